"""Training-time timestep samplers: each draws a per-token noise-time field (B, h, w) in [0, 1].

Convention (flow matching): 1 = pure noise, 0 = clean; a token at time tau is
``(1 - tau) * x0 + tau * noise``.

- ``sync``: the usual logit-normal time, one value per sample broadcast over the grid (SD3/Flux
  training default).
- ``patchwise``: AsyncPatch App. C "patchwise sampling": square patches of a random size, each with
  its own independent uniform time.
- ``perlin``: AsyncPatch App. C "Perlin sampling" (after RAD): a smooth multi-octave value-noise
  field, rescaled per sample to span a random interval [lo, hi] of times, so that large regions
  share similar corruption, like natural inpainting masks.
- ``controlled``: AsyncPatch App. C "AsyncPatch sampling": the mean time across the image and the
  spread (standard deviation) of times within it are set explicitly; a zero-mean, unit-variance
  spatial pattern (sharp blocks or smooth noise at a random spatial scale) carries the
  heterogeneity. Spread 0 recovers synchronous training.

The paper gives these samplers in a figure only; the exact parametrisations here are ours and are
documented per function. Written by hand because no library ships per-token time samplers.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from functools import partial

import torch
import torch.nn.functional as F

__all__ = [
    "TIMESTEP_SAMPLERS",
    "controlled",
    "controlled_field",
    "get_timestep_sampler",
    "logit_normal",
    "patchwise",
    "perlin",
    "standardized_pattern",
]

TimestepSampler = Callable[..., torch.Tensor]


def _rand(shape: Sequence[int], generator: torch.Generator | None, device: torch.device | str | None):
    return torch.rand(tuple(shape), generator=generator, device=device)


def _randn(shape: Sequence[int], generator: torch.Generator | None, device: torch.device | str | None):
    return torch.randn(tuple(shape), generator=generator, device=device)


def logit_normal(
    batch: int,
    h: int,
    w: int,
    *,
    mean: float = 0.0,
    std: float = 1.0,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Synchronous field: ``tau = sigmoid(N(mean, std^2))`` per sample, the same for all tokens."""
    tau = torch.sigmoid(mean + std * _randn((batch,), generator, device))
    return tau[:, None, None].expand(batch, h, w).contiguous()


def patchwise(
    batch: int,
    h: int,
    w: int,
    *,
    patch_sizes: Sequence[int] = (1, 2, 4),
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Piecewise-constant field on ``p x p`` token patches, ``p`` drawn per sample from ``patch_sizes``,
    each patch's time independent U(0, 1). Patches at the border are cut to the grid."""
    sizes = torch.tensor(list(patch_sizes))
    pick = torch.randint(len(sizes), (batch,), generator=generator, device=None)
    out = torch.empty(batch, h, w, device=device)
    for b in range(batch):
        p = int(sizes[pick[b]])
        coarse = _rand((1, 1, math.ceil(h / p), math.ceil(w / p)), generator, device)
        out[b] = F.interpolate(coarse, scale_factor=p, mode="nearest")[0, 0, :h, :w]
    return out


def _value_noise(
    batch: int, h: int, w: int, cells: int, generator: torch.Generator | None, device
) -> torch.Tensor:
    """Smooth noise: an iid normal ``cells x cells`` grid bilinearly upsampled to (h, w)."""
    grid = _randn((batch, 1, cells + 1, cells + 1), generator, device)
    return F.interpolate(grid, size=(h, w), mode="bilinear", align_corners=True)[:, 0]


def perlin(
    batch: int,
    h: int,
    w: int,
    *,
    octaves: int = 3,
    persistence: float = 0.5,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Perlin-style field: sum of ``octaves`` value-noise layers (cells 1, 2, 4, ...; amplitude
    ``persistence**k``), min-max normalised per sample to [0, 1], then mapped affinely onto
    ``[lo, hi]`` with ``lo < hi`` the sorted pair of two U(0, 1) draws per sample."""
    field = torch.zeros(batch, h, w, device=device)
    for k in range(octaves):
        field += persistence**k * _value_noise(batch, h, w, 2**k, generator, device)
    flat = field.flatten(1)
    lo_f, hi_f = flat.min(1).values, flat.max(1).values
    unit = (field - lo_f[:, None, None]) / (hi_f - lo_f).clamp_min(1e-12)[:, None, None]
    ends = _rand((batch, 2), generator, device).sort(dim=1).values
    lo, hi = ends[:, 0, None, None], ends[:, 1, None, None]
    return lo + (hi - lo) * unit


def standardized_pattern(
    batch: int,
    h: int,
    w: int,
    *,
    scales: Sequence[int] = (1, 2, 4),
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Zero-mean, unit-variance (population) spatial pattern per sample.

    Per sample a cell size ``s`` is drawn from ``scales`` and the pattern is an iid normal grid of
    ``ceil(h/s) x ceil(w/s)`` cells upsampled to (h, w), half of the samples with nearest
    (sharp block edges, the clean-next-to-noisy states inpainting needs) and half bilinearly
    (smooth). A pattern that comes out constant is returned as zeros.
    """
    out = torch.empty(batch, h, w, device=device)
    pick = torch.randint(len(scales), (batch,), generator=generator)
    sharp = torch.rand((batch,), generator=generator) < 0.5
    for b in range(batch):
        s = int(scales[pick[b]])
        ch, cw = max(math.ceil(h / s), 2), max(math.ceil(w / s), 2)
        grid = _randn((1, 1, ch, cw), generator, device)
        mode = "nearest" if bool(sharp[b]) else "bilinear"
        kwargs = {} if mode == "nearest" else {"align_corners": True}
        out[b] = F.interpolate(grid, size=(h, w), mode=mode, **kwargs)[0, 0]
    centred = out - out.mean(dim=(1, 2), keepdim=True)
    std = centred.pow(2).mean(dim=(1, 2), keepdim=True).sqrt()
    return torch.where(std > 1e-6, centred / std.clamp_min(1e-6), torch.zeros_like(centred))


def controlled_field(mean: torch.Tensor, spread: torch.Tensor, pattern: torch.Tensor) -> torch.Tensor:
    """AsyncPatch App. C controlled field with exactly the requested mean and spread.

    ``tau = mean + s * z`` for a zero-mean, unit-variance pattern ``z`` (B, h, w), so the spatial mean
    of ``tau`` is ``mean`` and its population standard deviation is ``s``. ``s = min(spread, s_max)``,
    where ``s_max`` is the largest spread that keeps every token in [0, 1]; when ``spread`` exceeds it
    the field touches 0 or 1 (a fully clean or fully noisy region) and the mean is still exact.

    Args:
        mean: (B,) target mean time in [0, 1].
        spread: (B,) target standard deviation, >= 0.
        pattern: (B, h, w) zero-mean, unit-variance pattern (see ``standardized_pattern``).
    """
    if mean.min() < 0 or mean.max() > 1 or spread.min() < 0:
        raise ValueError("controlled_field: mean must lie in [0, 1] and spread must be >= 0.")
    m = mean[:, None, None]
    zmax = pattern.flatten(1).max(1).values.clamp_min(1e-12)
    zmin = (-pattern.flatten(1).min(1).values).clamp_min(1e-12)
    s_max = torch.minimum((1 - mean) / zmax, mean / zmin)
    s = torch.minimum(spread, s_max)[:, None, None]
    return (m + s * pattern).clamp(0.0, 1.0)


def controlled(
    batch: int,
    h: int,
    w: int,
    *,
    mean_loc: float = 0.0,
    mean_scale: float = 1.0,
    max_spread: float = 0.5,
    p_sync: float = 0.25,
    scales: Sequence[int] = (1, 2, 4),
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """AsyncPatch controlled sampler: mean ~ logit-normal(mean_loc, mean_scale) as in synchronous
    training, spread ~ U(0, max_spread), and spread 0 with probability ``p_sync`` so homogeneous
    states stay well represented (the paper's point against independent per-token sampling)."""
    mean = torch.sigmoid(mean_loc + mean_scale * _randn((batch,), generator, device))
    spread = max_spread * _rand((batch,), generator, device)
    spread = torch.where(_rand((batch,), generator, device) < p_sync, torch.zeros_like(spread), spread)
    pattern = standardized_pattern(batch, h, w, scales=scales, generator=generator, device=device)
    return controlled_field(mean, spread, pattern)


TIMESTEP_SAMPLERS: dict[str, TimestepSampler] = {
    "sync": logit_normal,
    "patchwise": patchwise,
    "perlin": perlin,
    "controlled": controlled,
}


def get_timestep_sampler(name: str, **kwargs) -> TimestepSampler:
    """The sampler registered as ``name`` with keyword defaults bound:
    ``sampler(batch, h, w, generator=..., device=...) -> (B, h, w)``."""
    if name not in TIMESTEP_SAMPLERS:
        raise ValueError(f"Unknown timestep sampler {name!r}; choose one of {sorted(TIMESTEP_SAMPLERS)}.")
    return partial(TIMESTEP_SAMPLERS[name], **kwargs)
