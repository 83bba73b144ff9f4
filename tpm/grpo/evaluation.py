"""Held-out evaluation for GRPO runs: per-image rewards of any policy on fixed prompts and noises.

Which noises: the evaluation protocol (:mod:`tpm.comparison.protocol`). Image j of noise set s
starts from the noise seeded by ``noise_seed(s, j)`` whatever the policy, step count or run, so two
evaluations on the same prompts are paired image by image, and ``tpm compare`` on the same prompts
and noise sets scores the same images: a trained policy, its starting point, the synchronous sampler and a fixed baseline are
compared on identical noises. Sampling reuses :func:`tpm.grpo.rollout.rollout` (deterministic
actions), so a trainable policy is evaluated exactly as it is trained, minus exploration.
Prompts are split over ``accelerate`` processes and the scores gathered in prompt order.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from tpm.comparison.protocol import noise_seeds
from tpm.grpo.reward import TrainingReward
from tpm.grpo.rollout import rollout
from tpm.policy import Synchronous


@dataclass
class EvalResult:
    """Per-image raw scores per metric (prompt order), the total reward, and the policy's action statistics."""

    metrics: dict[str, np.ndarray]
    total: np.ndarray
    stats: dict[str, float] = field(default_factory=dict)
    images: torch.Tensor | None = None  # the first images (this process's share), for grids

    def means(self) -> dict[str, float]:
        out = {k: float(np.mean(v)) for k, v in self.metrics.items()}
        return {**out, **self.stats}


def evaluation_seeds(n: int, seed: int = 0) -> list[int]:
    """The noise seeds of prompts ``0 .. n-1`` in noise set ``seed`` (the protocol's :func:`noise_seeds`)."""
    return noise_seeds(n, seed)


@torch.no_grad()
def evaluate(pipe, policy, prompts: Sequence[str], reward: TrainingReward, *, accelerator=None, seed: int = 0,
             noise_sets: int = 1, num_inference_steps: int | None = None, height: int | None = None,
             width: int | None = None, rollout_batch_size: int = 16, sample_kwargs: dict[str, Any] | None = None,
             keep_images: int = 0) -> EvalResult:
    """Score ``policy`` (``None`` = synchronous) on ``prompts`` from the evaluation noises of noise sets
    ``seed .. seed + noise_sets - 1``; with several sets each prompt's scores are averaged over them."""
    runs = [_evaluate_once(pipe, policy, prompts, reward, accelerator, seed + i, num_inference_steps, height, width,
                           rollout_batch_size, sample_kwargs, keep_images if i == 0 else 0)
            for i in range(max(1, noise_sets))]
    if len(runs) == 1:
        return runs[0]
    metrics = {k: np.mean([r.metrics[k] for r in runs], axis=0) for k in runs[0].metrics}
    stats = {k: float(np.mean([r.stats[k] for r in runs])) for k in runs[0].stats}
    return EvalResult(metrics, np.mean([r.total for r in runs], axis=0), stats, runs[0].images)


def _evaluate_once(pipe, policy, prompts, reward, accelerator, seed, num_inference_steps, height, width,
                   rollout_batch_size, sample_kwargs, keep_images) -> EvalResult:
    prompts = list(prompts)
    procs = 1 if accelerator is None else accelerator.num_processes
    rank = 0 if accelerator is None else accelerator.process_index
    per = math.ceil(len(prompts) / procs)
    padded = prompts + [prompts[-1]] * (per * procs - len(prompts))
    lo = rank * per
    local = padded[lo:lo + per]
    seeds = evaluation_seeds(per * procs, seed)[lo:lo + per]
    pol = Synchronous() if policy is None else policy
    pol.eval()
    batch = rollout(pipe, pol, local, seeds, num_inference_steps=num_inference_steps, height=height, width=width,
                    rollout_batch_size=rollout_batch_size, sample_kwargs=sample_kwargs, explore=False)
    raw = reward.metrics(batch.images, local)

    def gather(t: torch.Tensor) -> torch.Tensor:
        """(per, ...) on each process -> (len(prompts), ...) in prompt order."""
        t = torch.as_tensor(t).detach().float()
        if accelerator is not None and procs > 1:
            t = accelerator.gather(t.to(accelerator.device))
        return t.cpu()[: len(prompts)]

    metrics = {k: gather(torch.as_tensor(v).reshape(-1)).numpy() for k, v in raw.items()}
    total = reward.combine({k: torch.as_tensor(v) for k, v in metrics.items()})
    stats: dict[str, float] = {}
    if batch.num_decisions and hasattr(pol, "decision_stats"):
        acts = {k: gather(v) for k, v in batch.actions.items()}
        stats = pol.decision_stats(acts)
    images = batch.images[:keep_images] if keep_images else None
    return EvalResult(metrics, torch.as_tensor(total).float().numpy(), stats, images)
