"""Statistics for comparison tables: means with a 95 % interval and paired differences.

Pure numpy, seeded. Both intervals are percentile bootstraps that resample *prompts* (clusters),
each with all its seeds, because images of one prompt are correlated: resampling single
(prompt, seed) pairs would treat them as independent and make the interval too narrow. The
difference between two policies is bootstrapped on per-image paired differences (same prompt,
same seed, same initial noise), which removes the large prompt-to-prompt variance that both
policies share: the comparison of AsynDM Table 1, with its noise shown.

Written by hand because the bootstrap we need (paired, clustered, reproducible from one seed)
is a few lines of numpy, and ``scipy.stats.bootstrap`` (scipy is not a dependency) has no
cluster resampling.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Interval:
    """A point estimate with a two-sided interval at ``level``; ``n`` independent units (clusters)."""

    estimate: float
    low: float
    high: float
    n: int
    level: float = 0.95

    @property
    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0

    def format(self, digits: int = 3, signed: bool = False) -> str:
        sign = "+" if signed else ""
        return f"{self.estimate:{sign}.{digits}f} [{self.low:.{digits}f}, {self.high:.{digits}f}]"


def _cluster_means(values: np.ndarray, groups: Sequence | None) -> tuple[np.ndarray, np.ndarray]:
    """Per-cluster sums and sizes (each value its own cluster when ``groups`` is None)."""
    if groups is None:
        return values.astype(np.float64), np.ones(len(values))
    groups = np.asarray(groups)
    if groups.shape != values.shape:
        raise ValueError(f"groups has shape {groups.shape}, values {values.shape}; give one group per value")
    _, inverse = np.unique(groups, return_inverse=True)
    sums = np.bincount(inverse, weights=values.astype(np.float64))
    sizes = np.bincount(inverse).astype(np.float64)
    return sums, sizes


def _check(values) -> np.ndarray:
    x = np.asarray(values, dtype=np.float64).reshape(-1)
    if x.size == 0:
        raise ValueError("no values: need at least one score to summarise")
    if not np.all(np.isfinite(x)):
        raise ValueError("scores contain NaN or inf; fix the reward before summarising")
    return x


def bootstrap_mean(values, groups: Sequence | None = None, *, num_resamples: int = 10_000, level: float = 0.95,
                   seed: int = 0) -> Interval:
    """Mean of ``values`` with a percentile-bootstrap interval, resampling clusters ``groups``.

    A resample draws as many clusters as there are, with replacement, and takes the mean of all
    values in the drawn clusters (sum of their sums / sum of their sizes). With ``groups=None``
    every value is its own cluster (the ordinary bootstrap of the mean). Deterministic in ``seed``.
    """
    x = _check(values)
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    sums, sizes = _cluster_means(x, groups)
    n = len(sums)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(num_resamples, n))
    boot = sums[idx].sum(1) / sizes[idx].sum(1)
    alpha = (1 - level) / 2
    low, high = np.quantile(boot, [alpha, 1 - alpha])
    return Interval(float(x.mean()), float(low), float(high), n, level)


def paired_bootstrap(a, b, groups: Sequence | None = None, *, num_resamples: int = 10_000, level: float = 0.95,
                     seed: int = 0) -> Interval:
    """Mean paired difference ``a - b`` with a paired bootstrap interval.

    ``a[i]`` and ``b[i]`` must be the same unit (same prompt, seed and noise) under two policies.
    The pairs are resampled together (by cluster ``groups``, e.g. the prompt index), so the
    interval reflects only the noise of the difference, not the spread of the scores.
    """
    a, b = _check(a), _check(b)
    if a.shape != b.shape:
        raise ValueError(f"paired samples need equal lengths, got {a.size} and {b.size}")
    return bootstrap_mean(a - b, groups, num_resamples=num_resamples, level=level, seed=seed)
