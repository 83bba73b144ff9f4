"""AsynDM: prompt-related tokens follow a slower, concave schedule (Hu et al., AsynDM §3-4).

Each token carries a schedule time ``t`` in step units: ``t = K`` is noise, ``t = 0`` clean, and
the linear schedule ``g(i) = K - i`` is the synchronous grid. A token's noise time is read off
the pipeline's grid at position ``K - t`` (:func:`tpm.fields.grid_time`), so a token on ``g`` is
exactly where the synchronous sampler would put it, shift and dynamic shifting included.

At step i (going to i+1), masked tokens follow the concave schedule ``f`` *shifted through their
current point*: Proposition 1 says that for a concave f with f(0) = K, f(K) = 0 and any point
(i0, t0) with K - i0 <= t0 <= f(i0) there are unique a, b with f(i0 - a) + b = t0 and
f(K - a) + b = 0 (Eq. 6). We find a by bisection on the monotone g(a) = f(i0 - a) - f(K - a)
(App. A.1, Eq. 8-9), per token, and move the token to f(i0 + 1 - a) + b. Every token therefore
reaches 0 at the last step, whatever its mask history. Unmasked tokens move on the straight
line from their current point to (K, 0), which is ``g`` itself for a token that was never masked.

Schedules (normalised, u = i / K): quadratic 1 - u^2 (§3.2), piecewise linear
min(1 - u/2, 3/2 - 3u/2) and exponential (e - e^u) / (e - 1) (§5.4). The reweighting
f' = w f + (1 - w) g (App. B.1) keeps f' concave and bounds the largest gap between tokens at
any step by w * max(f - g).

The mask comes from :mod:`policies.masks` (Eq. 7 cross-attention, fixed, user, all).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from policies.masks import attention_mask, check_user_mask, find_objects, object_positions
from tpm.fields import grid_time
from tpm.policy import Action, Policy, PolicyError, RunContext, State, register_policy

SCHEDULES: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "quadratic": lambda u: 1 - u * u,
    "piecewise_linear": lambda u: torch.minimum(1 - u / 2, 1.5 - 1.5 * u),
    "exponential": lambda u: (math.e - torch.exp(u)) / (math.e - 1),
}
MASK_SOURCES = ("cross_attention", "fixed", "user", "all")
DELAYS = (None, "last", "first", "smaller")


def reweighted(name: str, weight: float) -> Callable[[torch.Tensor], torch.Tensor]:
    """f'(u) = w f(u) + (1 - w)(1 - u) on the normalised step axis (AsynDM App. B.1)."""
    f = SCHEDULES[name]
    return lambda u: weight * f(u) + (1 - weight) * (1 - u)


def shift_solve(f: Callable, u0: torch.Tensor, s0: torch.Tensor, iters: int = 60) -> torch.Tensor:
    """The shift a in [0, u0] with f(u0 - a) - f(1 - a) = s0 (AsynDM Prop. 1, Eq. 6-8).

    Normalised units: u0 = i0 / K, s0 = t0 / K. g(a) = f(u0 - a) - f(1 - a) is nonincreasing
    (Eq. 9), so bisection converges; points outside g's range are clamped to the ends.
    """
    u0 = torch.as_tensor(u0, dtype=torch.float64).expand_as(s0)
    lo = torch.zeros_like(s0)
    hi = u0.clone()
    for _ in range(iters):
        mid = (lo + hi) / 2
        g = f(u0 - mid) - f(1 - mid)
        above = g > s0  # g too large -> move right (g decreases in a)
        lo = torch.where(above, mid, lo)
        hi = torch.where(above, hi, mid)
    return (lo + hi) / 2


def _shift_quadratic(u0: float, s0: torch.Tensor, w: float) -> torch.Tensor:
    # w (1 - u0)(1 + u0 - 2a) + (1 - w)(1 - u0) = s0, solved for a (App. A.1 with f = 1 - u^2).
    return (1 + u0 - (s0 - (1 - w) * (1 - u0)) / (w * (1 - u0))) / 2


def _shift_exponential(u0: float, s0: torch.Tensor, w: float) -> torch.Tensor:
    # w e^{-a} (e - e^{u0}) / (e - 1) + (1 - w)(1 - u0) = s0, solved for a.
    arg = (s0 - (1 - w) * (1 - u0)) * (math.e - 1) / (w * (math.e - math.exp(u0)))
    return -torch.log(arg.clamp(min=1e-300))


# Closed forms of the Prop. 1 shift where one exists; others use bisection.
CLOSED_FORM_SHIFTS = {"quadratic": _shift_quadratic, "exponential": _shift_exponential}


def concave_next(f: Callable, step: int, num_steps: int, t: torch.Tensor,
                 closed_form: Callable | None = None, weight: float = 1.0) -> torch.Tensor:
    """Next schedule time of masked tokens: along f shifted through (step, t). Step units.

    Tokens share few distinct times (one per mask history), so the shift is solved once per
    distinct value and scattered back.
    """
    k = num_steps
    if step + 1 >= k:
        return torch.zeros_like(t)
    values, inverse = torch.unique(t.to(torch.float64), return_inverse=True)
    s0 = values / k
    u0 = step / k
    if closed_form is not None:
        a = closed_form(u0, s0, weight).clamp(0.0, u0)
    else:
        a = shift_solve(f, torch.tensor(u0, dtype=torch.float64), s0)
    b = -f(1 - a)
    nxt = (f((step + 1) / k - a) + b) * k
    return nxt.clamp(min=0.0)[inverse]


def linear_next(step: int, num_steps: int, t: torch.Tensor) -> torch.Tensor:
    """Next schedule time of unmasked tokens: straight to (K, 0) from (step, t)."""
    left = num_steps - step
    return t * (left - 1) / left


@dataclass
class ConcaveConfig:
    schedule: str = "quadratic"  # quadratic | piecewise_linear | exponential
    mask: str = "cross_attention"  # cross_attention | fixed | user | all
    weight: float = 1.0  # w in f' = w f + (1 - w) g; 1 = the plain concave schedule
    objects: list[str] | None = None  # object words; None = found from the prompt
    # Layers averaged for the maps: None = the backbone's default (Backbone.default_attention_layers: the
    # last layer of a DiT, the 1/4-resolution layers of a UNet), "all" = every layer, or a list of indices.
    attention_layers: list[int] | str | None = None
    user_mask_shape: list[int] | None = None  # shape of the saved user mask, (h, w) or (B, h, w)
    # Per-object order (AsynDM's future work): slow down only one object's tokens, so the others
    # settle first. None = every object word (Eq. 7); "last" / "first" = the last- / first-mentioned
    # object word only; "smaller" = the object word whose mask covers fewer tokens (larger first).
    delay: str | None = None

    def __post_init__(self):
        if self.schedule not in SCHEDULES:
            raise PolicyError(f"unknown concave schedule {self.schedule!r}; choose from {sorted(SCHEDULES)}")
        if self.mask not in MASK_SOURCES:
            raise PolicyError(f"unknown mask source {self.mask!r}; choose from {MASK_SOURCES}")
        if not 0.0 < self.weight <= 1.0:
            raise PolicyError(f"weight must be in (0, 1], got {self.weight}")
        if self.delay not in DELAYS:
            raise PolicyError(f"unknown delay {self.delay!r}; choose from {DELAYS}")
        if self.delay is not None and self.mask != "cross_attention":
            raise PolicyError(f'delay={self.delay!r} picks an object by its cross-attention map; it needs '
                              f'mask="cross_attention", not {self.mask!r}')
        if isinstance(self.attention_layers, str) and self.attention_layers != "all":
            raise PolicyError(f'attention_layers must be a list of layer indices, "all" or None (the backbone\'s '
                              f'default), got {self.attention_layers!r}')


@register_policy("concave")
class Concave(Policy):
    """AsynDM (``mask="cross_attention"``), its fixed-mask ablation, user masks, and DM_concave."""

    paper = "AsynDM: Asynchronous Denoising Diffusion Models for Aligning Text-to-Image Generation (concave schedules, Prop. 1; cross-attention masks, Eq. 7)"

    config_class = ConcaveConfig

    def __init__(self, config: ConcaveConfig | None = None, user_mask: torch.Tensor | None = None, **kwargs):
        if user_mask is not None:
            kwargs.setdefault("mask", "user")
            kwargs["user_mask_shape"] = list(torch.as_tensor(user_mask).shape)
        super().__init__(config, **kwargs)
        shape = self.config.user_mask_shape
        if self.config.mask == "user":
            if shape is None:
                raise PolicyError('mask="user" needs user_mask=<(h, w) or (B, h, w) tensor>')
            buf = torch.zeros(shape) if user_mask is None else torch.as_tensor(user_mask, dtype=torch.float32)
            self.register_buffer("user_mask", buf.float())
        self.f = reweighted(self.config.schedule, self.config.weight)

    def attention_layers(self, num_layers: int) -> list[int] | None:
        if self.config.mask != "cross_attention":
            return None
        return self._layers(num_layers, [num_layers - 1])

    def attention_layers_for(self, backbone) -> list[int] | None:
        if self.config.mask != "cross_attention":
            return None
        return self._layers(backbone.num_attention_layers, backbone.default_attention_layers())

    def _layers(self, num_layers: int, default: list[int] | None) -> list[int]:
        chosen = self.config.attention_layers
        if chosen is None:
            return list(default) if default is not None else [num_layers - 1]
        return list(range(num_layers)) if chosen == "all" else list(chosen)

    def attention_tokens(self, prompts: list[str], text_words: list[list[int]] | None) -> list[list[int]] | None:
        # Eq. 7 reads the object words' maps only.
        return None if text_words is None else self._positions(prompts, text_words)

    def _positions(self, prompts: list[str], text_words: list[list[int]] | None) -> list[list[int]]:
        if text_words is None:
            raise PolicyError("the backbone did not report text token positions; cannot find object tokens")
        return [object_positions(p, tw, self.config.objects) for p, tw in zip(prompts, text_words)]

    def begin(self, ctx: RunContext) -> dict:
        memory: dict = {}
        if self.config.mask == "fixed":
            if ctx.reference_run is None:
                raise PolicyError('mask="fixed" needs a synchronous reference run; use tpm.sample')
            layers = self._layers(ctx.num_attention_layers, ctx.default_attention_layers)
            ref = ctx.reference_run(layers)
            avg = torch.stack([a for a in ref.attention if a is not None]).mean(0)
            memory["fixed_mask"] = attention_mask(avg, self._positions(ctx.prompts, ref.text_words))
        return memory

    def current_mask(self, state: State) -> torch.Tensor:
        b, (h, w) = state.batch_size, state.grid
        src = self.config.mask
        if src == "all":
            return torch.ones(b, h, w, dtype=torch.bool, device=state.tau.device)
        if src == "user":
            return check_user_mask(self.user_mask, b, state.grid).to(state.tau.device)
        if src == "fixed":
            return state.memory["fixed_mask"].to(state.tau.device)
        if state.attention is None:  # Algorithm 1: M starts as all ones
            return torch.ones(b, h, w, dtype=torch.bool, device=state.tau.device)
        if self.config.delay is not None:
            return self._delayed_object_mask(state).to(state.tau.device)
        pos = state.memory.get("positions")
        if pos is None:
            pos = state.memory["positions"] = self._positions(state.prompts, state.text_words)
        return attention_mask(state.attention, pos).to(state.tau.device)

    def _delayed_object_mask(self, state: State) -> torch.Tensor:
        """Eq. 7 on one object word per sample: the one ``delay`` names (per-object order)."""
        groups = state.memory.get("object_groups")
        if groups is None:  # per sample: the text positions of each object word, in prompt order
            if state.text_words is None:
                raise PolicyError("the backbone did not report text token positions; cannot find object tokens")
            groups = state.memory["object_groups"] = [
                [g for g in (object_positions(p, tw, [o]) for o in (self.config.objects or find_objects(p))) if g]
                for p, tw in zip(state.prompts, state.text_words)]
        b, (h, w) = state.batch_size, state.grid
        out = torch.zeros(b, h, w, dtype=torch.bool, device=state.attention.device)
        for i, g in enumerate(groups):
            if not g:
                continue
            if self.config.delay == "last":
                chosen = g[-1]
            elif self.config.delay == "first":
                chosen = g[0]
            else:  # "smaller": the object whose own mask is smallest now
                sizes = [int(attention_mask(state.attention[i:i + 1], [pos]).sum()) for pos in g]
                chosen = g[sizes.index(min(sizes))]
            out[i] = attention_mask(state.attention[i:i + 1], [chosen])[0]
        return out

    def act(self, state: State) -> Action:
        k, n = state.step, state.num_steps
        t = state.memory.get("t")
        if t is None:  # every token starts at schedule time K (noise)
            t = torch.full(state.tau.shape, float(n), dtype=torch.float64, device=state.tau.device)
        mask = self.current_mask(state)
        closed = CLOSED_FORM_SHIFTS.get(self.config.schedule)
        t_next = torch.where(mask, concave_next(self.f, k, n, t, closed, self.config.weight), linear_next(k, n, t))
        if k + 1 == n:
            t_next = torch.zeros_like(t_next)
        state.memory["t"] = t_next
        tau_next = grid_time(state.sigmas.to(torch.float64), n - t_next).to(state.tau.dtype)
        return Action(tau_next=tau_next, mask=mask)


# AsynDM's named variants, used by policies.load("asyndm:exponential:fixed") etc.
PRESETS = {
    "asyndm": ("concave", {"schedule": "quadratic", "mask": "cross_attention"}),
    "dm_concave": ("concave", {"schedule": "quadratic", "mask": "all"}),
}
VARIANTS = {**{s: {"schedule": s} for s in SCHEDULES}, **{m: {"mask": m} for m in ("fixed", "all")}}
