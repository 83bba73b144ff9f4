"""Rollouts: sample with the frozen backbone under ``no_grad`` and keep what replay needs.

Each sample is denoised by ``tpm.sample`` from its own seeded noise while the policy decides at
every step (sampling its actions when exploring, deterministic otherwise); a step callback collects
the policy's actions. Per decision only the
:class:`~tpm.policy.TrainablePolicy` record (the network's inputs and the action parts) and the
log-probability are kept, no latents; record entries the policy lists in ``static_inputs`` (the
prompt embeddings) are kept once per sample. The trainer replays them through the policy network
alone. A policy without decisions (a fixed schedule) rolls out too, with nothing recorded: the
evaluation uses the same code for baselines and for the trained policy.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch

from tpm.policy import ACTION_PREFIX, Action, Policy
from tpm.sampler import StepOutput, sample


@dataclass
class RolloutBatch:
    """N samples' rollouts. ``steps[key]``: (N, S, ...) record entries over the S decisions;
    ``static[key]``: (N, ...); ``log_probs``: (N, S) under the rollout policy; ``images``: (N, 3, H, W)
    float in [0, 1] on CPU."""

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

    @property
    def actions(self) -> dict[str, torch.Tensor]:
        """The action parts, each (N, S, ...)."""
        return {k[len(ACTION_PREFIX):]: v for k, v in self.steps.items() if k.startswith(ACTION_PREFIX)}

    def records(self, idx: torch.Tensor) -> dict[str, torch.Tensor]:
        """Records of samples ``idx`` for all their decisions, flattened to (len(idx) * S, ...) rows
        (row i * S + s is sample idx[i], decision s), so the network replays them in one call."""
        s = self.num_decisions
        out = {k: v[idx].flatten(0, 1) for k, v in self.steps.items()}
        out.update({k: v[idx].repeat_interleave(s, dim=0) for k, v in self.static.items()})
        return out

    def stored_bytes(self) -> int:
        """Bytes kept for replay (step records, per-sample inputs, log-probs), images excluded."""
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


def collect(actions: list[Action], static_keys: tuple[str, ...], batch: int) -> tuple[dict, dict, torch.Tensor]:
    """Stack the decisions (actions with a log-probability) of one run into (B, S, ...) tensors."""
    decisions = [a for a in actions if a.log_prob is not None]
    if not decisions:
        return {}, {}, torch.zeros(batch, 0)
    keys = set(decisions[0].extras)
    steps = {k: torch.stack([a.extras[k].detach().cpu() for a in decisions], dim=1)
             for k in sorted(keys - set(static_keys))}
    static = {k: decisions[0].extras[k].detach().cpu() for k in sorted(keys & set(static_keys))}
    log_probs = torch.stack([a.log_prob.detach().cpu() for a in decisions], dim=1)
    return steps, static, log_probs


@torch.no_grad()
def rollout(pipe, policy: Policy, prompts: list[str], seeds: list[int], *, num_inference_steps: int | None = None,
            height: int | None = None, width: int | None = None, rollout_batch_size: int = 16,
            sample_kwargs: dict[str, Any] | None = None, explore: bool = True,
            action_seeds: list[int] | None = None) -> RolloutBatch:
    """Denoise ``prompts[i]`` from noise seeded by ``seeds[i]`` (a CPU ``torch.Generator`` per sample,
    so a sample's noise does not depend on how the batch is split); a trainable policy samples its
    actions when ``explore`` and acts deterministically otherwise. With ``action_seeds`` sample i's
    action draws come from a generator seeded by ``action_seeds[i]`` (likewise independent of the
    split); without, from torch's global generator."""
    if len(prompts) != len(seeds):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds; pass one seed per sample")
    if action_seeds is not None and len(action_seeds) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(action_seeds)} action seeds; pass one per sample")
    static_keys = tuple(getattr(policy, "static_inputs", ()))
    actions: list[Action] = []

    def record(out: StepOutput) -> None:
        actions.append(out.action)

    parts: list[RolloutBatch] = []
    switch = getattr(policy, "exploring", None)
    for s in range(0, len(prompts), rollout_batch_size):
        chunk = prompts[s:s + rollout_batch_size]
        gens = [torch.Generator().manual_seed(int(seed)) for seed in seeds[s:s + rollout_batch_size]]
        draws = (None if action_seeds is None else
                 [torch.Generator().manual_seed(int(a)) for a in action_seeds[s:s + rollout_batch_size]])
        ctx = switch(explore, generators=draws) if switch is not None else nullcontext()
        with ctx:
            actions.clear()
            out = sample(pipe, chunk, policy=policy, num_inference_steps=num_inference_steps, height=height,
                         width=width, generator=gens, output_type="pt", callback=record, **(sample_kwargs or {}))
            steps, static, log_probs = collect(actions, static_keys, len(chunk))
            parts.append(RolloutBatch(list(chunk), out.images.detach().float().cpu(), steps, static, log_probs))
    return RolloutBatch.concat(parts)

