"""GRPO rollouts: sample with the frozen backbone under ``no_grad``, keep what replay needs.

Each sample is denoised by ``tpm.sample`` from its own seeded noise while the policy (switched to
exploring, i.e. sampling its actions) decides at every step. A thin recording wrapper collects
the policy's :class:`~tpm.policy.Action` objects instead of asking the sampler for a full
trajectory, so no latents are copied per step: per decision only ``Action.extras`` (the policy
network's inputs and the sampled action) and ``Action.log_prob`` are kept, and extras the policy
marks as constant over a run (``policy.static_extras``, e.g. pooled prompt embeddings) are kept
once per sample. The trainer replays them through the policy network alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from tpm.policy import Action, Policy, PolicyError, RunContext, State
from tpm.sampler import sample


class _Recorder(Policy):
    """Delegates to ``inner`` and records its actions (not registered, never saved)."""

    config_class = dict

    def __init__(self, inner: Policy):
        super().__init__(config={})
        object.__setattr__(self, "inner", inner)  # not a submodule: the recorder owns no weights
        self.actions: list[Action] = []

    def attention_layers(self, num_layers: int):
        return self.inner.attention_layers(num_layers)

    def known_region(self):
        return self.inner.known_region() if hasattr(self.inner, "known_region") else None

    def begin(self, ctx: RunContext) -> dict[str, Any]:
        self.actions = []
        return self.inner.begin(ctx)

    def act(self, state: State) -> Action:
        action = self.inner.act(state)
        self.actions.append(action)
        return action


@dataclass
class RolloutBatch:
    """N samples' rollouts. ``steps[key]``: (N, S, ...) over the S decision steps; ``static[key]``:
    (N, ...); ``log_probs``: (N, S) log-probabilities under the rollout policy; ``images``:
    (N, 3, H, W) float in [0, 1] on CPU."""

    prompts: list[str]
    images: torch.Tensor
    steps: dict[str, torch.Tensor]
    static: dict[str, torch.Tensor]
    log_probs: torch.Tensor

    def __len__(self) -> int:
        return len(self.prompts)

    @property
    def num_decisions(self) -> int:
        return self.log_probs.shape[1]

    def replay_inputs(self, idx: torch.Tensor) -> dict[str, torch.Tensor]:
        """Inputs of samples ``idx`` for all their decisions, flattened to (len(idx) * S, ...) rows
        (row i * S + s is sample idx[i], decision s), so the network replays them in one call."""
        s = self.num_decisions
        out = {k: v[idx].flatten(0, 1) for k, v in self.steps.items()}
        out.update({k: v[idx].repeat_interleave(s, dim=0) for k, v in self.static.items()})
        return out

    def stored_bytes(self) -> int:
        """Bytes kept for replay (step inputs, per-sample inputs, log-probs), images excluded."""
        tensors = [*self.steps.values(), *self.static.values(), self.log_probs]
        return sum(t.numel() * t.element_size() for t in tensors)

    @staticmethod
    def concat(parts: list[RolloutBatch]) -> RolloutBatch:
        return RolloutBatch(
            prompts=[p for part in parts for p in part.prompts],
            images=torch.cat([p.images for p in parts]),
            steps={k: torch.cat([p.steps[k] for p in parts]) for k in parts[0].steps},
            static={k: torch.cat([p.static[k] for p in parts]) for k in parts[0].static},
            log_probs=torch.cat([p.log_probs for p in parts]),
        )


def collect(actions: list[Action], static_keys: tuple[str, ...]) -> tuple[dict, dict, torch.Tensor]:
    """Stack the decisions (actions with a log-probability) of one run into (B, S, ...) tensors."""
    decisions = [a for a in actions if a.log_prob is not None]
    if not decisions:
        raise PolicyError("the policy took no stochastic decision in this run; GRPO needs a stochastic policy "
                          "(one whose actions carry log_prob), e.g. policies.TPM")
    keys = set(decisions[0].extras)
    steps = {k: torch.stack([a.extras[k] for a in decisions], dim=1) for k in sorted(keys - set(static_keys))}
    static = {k: decisions[0].extras[k] for k in sorted(keys & set(static_keys))}
    log_probs = torch.stack([a.log_prob for a in decisions], dim=1)
    return steps, static, log_probs


@torch.no_grad()
def rollout(pipe, policy: Policy, prompts: list[str], seeds: list[int], *, num_inference_steps: int | None = None,
            height: int | None = None, width: int | None = None, rollout_batch_size: int = 16,
            sample_kwargs: dict[str, Any] | None = None, explore: bool = True,
            progress: bool = False) -> RolloutBatch:
    """Denoise ``prompts[i]`` from noise seeded by ``seeds[i]`` (a CPU ``torch.Generator`` per sample,
    so a sample's noise does not depend on how the batch is split) with the policy exploring."""
    if len(prompts) != len(seeds):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds; pass one seed per sample")
    if not getattr(policy, "stochastic", False):
        raise PolicyError(f"{type(policy).__name__} is not stochastic; GRPO trains policies with log-probabilities")
    static_keys = tuple(getattr(policy, "static_extras", ()))
    recorder = _Recorder(policy)
    parts: list[RolloutBatch] = []
    old = getattr(policy, "explore", None)
    policy.explore = explore
    try:
        for s in range(0, len(prompts), rollout_batch_size):
            chunk = prompts[s:s + rollout_batch_size]
            gens = [torch.Generator().manual_seed(int(seed)) for seed in seeds[s:s + rollout_batch_size]]
            out = sample(pipe, chunk, policy=recorder, num_inference_steps=num_inference_steps, height=height,
                         width=width, generator=gens, output_type="pt", **(sample_kwargs or {}))
            steps, static, log_probs = collect(recorder.actions, static_keys)
            parts.append(RolloutBatch(list(chunk), out.images.detach().float().cpu(), steps, static, log_probs))
    finally:
        policy.explore = old
    return RolloutBatch.concat(parts)
