"""Discrete-time (DDPM-family) schedulers seen through the flow time ``tau``, and per-pixel updates.

A UNet of SD 1.5 / 2.1 / SDXL is trained on ``x_t = a_t x0 + b_t eps`` with ``a_t = sqrt(abar_t)``,
``b_t = sqrt(1 - abar_t)`` at integer timesteps t (``abar`` = the scheduler's ``alphas_cumprod``).
Dividing by ``a_t + b_t`` gives the flow form the rest of tpm uses,

    y = x_t / (a_t + b_t) = (1 - tau) x0 + tau eps,   tau = b_t / (a_t + b_t) = sigma_t / (1 + sigma_t),

with ``sigma_t = b_t / a_t`` (the VE noise level of Euler/Karras samplers). So ``tau`` in [0, 1] is the
noise time of every policy, and a pixel at ``tau`` is the UNet's pixel at ``abar = (1 - tau)^2 /
((1 - tau)^2 + tau^2)`` (``x_t = y / sqrt((1 - tau)^2 + tau^2)``). The UNet's timestep input for a
time ``tau`` is read off the scheduler's own table: ``sigma = tau / (1 - tau)`` interpolated
linearly between the integer timesteps (diffusers' ``EulerDiscreteScheduler`` rule), so a
scheduler's integer (or interpolated) timesteps come back exactly.

DDIM with eta = 0 (AsynDM Eq. 14-15) is exactly an Euler step in these coordinates: with the
model's ``x0`` and ``eps`` estimates, ``x_prev = a_p x0 + b_p eps`` divided by ``a_p + b_p`` is
``y + (tau_p - tau) (eps - x0)``. ``EulerDiscreteScheduler`` (no churn) is the same step on its own
sigma grid. So both run through the sampler's per-token Euler step unchanged, per pixel. DDPM
(AsynDM Eq. 4-5) is not an Euler step: :func:`ddpm_step` draws the ancestral update per pixel.

Multistep and higher-order schedulers (PNDM, DPM-Solver, UniPC, LMS, Heun) combine model outputs
of several steps, which has no meaning when pixels sit at different times; they are rejected by
:func:`scheduler_kind` with the list of schedulers that work.

Written by hand: diffusers' schedulers step one scalar timestep per batch, never a field.
"""

from __future__ import annotations

import torch

#: scheduler classes tpm applies per pixel, and how
SUPPORTED_SCHEDULERS = {
    "DDIMScheduler": "ddim",  # eta = 0: Euler in flow coordinates (exact)
    "EulerDiscreteScheduler": "euler",  # no churn, linear sigma interpolation: Euler in flow coordinates
    "DDPMScheduler": "ddpm",  # ancestral per-pixel DDPM (AsynDM Eq. 4-5)
}
HINT = ("use `pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)` "
        "(or EulerDiscreteScheduler / DDPMScheduler)")


class SchedulerError(ValueError):
    """A scheduler tpm cannot apply per pixel (a ``BackboneError`` subclass is raised by adapters)."""


def scheduler_kind(scheduler) -> str:
    """"ddim", "euler" or "ddpm" for a scheduler tpm can apply per pixel; :class:`SchedulerError` otherwise."""
    name = type(scheduler).__name__
    kind = SUPPORTED_SCHEDULERS.get(name)
    if kind is None:
        raise SchedulerError(
            f"{name} cannot be applied per pixel (it combines several steps' outputs or is not a "
            f"DDPM-family scheduler); tpm supports {', '.join(SUPPORTED_SCHEDULERS)} on UNet pipelines: {HINT}"
        )
    cfg = scheduler.config
    if cfg.get("thresholding", False):
        raise SchedulerError(f"{name} with thresholding=True is not supported per pixel; {HINT}")
    if kind == "ddim" and cfg.get("clip_sample", False):
        raise SchedulerError("DDIMScheduler with clip_sample=True is not an Euler step; set clip_sample=False")
    if kind == "ddpm" and cfg.get("variance_type", "fixed_small") != "fixed_small":
        raise SchedulerError(f"DDPMScheduler variance_type {cfg.get('variance_type')!r} is not supported; "
                             "use variance_type='fixed_small'")
    if kind == "euler":
        if cfg.get("interpolation_type", "linear") != "linear" or cfg.get("timestep_type", "discrete") != "discrete":
            raise SchedulerError("EulerDiscreteScheduler needs interpolation_type='linear' and "
                                 f"timestep_type='discrete' to be applied per pixel; {HINT}")
    if cfg.get("prediction_type", "epsilon") not in ("epsilon", "v_prediction", "sample"):
        raise SchedulerError(f"prediction_type {cfg.get('prediction_type')!r} is not supported")
    return kind


def tau_from_alpha_bar(abar: torch.Tensor) -> torch.Tensor:
    """Flow time of a noise level: b / (a + b), float64."""
    abar = abar.to(torch.float64)
    a, b = abar.sqrt(), (1 - abar).clamp(min=0).sqrt()
    return b / (a + b)


def coefficients(tau: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(a, b, n) of a flow time: ``x_t = a x0 + b eps = y / n`` with ``a^2 + b^2 = 1``."""
    n = torch.sqrt((1 - tau) ** 2 + tau ** 2)
    return (1 - tau) / n, tau / n, n


def _interp(x: torch.Tensor, xp: torch.Tensor, fp: torch.Tensor) -> torch.Tensor:
    """np.interp for increasing ``xp`` (values outside are clamped to the ends)."""
    x = x.clamp(xp[0], xp[-1])
    idx = torch.searchsorted(xp, x.contiguous(), right=True).clamp(1, len(xp) - 1)
    x0, x1, f0, f1 = xp[idx - 1], xp[idx], fp[idx - 1], fp[idx]
    w = torch.where(x1 > x0, (x - x0) / (x1 - x0), torch.zeros_like(x))
    return f0 + w * (f1 - f0)


class DiscreteTime:
    """The map between flow time ``tau`` and a scheduler's timesteps (module docstring)."""

    def __init__(self, scheduler):
        abar = scheduler.alphas_cumprod.to(torch.float64)
        self.sigma_table = ((1 - abar) / abar).sqrt()  # increasing in t
        self.steps = torch.arange(len(abar), dtype=torch.float64)
        self.num_train_timesteps = len(abar)
        self.tau_max = float(tau_from_alpha_bar(abar[-1]))

    def timestep(self, tau: torch.Tensor) -> torch.Tensor:
        """The UNet's (fractional) timestep at flow time ``tau``, float64."""
        t = tau.to(torch.float64).clamp(0, self.tau_max)
        sigma = t / (1 - t)
        dev = sigma.device
        return _interp(sigma, self.sigma_table.to(dev), self.steps.to(dev))


def ddpm_step(y: torch.Tensor, tau: torch.Tensor, tau_next: torch.Tensor, x0: torch.Tensor,
              noise: torch.Tensor | None) -> torch.Tensor:
    """One ancestral DDPM step per pixel (AsynDM Eq. 4-5), in flow coordinates.

    Each pixel goes from its ``abar_t`` (flow time ``tau``) to ``abar_p`` (``tau_next``) with
    ``alpha = abar_t / abar_p``: the posterior mean ``sqrt(abar_p) beta / (1 - abar_t) x0 +
    sqrt(alpha) (1 - abar_p) / (1 - abar_t) x_t`` plus ``sqrt((1 - abar_p) / (1 - abar_t) beta) z``
    (DDPM's "fixed_small" variance). A pixel that does not move (tau_next = tau) stays put; one sent
    to 0 lands on ``x0``. All tensors broadcast (fields as (B, 1, h, w)); float64 inside.
    """
    a_t, b_t, n_t = coefficients(tau.double())
    a_p, b_p, n_p = coefficients(tau_next.double())
    abar_t, abar_p = a_t ** 2, a_p ** 2
    alpha = abar_t / abar_p.clamp(min=1e-30)
    beta = (1 - alpha).clamp(min=0)
    one_minus_t = (1 - abar_t).clamp(min=1e-30)
    x_t = y.double() / n_t
    mean = (a_p * beta / one_minus_t) * x0.double() + (alpha.sqrt() * b_p ** 2 / one_minus_t) * x_t
    if noise is not None:
        var = (b_p ** 2 / one_minus_t * beta).clamp(min=1e-20)
        mean = mean + torch.where(beta > 0, var.sqrt(), torch.zeros_like(var)) * noise.double()
    return (mean * n_p).to(y.dtype)
