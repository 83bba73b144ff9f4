"""Run folders: the exclusive lock, overwrite that keeps the old run until the new one has started,
resume that refuses a changed config, and checkpoint pruning that survives a kill."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from tpm.grpo import GRPOConfig, GRPOConfigError, GRPOTrainer
from tpm.grpo import checkpoint as ckpt

from .conftest import PROMPTS, brightness, small_tpm


def make_trainer(pipe, out, reward=brightness, **overrides):
    opts = dict(output_dir=str(out), max_iterations=2, group_size=2, batch_size=4, rollout_batch_size=4,
                minibatch_size=2, num_inference_steps=2, height=32, width=32, learning_rate=1e-2, save_every=1,
                eval_prompts=0, progress=False, report_to="none")
    opts.update(overrides)
    return GRPOTrainer(GRPOConfig(**opts), small_tpm(pipe), pipe, reward, PROMPTS)


def checkpoints(out) -> list[str]:
    return sorted(d for d in os.listdir(os.path.join(out, "checkpoints")) if not d.startswith("."))


def test_lock_refuses_a_second_process(tmp_path):
    out = tmp_path / "run"
    ckpt.acquire_lock(str(out))
    try:
        code = textwrap.dedent(f"""
            from tpm.grpo import checkpoint as ckpt
            try:
                ckpt.acquire_lock({str(out)!r})
            except ValueError as e:
                print("REFUSED", e)
        """)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
        assert "REFUSED" in proc.stdout and "in use by another training process" in proc.stdout, proc.stderr
        ckpt.acquire_lock(str(out))  # re-entrant in the holding process
        ckpt.release_lock(str(out))
    finally:
        ckpt.release_lock(str(out))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert "REFUSED" not in proc.stdout, proc.stdout  # free again once released


def test_overwrite_keeps_the_old_run_when_the_new_one_fails(flux_pipe, tmp_path):
    out = tmp_path / "run"
    make_trainer(flux_pipe, out, max_iterations=1).train()
    old = (out / "policy" / "model.safetensors").read_bytes()

    def broken(images, prompts):
        raise ValueError("prompt outside the grammar")

    with pytest.raises(ValueError, match="outside the grammar"):
        make_trainer(flux_pipe, out, reward=broken, overwrite=True).train()
    assert (out / "policy" / "model.safetensors").read_bytes() == old  # the old run is back, whole
    assert checkpoints(out) == ["checkpoint-000001"] and not (out / ckpt.PREVIOUS).exists()
    # a new run that completes its first iteration replaces it, and the old one is deleted
    again = make_trainer(flux_pipe, out, overwrite=True, max_iterations=2).train()
    assert again.iterations == 2 and checkpoints(out) == ["checkpoint-000001", "checkpoint-000002"]
    assert not (out / ckpt.PREVIOUS).exists()
    assert (out / "policy" / "model.safetensors").read_bytes() != old


def test_overwrite_moves_aside_until_the_first_iteration(flux_pipe, tmp_path):
    out = tmp_path / "run"
    make_trainer(flux_pipe, out, max_iterations=1).train()
    seen = []

    def watching(images, prompts):  # the reward of the new run's first iteration: the old run is aside, kept
        seen.append(sorted(os.listdir(out / ckpt.PREVIOUS)))
        return brightness(images, prompts)

    make_trainer(flux_pipe, out, reward=watching, overwrite=True, max_iterations=1).train()
    assert seen and "checkpoints" in seen[0] and "policy" in seen[0]
    assert not (out / ckpt.PREVIOUS).exists()


def test_resume_refuses_a_changed_config(flux_pipe, tmp_path, capsys):
    out = tmp_path / "run"
    make_trainer(flux_pipe, out, max_iterations=1).train()
    for change in ({"learning_rate": 5e-3}, {"group_size": 4}):
        with pytest.raises(GRPOConfigError, match=f"differs from the checkpoint's.*{next(iter(change))}") as info:
            make_trainer(flux_pipe, out, max_iterations=2, resume="latest", **change).train()
        assert "--accept-config-changes" in str(info.value)
    assert checkpoints(out) == ["checkpoint-000001"]  # nothing written by the refused runs
    capsys.readouterr()
    res = make_trainer(flux_pipe, out, max_iterations=2, resume="latest", learning_rate=5e-3,
                       accept_config_changes=True).train()
    printed = capsys.readouterr().out
    assert res.iterations == 2
    assert f"resumed from {out / 'checkpoints' / 'checkpoint-000001'} at iteration 1 of 2" in printed
    assert "learning_rate 0.01 -> 0.005" in printed
    # the fields that decide only how long / how visibly a run goes may change freely; a path works too
    res = make_trainer(flux_pipe, out, max_iterations=3, resume=str(out / "checkpoints" / "checkpoint-000002"),
                       learning_rate=5e-3, save_every=2, keep_checkpoints=3).train()
    assert res.iterations == 3


def test_resume_refuses_a_changed_recipe(tmp_path):
    from tpm.app.train import check_resume, parse_args

    out = tmp_path / "run"
    state = tmp_path / "run" / "checkpoints" / "checkpoint-000001"
    state.mkdir(parents=True)
    cfg = parse_args(["--output-dir", str(out)])
    from tpm.app.train import run_config

    saved = {"config": cfg.grpo.to_dict(), "run_config": run_config(cfg), "iteration": 1}
    import json

    (state / ckpt.STATE_FILE).write_text(json.dumps(saved))
    check_resume(parse_args(["--output-dir", str(out), "--resume", "--max-iterations", "900"]))  # allowed change
    with pytest.raises(GRPOConfigError, match=r"run.rewards: \{'testbed': 1.0\} -> \{'testbed': 2.0\}"):
        check_resume(parse_args(["--output-dir", str(out), "--resume", "--rewards", "testbed=2"]))
    with pytest.raises(GRPOConfigError, match=r"learning_rate: 0.0003 -> 0.0001"):
        check_resume(parse_args(["--output-dir", str(out), "--resume", "--learning-rate", "1e-4"]))
    check_resume(parse_args(["--output-dir", str(out), "--resume", "--learning-rate", "1e-4",
                             "--accept-config-changes"]))


def test_pruning_after_a_kill_between_rename_and_prune(flux_pipe, tmp_path, monkeypatch):
    out = tmp_path / "run"
    make_trainer(flux_pipe, out, max_iterations=2, keep_checkpoints=2).train()
    assert checkpoints(out) == ["checkpoint-000001", "checkpoint-000002"]

    real, calls = ckpt.prune_checkpoints, []

    def killed(*args, **kwargs):  # the start's prune runs; the process dies right after the save's rename
        calls.append(args)
        if len(calls) > 1:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(ckpt, "prune_checkpoints", killed)
    with pytest.raises(KeyboardInterrupt):
        make_trainer(flux_pipe, out, max_iterations=3, keep_checkpoints=2, resume="latest").train()
    assert checkpoints(out) == ["checkpoint-000001", "checkpoint-000002", "checkpoint-000003"]  # one too many
    monkeypatch.undo()
    # the kill came after the run's last checkpoint: resuming saves nothing more, the start prunes
    res = make_trainer(flux_pipe, out, max_iterations=3, keep_checkpoints=2, resume="latest").train()
    assert res.iterations == 3 and checkpoints(out) == ["checkpoint-000002", "checkpoint-000003"]
    # and with a further save
    make_trainer(flux_pipe, out, max_iterations=4, keep_checkpoints=2, resume="latest").train()
    assert checkpoints(out) == ["checkpoint-000003", "checkpoint-000004"]


def test_interrupted_prune_leaves_no_half_checkpoint(tmp_path, monkeypatch):
    root = tmp_path / "checkpoints"
    for i in (1, 2, 3):
        (root / f"checkpoint-{i:06d}" / "policy").mkdir(parents=True)
        (root / f"checkpoint-{i:06d}" / ckpt.STATE_FILE).write_text("{}")
    import shutil

    def dies(path, *a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(shutil, "rmtree", dies)
    with pytest.raises(KeyboardInterrupt):
        ckpt.prune_checkpoints(str(tmp_path), keep=2)
    monkeypatch.undo()
    # the old one was renamed out of the checkpoint names before its deletion began
    assert checkpoints(tmp_path) == ["checkpoint-000002", "checkpoint-000003"]
    assert ckpt.latest_checkpoint(str(tmp_path)).endswith("checkpoint-000003")
    ckpt.prune_checkpoints(str(tmp_path), keep=2)
    assert sorted(os.listdir(root)) == ["checkpoint-000002", "checkpoint-000003"]  # the leftover is gone


def test_a_killed_overwrite_is_undone_at_the_next_start(flux_pipe, tmp_path):
    out = tmp_path / "run"
    make_trainer(flux_pipe, out, max_iterations=1).train()
    old = (out / "policy" / "model.safetensors").read_bytes()
    ckpt.set_aside(str(out))  # what --overwrite does before a kill -9 in its first iteration
    (out / "logs").mkdir()  # ... and the new run's first files
    with pytest.raises(GRPOConfigError, match="holds another run"):  # the old run is back, so it is protected
        make_trainer(flux_pipe, out, max_iterations=1).train()
    assert (out / "policy" / "model.safetensors").read_bytes() == old and not (out / ckpt.PREVIOUS).exists()
