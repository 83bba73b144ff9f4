"""Composition: one policy moves the tokens, another sets the time the denoiser is told, and a known
region (inpainting, outpainting) is held under either, learned policies included.

An :class:`~tpm.policy.Action` has two independent parts, the update field ``tau_next`` and the
conditioning field ``tau_cond`` (AsyncDiff §3.2 separates them: the TPM keeps the synchronous
update and changes only the told time). :func:`compose` takes each part from a different policy:

- ``update``: its ``tau_next`` (and ``step_scale``, ``mask``) are used;
- ``condition``: its ``tau_cond`` is used (``None`` there means the tokens' own time); without it
  the update policy's own ``tau_cond`` is kept;
- ``known``: a policy with a :meth:`~tpm.policy.Policy.known_region` (``policies.inpaint_policy``,
  ``outpaint_policy``); its tokens start clean, stay at time 0 and are told time 0 whatever the
  others return (AsyncPatch §3.2, Eq. 4-5), and the sampler keeps their latents bit-exact.

Each part sees the true state (the fields the composition produced) and keeps its own memory.
Checked at every step, with an error naming the policy: no token's time rises, and after the
last step every token is at the end of the pipeline's grid (0 for flow models). A composition of
state-free parts with uniform fields is itself state-free, so it exports as a scheduler
(:func:`tpm.schedulers.to_scheduler`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from tpm.policy import Action, Policy, PolicyError, RunContext, State, register_policy, registered_policies

PARTS = ("update", "condition", "known")


@dataclass
class ComposeConfig:
    update: dict | None = None  # the update policy's config (its config.json content)
    condition: dict | None = None  # the conditioning policy's config, or None
    known: dict | None = None  # the known-region policy's config, or None

    def __post_init__(self):
        if self.update is None:
            raise PolicyError("compose needs an update policy: policies.compose(update=..., condition=..., known=...)")


def _build(cfg: dict, part: str) -> Policy:
    name = cfg.get("policy")
    cls = registered_policies().get(name)
    if cls is None:
        raise PolicyError(f"compose: the {part} policy {name!r} is not registered")
    return cls.from_config_dict(cfg)


@register_policy("compose")
class Compose(Policy):
    """The update field of one policy, the told time of another, a known region held under both."""

    paper = "AsyncDiff §3.2 (update and told time apart) and AsyncPatch §3.2 (known regions at time 0), combined"
    config_class = ComposeConfig

    def __init__(self, config: ComposeConfig | None = None, update: Policy | None = None,
                 condition: Policy | None = None, known: Policy | None = None, **kwargs):
        given = {"update": update, "condition": condition, "known": known}
        for part, pol in given.items():
            if pol is not None:
                if not isinstance(pol, Policy):
                    raise PolicyError(f"compose: {part} must be a tpm Policy, got {type(pol).__name__}")
                kwargs[part] = pol.config_dict()
        super().__init__(config, **kwargs)
        for part in PARTS:
            cfg = getattr(self.config, part)
            pol = given[part] if given[part] is not None else (None if cfg is None else _build(cfg, part))
            setattr(self, f"{part}_policy", pol)
        if self.known_policy is not None and self.known_policy.known_region() is None:
            raise PolicyError(f"compose: known={type(self.known_policy).__name__} declares no known region; "
                              "build it with policies.inpaint_policy / outpaint_policy")

    @property
    def _acting(self) -> list[tuple[str, Policy]]:
        return [(p, getattr(self, f"{p}_policy")) for p in ("update", "condition")
                if getattr(self, f"{p}_policy") is not None]

    # --- what the sampler asks: delegated to the parts -----------------------------------------
    def check_backbone(self, backbone) -> None:
        for _, pol in self._acting:
            pol.check_backbone(backbone)

    def _one(self, ask) -> Any:
        """The one non-None answer of the acting parts (both asking differently is an error)."""
        answers = [(part, ask(pol)) for part, pol in self._acting]
        answers = [(part, a) for part, a in answers if a is not None]
        if len(answers) == 2 and answers[0][1] != answers[1][1]:
            raise PolicyError("compose: the update and conditioning policies ask for different attention maps "
                              f"({answers[0][1]} vs {answers[1][1]}); give them the same attention_layers")
        return answers[0][1] if answers else None

    def attention_layers(self, num_layers: int) -> list[int] | None:
        return self._one(lambda p: p.attention_layers(num_layers))

    def attention_layers_for(self, backbone) -> list[int] | None:
        return self._one(lambda p: p.attention_layers_for(backbone))

    def attention_tokens(self, prompts, text_words):
        return self._one(lambda p: p.attention_tokens(prompts, text_words))

    def conditioning_time_levels(self) -> int | None:
        levels = [lv for _, pol in self._acting if (lv := pol.conditioning_time_levels()) is not None]
        return min(levels) if levels else None

    def known_region(self):
        return None if self.known_policy is None else self.known_policy.known_region()

    def begin(self, ctx: RunContext) -> dict:
        return {part: pol.begin(ctx) for part, pol in self._acting}

    # --- acting -----------------------------------------------------------------------------------
    def act(self, state: State) -> Action:
        upd = self.update_policy.act(dataclasses.replace(state, memory=state.memory["update"]))
        tau_next, tau_cond = upd.tau_next, upd.tau_cond
        log_probs = [upd.log_prob]
        if self.condition_policy is not None:
            con = self.condition_policy.act(dataclasses.replace(state, memory=state.memory["condition"]))
            tau_cond = con.tau_cond
            log_probs.append(con.log_prob)
        region = self.known_region()
        if region is not None:
            known = region.mask.to(state.tau.device).expand_as(state.tau)
            tau_next = torch.where(known, torch.zeros_like(tau_next), tau_next)
            if tau_cond is not None:
                tau_cond = torch.where(known, torch.zeros_like(tau_cond), tau_cond)
        self._check(state, tau_next)
        logps = [lp for lp in log_probs if lp is not None]
        return Action(tau_next=tau_next, tau_cond=tau_cond, mask=upd.mask, step_scale=upd.step_scale,
                      log_prob=sum(logps) if logps else None)

    def _check(self, state: State, tau_next: torch.Tensor) -> None:
        name = type(self.update_policy).__name__
        if bool((tau_next > state.tau).any()):
            rise = float((tau_next - state.tau).max())
            raise PolicyError(f"compose: at step {state.step} the update policy {name} raises a token's time (by "
                              f"{rise:.3g}); times must never rise")
        if state.step + 1 == state.num_steps:
            end = state.sigmas[-1].to(tau_next.device, tau_next.dtype)
            region = self.known_region()
            free = torch.ones_like(tau_next, dtype=torch.bool) if region is None else \
                ~region.mask.to(tau_next.device).expand_as(tau_next)
            if bool(((tau_next - end).abs() > 1e-6)[free].any()):
                raise PolicyError(f"compose: after the last step the update policy {name} leaves tokens away from "
                                  f"the end of the grid ({float(end):.4g}); every token must end there")


def compose(update: Policy, condition: Policy | None = None, known: Policy | None = None) -> Compose:
    """``update``'s update field, ``condition``'s told time (optional) and ``known``'s known region
    (optional, an inpainting / outpainting policy) as one policy; see the module docstring."""
    return Compose(update=update, condition=condition, known=known)
