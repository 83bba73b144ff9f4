"""trl's GRPOConfig names and a trl-style reward function, from a YAML file through ``tpm train``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import rewards
from tpm.app.recipe import parse_args
from tpm.typed_config import ConfigError

ROOT = Path(__file__).resolve().parents[2]

# What a trl user writes: flat keys, trl's names.
TRL_YAML = """
num_generations: 2
beta: 0.01
epsilon: 0.3
scale_rewards: batch
learning_rate: 1.0e-3
seed: 3
report_to: none
policy: tpm
warm_start: null
policy_options: {width: 16, heads: 2, layers: 1, text_tokens: 2}
reference_steps: 3
grpo:
  batch_size: 4
  rollout_batch_size: 4
  minibatch_size: 2
  num_inference_steps: 3
  eval_prompts: 2
  progress: false
"""

# A reward function written for trl's GRPOTrainer: prompts and completions in, a list of floats out.
TRL_REWARD = """
import numpy as np

def brightness(prompts, completions, **kwargs):
    return [float(np.asarray(image, dtype=np.float32).mean() / 255.0) for image in completions]
"""


def test_trl_names_read_as_ours_and_say_so(tmp_path, capsys):
    (tmp_path / "trl.yaml").write_text(TRL_YAML + "output_dir: somewhere\n")
    cfg = parse_args(["--config", str(tmp_path / "trl.yaml")])
    g = cfg.grpo
    assert (g.group_size, g.kl_coef, g.clip_eps, g.advantage_scale) == (2, 0.01, 0.3, "batch")
    assert (g.learning_rate, g.seed, g.report_to, g.output_dir) == (1e-3, 3, "none", "somewhere")
    err = capsys.readouterr().err
    assert "trl's num_generations is grpo.group_size here" in err and "trl's beta is grpo.kl_coef here" in err
    cfg = parse_args(["--num-generations", "4", "--beta", "0.5", "--epsilon", "0.1", "--scale-rewards", "true"])
    assert (cfg.grpo.group_size, cfg.grpo.kl_coef, cfg.grpo.clip_eps, cfg.grpo.advantage_scale) == (4, 0.5, 0.1, "group")
    assert "command line: trl's epsilon is grpo.clip_eps here" in capsys.readouterr().err


def test_trl_names_that_mean_something_else_are_refused(tmp_path):
    (tmp_path / "a.yaml").write_text("scale_rewards: none\n")
    with pytest.raises(ConfigError, match="scale_rewards: none"):
        parse_args(["--config", str(tmp_path / "a.yaml")])
    (tmp_path / "b.yaml").write_text("beta: 0.1\ngrpo: {kl_coef: 0.2}\n")
    with pytest.raises(ConfigError, match="beta and grpo.kl_coef are the same setting"):
        parse_args(["--config", str(tmp_path / "b.yaml")])


def test_a_trl_reward_function_scores_pil_completions(tmp_path, monkeypatch):
    (tmp_path / "trl_reward.py").write_text(TRL_REWARD)
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        reward = rewards.load("trl_reward:brightness")
        images = torch.rand(3, 3, 8, 8)
        scores = reward(images, ["a", "b", "c"])
        # 8-bit PIL images, as a trl user's function would see them
        expected = (images * 255).round().clamp(0, 255).mean(dim=(1, 2, 3)) / 255
        torch.testing.assert_close(scores, expected, atol=1e-3, rtol=0)
    finally:
        sys.modules.pop("trl_reward", None)


@pytest.mark.slow
def test_tpm_train_runs_a_trl_config_and_reward(tmp_path, testbed_flux):
    (tmp_path / "trl.yaml").write_text(TRL_YAML)
    (tmp_path / "trl_reward.py").write_text(TRL_REWARD)
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "tpm", "train", "--config", str(tmp_path / "trl.yaml"), "--model", str(testbed_flux),
           "--rewards", "trl_reward:brightness", "--output-dir", str(out), "--max-iterations", "2",
           "--train-prompts", "testbed:train", "--eval-prompts", "testbed:val"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(ROOT), str(tmp_path)])}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "trl's num_generations is grpo.group_size here" in proc.stderr
    run = json.loads((out / "run.json").read_text())
    assert run["iterations"] == 2 and "trl_reward:brightness" in run["final_eval"]
    assert run["config"]["group_size"] == 2 and run["config"]["kl_coef"] == 0.01
