"""The evaluation protocol: which (prompt, noise) pairs an evaluation scores, and its paired interval.

Every held-out number of tpm comes from here: the training run's evaluations and report
(:mod:`tpm.grpo.evaluation`, :mod:`tpm.app.report`), ``tpm compare`` (:mod:`tpm.comparison.runner`)
and ``benchmarks/heldout_gain.py``. So a number of one can be reproduced by another.

Noise. An evaluation scores prompts ``0 .. n-1`` (their place in the evaluated list) under noise
sets ``s`` (small integers: 0, 1, ... or 1000-1007 for a test split kept for claims). Image
(prompt ``j``, noise set ``s``) starts from the noise of a CPU ``torch.Generator`` seeded by
:func:`noise_seed`, a hash of ``(s, j)``: every prompt gets its own draw in every noise set, and the
same draw under every policy and step count, so two policies pair image by image. With
``common=True`` (asked for explicitly, ``tpm compare --common-noise``) every prompt of noise set
``s`` starts from the same noise, a generator seeded by ``s`` itself; a mean over prompts is then
conditional on a handful of noises, which suits pictures, not claims.

Interval. Scores are averaged per prompt over the noise sets, and the difference of two policies is
a percentile bootstrap over prompts of the mean paired difference (:func:`paired_difference`;
:data:`RESAMPLES` resamples, 95 %, seed 0). Prompts are the units resampled because the images of
one prompt are correlated.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from tpm.comparison.stats import Interval, bootstrap_mean, paired_bootstrap

RESAMPLES = 4000  # bootstrap resamples of every interval the protocol reports
LEVEL = 0.95


def noise_seed(noise_set: int, prompt_index: int, common: bool = False) -> int:
    """The seed of the initial noise of image (``prompt_index``, ``noise_set``): drawn per pair, or the
    noise set's one seed for every prompt when ``common``."""
    if common:
        return int(noise_set)
    from tpm.grpo.seeds import Stream, seed_for

    return seed_for(int(noise_set), Stream.EVAL_NOISE, int(prompt_index))


def noise_seeds(n_prompts: int, noise_set: int = 0, common: bool = False) -> list[int]:
    """The seeds of prompts ``0 .. n_prompts - 1`` in noise set ``noise_set`` (:func:`noise_seed`)."""
    return [noise_seed(noise_set, j, common) for j in range(n_prompts)]


def per_prompt(scores, prompt_index: Sequence[int] | None = None) -> np.ndarray:
    """Scores averaged per prompt: ``scores`` is (prompts,), (prompts, noise sets), or flat with the
    ``prompt_index`` of each score (then the result follows the sorted prompt indices)."""
    x = np.asarray(scores, dtype=np.float64)
    if prompt_index is None:
        return x.reshape(len(x), -1).mean(axis=1) if x.ndim > 1 else x
    idx = np.asarray(prompt_index)
    if idx.shape != x.reshape(-1).shape:
        raise ValueError(f"{x.size} scores but {idx.size} prompt indices; give one index per score")
    _, inverse = np.unique(idx, return_inverse=True)
    sums = np.bincount(inverse, weights=x.reshape(-1))
    return sums / np.bincount(inverse)


def mean_interval(scores, prompt_index: Sequence[int] | None = None, *, num_resamples: int = RESAMPLES,
                  level: float = LEVEL) -> Interval:
    """The mean score with a bootstrap interval over prompts (each prompt averaged over its noise sets)."""
    return bootstrap_mean(per_prompt(scores, prompt_index), num_resamples=num_resamples, level=level)


def paired_difference(a, b, prompt_index: Sequence[int] | None = None, *, num_resamples: int = RESAMPLES,
                      level: float = LEVEL) -> Interval:
    """Mean of ``a - b`` with the paired bootstrap over prompts; ``a`` and ``b`` hold the same images
    (prompt, noise set) under two policies, laid out as for :func:`per_prompt`."""
    return paired_bootstrap(per_prompt(a, prompt_index), per_prompt(b, prompt_index), num_resamples=num_resamples,
                            level=level)


def rounded(iv: Interval, digits: int = 4) -> list[float]:
    """[estimate, low, high] rounded, as the reports write them."""
    return [round(iv.estimate, digits), round(iv.low, digits), round(iv.high, digits)]
