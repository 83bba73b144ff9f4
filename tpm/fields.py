"""Time fields: pure functions on (B, h, w) tensors and the synchronous grid.

A field holds each token's noise time ``tau`` in [0, 1] (1 = noise). The *grid* is the
synchronous schedule the pipeline's scheduler produces (``sigmas``, K+1 values, shift and
dynamic shifting included, ``sigmas[K] = 0``). Policies that reason in "steps" (AsynDM's
schedules are functions of the step index) place a token at a fractional grid position
``s`` in [0, K] (0 = start, K = clean) and read its time off the grid by linear interpolation,
so that integer positions give exactly the pipeline's times.
"""

from __future__ import annotations

import torch


def uniform_field(value: torch.Tensor | float, batch: int, grid: tuple[int, int],
                  device=None, dtype=torch.float32) -> torch.Tensor:
    """A (B, h, w) field filled with ``value``."""
    v = torch.as_tensor(value, dtype=dtype, device=device)
    return v.expand(batch, *grid).clone()


def grid_time(sigmas: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
    """Time at fractional grid positions: ``sigmas`` interpolated linearly between steps.

    Args:
        sigmas: (K+1,) the synchronous grid, decreasing to 0.
        position: any shape, values in [0, K]; integer values return ``sigmas[position]`` exactly.
    """
    k = sigmas.shape[0] - 1
    pos = position.clamp(0, k)
    lo = pos.floor().long().clamp(max=k - 1) if k > 0 else pos.floor().long()
    frac = (pos - lo.to(pos.dtype)).to(sigmas.dtype)
    s = sigmas.to(pos.device)
    lo_v = s[lo]
    hi_v = s[(lo + 1).clamp(max=k)]
    out = lo_v + frac * (hi_v - lo_v)
    # Exact grid values at integer positions (frac == 0 or 1 would otherwise round).
    return torch.where(frac == 0, lo_v, torch.where(frac == 1, hi_v, out))


def grid_position(sigmas: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`grid_time` for a strictly decreasing grid: position of each time."""
    k = sigmas.shape[0] - 1
    s = sigmas.to(tau.device, torch.float64)
    t = tau.to(torch.float64)
    # index of the first grid value <= t (grid is decreasing)
    idx = torch.searchsorted(-s, -t, right=False).clamp(1, k)
    hi, lo = s[idx - 1], s[idx]
    frac = torch.where(hi > lo, (hi - t) / (hi - lo), torch.zeros_like(t))
    return (idx - 1).to(torch.float64) + frac.clamp(0, 1)


def synchronous_next(state) -> torch.Tensor:
    """The pipeline's own next field: every token at ``sigmas[k+1]``."""
    return state.sigmas[state.step + 1].to(state.tau.dtype).expand_as(state.tau).clone()


def check_field(field: torch.Tensor, batch: int, grid: tuple[int, int], name: str = "field") -> None:
    """Fail loudly on a field of the wrong shape or with values outside [0, 1]."""
    if tuple(field.shape) != (batch, *grid):
        raise ValueError(f"{name} must have shape {(batch, *grid)}, got {tuple(field.shape)}")
    if not bool(((field >= 0) & (field <= 1)).all()):  # written so that NaN fails too
        raise ValueError(f"{name} values must lie in [0, 1]")
