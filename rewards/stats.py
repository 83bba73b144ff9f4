"""Small pure functions for reward statistics: batch z-scores and group-relative advantages.

``zscore`` is the per-metric normalisation of AsyncDiff Eq. 16; ``group_advantages`` is the GRPO
advantage of AsyncDiff §4 (each sample's reward relative to the other samples of its prompt),
computed by the trainer's own formula (``tpm.grpo.advantages``) so the two cannot drift apart.
They only take and return tensors.
"""

from __future__ import annotations

import torch

from tpm.grpo.advantages import group_advantages as _grpo_advantages

ZSCORE_EPS = 1e-6
ADVANTAGE_EPS = 1e-4


def zscore(x: torch.Tensor, eps: float = ZSCORE_EPS) -> torch.Tensor:
    """``(x - mean(x)) / (std(x) + eps)`` over a 1-D batch (AsyncDiff Eq. 16, S-hat).

    The std is the population one (divide by N). One sample, or a batch of equal scores, has
    std 0 and gives all zeros: the metric then carries no preference, rather than NaN or a blow-up.
    """
    x = x.double().reshape(-1)
    if x.numel() == 0:
        return x.float()
    return ((x - x.mean()) / (x.std(unbiased=False) + eps)).float()


def group_advantages(rewards: torch.Tensor, groups: torch.Tensor, eps: float = ADVANTAGE_EPS) -> torch.Tensor:
    """GRPO advantages ``(R - mean_g) / (std_g + eps)`` where g is each sample's group (prompt).

    rewards: (N,); groups: (N,) integer ids (samples of the same prompt share an id), in any order
    and of any sizes. Population std within each group; a group of one sample gets advantage 0.
    The formula is the trainer's (:func:`tpm.grpo.advantages.group_advantages`), applied per group.
    """
    rewards = rewards.double().reshape(-1)
    groups = torch.as_tensor(groups).reshape(-1)
    if groups.shape != rewards.shape:
        raise ValueError(f"rewards {tuple(rewards.shape)} and groups {tuple(groups.shape)} must have one id per reward")
    out = torch.zeros_like(rewards, dtype=torch.float32)
    for g in torch.unique(groups):
        idx = (groups == g).nonzero().reshape(-1)
        out[idx] = _grpo_advantages(rewards[idx], idx.numel(), eps)
    return out


def grouped_advantages(rewards: torch.Tensor, group_size: int, eps: float = ADVANTAGE_EPS) -> torch.Tensor:
    """:func:`group_advantages` for a batch laid out as consecutive groups of ``group_size``."""
    return _grpo_advantages(rewards, group_size, eps)
