"""Tables of a comparison: ``results.csv`` (one row per image) and ``summary.md``.

``summary.md`` has, per step count, the form of AsynDM Table 1: one row per policy, one column
per metric with the mean and its 95 % interval; then the paired difference of every policy
against the first one (same prompt, seed and noise) with a paired bootstrap interval, marked
``*`` when the interval excludes 0. Intervals resample prompts, not images (see
:mod:`tpm.comparison.stats`).
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass

import numpy as np

from tpm.comparison.protocol import LEVEL, RESAMPLES, mean_interval, paired_difference
from tpm.comparison.stats import Interval

BASE_COLUMNS = ("prompt_index", "prompt", "seed", "policy", "steps")
TAIL_COLUMNS = ("nfe", "time_s", "image")


def metric_names(rows: list[dict]) -> list[str]:
    known = set(BASE_COLUMNS) | set(TAIL_COLUMNS)
    names: list[str] = []
    for r in rows:
        names += [k for k in r if k not in known and k not in names]
    return names


def write_results_csv(path: str, rows: list[dict], metrics: list[str]) -> str:
    """One row per image; columns: prompt_index, prompt, seed, policy, steps, metrics..., nfe, time_s, image."""
    cols = [*BASE_COLUMNS, *metrics, *TAIL_COLUMNS]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({c: (repr(r[c]) if isinstance(r[c], float) else r[c]) for c in cols})
    return path


@dataclass
class PolicySummary:
    policy: str
    steps: int
    n_images: int
    n_prompts: int
    means: dict[str, Interval]
    diffs: dict[str, Interval] | None  # vs the first policy; None for the first policy itself
    nfe: float
    time_s: float


def summarise(rows: list[dict], policies: list[str], steps: list[int], metrics: list[str], *,
              num_resamples: int = RESAMPLES, level: float = LEVEL,
              reference: tuple[str, int] | None = None) -> list[PolicySummary]:
    """Means with intervals and paired differences against ``policies[0]``, per step count, as the
    evaluation protocol computes them (:mod:`tpm.comparison.protocol`: each prompt averaged over its
    seeds, bootstrap over prompts). ``reference``: (label, steps) of a row added to every step count's
    table (the synchronous sampler at the reference step count), compared on the same pairs."""
    out = []
    for k in steps:
        def of(p: str, steps: int) -> dict:
            return {(r["prompt_index"], r["seed"]): r for r in rows if r["policy"] == p and r["steps"] == steps}

        by_policy = {p: of(p, k) for p in policies}
        if reference is not None:
            by_policy[reference[0]] = of(*reference)
        ref = by_policy[policies[0]]
        for p, cur in by_policy.items():
            keys = sorted(cur)
            if not keys:
                continue
            groups = [key[0] for key in keys]
            means = {m: mean_interval([cur[key][m] for key in keys], groups, num_resamples=num_resamples,
                                      level=level) for m in metrics}
            diffs = None
            if p != policies[0]:
                if set(keys) != set(ref):
                    raise ValueError(f"policy {p!r} and {policies[0]!r} have different (prompt, seed) pairs at "
                                     f"{k} steps; paired differences need the same pairs")
                diffs = {m: paired_difference([cur[key][m] for key in keys], [ref[key][m] for key in keys], groups,
                                              num_resamples=num_resamples, level=level) for m in metrics}
            out.append(PolicySummary(p, k, len(keys), len(set(groups)), means, diffs,
                                     float(np.mean([cur[key]["nfe"] for key in keys])),
                                     float(np.mean([cur[key]["time_s"] for key in keys]))))
    return out


def summary_markdown(summary: list[PolicySummary], metrics: list[str], *, title: str = "Comparison",
                     notes: list[str] | None = None, num_resamples: int = RESAMPLES, level: float = LEVEL) -> str:
    pct = f"{100 * level:g} %"
    lines = [f"# {title}", ""]
    lines += [f"- {n}" for n in notes or []]
    lines += [
        f"- Means: {pct} percentile-bootstrap interval over prompts ({num_resamples} resamples, each prompt "
        "averaged over its seeds).",
        f"- Differences: policy minus `{summary[0].policy}` on the same (prompt, seed, noise), paired bootstrap "
        f"over prompts, {pct}; `*` = interval excludes 0 (tpm.comparison.protocol).",
        "",
    ]
    for k in sorted({s.steps for s in summary}, key=[s.steps for s in summary].index):
        rows = [s for s in summary if s.steps == k]
        lines += [f"## {k} steps ({rows[0].n_prompts} prompts x {rows[0].n_images // max(rows[0].n_prompts, 1)} "
                  f"seeds = {rows[0].n_images} images per policy)", ""]
        head = ["policy", *metrics, "NFE", "s / image"]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for s in rows:
            cells = [f"`{s.policy}`", *[s.means[m].format(4) for m in metrics], f"{s.nfe:g}", f"{s.time_s:.3f}"]
            lines.append("| " + " | ".join(cells) + " |")
        lines += ["", f"Paired difference vs `{rows[0].policy}`:", ""]
        head = ["policy", *[f"Δ {m}" for m in metrics]]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for s in rows[1:]:
            cells = [f"`{s.policy}`"] + [s.diffs[m].format(4, signed=True) + (" *" if s.diffs[m].excludes_zero else "")
                                         for m in metrics]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def write_summary(path: str, text: str) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)
    return path
