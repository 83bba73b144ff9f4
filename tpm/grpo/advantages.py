"""Group-relative advantages (GRPO; AsyncDiff §3.3 and §4.1): pure functions on tensors.

This is the one implementation of the formula; ``rewards.stats`` uses it too (rewards may import
tpm, not the other way round).
"""

from __future__ import annotations

import torch


def group_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-4) -> torch.Tensor:
    """``(R - mean_g) / (std_g + eps)`` for a batch laid out as consecutive groups of ``group_size``.

    rewards: (N,), N a multiple of ``group_size``; population std within a group (a group whose
    samples scored the same gets advantages 0). Computed in float64, returned float32.
    """
    r = rewards.detach().double().reshape(-1)
    if group_size < 1 or r.numel() % group_size:
        raise ValueError(f"{r.numel()} rewards cannot be split into groups of {group_size}")
    g = r.view(-1, group_size)
    mean = g.mean(dim=1, keepdim=True)
    std = g.std(dim=1, unbiased=False, keepdim=True)
    return ((g - mean) / (std + eps)).reshape(-1).float()


def advantage_stats(adv: torch.Tensor) -> dict[str, float]:
    """Mean / std / min / max of advantages, for logging."""
    a = adv.detach().float()
    return {"adv/mean": float(a.mean()), "adv/std": float(a.std(unbiased=False)),
            "adv/min": float(a.min()), "adv/max": float(a.max())}
