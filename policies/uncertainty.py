"""Uncertainty-guided patches: certain regions advance faster, at a fixed budget of K steps
(AsyncPatch §5.5, "accelerating sampling where uncertainty is low").

Uncertainty per token, from one of two sources:

- ``"head"``: a trained :class:`policies.uncertainty_head.UncertaintyHead` reads the previous
  backbone call's x0 estimate, velocity and conditioning time and predicts the log squared error
  of that x0 estimate (AsyncPatch's uncertainty head, trained by regression on the frozen
  backbone's own trajectories).
- ``"x0_change"`` (training-free): how fast the x0 estimate of a token still moves,
  ``mean_c (x0_{k-1} - x0_{k-2})^2 / (tau'_{k-2} - tau'_{k-1})^2`` with tau' the conditioning
  times of the two calls. A token whose clean estimate has settled is treated as certain. The
  division by the time moved makes tokens that took different steps comparable.

Before a source has data (step 0; step 1 too for ``x0_change``) every token moves like the
synchronous sampler.

Schedule. A token's place on the pipeline's grid is a fractional position p in [0, K]
(0 = noise, K = clean; :func:`tpm.fields.grid_time` reads its time off the grid). The
synchronous sampler puts every token at p = k + 1 after step k; we put it at

    p = (k + 1) + strength * c * min(k + 1, K - k - 1),

where c in [-1, 1] is the token's certainty: the per-sample z-score of the negative log
uncertainty (optionally averaged over ``patch`` x ``patch`` token patches), clipped. Certain
tokens run up to ``strength`` of the way ahead of the grid, uncertain ones fall behind; the
allowance shrinks to zero at both ends, so nobody is ever more than ``strength`` grid steps off at
the second-to-last step, and the last step is never a leap. Then, on times:

1. the spread is bounded: every time is raised to at least ``max(tau_next) - max_disparity`` in
   its sample, so no two tokens are more than ``max_disparity`` apart at any step (AsynDM App.
   D.2 shows that large disparities leave fast regions noisy under a frozen model);
2. times never increase (``tau_next <= tau``): a token that was ahead and turns uncertain waits;
3. the last step sends every token to 0.

Constant uncertainty gives c = 0 and the synchronous grid.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from policies.uncertainty_head import UncertaintyHead, UncertaintyHeadConfig
from tpm.fields import grid_time
from tpm.policy import Action, Policy, PolicyError, State, register_policy

SOURCES = ("x0_change", "head")
_EPS = 1e-12


def certainty(log_u: torch.Tensor, patch: int = 1) -> torch.Tensor:
    """(B, h, w) log uncertainty -> certainty in [-1, 1]: clipped per-sample z-score of -log u."""
    if patch > 1:
        pooled = F.avg_pool2d(log_u[:, None], patch, ceil_mode=True, count_include_pad=False)
        log_u = F.interpolate(pooled, scale_factor=patch, mode="nearest")[:, 0, : log_u.shape[1], : log_u.shape[2]]
    flat = log_u.reshape(log_u.shape[0], -1)
    mean = flat.mean(1, keepdim=True)
    std = flat.std(1, keepdim=True, unbiased=False)
    z = torch.where(std > 1e-8, (mean - flat) / std.clamp(min=1e-8), torch.zeros_like(flat))
    return z.clamp(-1, 1).reshape(log_u.shape)


def uncertainty_step(tau: torch.Tensor, cert: torch.Tensor, sigmas: torch.Tensor, step: int,
                     strength: float, max_disparity: float) -> torch.Tensor:
    """The next field from the current one and a certainty map (module docstring, rules 1-3).

    Args:
        tau: (B, h, w) current times; cert: (B, h, w) in [-1, 1]; sigmas: (K+1,) grid.
    """
    k_total = sigmas.shape[0] - 1
    if step + 1 >= k_total:
        return torch.zeros_like(tau)
    sig = sigmas.to(tau.device, torch.float64)
    allowance = min(step + 1, k_total - step - 1)
    pos = (step + 1) + strength * allowance * cert.to(tau.device, torch.float64)
    desired = grid_time(sig, pos.clamp(0, k_total))
    top = desired.reshape(desired.shape[0], -1).amax(1).view(-1, 1, 1)
    bounded = torch.maximum(desired, top - max_disparity)
    return torch.minimum(bounded.to(tau.dtype), tau)


@dataclass
class UncertaintyPatchesConfig:
    source: str = "x0_change"  # x0_change (training-free) | head (trained UncertaintyHead)
    strength: float = 0.5  # how far (in grid steps, times the distance to the nearer end) certainty moves a token
    max_disparity: float = 0.2  # largest time difference between two tokens of a sample, in [0, 1]
    patch: int = 1  # average the uncertainty over patch x patch tokens before ranking
    head: dict | None = None  # UncertaintyHeadConfig fields when source == "head" (weights in model.safetensors)

    def __post_init__(self):
        if self.source not in SOURCES:
            raise PolicyError(f"unknown uncertainty source {self.source!r}; choose from {SOURCES}")
        if not 0.0 <= self.strength <= 1.0:
            raise PolicyError(f"strength must be in [0, 1], got {self.strength}")
        if not 0.0 <= self.max_disparity <= 1.0:
            raise PolicyError(f"max_disparity must be in [0, 1], got {self.max_disparity}")
        if self.patch < 1:
            raise PolicyError(f"patch must be >= 1, got {self.patch}")
        if self.source == "head" and self.head is None:
            raise PolicyError('source="head" needs a trained head: UncertaintyPatches.with_head("path/to/head")')


@register_policy("uncertainty_patches")
class UncertaintyPatches(Policy):
    """AsyncPatch §5.5: low-uncertainty patches take larger time decrements, all end at 0 at step K."""

    paper = "AsyncPatch Diffusion: spatially-flexible image generation (uncertainty-guided acceleration, §5.5)"

    config_class = UncertaintyPatchesConfig

    def __init__(self, config: UncertaintyPatchesConfig | None = None, **kwargs):
        super().__init__(config, **kwargs)
        self.head = None
        if self.config.source == "head":
            self.head = UncertaintyHead(UncertaintyHeadConfig(**self.config.head))

    @classmethod
    def with_head(cls, head: UncertaintyHead | str | os.PathLike, **kwargs) -> UncertaintyPatches:
        """The policy with a trained head (an instance or a directory saved by the recipe)."""
        import dataclasses

        if not isinstance(head, UncertaintyHead):
            head = UncertaintyHead.from_pretrained(head)
        policy = cls(source="head", head=dataclasses.asdict(head.config), **kwargs)
        policy.head.load_state_dict(head.state_dict())
        return policy.eval()

    def log_uncertainty(self, state: State) -> torch.Tensor | None:
        """(B, h, w) log uncertainty from the configured source, or None before it has data."""
        mem = state.memory
        if state.x0 is None:
            return None
        b, (h, w) = state.batch_size, state.grid
        if self.config.source == "head":
            self.head.check_tokens(state.x0)
            with torch.no_grad():
                return self.head(state.x0, state.velocity, mem["prev_tau_cond"]).to(state.tau.device).float()
        prev_x0, prev_t = mem.get("prev_x0"), mem.get("prev_prev_tau_cond")
        if prev_x0 is None or prev_t is None:
            return None
        change = (state.x0.float() - prev_x0.float()).pow(2).mean(-1).reshape(b, h, w)
        dt = (prev_t - mem["prev_tau_cond"]).abs().clamp(min=1e-4)
        return torch.log(change / dt.pow(2) + _EPS)

    def act(self, state: State) -> Action:
        log_u = self.log_uncertainty(state)
        cert = torch.zeros_like(state.tau) if log_u is None else certainty(log_u, self.config.patch)
        tau_next = uncertainty_step(state.tau, cert, state.sigmas, state.step, self.config.strength,
                                    self.config.max_disparity)
        mem = state.memory
        # What the next step's source reads: this step's call is conditioned on tau_k.
        mem["prev_prev_tau_cond"] = mem.get("prev_tau_cond")
        mem["prev_tau_cond"] = state.tau
        mem["prev_x0"] = state.x0
        return Action(tau_next=tau_next, mask=cert > 0, extras={"certainty": cert})
