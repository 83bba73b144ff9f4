"""The testbed's verifiable alignment reward: the exact verifier's score as a reward.

``rewards.load("testbed")`` scores each image by the fraction of its prompt's constraints the
image satisfies (``metric="score"``, GenEval-style, in [0, 1]) or by whether all are satisfied
(``metric="all_correct"``, 0 or 1). Prompts must belong to the testbed grammar
(``tpm.testbed.VOCAB``); any other prompt raises :class:`RewardError` naming the unknown word
rather than scoring 0. There are no weights, so nothing is ever downloaded.

``rewards.load("testbed_spatial")`` is the same verifier for the spatial testbed's scenes
(backgrounds with content, estimated per pixel; ``Verifier.for_domain("spatial")``), and
``rewards.load("testbed_fidelity")`` scores how well the objects and the background are drawn
(:mod:`tpm.testbed.fidelity`: shape, colour, flatness, edge sharpness, background smoothness), a
continuous score that keeps rising with sampling steps after the checks saturate, the part HPS or
ImageReward play on real models. The spatial testbed's training reward is their z-scored
composite, ``--rewards testbed_spatial=1,testbed_fidelity=1`` (AsyncDiff Eq. 16).
"""

from __future__ import annotations

import torch

from rewards.base import RewardError, RewardModel, register_reward
from tpm.testbed import DomainError, Verifier, parse_prompt

METRICS = ("score", "all_correct")
DOMAINS = ("shapes", "spatial")


@register_reward("testbed")
class TestbedReward(RewardModel):
    """Options: ``metric`` ("score" | "all_correct"); ``size``: resize images to size x size before
    verifying (None keeps their own size); ``domain``: "shapes" (the 16-token testbed's plain
    background) or "spatial"; ``device`` / ``dtype`` are accepted and unused (CPU numpy)."""

    __test__ = False  # not a pytest test class despite its name
    default_domain = "shapes"

    def __init__(self, metric: str = "score", size: int | None = None, domain: str | None = None, **kwargs):
        super().__init__(**kwargs)
        if metric not in METRICS:
            raise RewardError(f"{self.name} reward: unknown metric {metric!r}; use one of {list(METRICS)}")
        domain = domain or self.default_domain
        if domain not in DOMAINS:
            raise RewardError(f"{self.name} reward: unknown domain {domain!r}; use one of {list(DOMAINS)}")
        self.metric = metric
        self.size = size
        self.domain = domain
        self.verifier: Verifier | None = None

    def _load(self) -> None:
        try:
            self.verifier = Verifier.for_domain(self.domain, size=self.size)
        except DomainError as e:
            raise RewardError(f"{self.name} reward: {e}") from e

    def _score(self, pixels: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        try:
            specs = [parse_prompt(p) for p in prompts]
            results = [self.verifier.verify(pixels[i], specs[i]) for i in range(len(specs))]
        except DomainError as e:
            raise RewardError(f"{self.name} reward: {e}") from e
        values = [r.score if self.metric == "score" else float(r.all_correct) for r in results]
        return torch.tensor(values, dtype=torch.float32)


@register_reward("testbed_spatial")
class SpatialTestbedReward(TestbedReward):
    """The testbed verifier for the spatial testbed's scenes (``domain="spatial"``); options as ``testbed``."""

    default_domain = "spatial"


@register_reward("testbed_fidelity")
class TestbedFidelityReward(RewardModel):
    """How well the prompt's objects and the background are drawn, in [0, 1] (:mod:`tpm.testbed.fidelity`).

    Options: ``size`` (resize first), ``domain`` ("spatial", default, or "shapes": which verifier
    finds the objects); ``device`` / ``dtype`` accepted and unused (CPU numpy)."""

    __test__ = False

    def __init__(self, size: int | None = None, domain: str = "spatial", **kwargs):
        super().__init__(**kwargs)
        if domain not in DOMAINS:
            raise RewardError(f"testbed_fidelity reward: unknown domain {domain!r}; use one of {list(DOMAINS)}")
        self.size = size
        self.domain = domain
        self.verifier: Verifier | None = None

    def _load(self) -> None:
        try:
            self.verifier = Verifier.for_domain(self.domain, size=self.size)
        except DomainError as e:
            raise RewardError(f"testbed_fidelity reward: {e}") from e

    def _score(self, pixels: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        from tpm.testbed.fidelity import fidelity

        try:
            specs = [parse_prompt(p) for p in prompts]
            values = [fidelity(pixels[i], specs[i], self.verifier).score for i in range(len(specs))]
        except DomainError as e:
            raise RewardError(f"testbed_fidelity reward: {e}") from e
        return torch.tensor(values, dtype=torch.float32)
