"""A shifted synchronous grid: every token together, on the pipeline's grid re-timed by a shift.

Flow-matching pipelines (SD3, Flux) already shift their grid towards noise with
``sigma' = shift * sigma / (1 + (shift - 1) * sigma)`` (the scheduler's ``shift``; Esser et al. 2024,
SD3 §5.3.2). This policy applies one more such shift on top of whatever grid the pipeline made,
so ``shift > 1`` spends more of the K steps at high noise and ``shift < 1`` at low noise; ``shift = 1``
is the synchronous sampler. It is the simplest fixed family a learned grid has to beat, and at
few steps it is often the strongest (see the README's headroom table).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from tpm.policy import Action, Policy, PolicyError, State, register_policy


def shift_time(sigma: torch.Tensor, shift: float) -> torch.Tensor:
    """``shift * sigma / (1 + (shift - 1) * sigma)``: keeps 0 and 1 fixed, monotone in sigma."""
    return shift * sigma / (1 + (shift - 1) * sigma)


@dataclass
class ShiftedGridConfig:
    shift: float = 2.0  # > 0; 1 = the pipeline's own grid

    def __post_init__(self):
        if not (math.isfinite(self.shift) and self.shift > 0):
            raise PolicyError(f"shifted_grid: shift must be a positive number, got {self.shift}")


@register_policy("shifted_grid")
class ShiftedGrid(Policy):
    config_class = ShiftedGridConfig

    def act(self, state: State) -> Action:
        nxt = state.sigmas[state.step + 1].double()
        value = shift_time(nxt, self.config.shift).to(state.tau.dtype)
        return Action(tau_next=value.to(state.tau.device).expand_as(state.tau).clone())
