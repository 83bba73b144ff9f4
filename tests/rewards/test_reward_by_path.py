"""Rewards named by import path (package.module:Name), from the API, YAML and the command line."""

from __future__ import annotations

import sys
import textwrap

import pytest
import torch

import rewards
from rewards import RewardError

MODULE = textwrap.dedent('''
    import torch
    from rewards import RewardModel

    class Brightness(RewardModel):
        def __init__(self, scale=1.0, **kw):
            super().__init__(**kw)
            self.scale = scale
        def _load(self):
            pass
        def _score(self, pixels, prompts):
            return pixels.mean(dim=(1, 2, 3)) * self.scale

    def redness(images, prompts, offset=0.0):
        return images[:, 0].mean(dim=(1, 2)) + offset

    NOT_A_REWARD = 3
    class Plain:
        pass
''')


@pytest.fixture
def custom_module(tmp_path, monkeypatch):
    (tmp_path / "my_rewards_mod.py").write_text(MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "my_rewards_mod"
    sys.modules.pop("my_rewards_mod", None)


def test_import_path_rewards_score(custom_module, images, prompts):
    r = rewards.load(f"{custom_module}:Brightness", scale=2.0)
    assert torch.allclose(r(images, prompts), images.mean(dim=(1, 2, 3)) * 2.0)
    f = rewards.load(f"{custom_module}:redness", offset=1.0)
    assert torch.allclose(f(images, prompts), images[:, 0].mean(dim=(1, 2)) + 1.0)
    assert f.name == f"{custom_module}:redness"


@pytest.mark.parametrize("spec, message", [
    ("no_such_module_xyz:Thing", r"cannot import module 'no_such_module_xyz'"),
    ("{m}:Missing", r"has no attribute 'Missing'"),
    ("{m}:NOT_A_REWARD", r"is a int, not a reward"),
    ("{m}:Plain", r"is a type, not a reward"),
    ("{m}:", r"must read package.module:Name"),
])
def test_import_path_errors(custom_module, spec, message):
    with pytest.raises(RewardError, match=message):
        rewards.load(spec.format(m=custom_module))


def test_bad_options_name_the_reward(custom_module):
    with pytest.raises(RewardError, match=r"my_rewards_mod:Brightness': bad options \['colour'\]"):
        rewards.load(f"{custom_module}:Brightness", colour=1)


def test_import_path_in_yaml_and_on_the_command_line(custom_module, tmp_path, images, prompts):
    from tpm.app.train import build_reward, parse_args

    path = f"{custom_module}:Brightness"
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text(f"rewards: {{'{path}': 1.0}}\nreward_options: {{'{path}': {{scale: 3.0}}}}\n")
    cfg = parse_args(["--config", str(cfg_file)])
    assert cfg.rewards == {path: 1.0}
    reward = build_reward(cfg)
    metrics = reward.metrics(images, prompts)
    assert torch.allclose(metrics[path], images.mean(dim=(1, 2, 3)) * 3.0)
    # weights on the command line, with a registered reward beside it (z-scored sum, AsyncDiff Eq. 16)
    cfg = parse_args(["--rewards", f"{path}=0.5,{custom_module}:redness=0.5"])
    assert cfg.rewards == {path: 0.5, f"{custom_module}:redness": 0.5}
    total = build_reward(cfg).combine(build_reward(cfg).metrics(images, prompts))
    assert total.shape == (5,) and bool(torch.isfinite(torch.as_tensor(total)).all())
    # a broken path fails before any model loads, as one line
    from tpm.app.train import main

    with pytest.raises(SystemExit, match=r"error: reward 'nope_mod:X': cannot import module"):
        main(["--rewards", "nope_mod:X", "--output-dir", str(tmp_path / "o")])


def test_compare_takes_import_paths(custom_module):
    from rewards import parse_reward_spec

    assert parse_reward_spec(f"{custom_module}:Brightness:scale=2") == (f"{custom_module}:Brightness", {"scale": 2})
    assert parse_reward_spec("clipscore:device=cpu") == ("clipscore", {"device": "cpu"})
