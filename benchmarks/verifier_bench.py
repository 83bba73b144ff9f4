"""What the held-out benchmarks share: policies scored by the testbed verifier on paired noises.

``headroom.py``, ``heldout_gain.py`` and ``field_schedule_scan.py`` all load a pipeline and a prompt
set, score policies with :func:`tpm.grpo.evaluate` under the evaluation protocol
(:mod:`tpm.comparison.protocol`: image j of noise set s starts from the same noise under every policy,
so scores pair up, and a training report or ``tpm compare`` on the same prompts and noise sets scores
the same images), average each prompt over the noise sets, compare with the protocol's paired
bootstrap over prompts, and write ``NAME.json`` + ``NAME.md``. This module is that part once.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

import numpy as np
import torch


class VerifierBench:
    """``model`` and ``prompts`` loaded once; :meth:`scores` gives per-prompt verifier scores."""

    def __init__(self, model: str, prompts: str, *, threads: int = 2, batch_size: int = 128, reward: str | None = None):
        import rewards
        from tpm.backbones import get_backbone
        from tpm.grpo import training_reward
        from tpm.loading import load_model, load_prompts, testbed_domain

        torch.set_num_threads(threads)
        self.pipe = load_model(model)
        self.backbone = get_backbone(self.pipe)
        self.sample_kwargs = self.backbone.sample_kwargs()
        self.prompts = load_prompts(prompts)
        self.batch_size = batch_size
        # The spatial testbed's prompts are scored by its own verifier unless a reward is named.
        default = "testbed_spatial" if testbed_domain(prompts) == "spatial" else "testbed"
        verifier = rewards.load(reward or default)
        self.reward = training_reward(lambda images, p: verifier.raw_scores(images, p))

    def scores(self, policy, steps: int, noise_sets: Sequence[int]) -> np.ndarray:
        """(prompts,) scores of ``policy`` (None = synchronous) at ``steps``, each the mean over ``noise_sets``."""
        from tpm.grpo import evaluate

        runs = [evaluate(self.pipe, policy, self.prompts, self.reward, seed=s, num_inference_steps=steps,
                         rollout_batch_size=self.batch_size, sample_kwargs=self.sample_kwargs).metrics["reward"]
                for s in noise_sets]
        return np.mean(runs, axis=0)


def paired_interval(a: np.ndarray, b: np.ndarray) -> list[float]:
    """[mean of a - b, low, high]: the evaluation protocol's paired bootstrap over prompts
    (:func:`tpm.comparison.protocol.paired_difference`), rounded to 4 decimals."""
    from tpm.comparison.protocol import paired_difference, rounded

    return rounded(paired_difference(a, b))


def write_report(out: str, name: str, report: dict, markdown: str) -> None:
    """Print ``report`` as JSON and, when ``out`` is set, write ``out/NAME.json`` and ``out/NAME.md``."""
    text = json.dumps(report, indent=2)
    print(text)
    if not out:
        return
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, f"{name}.json"), "w") as f:
        f.write(text)
    with open(os.path.join(out, f"{name}.md"), "w") as f:
        f.write(markdown)
