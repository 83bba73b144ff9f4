"""The reward contract's own checks: input validation, registry, NaN reporting."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import rewards
from rewards.base import RewardError, RewardModel, to_pil_images, to_pixels, to_uint8


class Const(RewardModel):
    name = "const"

    def __init__(self, values, **kw):
        super().__init__(**kw)
        self.values = torch.tensor(values, dtype=torch.float32)
        self.calls = []

    def _load(self):
        pass

    def _score(self, pixels, prompts):
        self.calls.append(len(prompts))
        start = sum(self.calls[:-1])
        return self.values[start:start + len(prompts)]


def test_registry_names_and_unknown():
    names = set(rewards.registered_rewards())
    assert {"clipscore", "hpsv2", "pickscore", "imagereward", "remote"} <= names
    with pytest.raises(RewardError, match=r"unknown reward 'hps'.*'hpsv2'"):
        rewards.load("hps")


def test_count_mismatch_and_bad_images():
    r = Const([1.0, 2.0])
    with pytest.raises(RewardError, match="2 images but 3 prompts"):
        r(torch.rand(2, 3, 8, 8), ["a", "b", "c"])
    with pytest.raises(RewardError, match=r"\(N, 3, H, W\)"):
        r(torch.rand(2, 4, 8, 8), ["a", "b"])
    with pytest.raises(RewardError, match="different sizes"):
        r([Image.new("RGB", (8, 8)), Image.new("RGB", (9, 8))], ["a", "b"])
    assert r.calls == []  # nothing was scored


def test_internal_batching_and_nan_index():
    r = Const([0.0, 1.0, 2.0, float("nan"), 4.0], batch_size=2)
    with pytest.raises(RewardError, match=r"images \[3\]"):
        r(torch.rand(5, 3, 8, 8), list("abcde"))
    assert r.calls == [2, 2, 1]
    r2 = Const([0.0, 1.0, 2.0, float("nan"), 4.0], batch_size=2)
    raw = r2.raw_scores(torch.rand(5, 3, 8, 8), list("abcde"))
    assert torch.isnan(raw[3]) and raw.shape == (5,)


def test_wrong_score_count_is_reported():
    class Short(Const):
        def _score(self, pixels, prompts):
            return torch.zeros(len(prompts) - 1)

    with pytest.raises(RewardError, match="returned 1 scores for a batch of 2"):
        Short([0.0])(torch.rand(2, 3, 8, 8), ["a", "b"])


def test_8bit_conversion_round_trips():
    """Scorers see the 8-bit image: rounding to nearest, and PIL input -> same pixels as its tensor."""
    x = torch.tensor([0.0, 0.5 / 255 - 1e-4, 0.5 / 255 + 1e-4, 1.0, 1.7, -0.2]).view(1, 1, 1, 6).expand(1, 3, 1, 6)
    assert to_uint8(x)[0, 0, 0].tolist() == [0, 0, 1, 255, 255, 0]
    y = torch.rand(2, 3, 5, 7)
    pil = to_pil_images(y)
    assert [im.size for im in pil] == [(7, 5), (7, 5)] and pil[0].mode == "RGB"
    assert torch.equal(torch.from_numpy(np.array(pil[1])).permute(2, 0, 1), to_uint8(y)[1])
    torch.testing.assert_close(to_pixels(pil), to_uint8(y).float() / 255, rtol=0, atol=1e-7)
