"""Group-relative advantages (GRPO; AsyncDiff §3.3 and §4.1): pure functions on tensors.

This is the one implementation of the formula; the rewards package z-scores metrics
(``rewards.stats.zscore``) but computes no advantages.
"""

from __future__ import annotations

import torch

BASELINES = ("group", "james_stein")


def shrunk_group_means(g: torch.Tensor) -> torch.Tensor:
    """(m, 1) per-group baselines: the group means shrunk toward the batch mean (positive-part James-Stein).

    With m groups of G rewards, the noise variance of a group mean is estimated from the pooled
    within-group variance (s^2 / G) and the spread of the group means around the batch mean is S; the
    means move toward the batch mean by ``min(1, (m - 3) (s^2 / G) / S)``. When prompts differ little
    (S about (m - 1) s^2 / G) the baseline borrows the whole batch's samples, which lowers the policy
    gradient's variance; when they differ a lot it stays each prompt's own mean. Fewer than 4 groups: no
    shrinkage (the estimator needs m > 3)."""
    m, size = g.shape
    mean = g.mean(dim=1, keepdim=True)
    if m < 4 or size < 2:
        return mean
    noise = g.var(dim=1, unbiased=True).mean() / size
    spread = (mean - mean.mean()).pow(2).sum()
    factor = torch.clamp((m - 3) * noise / spread.clamp(min=1e-30), max=1.0)
    return mean.mean() + (1 - factor) * (mean - mean.mean())


def group_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-4, scale: str = "group",
                     baseline: str = "group") -> torch.Tensor:
    """``(R - b_g) / (std + eps)`` for a batch laid out as consecutive groups of ``group_size``.

    ``baseline="group"`` (GRPO): b_g is the group's mean; ``"james_stein"``: the group means shrunk toward
    the batch mean (:func:`shrunk_group_means`), the per-prompt baselines of instance-level schedule RL.

    rewards: (N,), N a multiple of ``group_size``. ``scale="group"`` (GRPO, AsyncDiff Eq. 13): std is
    each group's own population std, so every group weighs the same however little its rewards
    differ. ``scale="batch"``: one std, of all group-centred rewards of the batch, so a group weighs in
    proportion to how much its samples' rewards differ (groups that differ by one rare flip of a
    discrete reward are not blown up to unit scale). A group whose samples scored the same gets
    advantages 0 either way. Computed in float64, returned float32.
    """
    if scale not in ("group", "batch"):
        raise ValueError(f"scale must be 'group' or 'batch', got {scale!r}")
    if baseline not in BASELINES:
        raise ValueError(f"baseline must be one of {BASELINES}, got {baseline!r}")
    r = rewards.detach().double().reshape(-1)
    if group_size < 1 or r.numel() % group_size:
        raise ValueError(f"{r.numel()} rewards cannot be split into groups of {group_size}")
    g = r.view(-1, group_size)
    mean = g.mean(dim=1, keepdim=True)
    if scale == "group":
        std = g.std(dim=1, unbiased=False, keepdim=True)
    else:
        std = (g - mean).pow(2).mean().sqrt()
    base = mean if baseline == "group" else shrunk_group_means(g)
    return ((g - base) / (std + eps)).reshape(-1).float()


def advantage_stats(adv: torch.Tensor) -> dict[str, float]:
    """Mean / std / min / max of advantages, for logging."""
    a = adv.detach().float()
    return {"adv/mean": float(a.mean()), "adv/std": float(a.std(unbiased=False)),
            "adv/min": float(a.min()), "adv/max": float(a.max())}
