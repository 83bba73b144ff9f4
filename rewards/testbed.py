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


class VerifierReward(RewardModel):
    """The base of the testbed rewards: images read by the exact verifier of ``domain`` ("shapes", the
    16-token testbed's plain background, or "spatial"), after resizing to ``size`` x ``size`` (None keeps
    their own size); a prompt outside the grammar raises :class:`RewardError`."""

    __test__ = False  # not a pytest test class despite its name
    default_domain = "shapes"

    def __init__(self, size: int | None = None, domain: str | None = None, **kwargs):
        super().__init__(**kwargs)
        domain = domain or self.default_domain
        if domain not in DOMAINS:
            raise RewardError(f"{self.name} reward: unknown domain {domain!r}; use one of {list(DOMAINS)}")
        self.size = size
        self.domain = domain
        self.verifier: Verifier | None = None

    def _load(self) -> None:
        try:
            self.verifier = Verifier.for_domain(self.domain, size=self.size)
        except DomainError as e:
            raise RewardError(f"{self.name} reward: {e}") from e

    def _per_image(self, pixels: torch.Tensor, prompts: list[str], score) -> torch.Tensor:
        """``score(image, parsed prompt) -> float`` for every image, as a float32 tensor."""
        try:
            specs = [parse_prompt(p) for p in prompts]
            values = [score(pixels[i], specs[i]) for i in range(len(specs))]
        except DomainError as e:
            raise RewardError(f"{self.name} reward: {e}") from e
        return torch.tensor(values, dtype=torch.float32)


@register_reward("testbed")
class TestbedReward(VerifierReward):
    """Options: ``metric`` ("score" | "all_correct"); ``size``, ``domain``: as :class:`VerifierReward`;
    ``device`` / ``dtype`` are accepted and unused (CPU numpy)."""

    def __init__(self, metric: str = "score", size: int | None = None, domain: str | None = None, **kwargs):
        if metric not in METRICS:  # checked first: a wrong metric is the likelier mistake
            raise RewardError(f"{self.name} reward: unknown metric {metric!r}; use one of {list(METRICS)}")
        super().__init__(size=size, domain=domain, **kwargs)
        self.metric = metric

    def _score(self, pixels: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        def check(image, spec) -> float:
            r = self.verifier.verify(image, spec)
            return r.score if self.metric == "score" else float(r.all_correct)

        return self._per_image(pixels, prompts, check)


@register_reward("testbed_spatial")
class SpatialTestbedReward(TestbedReward):
    """The testbed verifier for the spatial testbed's scenes (``domain="spatial"``); options as ``testbed``."""

    default_domain = "spatial"


@register_reward("testbed_fidelity")
class TestbedFidelityReward(VerifierReward):
    """How well the prompt's objects and the background are drawn, in [0, 1] (:mod:`tpm.testbed.fidelity`).

    Options: ``size`` (resize first), ``domain`` ("spatial", default, or "shapes": which verifier
    finds the objects); ``device`` / ``dtype`` accepted and unused (CPU numpy)."""

    default_domain = "spatial"

    def _score(self, pixels: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        from tpm.testbed.fidelity import fidelity

        return self._per_image(pixels, prompts, lambda image, spec: fidelity(image, spec, self.verifier).score)
