"""End to end: the GRPO recipe under ``accelerate launch`` on a tiny testbed Flux, exported and reloaded."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import policies
import tpm
from tpm.app.train import parse_args

ROOT = Path(__file__).resolve().parents[2]

SMALL = """
policy_options: {width: 16, heads: 2, layers: 1, text_tokens: 2, patch: 4, token_offsets: false}
warm_start: {policy: shifted_grid, shift: 2.0}
warm_start_prompts: 4
warm_start_iterations: 5
baselines: {"shifted grid": {policy: shifted_grid, shift: 2.0}}
reference_steps: 4
grpo:
  group_size: 2
  batch_size: 4
  rollout_batch_size: 2  # = the share of each of 2 processes, so that their rollouts batch as one process's do
  minibatch_size: 2
  num_inference_steps: 3
  eval_prompts: 3  # odd: the evaluation pads its split over 2 processes
  keep_best: false  # export the trained weights, not possibly the starting ones
  save_every: 1
  progress: false
"""


def test_recipe_parses_yaml_and_flags(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text(SMALL)
    cfg = parse_args(["--config", str(cfg_file), "--max-iterations", "7", "--rewards", "testbed,clipscore",
                      "--output-dir", "x", "--resume"])
    assert cfg.grpo.group_size == 2 and cfg.grpo.max_iterations == 7 and cfg.grpo.resume
    assert cfg.rewards == {"testbed": 0.5, "clipscore": 0.5} and cfg.policy_options["width"] == 16
    assert cfg.warm_start == {"policy": "shifted_grid", "shift": 2.0} and cfg.reference_steps == 4
    cfg_file.write_text("grpo: {group_sise: 2}\n")
    with pytest.raises(ValueError, match="unknown key grpo.group_sise"):
        parse_args(["--config", str(cfg_file)])


def _launch(tmp_path, model, out, processes, *extra, script=None, pythonpath=()):
    """The recipe under ``accelerate launch``: one process, or N real CPU processes (``--multi_gpu`` starts
    them with torchrun; without a visible GPU tpm runs them on the CPU with gloo)."""
    cfg_file = tmp_path / "small.yaml"
    cfg_file.write_text(SMALL)
    how = ["--cpu"] if processes == 1 else ["--multi_gpu", "--main_process_port", "0"]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *how, "--num_processes", str(processes),
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           str(script or ROOT / "recipes" / "grpo_flux.py"), "--config", str(cfg_file), "--model", str(model),
           "--output-dir", str(out), "--max-iterations", "2", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(ROOT), *map(str, pythonpath)]),
           "CUDA_VISIBLE_DEVICES": ""}
    env.pop("ACCELERATE_USE_CPU", None)
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


# A reward that varies with every action (the testbed verifier's scores tie within a group of this untrained
# model, which leaves every advantage 0 and nothing to compare).
BRIGHTNESS = """
def brightness(images, prompts):
    return images.mean(dim=(1, 2, 3))
"""


@pytest.fixture(scope="module")
def launched(tmp_path_factory, testbed_flux):
    """``launched(name, processes)``: (completed process, run folder) of the small recipe run on the brightness
    reward, launched once per module."""
    runs = {}
    lib = tmp_path_factory.mktemp("lib")
    (lib / "brightness_reward.py").write_text(BRIGHTNESS)

    def get(name, processes, *extra, script=None):
        if name not in runs:
            tmp = tmp_path_factory.mktemp(name)
            out = tmp / "run"
            runs[name] = (_launch(tmp, testbed_flux, out, processes, "--rewards", "brightness_reward:brightness",
                                  *extra, script=script, pythonpath=[lib]), out)
        return runs[name]

    return get


@pytest.mark.slow
@pytest.mark.parametrize("processes", [1, 2])
def test_recipe_under_accelerate_launch(launched, testbed_flux, processes):
    proc, out = launched(f"p{processes}", processes)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Held-out reward" in proc.stdout and str(out / "policy") in proc.stdout
    assert (out / "report.md").is_file() and (out / "report.png").is_file()
    run = json.loads((out / "run.json").read_text())
    assert run["iterations"] == 2 and "brightness_reward:brightness" in run["final_eval"]
    assert run["processes"] == processes  # counted inside the run: the launch really started them
    assert (out / "checkpoints" / "checkpoint-000002" / "policy" / "model.safetensors").is_file()
    assert any((out / "logs").rglob("events.out.tfevents*"))
    policy = policies.load(str(out / "policy"))
    assert isinstance(policy, policies.FieldPolicy)
    report = (out / "report.md").read_text()
    assert all(row in report for row in ("synchronous, 3 steps", "synchronous, 4 steps", "shifted grid, 3 steps",
                                         "policy before training", "policy after training"))
    from tpm.testbed.models import load_pipeline

    pipe = load_pipeline(testbed_flux)
    images = tpm.sample(pipe, ["a red circle"], policy=policy, num_inference_steps=3, output_type="pt").images
    assert images.shape[0] == 1 and bool(torch.isfinite(images).all())


NO_ALL_REDUCE = """
from tpm.grpo.trainer import GRPOTrainer
from tpm.app.train import main

GRPOTrainer._reduce_gradients = lambda self: None  # each process steps on its own share of the gradient
main(defaults="grpo_flux")
"""


def _weights(out):
    from safetensors.torch import load_file

    return load_file(str(out / "policy" / "model.safetensors"))


@pytest.mark.slow
def test_two_processes_train_the_one_process_policy(launched, tmp_path):
    # 4 samples in 2 groups over 2 processes, minibatches of 2 that often span both: the update must be
    # the 1-process update (same draws, gathered advantages, summed gradients) up to float summation order
    (one, out1), (two, out2) = launched("p1", 1), launched("p2", 2)
    assert one.returncode == 0, one.stderr[-3000:]
    assert two.returncode == 0, two.stderr[-3000:]
    runs = [json.loads((o / "run.json").read_text()) for o in (out1, out2)]
    assert [r["processes"] for r in runs] == [1, 2]
    a, b = _weights(out1), _weights(out2)
    diff = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert diff <= 1e-4, diff
    # the preset keeps a weight average (ema_decay), which is what both runs exported; the raw weights of the
    # last checkpoint must agree as well
    from safetensors.torch import load_file

    def raw(out, it=2):
        return load_file(str(out / "checkpoints" / f"checkpoint-{it:06d}" / "policy" / "model.safetensors"))

    ema = [load_file(str(o / "checkpoints" / "checkpoint-000002" / "ema_policy.safetensors")) for o in (out1, out2)]
    assert all(torch.equal(ema[0][k], a[k]) for k in a) and all(torch.equal(ema[1][k], b[k]) for k in b)
    ra = raw(out1)
    rdiff = max(float((ra[k] - v).abs().max()) for k, v in raw(out2).items())
    assert rdiff <= 1e-4, rdiff
    # ... while the second iteration's update alone moved the weights far more
    first = raw(out1, 1)
    assert max(float((ra[k] - first[k]).abs().max()) for k in ra) > 100 * max(rdiff, 1e-6)
    # the evaluation split: 3 prompts over 2 processes (one padded), scored as one process scores them
    name = "brightness_reward:brightness"
    assert runs[1]["final_eval"][name] == pytest.approx(runs[0]["final_eval"][name], abs=1e-6)
    # without the gradient all-reduce each process would follow its own share of the batch
    script = tmp_path / "no_all_reduce.py"
    script.write_text(NO_ALL_REDUCE)
    alone, out3 = launched("p2_no_reduce", 2, script=script)
    assert alone.returncode == 0, alone.stderr[-3000:]
    rc = raw(out3)
    assert max(float((ra[k] - rc[k]).abs().max()) for k in ra) > 100 * max(rdiff, 1e-6)


@pytest.mark.slow
def test_prompt_cache_leaves_the_trained_policy_unchanged(launched):
    (plain, out1), (cached, out2) = launched("p1", 1), launched("p1_cache", 1, "--prompt-cache")
    assert plain.returncode == 0 and cached.returncode == 0, cached.stderr[-3000:]
    assert "prompt cache: " in cached.stdout and "text_encoder_2 moved off the device" in cached.stdout
    assert (out2 / "prompt_cache.safetensors").is_file()
    a, b = _weights(out1), _weights(out2)
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-5


CUSTOM_REWARD = """
def brightness(images, prompts):
    return images.mean(dim=(1, 2, 3))
"""


@pytest.mark.slow
def test_tpm_train_outside_the_repo(tmp_path, testbed_flux):
    # `tpm train` from another folder: the preset comes from the package, the reward by import path,
    # the prompts from a flow_grpo-style folder (train.txt / test.txt)
    work = tmp_path / "elsewhere"
    (work / "dataset" / "shapes").mkdir(parents=True)
    (work / "dataset" / "shapes" / "train.txt").write_text("a red circle\na blue square\n")
    (work / "dataset" / "shapes" / "test.txt").write_text("a green triangle\n")
    (work / "my_reward.py").write_text(CUSTOM_REWARD)
    cfg_file = tmp_path / "small.yaml"
    cfg_file.write_text(SMALL)
    cmd = [sys.executable, "-m", "tpm", "train", "--config", str(cfg_file), "--model", str(testbed_flux),
           "--output-dir", "run", "--max-iterations", "2", "--rewards", "my_reward:brightness",
           "--train-prompts", "dataset/shapes", "--eval-prompts", "dataset/shapes", "--report-to", "none"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(ROOT), str(work)])}
    proc = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = json.loads((work / "run" / "run.json").read_text())
    assert run["iterations"] == 2 and "my_reward:brightness" in run["final_eval"]
    assert (work / "run" / "config.yaml").is_file() and (work / "run" / "report.md").is_file()
    # the same again is refused (another run is there), in one line, and nothing is lost
    again = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 1 and again.stderr.strip().splitlines() == [
        "error: run holds another run; pass --resume to continue it, --overwrite to replace it, or choose "
        "another --output-dir"]
    assert json.loads((work / "run" / "run.json").read_text()) == run


@pytest.mark.slow
def test_the_wheel_ships_the_presets(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(tmp_path), str(ROOT)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    import zipfile

    from tpm.app.recipe import available_presets

    (wheel,) = tmp_path.glob("tpm-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {f"tpm/presets/{p}.yaml" for p in available_presets()} <= names
    assert {"tpm/__main__.py", "tpm/app/train.py", "tpm/tiny.py"} <= names
