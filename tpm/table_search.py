"""Coordinate search for the best state-free table of a policy's actions.

A *table* maps each action part to one value per step (``{"grid": [d_0, d_1, d_2], "cond": [...]}``,
values in [lo, hi]); a coordinate is one (part, step) entry. Like AYS / OSS-style schedule search,
the search scores whole tables with the sampler and keeps the best, but moves one coordinate at a time
and needs no gradient and no dependency:

1. *grid passes*: for each coordinate in turn, every value of its candidate list, each scored with the
   other coordinates at their current best; the best table so far is kept. Passes repeat (up to
   ``grid_passes``) while one of them improved the score, because coordinates interact (a longer
   step changes which conditioning shift is best).
2. *refinement*: each coordinate moved by +-``step`` around the best, ``step`` halved after every pass.

``score(table) -> float`` is called once per distinct table (scores are cached), so a deterministic
score (fixed prompts and noises, :mod:`tpm.comparison.protocol`) makes the search deterministic too.
This module knows nothing of policies: the caller turns a table into a policy and scores it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

Table = dict[str, list[float]]


@dataclass
class SearchResult:
    """The best table, its score, the start's score and every scored point (table, score, stage) in order."""

    best: Table
    score: float
    start_score: float
    points: list[dict] = field(default_factory=list)


def _key(table: Mapping[str, Sequence[float]]) -> tuple:
    return tuple((part, tuple(round(float(v), 9) for v in table[part])) for part in sorted(table))


def coordinate_search(score: Callable[[Table], float], start: Mapping[str, Sequence[float]],
                      coordinates: Sequence[tuple[str, int]], values: Mapping[str, Sequence[float]], *,
                      grid_passes: int = 2, refine_passes: int = 2, refine_step: float | None = None,
                      bounds: tuple[float, float] = (-1.0, 1.0),
                      report: Callable[[dict], None] | None = None) -> SearchResult:
    """Maximise ``score`` over tables by coordinate search (module docstring).

    ``start``: the first table (every part of ``coordinates`` present, one value per step);
    ``values[part]``: the candidate values of that part's coordinates in a grid pass;
    ``refine_step``: the first refinement move (default half the smallest gap between candidates);
    ``report(point)`` is called after every new point.
    """
    lo, hi = bounds
    current: Table = {part: [float(v) for v in vals] for part, vals in start.items()}
    for part, step in coordinates:
        if part not in current or not 0 <= step < len(current[part]):
            raise ValueError(f"coordinate ({part!r}, step {step}) is not in the start table {current}")
        if part not in values or not values[part]:
            raise ValueError(f"no candidate values for part {part!r}")
    cache: dict[tuple, float] = {}
    points: list[dict] = []

    def evaluate(table: Table, stage: str) -> float:
        k = _key(table)
        if k not in cache:
            cache[k] = float(score({p: list(v) for p, v in table.items()}))
            points.append({"stage": stage, "table": {p: list(v) for p, v in table.items()}, "score": cache[k]})
            if report is not None:
                report(points[-1])
        return cache[k]

    best = start_score = evaluate(current, "start")

    def try_values(part: str, step: int, candidates: Sequence[float], stage: str) -> bool:
        nonlocal best, current
        improved = False
        for v in candidates:
            v = min(hi, max(lo, float(v)))
            if abs(v - current[part][step]) < 1e-12:
                continue
            cand = {p: list(vals) for p, vals in current.items()}
            cand[part][step] = v
            s = evaluate(cand, stage)
            if s > best:
                best, current, improved = s, cand, True
        return improved

    for n in range(grid_passes):
        improved = False
        for part, step in coordinates:
            improved |= try_values(part, step, values[part], f"grid {n + 1}")
        if not improved:
            break
    gaps = [b - a for vals in values.values() for a, b in zip(sorted(vals), sorted(vals)[1:]) if b > a]
    step_size = refine_step if refine_step is not None else (min(gaps) / 2 if gaps else 0.1)
    for n in range(refine_passes):
        for part, step in coordinates:
            here = current[part][step]
            try_values(part, step, (here - step_size, here + step_size), f"refine {n + 1}")
        step_size /= 2
    return SearchResult(current, best, start_score, points)
