"""The training curve of a run as one PNG: the training reward per iteration and the held-out evaluations.

Top panel: each reward metric's mean over the iteration's rollouts (exploring, on training prompts),
with a moving average, because a GRPO iteration's mean follows which prompts came in. Bottom panel:
each held-out evaluation (deterministic actions, the evaluation protocol's prompts and noises) with its
95 % bootstrap interval over prompts, and the evaluation ``keep_best`` exported, if any.
"""

from __future__ import annotations

import math
import os
from typing import Any

import numpy as np


def reward_series(history: list[dict[str, float]]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per metric (``reward/<name>`` in the history, the combined ``reward/total`` left out when there are
    others): (iterations, means), skipped iterations and non-finite means dropped."""
    names = [k for k in dict.fromkeys(k for rec in history for k in rec)
             if k.startswith("reward/") and k not in ("reward/nonfinite",)]
    if len(names) > 1 and "reward/total" in names:
        names.remove("reward/total")
    out = {}
    for name in names:
        pts = [(rec["iteration"], rec[name]) for rec in history
               if name in rec and not rec.get("skipped") and math.isfinite(rec[name])]
        if pts:
            it, v = zip(*pts)
            out[name[len("reward/"):]] = (np.asarray(it), np.asarray(v, dtype=np.float64))
    return out


def moving_average(values: np.ndarray, window: int) -> np.ndarray:
    """Mean of the last ``window`` values at each point (fewer at the start)."""
    c = np.cumsum(np.insert(values, 0, 0.0))
    idx = np.arange(1, len(values) + 1)
    lo = np.maximum(idx - window, 0)
    return (c[idx] - c[lo]) / (idx - lo)


def write_training_curve(path: str | os.PathLike, history: list[dict[str, float]],
                         evaluations: list[dict[str, Any]], selected: int | None = None) -> str:
    """Draw the two panels of the module docstring to ``path``; returns it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
    for name, (it, v) in reward_series(history).items():
        line, = top.plot(it, v, alpha=0.3, lw=0.8)
        window = max(1, len(v) // 20)
        top.plot(it, moving_average(v, window), color=line.get_color(), lw=1.6,
                 label=f"{name} (mean of {window})" if window > 1 else name)
    top.set_ylabel("training reward")
    top.set_title("rollouts (exploring, training prompts)", fontsize=9)
    metrics = [k for k in dict.fromkeys(k for e in evaluations for k in e) if k != "iteration"]
    for name in metrics:
        pts = sorted((e["iteration"], e[name]) for e in evaluations if name in e)
        it = np.asarray([p[0] for p in pts])
        est, lo, hi = (np.asarray([p[1][i] for p in pts]) for i in range(3))
        bottom.errorbar(it, est, yerr=[est - lo, hi - est], marker="o", capsize=3, label=name)
        if selected is not None and selected in set(it.tolist()):
            j = int(np.flatnonzero(it == selected)[0])
            bottom.plot([selected], [est[j]], marker="*", ms=14, color="black", ls="none",
                        label="exported (keep_best)" if name == metrics[0] else None)
    bottom.set_ylabel("held-out reward")
    bottom.set_xlabel("iteration")
    bottom.set_title("evaluations (deterministic, 95 % interval over prompts)", fontsize=9)
    for ax in (top, bottom):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return str(path)
