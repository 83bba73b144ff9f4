"""Batch z-scores of reward metrics: a small pure function on tensors.

``zscore`` is the per-metric normalisation of AsyncDiff Eq. 16, used by :mod:`rewards.composite`.
The GRPO group advantages (each sample's reward relative to the other samples of its prompt) are
the trainer's business and live in :mod:`tpm.grpo.advantages` only; a reward server never needs them.
"""

from __future__ import annotations

import torch

ZSCORE_EPS = 1e-6


def zscore(x: torch.Tensor, eps: float = ZSCORE_EPS) -> torch.Tensor:
    """``(x - mean(x)) / (std(x) + eps)`` over a 1-D batch (AsyncDiff Eq. 16, S-hat).

    The std is the population one (divide by N). One sample, or a batch of equal scores, has
    std 0 and gives all zeros: the metric then carries no preference, rather than NaN or a blow-up.
    """
    x = x.double().reshape(-1)
    if x.numel() == 0:
        return x.float()
    return ((x - x.mean()) / (x.std(unbiased=False) + eps)).float()

