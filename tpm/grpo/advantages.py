"""Group-relative advantages (GRPO; AsyncDiff §3.3 and §4.1): pure functions on tensors.

This is the one implementation of the formula; the rewards package z-scores metrics
(``rewards.stats.zscore``) but computes no advantages.
"""

from __future__ import annotations

import torch


def group_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-4, scale: str = "group") -> torch.Tensor:
    """``(R - mean_g) / (std + eps)`` for a batch laid out as consecutive groups of ``group_size``.

    rewards: (N,), N a multiple of ``group_size``. ``scale="group"`` (GRPO, AsyncDiff Eq. 13): std is
    each group's own population std, so every group weighs the same however little its rewards
    differ. ``scale="batch"``: one std, of all group-centred rewards of the batch, so a group weighs in
    proportion to how much its samples' rewards differ (groups that differ by one rare flip of a
    discrete reward are not blown up to unit scale). A group whose samples scored the same gets
    advantages 0 either way. Computed in float64, returned float32.
    """
    if scale not in ("group", "batch"):
        raise ValueError(f"scale must be 'group' or 'batch', got {scale!r}")
    r = rewards.detach().double().reshape(-1)
    if group_size < 1 or r.numel() % group_size:
        raise ValueError(f"{r.numel()} rewards cannot be split into groups of {group_size}")
    g = r.view(-1, group_size)
    mean = g.mean(dim=1, keepdim=True)
    if scale == "group":
        std = g.std(dim=1, unbiased=False, keepdim=True)
    else:
        std = (g - mean).pow(2).mean().sqrt()
    return ((g - mean) / (std + eps)).reshape(-1).float()


def advantage_stats(adv: torch.Tensor) -> dict[str, float]:
    """Mean / std / min / max of advantages, for logging."""
    a = adv.detach().float()
    return {"adv/mean": float(a.mean()), "adv/std": float(a.std(unbiased=False)),
            "adv/min": float(a.min()), "adv/max": float(a.max())}
