"""The testbed's verifiable alignment reward: the exact verifier's score as a reward.

``rewards.load("testbed")`` scores each image by the fraction of its prompt's constraints the
image satisfies (``metric="score"``, GenEval-style, in [0, 1]) or by whether all are satisfied
(``metric="all_correct"``, 0 or 1). Prompts must belong to the testbed grammar
(``tpm.testbed.VOCAB``); any other prompt raises :class:`RewardError` naming the unknown word
rather than scoring 0. There are no weights, so nothing is ever downloaded.
"""

from __future__ import annotations

import torch

from rewards.base import RewardError, RewardModel, register_reward
from tpm.testbed import DomainError, Verifier, parse_prompt

METRICS = ("score", "all_correct")


@register_reward("testbed")
class TestbedReward(RewardModel):
    """Options: ``metric`` ("score" | "all_correct"); ``size``: resize images to size x size before
    verifying (None keeps their own size); ``device`` / ``dtype`` are accepted and unused (CPU numpy)."""

    __test__ = False  # not a pytest test class despite its name

    def __init__(self, metric: str = "score", size: int | None = None, **kwargs):
        super().__init__(**kwargs)
        if metric not in METRICS:
            raise RewardError(f"testbed reward: unknown metric {metric!r}; use one of {list(METRICS)}")
        self.metric = metric
        self.size = size
        self.verifier: Verifier | None = None

    def _load(self) -> None:
        try:
            self.verifier = Verifier(size=self.size)
        except DomainError as e:
            raise RewardError(f"testbed reward: {e}") from e

    def _score(self, pixels: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        try:
            specs = [parse_prompt(p) for p in prompts]
            results = [self.verifier.verify(pixels[i], specs[i]) for i in range(len(specs))]
        except DomainError as e:
            raise RewardError(f"testbed reward: {e}") from e
        values = [r.score if self.metric == "score" else float(r.all_correct) for r in results]
        return torch.tensor(values, dtype=torch.float32)
