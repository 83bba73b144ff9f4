"""The one reward contract the GRPO trainer sees.

A :class:`TrainingReward` splits scoring in two because AsyncDiff's composite reward (Eq. 16)
z-scores every metric over the *whole* batch, which under ``accelerate`` is spread over processes:

- ``metrics(images, prompts)`` runs on each process's share and returns raw per-metric scores,
  ``{name: (n,) tensor}``; a score may be NaN (the trainer then skips the iteration);
- ``combine(metrics)`` runs on the gathered batch and returns the (N,) total reward.

:func:`training_reward` wraps the common cases: a plain ``reward(images, prompts) -> scores``
callable, or a metrics function with its own ``combine``. ``tpm`` does not import ``rewards``; the
recipe builds the metrics from reward models and passes them in.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

Metrics = dict[str, torch.Tensor]


@dataclass
class TrainingReward:
    metrics: Callable[[torch.Tensor, list[str]], Metrics]
    combine: Callable[[Metrics], torch.Tensor]
    # One number per held-out evaluation, from each metric's mean: what ``keep_best`` selects on. The
    # default is the mean of the metric means (the metric itself when there is one).
    summary: Callable[[dict[str, float]], float] | None = None

    def summarise(self, means: dict[str, float]) -> float:
        return float(self.summary(means)) if self.summary is not None else float(sum(means.values()) / len(means))


def training_reward(reward: Callable | TrainingReward,
                    combine: Callable[[Metrics], torch.Tensor] | None = None) -> TrainingReward:
    """A :class:`TrainingReward` from ``reward``: kept as is, or a callable returning (n,) scores
    (one metric named "reward"), or a callable returning a mapping of metrics together with ``combine``."""
    if isinstance(reward, TrainingReward):
        return reward
    if not callable(reward):
        raise TypeError(f"reward must be callable (images, prompts) -> scores, got {type(reward).__name__}")

    def metrics(images, prompts) -> Metrics:
        out = reward(images, prompts)
        if isinstance(out, Mapping):
            if combine is None:
                raise ValueError("the reward returned per-metric scores; pass combine= to turn them into one reward")
            return {k: torch.as_tensor(v).float().reshape(-1) for k, v in out.items()}
        return {"reward": torch.as_tensor(out).float().reshape(-1)}

    if combine is None:
        return TrainingReward(metrics, lambda m: m["reward"])
    return TrainingReward(metrics, combine)
