"""Composite reward (AsyncDiff Eq. 16) against hand computations."""

from __future__ import annotations

import math

import pytest
import torch

from rewards import Composite, combine
from rewards.base import RewardError, RewardModel
from rewards.stats import zscore


class Brightness(RewardModel):
    """Mean pixel value times a factor: scores known in closed form."""

    name = "brightness"

    def __init__(self, factor: float = 1.0, **kw):
        super().__init__(**kw)
        self.factor = factor

    def _load(self):
        pass

    def _score(self, pixels, prompts):
        return self.factor * pixels.mean(dim=(1, 2, 3))


class PromptLength(RewardModel):
    name = "prompt_length"

    def _load(self):
        pass

    def _score(self, pixels, prompts):
        return torch.tensor([float(len(p)) for p in prompts])


class NaNAt(RewardModel):
    name = "nan_at"

    def __init__(self, index: int, **kw):
        super().__init__(**kw)
        self.index = index
        self.seen = 0

    def _load(self):
        pass

    def _score(self, pixels, prompts):
        out = torch.arange(self.seen, self.seen + len(prompts), dtype=torch.float32)
        out[(out == self.index)] = float("nan")
        self.seen += len(prompts)
        return out


def test_zscore_by_hand():
    z = zscore(torch.tensor([1.0, 2.0, 3.0, 4.0]), eps=0.0)
    sd = math.sqrt(((1.5**2) * 2 + (0.5**2) * 2) / 4)  # population std = sqrt(1.25)
    torch.testing.assert_close(z, torch.tensor([-1.5, -0.5, 0.5, 1.5]) / sd)
    z_eps = zscore(torch.tensor([1.0, 2.0, 3.0, 4.0]), eps=0.5)
    torch.testing.assert_close(z_eps, torch.tensor([-1.5, -0.5, 0.5, 1.5]) / (sd + 0.5))


def test_zscore_degenerate_batches_give_zero():
    assert torch.equal(zscore(torch.tensor([3.7])), torch.zeros(1))
    assert torch.equal(zscore(torch.full((4,), 2.5)), torch.zeros(4))
    assert zscore(torch.zeros(0)).shape == (0,)


def test_combine_by_hand():
    a = torch.tensor([0.0, 1.0, 2.0])  # mean 1, population std sqrt(2/3)
    b = torch.tensor([10.0, 10.0, 40.0])  # mean 20, population std sqrt(200)
    out = combine({"a": a, "b": b}, {"a": 2.0, "b": -0.5}, eps=0.0)
    za = torch.tensor([-1.0, 0.0, 1.0]) / math.sqrt(2 / 3)
    zb = torch.tensor([-10.0, -10.0, 20.0]) / math.sqrt(200)
    torch.testing.assert_close(out.total, 2.0 * za - 0.5 * zb)
    torch.testing.assert_close(out.zscores["b"], zb)
    assert torch.equal(out.metrics["a"], a) and torch.equal(out.metrics["b"], b)


def test_composite_calls_rewards_and_combines(images, prompts):
    comp = Composite({"bright": 1.0, "len": 0.25},
                     rewards={"bright": Brightness(factor=3.0), "len": PromptLength(batch_size=2)})
    out = comp(images, prompts)
    bright = 3.0 * images.mean(dim=(1, 2, 3))
    length = torch.tensor([float(len(p)) for p in prompts])
    torch.testing.assert_close(out.metrics["bright"], bright)
    torch.testing.assert_close(out.metrics["len"], length)

    def z(x):
        return (x - x.mean()) / (x.std(unbiased=False) + 1e-6)

    torch.testing.assert_close(out.total, z(bright) + 0.25 * z(length), rtol=1e-5, atol=1e-5)
    assert out.total.shape == (5,)
    # Z-scoring makes the composite blind to a metric's scale and offset.
    comp2 = Composite({"bright": 1.0, "len": 0.25},
                      rewards={"bright": Brightness(factor=300.0), "len": PromptLength()})
    torch.testing.assert_close(comp2(images, prompts).total, out.total, rtol=1e-4, atol=1e-4)


def test_composite_refuses_nan_with_index(images, prompts):
    comp = Composite({"ok": 1.0, "bad": 1.0}, rewards={"ok": Brightness(), "bad": NaNAt(3, batch_size=2)})
    with pytest.raises(RewardError, match=r"'nan_at'.*images \[3\]"):
        comp(images, prompts)
    with pytest.raises(RewardError, match=r"'bad'.*images \[1\]"):
        combine({"bad": torch.tensor([0.0, float("inf"), 1.0])}, {"bad": 1.0})


def test_composite_input_errors(images, prompts):
    with pytest.raises(RewardError, match="unknown reward 'nope'.*known rewards"):
        Composite({"nope": 1.0})
    with pytest.raises(RewardError, match="finite"):
        Composite({"b": float("nan")}, rewards={"b": Brightness()})
    with pytest.raises(RewardError, match="5 images but 4 prompts"):
        Composite({"b": 1.0}, rewards={"b": Brightness()})(images, prompts[:4])
    with pytest.raises(RewardError, match="different numbers"):
        combine({"a": torch.zeros(3), "b": torch.zeros(2)}, {"a": 1.0, "b": 1.0})

