"""The policy interface: what a timestep policy sees, what it returns, how it is saved.

Notation (flow-matching convention): a token's noise time ``tau`` lies in
[0, 1], 1 = pure noise, 0 = clean. A *field* is a tensor of shape (B, h, w) on the backbone's
token grid. At step k of K the sampler holds the latents ``x_k`` and the update field
``tau_k``; a policy maps the :class:`State` to an :class:`Action`:

- ``tau_next``: the update field after this step (where each token will be);
- ``tau_cond``: the conditioning field the denoiser is queried at (``None`` means ``tau_k``);
- ``log_prob``: for stochastic policies, the log-probability of the action (GRPO needs it).

Policies that GRPO trains subclass :class:`TrainablePolicy`, whose docstring is the contract the
trainer relies on (sampling with a log-probability, the deterministic action, the replay record,
KL to a reference, logged statistics).

Every policy is an ``nn.Module`` (most hold no weights) with a config dataclass. It saves to a
directory as ``config.json`` (+ ``model.safetensors`` when it has weights) with a model card
``README.md`` (:mod:`tpm.model_card`) and loads with ``from_pretrained``;
``policies.load(name_or_path_or_repo_id)`` restores any registered policy, from the Hub too
(:mod:`tpm.hub`), and ``push_to_hub`` uploads one. We do not
use diffusers' ``ConfigMixin`` here because most policies carry tensors-free configs with
nested values (lists, None, strings chosen from a registry) that read best as a dataclass, and
because loading must fail with a message that names the policy registry, not a missing class.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from tpm.fields import synchronous_next
from tpm.io import CONFIG_NAME, WEIGHTS_NAME, load_weights, read_config, write_config_and_weights
from tpm.model_card import CARD_NAME

__all__ = ["ACTION_PREFIX", "CONFIG_NAME", "WEIGHTS_NAME", "Action", "Decision", "KnownRegion", "Policy", "PolicyError",
           "RunContext", "State", "Synchronous", "SynchronousConfig", "TrainablePolicy", "read_policy_config",
           "register_policy", "registered_policies", "split_record"]


_POLICIES: dict[str, type[Policy]] = {}


class PolicyError(ValueError):
    """A user-facing problem with a policy name, directory or argument."""


@dataclass
class State:
    """What the sampler knows at the start of step ``k`` (before the backbone is queried).

    Shapes: B samples, token grid (h, w), N = h*w tokens, C_tok channels per token.
    ``velocity``, ``x0`` and ``attention`` come from the *previous* backbone call (step k-1);
    they are ``None`` at k = 0. AsynDM's Algorithm 1 uses exactly this order: the mask for
    step i's transition comes from the attention of step i-1.
    """

    step: int
    num_steps: int
    sigmas: torch.Tensor  # (K+1,) the synchronous grid the scheduler would use, sigmas[K] = 0
    tau: torch.Tensor  # (B, h, w) update field at step k
    latents: torch.Tensor  # (B, N, C_tok) current latent tokens x_k
    grid: tuple[int, int]  # (h, w)
    prompts: list[str]
    velocity: torch.Tensor | None = None  # (B, N, C_tok) guided model output of the previous step
    x0: torch.Tensor | None = None  # (B, N, C_tok) clean estimate x - tau_cond * v of the previous step
    attention: torch.Tensor | None = None  # (B, n_text, h, w) text->image attention of the previous step
    text_words: list[list[int]] | None = None  # per prompt: word index of each text position (-1: none)
    text_embeds: torch.Tensor | None = None  # (B, T, D) conditional prompt embeddings (backbone's encoder)
    pooled: torch.Tensor | None = None  # (B, D_pooled) conditional pooled prompt embedding
    memory: dict[str, Any] = field(default_factory=dict)  # per-run scratch space owned by the policy

    @property
    def batch_size(self) -> int:
        return self.tau.shape[0]


@dataclass
class Action:
    tau_next: torch.Tensor  # (B, h, w)
    tau_cond: torch.Tensor | None = None  # (B, h, w); None = query at tau_k
    mask: torch.Tensor | None = None  # (B, h, w) bool, for plots/trajectories
    log_prob: torch.Tensor | None = None  # (B,) for stochastic policies
    # Multiplies the Euler update without changing the time bookkeeping (AsyncDiff §5, Eq. 19-20):
    # x_{k+1} = x_k + step_scale * (tau_next - tau_k) * v. (B,) or (B, h, w); None = 1.
    step_scale: torch.Tensor | None = None
    extras: dict[str, torch.Tensor] = field(default_factory=dict)  # what a trainer stores to replay


@dataclass
class KnownRegion:
    """Tokens a policy declares known (AsyncPatch §3.2): held at time 0 with fixed clean latents.

    The sampler writes ``tokens`` into the latents where ``mask`` is True before the first step,
    starts those tokens at time 0, keeps them there exactly, and can use them for input guidance
    (AsyncPatch §3.3). Leading dimension 1 broadcasts over the batch.
    """

    tokens: torch.Tensor  # (B or 1, N, C_tok) clean latent tokens
    mask: torch.Tensor  # (B or 1, h, w) bool, True = known


@dataclass
class RunContext:
    """Handed to :meth:`Policy.begin` once per sampling run.

    ``reference_run`` samples synchronously from the same noise with attention captured from
    the given layers and returns the :class:`tpm.sampler.Trajectory`; policies that need a
    reference run (AsynDM's fixed mask) call it, others ignore it.
    """

    batch_size: int
    grid: tuple[int, int]
    num_steps: int
    prompts: list[str]
    num_attention_layers: int
    reference_run: Callable[[list[int] | None], Any] | None = None
    default_attention_layers: list[int] | None = None  # the backbone's (Backbone.default_attention_layers)


def register_policy(name: str):
    """Class decorator: make a policy loadable by ``name`` (``policies.load(name)``)."""

    def deco(cls: type[Policy]) -> type[Policy]:
        if name in _POLICIES and _POLICIES[name] is not cls:
            raise PolicyError(f"policy name {name!r} is registered twice")
        cls.policy_name = name
        _POLICIES[name] = cls
        return cls

    return deco


def registered_policies() -> dict[str, type[Policy]]:
    return dict(_POLICIES)


class Policy(nn.Module):
    """Base class. Subclasses set ``config_class`` and implement :meth:`act`."""

    policy_name: ClassVar[str] = ""
    config_class: ClassVar[type] = None  # a dataclass
    #: the paper (and equations) the policy implements, shown in its model card
    paper: ClassVar[str] = ""
    # True for policies whose actions are sampled and have a log-probability.
    stochastic: ClassVar[bool] = False

    def __init__(self, config=None, **kwargs):
        super().__init__()
        if config is None:
            try:
                config = self.config_class(**kwargs)
            except TypeError as e:
                names = [f.name for f in dataclasses.fields(self.config_class)]
                raise PolicyError(f"{type(self).__name__}: {e}. Valid options: {names}") from None
        elif kwargs:
            config = dataclasses.replace(config, **kwargs)
        self.config = config

    # --- what the sampler asks -------------------------------------------------------------
    def attention_layers(self, num_layers: int) -> list[int] | None:
        """Indices of the joint-attention layers whose text->image maps this policy reads.

        ``None`` (the default) means no capture, so the backbone runs at full speed.
        """
        return None

    def attention_layers_for(self, backbone) -> list[int] | None:
        """:meth:`attention_layers` for ``backbone`` (what the sampler asks); policies that use the
        backbone's default layers override this."""
        return self.attention_layers(backbone.num_attention_layers)

    def check_backbone(self, backbone) -> None:
        """Raise :class:`PolicyError` if this policy has no meaning on ``backbone`` (a
        ``tpm.backbones.Backbone``); called once per run before anything is computed."""

    def attention_tokens(self, prompts: list[str], text_words: list[list[int]] | None) -> list[list[int]] | None:
        """Per sample, the text positions whose maps this policy reads; ``None`` (default) = all.

        Asked only when :meth:`attention_layers` is not ``None``. Naming the positions lets the
        backbone compute the maps of those tokens only (AsynDM reads only the object words').
        The maps at the other positions may then be zero in ``State.attention``.
        """
        return None

    def conditioning_time_levels(self) -> int | None:
        """At most this many distinct conditioning times per sample and step, or ``None`` (exact).

        Bounds the cost of per-token time modulation for fields in which every token may have
        its own time (:mod:`tpm.backbones.modulation`); ``tpm.sample(time_levels=...)`` overrides.
        """
        return None

    def begin(self, ctx: RunContext) -> dict[str, Any]:
        """Called once per run; returns the initial ``State.memory``."""
        return {}

    def known_region(self) -> KnownRegion | None:
        """Tokens this policy holds known and clean from the start (inpainting); ``None`` for most.

        A policy that returns a region must keep ``tau_next == 0`` on it; the sampler checks.
        """
        return None

    def act(self, state: State) -> Action:
        raise NotImplementedError

    def forward(self, state: State) -> Action:  # nn.Module call -> act
        return self.act(state)

    # --- persistence -----------------------------------------------------------------------
    def config_dict(self) -> dict[str, Any]:
        return {"policy": self.policy_name, **dataclasses.asdict(self.config)}

    def card_info(self) -> dict[str, Any]:
        """What a model card says about this policy (:mod:`tpm.model_card`)."""
        def first_paragraph(doc):
            return " ".join((doc or "").strip().split("\n\n")[0].split())

        own = first_paragraph(type(self).__doc__).replace(": see the module docstring.", ".")
        module = sys.modules[type(self).__module__]
        # A policy family's module docstring names the method; tpm.policy's describes the interface.
        summary = own if module.__name__ == __name__ else first_paragraph(module.__doc__)
        return {"policy": self.policy_name, "class": f"{type(self).__module__}.{type(self).__qualname__}",
                "summary": summary, "detail": own if own != summary else "", "paper": self.paper,
                "config": self.config_dict(), "parameters": sum(p.numel() for p in self.parameters()),
                "stochastic": self.stochastic}

    def save_pretrained(self, path: str | os.PathLike) -> None:
        """``config.json`` (+ ``model.safetensors``) and a model card ``README.md``: the card this policy
        was loaded with (a training run's, say), else one describing the policy."""
        from tpm.model_card import write_policy_card

        write_config_and_weights(path, self.config_dict(), self)
        write_policy_card(path, self.card_info(), getattr(self, "card_text", None))

    def push_to_hub(self, repo_id: str, *, revision: str | None = None, private: bool | None = None,
                    token: str | bool | None = None, commit_message: str | None = None, create_pr: bool = False):
        """Upload this policy (what :meth:`save_pretrained` writes, card included) to Hub repo ``repo_id``,
        created if missing, as one commit to branch ``revision`` (default main); returns huggingface_hub's
        ``CommitInfo``. Load it back with ``policies.load(repo_id)``."""
        import tempfile

        from tpm.hub import push_folder

        with tempfile.TemporaryDirectory() as tmp:
            self.save_pretrained(tmp)
            return push_folder(tmp, repo_id, revision=revision, private=private, token=token,
                               commit_message=commit_message or f"Upload tpm {self.policy_name} policy",
                               create_pr=create_pr)

    @classmethod
    def from_config_dict(cls, cfg: dict[str, Any]) -> Policy:
        cfg = dict(cfg)
        cfg.pop("policy", None)
        names = {f.name for f in dataclasses.fields(cls.config_class)}
        unknown = sorted(set(cfg) - names)
        if unknown:
            raise PolicyError(
                f"{cls.__name__} config has unknown keys {unknown}; valid keys are {sorted(names)}"
            )
        return cls(cls.config_class(**cfg))

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> Policy:
        cfg = read_policy_config(path)
        name = cfg.get("policy")
        target = cls
        if cls is Policy or cls.policy_name != name:
            if name not in _POLICIES:
                raise PolicyError(
                    f"{path}/{CONFIG_NAME} names policy {name!r}, which is not registered; "
                    f"known policies: {sorted(_POLICIES)} (import `policies` to register them)"
                )
            target = _POLICIES[name]
            if cls is not Policy and not issubclass(target, cls):
                raise PolicyError(f"{path} holds a {name!r} policy, not a {cls.policy_name!r} one")
        policy = target.from_config_dict(cfg)
        load_weights(path, policy, label=f"{name!r} policy", kind="policy", error=PolicyError)
        card = os.path.join(path, CARD_NAME)
        if os.path.isfile(card):  # kept, so that save_pretrained / push_to_hub pass it on
            with open(card) as f:
                policy.card_text = f.read()
        return policy.eval()



# ---- the trainable-policy contract (what GRPO relies on) ------------------------------------------
ACTION_PREFIX = "action:"


@dataclass
class Decision:
    """One step's decision: the action parts, their log-probability and the replay record.

    ``record`` holds exactly what :meth:`TrainablePolicy.log_prob` needs to score the action again
    without the backbone: the network inputs (detached) and every action part under
    ``"action:<part>"``. Each tensor's first dimension is the batch.
    """

    action: dict[str, torch.Tensor]
    log_prob: torch.Tensor  # (B,)
    record: dict[str, torch.Tensor]


def split_record(record: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(inputs, action parts) of a decision record."""
    inputs = {k: v for k, v in record.items() if not k.startswith(ACTION_PREFIX)}
    action = {k[len(ACTION_PREFIX):]: v for k, v in record.items() if k.startswith(ACTION_PREFIX)}
    return inputs, action


class TrainablePolicy(Policy):
    """The contract of every policy GRPO trains; ``tpm.grpo`` uses nothing else.

    1. **Sampling with a log-probability.** At a step where it decides, the policy builds its
       network inputs from the :class:`State` and calls :meth:`decide`, which asks
       :meth:`distribution` for a :class:`tpm.distributions.BetaActions` and draws from it when
       ``explore`` is on (GRPO rollouts; :meth:`exploring` switches it for a block). ``act`` turns
       the action into fields and returns an :class:`Action` with ``log_prob`` (B,) set and
       ``extras`` = the decision's record. Steps without a decision leave ``log_prob`` None.
    2. **The deterministic action.** With ``explore`` off (the default, and what
       ``from_pretrained`` returns) :meth:`decide` takes the mode (or the mean where the config's
       ``deterministic`` says so), so sampling with the policy is deterministic given the noise.
    3. **The replay record.** ``Action.extras`` holds the network inputs (detached) and the action
       parts under ``"action:<part>"``; :meth:`log_prob` recomputes the log-probability from it
       alone, with gradients. Keys in ``static_inputs`` are the same at every step of a run (the
       prompt embeddings), so a rollout stores them once per sample. Every decision of a run has
       the same keys and shapes.
    4. **KL to a reference.** :meth:`kl` gives KL(self || reference) per sample at recorded inputs
       (the reference is usually a frozen copy of the starting policy).
    5. **Statistics.** :meth:`decision_stats` maps a batch of action parts, stacked (N, S, ...)
       over N samples and S decisions, to named floats the trainer logs and prints.
    """

    stochastic = True
    static_inputs: ClassVar[tuple[str, ...]] = ()
    # What a training run must give the policy, declared here so that the run never tests policy names.
    sized_to_image: ClassVar[bool] = False  # for_pipeline takes image_size=(height, width): it acts on the token grid
    takes_warm_start: ClassVar[bool] = False  # it can imitate a fixed policy before GRPO (policies.field_imitation)

    def __init__(self, config=None, **kwargs):
        super().__init__(config, **kwargs)
        self.explore = False  # a runtime switch, not config: never saved
        self.generators: list[torch.Generator] | None = None  # per-sample draws (see exploring)

    @contextmanager
    def exploring(self, on: bool = True, generators: list[torch.Generator] | None = None):
        """Within the block the policy samples its actions (on) or acts deterministically (off).

        ``generators``: one CPU generator per sample of the batch the policy will act on; sample i's
        draws then come from ``generators[i]`` only, so they do not depend on the batch around it
        (GRPO seeds them by global sample index, which makes a run independent of the process count).
        Without them the draws come from torch's global generator.
        """
        old, self.explore = (self.explore, self.generators), on
        self.generators = generators
        try:
            yield self
        finally:
            self.explore, self.generators = old

    # --- what a trainable policy implements ---------------------------------------------------
    def distribution(self, inputs: dict[str, torch.Tensor]):
        """The :class:`tpm.distributions.BetaActions` of the action at ``inputs`` (differentiable)."""
        raise NotImplementedError

    def decision_stats(self, actions: dict[str, torch.Tensor]) -> dict[str, float]:
        """Named statistics of a batch of action parts, each (N, S, ...). Default: mean of each part."""
        return {f"action/{k}": float(v.float().mean()) for k, v in actions.items()}

    # --- provided -----------------------------------------------------------------------------
    def decide(self, inputs: dict[str, torch.Tensor]) -> Decision:
        """Sample (exploring) or take the deterministic action at ``inputs``, without gradients."""
        with torch.no_grad():
            dist = self.distribution(inputs)
            if self.explore:
                action = dist.sample(getattr(self, "generators", None))
            elif getattr(self.config, "deterministic", "mode") == "mean":
                action = dist.mean()
            else:
                action = dist.mode()
            logp = dist.log_prob(action)
        record = {**inputs, **{ACTION_PREFIX + k: v for k, v in action.items()}}
        return Decision(action=action, log_prob=logp, record=record)

    def log_prob(self, record: dict[str, torch.Tensor]) -> torch.Tensor:
        """(B,) log-probability of the recorded action under the current parameters (differentiable)."""
        inputs, action = split_record(record)
        return self.distribution(inputs).log_prob(action)

    def kl(self, record: dict[str, torch.Tensor], reference: TrainablePolicy) -> torch.Tensor:
        """(B,) KL(self || reference) at the recorded inputs; no gradient flows into ``reference``."""
        inputs, _ = split_record(record)
        with torch.no_grad():
            ref = reference.distribution(inputs)
        return self.distribution(inputs).kl(ref)


def read_policy_config(path: str | os.PathLike) -> dict[str, Any]:
    """``path/config.json`` of an exported policy; :class:`PolicyError` says what is wrong with it."""
    return read_config(path, key="policy", kind="policy", hint="export one with `policy.save_pretrained(dir)`",
                       error=PolicyError)


# --- the synchronous policy --------------------------------------------------------------------
# Defined here, next to the interface, because the sampler uses it for ``policy=None``.


@dataclass
class SynchronousConfig:
    """The synchronous policy has no options."""


@register_policy("synchronous")
class Synchronous(Policy):
    """Every token on the pipeline's own grid (diffusers' default): ``tpm.sample`` with this policy
    equals ``pipe(...)``; the baseline every other policy is compared with."""

    config_class = SynchronousConfig

    def act(self, state: State) -> Action:
        return Action(tau_next=synchronous_next(state))


def trainable_policies() -> dict[str, type[TrainablePolicy]]:
    """The registered policies GRPO can train, by name (import ``policies`` first to register them)."""
    return {name: cls for name, cls in sorted(_POLICIES.items()) if issubclass(cls, TrainablePolicy)}
