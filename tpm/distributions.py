"""Action distributions of trainable policies: named groups of independent Beta variables.

A trainable policy's action at one step is one or more named parts, each a tensor of values in
(0, 1) drawn from Beta distributions: AsyncDiff's TPM draws one ``r`` per sample (Eq. 7); the
learned field policy draws a per-sample grid move, a per-token offset and a per-token conditioning
shift. :class:`BetaActions` holds the (alpha, beta) of every part and gives, per sample, what GRPO
needs: a draw, the deterministic action (the mode, AsyncDiff Eq. 18, or the mean), the
log-probability summed over every active variable, and the closed-form KL to another policy's
distribution on the same inputs.

Written by hand because ``torch.distributions.Beta`` covers one tensor: summing the parts per
sample, switching parts off at steps where they do not act (``active``), and computing the
log-density in float64 (the Beta's normaliser loses digits in float32 for concentrated
distributions) are the few lines here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Draws are kept this far from 0 and 1 so that their log-density stays finite.
EPS = 1e-5


def beta_log_prob(alpha: torch.Tensor, beta: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Log-density of Beta(alpha, beta) at x in (0, 1), elementwise, in float64, cast back to alpha's dtype."""
    a, b, v = alpha.double(), beta.double(), x.double()
    log_norm = torch.lgamma(a) + torch.lgamma(b) - torch.lgamma(a + b)
    return ((a - 1) * torch.log(v) + (b - 1) * torch.log1p(-v) - log_norm).to(alpha.dtype)


def beta_mode(alpha: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """The mode ``(alpha - 1) / (alpha + beta - 2)`` of Beta(alpha, beta) with alpha, beta > 1 (AsyncDiff Eq. 18).

    With alpha == beta the result is exactly 0.5 in floating point: the numerator and the denominator
    differ by an exact factor 2, which is what lets a fresh policy reproduce the synchronous sampler
    bit for bit.
    """
    return (alpha - 1) / (alpha + beta - 2)


def mode_concentration(mode: torch.Tensor, concentration: torch.Tensor | float) -> tuple[torch.Tensor, torch.Tensor]:
    """(alpha, beta) = (1 + m k, 1 + (1 - m) k): a Beta with mode m in (0, 1) and spread set by k > 0.

    Both parameters exceed 1 (a uni-modal Beta) and the mode is m exactly up to rounding; for
    m = 0.5 the two parameters are equal, so :func:`beta_mode` gives exactly 0.5.
    """
    k = torch.as_tensor(concentration, dtype=mode.dtype, device=mode.device)
    return 1 + mode * k, 1 + (1 - mode) * k


def _per_sample_beta(alpha: torch.Tensor, beta: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
    """Beta draws with row i from ``generators[i]``, on the CPU whatever the parameters' device (the
    draws are then the same on every device); as ``torch.distributions.Beta``, through a Dirichlet."""
    conc = torch.stack([alpha, beta], dim=-1).detach().float().cpu()
    rows = [torch._sample_dirichlet(conc[i], generator=g)[..., 0] for i, g in enumerate(generators)]
    return torch.stack(rows).to(device=alpha.device, dtype=alpha.dtype)


def _sum_per_sample(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(x.shape[0], -1).sum(1) if x.ndim > 1 else x


@dataclass
class BetaActions:
    """Independent Beta variables in named parts; every tensor's first dimension is the batch.

    ``alpha[name]`` / ``beta[name]``: (B, ...) parameters, both > 1. ``active[name]``: optional (B,)
    weights in {0, 1}; a part with weight 0 for a sample is not drawn for it (its value is the mode)
    and adds nothing to that sample's log-probability or KL.
    """

    alpha: dict[str, torch.Tensor]
    beta: dict[str, torch.Tensor]
    active: dict[str, torch.Tensor] | None = None

    def __post_init__(self):
        if set(self.alpha) != set(self.beta):
            raise ValueError(f"alpha parts {sorted(self.alpha)} differ from beta parts {sorted(self.beta)}")

    @property
    def parts(self) -> list[str]:
        return sorted(self.alpha)

    @property
    def batch_size(self) -> int:
        return self.alpha[self.parts[0]].shape[0]

    def _weight(self, name: str, like: torch.Tensor) -> torch.Tensor | None:
        w = None if self.active is None else self.active.get(name)
        if w is None:
            return None
        return w.to(like.dtype).view(-1, *([1] * (like.ndim - 1)))

    def mode(self) -> dict[str, torch.Tensor]:
        return {n: beta_mode(self.alpha[n], self.beta[n]).clamp(EPS, 1 - EPS) for n in self.parts}

    def mean(self) -> dict[str, torch.Tensor]:
        return {n: (self.alpha[n] / (self.alpha[n] + self.beta[n])).clamp(EPS, 1 - EPS) for n in self.parts}

    def sample(self, generators: list[torch.Generator] | None = None) -> dict[str, torch.Tensor]:
        """One draw per variable; inactive variables take their mode.

        Without ``generators`` the draws come from torch's global generator. With one CPU generator
        per sample, sample i's variables are drawn from ``generators[i]`` alone (part by part in
        sorted order), so a sample's draws do not depend on the batch around it: the same run split
        over any number of processes, or rolled out in other chunks, draws the same actions.
        """
        if generators is not None and len(generators) != self.batch_size:
            raise ValueError(f"{len(generators)} generators for a batch of {self.batch_size}; pass one per sample")
        out = {}
        for n in self.parts:
            a, b = self.alpha[n], self.beta[n]
            if generators is None:
                x = torch.distributions.Beta(a.detach(), b.detach()).sample()
            else:
                x = _per_sample_beta(a.detach(), b.detach(), generators)
            x = x.clamp(EPS, 1 - EPS)
            w = self._weight(n, x)
            out[n] = x if w is None else torch.where(w > 0, x, beta_mode(a, b).clamp(EPS, 1 - EPS))
        return out

    def log_prob(self, value: dict[str, torch.Tensor]) -> torch.Tensor:
        """(B,) sum of the log-densities of every active variable; differentiable in alpha, beta."""
        missing = sorted(set(self.parts) - set(value))
        if missing:
            raise KeyError(f"action has no value for parts {missing}")
        total = None
        for n in self.parts:
            lp = beta_log_prob(self.alpha[n], self.beta[n], value[n].to(self.alpha[n].dtype))
            w = self._weight(n, lp)
            lp = _sum_per_sample(lp if w is None else lp * w)
            total = lp if total is None else total + lp
        return total

    def kl(self, other: BetaActions) -> torch.Tensor:
        """(B,) KL(self || other) summed over active variables (closed form, per Beta)."""
        total = None
        for n in self.parts:
            p = torch.distributions.Beta(self.alpha[n], self.beta[n], validate_args=False)
            q = torch.distributions.Beta(other.alpha[n], other.beta[n], validate_args=False)
            kl = torch.distributions.kl_divergence(p, q)
            w = self._weight(n, kl)
            kl = _sum_per_sample(kl if w is None else kl * w)
            total = kl if total is None else total + kl
        return total
