"""Composite reward: a weighted sum of reward models, each z-scored within the batch.

AsyncDiff Eq. 16: every metric's scores are standardised over the batch (mean 0, std 1, with a
small eps in the denominator) before they are combined, so metrics on different scales weigh what
their weights say. The paper averages four metrics, i.e. weights 1/4 each; here the weights are
explicit. The composite relies only on the reward contract (``reward(images, prompts) -> (N,)``)
and refuses a non-finite score instead of propagating NaN into the advantages.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch

from rewards.base import ImageBatch, RewardError, check_finite, load, to_pixels
from rewards.stats import ZSCORE_EPS, zscore


@dataclass
class CompositeResult:
    """``total`` (N,): the combined reward; ``metrics``: name -> raw scores (N,);
    ``zscores``: name -> batch-standardised scores (N,)."""

    total: torch.Tensor
    metrics: dict[str, torch.Tensor]
    zscores: dict[str, torch.Tensor]


def combine(metrics: Mapping[str, torch.Tensor], weights: Mapping[str, float], eps: float = ZSCORE_EPS) -> CompositeResult:
    """Pure maths of Eq. 16: ``total = sum_i w_i * zscore(S_i)``; raises on a non-finite score."""
    missing = set(weights) - set(metrics)
    if missing:
        raise RewardError(f"no scores for metrics {sorted(missing)}")
    raw = {name: metrics[name].detach().float().cpu().reshape(-1) for name in weights}
    sizes = {name: s.numel() for name, s in raw.items()}
    if len(set(sizes.values())) > 1:
        raise RewardError(f"metrics scored different numbers of images: {sizes}")
    for name, s in raw.items():
        check_finite(s, name)
    z = {name: zscore(s, eps) for name, s in raw.items()}
    n = next(iter(sizes.values()), 0)
    total = torch.zeros(n, dtype=torch.float64)
    for name, w in weights.items():
        total += float(w) * z[name].double()
    return CompositeResult(total=total.float(), metrics=raw, zscores=z)


class Composite:
    """A weighted, batch-z-scored sum of rewards (AsyncDiff Eq. 16).

    ``weights``: reward name -> weight, e.g. ``{"imagereward": 1.0, "hpsv2": 1.0}``;
    ``rewards``: already-built rewards by name (any callable with the reward contract); names not
    given are built with ``rewards.load(name, **options.get(name, {}))``; ``eps``: z-score eps.
    """

    def __init__(self, weights: Mapping[str, float], rewards: Mapping[str, Callable] | None = None,
                 options: Mapping[str, dict] | None = None, eps: float = ZSCORE_EPS):
        if not weights:
            raise RewardError("Composite needs at least one reward weight")
        bad = {k: w for k, w in weights.items() if not math.isfinite(float(w))}
        if bad:
            raise RewardError(f"Composite weights must be finite numbers, got {bad}")
        self.weights = {k: float(w) for k, w in weights.items()}
        self.eps = eps
        given = dict(rewards or {})
        options = dict(options or {})
        unknown = set(options) - set(self.weights)
        if unknown:
            raise RewardError(f"options given for rewards {sorted(unknown)} that have no weight")
        self.rewards = {name: given[name] if name in given else load(name, **options.get(name, {}))
                        for name in self.weights}

    def __call__(self, images: ImageBatch, prompts: Sequence[str] | str) -> CompositeResult:
        pixels = to_pixels(images)  # convert once, shared by every metric
        metrics = {name: reward(pixels, prompts) for name, reward in self.rewards.items()}
        return combine(metrics, self.weights, self.eps)
