"""GRPO losses as small pure functions (AsyncDiff Eq. 14-15).

The policy's decisions along one sampling run form one trajectory whose log-probability is the
sum of the per-step log-probabilities (Eq. 15). PPO-clip (Eq. 14) then uses either one ratio per
trajectory (the paper) or one ratio per step (``ratio="step"``, advantages shared by the steps
of a sample). The loss returned is the negated clipped surrogate, to be minimised.
"""

from __future__ import annotations

import torch


def trajectory_log_prob(step_log_probs: torch.Tensor) -> torch.Tensor:
    """(N, S) per-step log-probabilities -> (N,) trajectory log-probability (Eq. 15)."""
    return step_log_probs.sum(dim=-1)


def ppo_clip_loss(log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor,
                  clip_eps: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``-mean(min(rho * A, clip(rho, 1 - eps, 1 + eps) * A))``, rho = exp(log_prob - old_log_prob).

    Shapes: log_prob / old_log_prob (N,) or (N, S); advantages (N,) (broadcast over S).
    Returns the loss and detached statistics: ratio mean/min/max, clip fraction (share of ratios
    outside [1 - eps, 1 + eps]) and the approximate KL ``mean(old - new)``.
    """
    adv = advantages.to(log_prob.dtype)
    if log_prob.ndim == 2:
        adv = adv[:, None]
    ratio = torch.exp(log_prob - old_log_prob.to(log_prob.dtype))
    surrogate = torch.minimum(ratio * adv, ratio.clamp(1 - clip_eps, 1 + clip_eps) * adv)
    loss = -surrogate.mean()
    with torch.no_grad():
        stats = {
            "ratio/mean": ratio.mean(), "ratio/min": ratio.min(), "ratio/max": ratio.max(),
            "clip_fraction": ((ratio - 1).abs() > clip_eps).float().mean(),
            "approx_kl": (old_log_prob.to(log_prob.dtype) - log_prob).mean(),
        }
    return loss, stats

