"""Warm-starting the learned field policy by imitating a fixed policy before GRPO.

GRPO from the synchronous start spends its first iterations finding what a fixed schedule already
knows. :func:`imitate` instead runs a fixed policy (a shifted grid, asyndm, dm_concave, the
uncertainty policy, ...) on training prompts, writes down at every step the state as the field
policy would see it and the source's fields, converts those fields into the field policy's action
parts (the inverse of :meth:`policies.field.FieldPolicy.fields`), and fits the network's
deterministic action (the Beta modes) to them by least squares. The spread of the Beta draws is
left as it was, so GRPO still explores around the imitated schedule.

A source whose tokens are further apart than the field policy's ``max_disparity`` is imitated as
closely as the bound allows (its extreme tokens are clipped to the band).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from policies.field import FieldPolicy, _group_mean, _inverse_piecewise
from tpm.distributions import EPS
from tpm.policy import Action, Policy, PolicyError, RunContext, State, TrainablePolicy
from tpm.sampler import sample


def invert_fields(policy: FieldPolicy, state: State, tau_next: torch.Tensor, tau_cond: torch.Tensor | None
                  ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """The action parts u in (0, 1) that make ``policy`` produce (as nearly as its bounds allow) the given
    fields at ``state``, and the centre it would then hold. ``state.memory`` must be the field policy's."""
    cfg = policy.config
    tau = state.tau.float()
    bsz = tau.shape[0]
    k, big_k = state.step, state.num_steps
    sig = state.sigmas.float().to(tau.device)
    centre = state.memory.get("centre", torch.ones(bsz, device=tau.device)).float()
    target = tau_next.float()
    flat = target.reshape(bsz, -1)
    parts: dict[str, torch.Tensor] = {}
    n_groups = cfg.groups[0] * cfg.groups[1]
    if k + 1 >= big_k:  # the last step sends every token to 0: grid and offsets do not act (d = 0)
        new_centre = torch.zeros_like(centre)
        target = torch.zeros_like(tau)
        if cfg.learn_grid:
            parts["grid"] = torch.zeros(bsz, device=tau.device)
        if cfg.token_offsets:
            parts["offset"] = torch.zeros(bsz, n_groups, device=tau.device)
    else:
        s_next, s_after = sig[k + 1].expand(bsz), sig[k + 2].expand(bsz)
        half = cfg.max_disparity / 2
        lo = torch.maximum(flat.max(1).values - half, s_after + 1e-6)
        hi = torch.minimum(flat.min(1).values + half, centre)
        mean = flat.mean(1)
        new_centre = torch.where(lo <= hi, torch.minimum(torch.maximum(mean, lo), hi),
                                 torch.minimum(torch.maximum(mean, s_after + 1e-6), centre))
        up = (new_centre - s_next) / (centre - s_next).clamp(min=1e-12)
        down = (new_centre - s_next) / (s_next - s_after).clamp(min=1e-12)
        d_grid = torch.where(new_centre >= s_next, up, down).clamp(-1, 1)
        if cfg.learn_grid:
            parts["grid"] = d_grid
        else:  # without a grid part the centre is the synchronous grid
            new_centre = s_next.clone()
        if cfg.token_offsets:
            c = new_centre.view(-1, 1, 1)
            g_tau = _group_mean(tau, cfg.patch)
            g_t = _group_mean(target, cfg.patch)
            anchor = torch.minimum(c.expand_as(g_tau), g_tau)
            hi_t = torch.minimum(g_tau, c + half)
            lo_t = torch.clamp(c - half, min=0.0).expand_as(g_tau)
            parts["offset"] = _inverse_piecewise(g_t, anchor, hi_t, lo_t).reshape(bsz, -1)
    if cfg.learn_cond:
        if tau_cond is None or cfg.cond_range == 0:
            d_c = torch.zeros(bsz, *cfg.groups, device=tau.device)
        else:
            step = _group_mean(tau - target, cfg.patch)
            shift = _group_mean(tau - tau_cond.float(), cfg.patch)
            d_c = torch.where(step > 0, shift / (cfg.cond_range * step).clamp(min=1e-12), torch.zeros_like(step))
        parts["cond"] = d_c.clamp(-1, 1).reshape(bsz, -1)
    u = {name: ((d + 1) / 2).clamp(EPS, 1 - EPS) for name, d in parts.items()}
    return u, new_centre


class _Imitator(Policy):
    """Acts as ``source`` while recording, per step, the field policy's inputs and the action parts that
    would reproduce the source's fields (not registered, never saved)."""

    config_class = dict

    def __init__(self, source: Policy, field: FieldPolicy):
        super().__init__(config={})
        object.__setattr__(self, "source", source)  # not submodules: nothing here is trained
        object.__setattr__(self, "field", field)
        self.records: list[tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]] = []
        self.field_memory: dict[str, Any] = {}

    def attention_layers(self, num_layers: int):
        a = self.source.attention_layers(num_layers)
        b = self.field.attention_layers(num_layers)
        return None if a is None and b is None else sorted(set(a or []) | set(b or []))

    def attention_layers_for(self, backbone):
        a = self.source.attention_layers_for(backbone)
        b = self.field.attention_layers_for(backbone)
        return None if a is None and b is None else sorted(set(a or []) | set(b or []))

    def attention_tokens(self, prompts, text_words):
        # Only the policies that capture maps at all (attention_layers is not None) have a say.
        wanted = [p.attention_tokens(prompts, text_words) for p in (self.source, self.field)
                  if p.attention_layers(1) is not None]
        if not wanted or any(w is None for w in wanted):  # one of them reads every token
            return None
        return [sorted(set().union(*rows)) for rows in zip(*wanted)]

    def conditioning_time_levels(self):
        return self.source.conditioning_time_levels()

    def known_region(self):
        return self.source.known_region()

    def begin(self, ctx: RunContext) -> dict[str, Any]:
        self.field.begin(ctx)
        self.field_memory = {}
        return self.source.begin(ctx)

    def act(self, state: State) -> Action:
        action = self.source.act(state)
        seen = dataclasses.replace(state, memory=self.field_memory)
        with torch.no_grad():
            inputs = self.field.inputs(seen)
            targets, centre = invert_fields(self.field, seen, action.tau_next, action.tau_cond)
        self.records.append((inputs, targets))
        self.field_memory["centre"] = centre
        self.field_memory["prev_x0"] = None if state.x0 is None else state.x0.detach().float()
        return action


def imitate(policy: FieldPolicy, pipe, source: Policy, prompts: Sequence[str], *, num_inference_steps: int,
            seeds: Sequence[int] | None = None, iterations: int = 300, learning_rate: float = 1e-3,
            batch_size: int = 64, sample_kwargs: dict[str, Any] | None = None, height: int | None = None,
            width: int | None = None, progress: bool = True) -> dict[str, float]:
    """Fit ``policy``'s deterministic action to ``source``'s fields on ``prompts`` (one noise each).

    Returns the final mean squared error of the action parts, per part. ``source`` must be a fixed
    policy: imitating a learned one would only copy its current mode.
    """
    if not isinstance(policy, FieldPolicy):
        raise PolicyError(f"imitate() warm-starts a FieldPolicy, got {type(policy).__name__}")
    if not isinstance(source, Policy) or isinstance(source, TrainablePolicy) or getattr(source, "stochastic", False):
        raise PolicyError(f"a warm start imitates a fixed policy (e.g. shifted_grid, asyndm, dm_concave, uncertainty); "
                          f"{type(source).__name__} is {'learned' if isinstance(source, Policy) else 'not a policy'}")
    prompts = list(prompts)
    if not prompts:
        raise PolicyError("imitate() needs at least one prompt")
    seeds = list(range(len(prompts))) if seeds is None else list(seeds)
    imitator = _Imitator(source, policy)
    inputs, targets = [], []
    chunk = 64
    for s in range(0, len(prompts), chunk):
        gens = [torch.Generator().manual_seed(int(x)) for x in seeds[s:s + chunk]]
        imitator.records = []
        sample(pipe, prompts[s:s + chunk], policy=imitator, num_inference_steps=num_inference_steps, height=height,
               width=width, generator=gens, output_type="latent", **(sample_kwargs or {}))
        for inp, tgt in imitator.records:
            inputs.append(inp)
            targets.append(tgt)
    data_in = {k: torch.cat([r[k] for r in inputs]) for k in inputs[0]}
    data_t = {k: torch.cat([t[k] for t in targets]) for k in targets[0]}
    n = next(iter(data_in.values())).shape[0]
    opt = torch.optim.Adam(policy.parameters(), lr=learning_rate)
    gen = torch.Generator().manual_seed(0)
    policy.train()
    errors: dict[str, float] = {}
    for _ in tqdm(range(iterations), desc="imitating", disable=not progress):
        idx = torch.randint(0, n, (min(batch_size, n),), generator=gen)
        dist = policy.distribution({k: v[idx] for k, v in data_in.items()})
        modes = dist.mode()
        active = dist.active or {}
        loss = 0.0
        for part, target in data_t.items():
            err = (modes[part] - target[idx]).pow(2)
            w = active.get(part)
            w = torch.ones(err.shape[0]) if w is None else w
            err = err.reshape(err.shape[0], -1).mean(1)
            part_loss = (err * w).sum() / w.sum().clamp(min=1)
            errors[part] = float(part_loss.detach())
            loss = loss + part_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    policy.eval()
    return errors
