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
from tpm.train import parse_args

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
  rollout_batch_size: 4
  minibatch_size: 2
  num_inference_steps: 3
  eval_prompts: 2
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


@pytest.fixture(scope="module")
def testbed_flux(tmp_path_factory):
    from tpm.testbed.models import TestbedModelConfig, build_pipeline, save_pipeline

    cfg = TestbedModelConfig(backbone="flux", vae_channels=(8, 8), latent_channels=4, text_dim=16, t5_dim=32,
                             num_heads=2, head_dim=16, num_layers=1, num_single_layers=1, text_layers=1)
    path = tmp_path_factory.mktemp("tb") / "flux"
    save_pipeline(build_pipeline(cfg), path, cfg, dtype=torch.float32)
    return path


def _launch(tmp_path, model, out, processes, *extra):
    cfg_file = tmp_path / "small.yaml"
    cfg_file.write_text(SMALL)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", str(processes),
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           str(ROOT / "recipes" / "grpo_flux.py"), "--config", str(cfg_file), "--model", str(model),
           "--output-dir", str(out), "--max-iterations", "2", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
@pytest.mark.parametrize("processes", [1, 2])
def test_recipe_under_accelerate_launch(tmp_path, testbed_flux, processes):
    out = tmp_path / "run"
    proc = _launch(tmp_path, testbed_flux, out, processes)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Held-out reward" in proc.stdout and str(out / "policy") in proc.stdout
    assert (out / "report.md").is_file() and (out / "report.png").is_file()
    run = json.loads((out / "run.json").read_text())
    assert run["iterations"] == 2 and "testbed" in run["final_eval"]
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
    cmd = [sys.executable, "-m", "tpm.cli", "train", "--config", str(cfg_file), "--model", str(testbed_flux),
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

    from tpm.recipe import available_presets

    (wheel,) = tmp_path.glob("tpm-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {f"tpm/presets/{p}.yaml" for p in available_presets()} <= names
