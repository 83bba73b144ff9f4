"""The per-pixel study's one table, from the saved runs of ``per_pixel_study.py`` and ``per_pixel_headroom.py``.

    python benchmarks/per_pixel_table.py --fixed docs/benchmarks/per_pixel_study_test_fixed \\
        --learned docs/benchmarks/per_pixel_study_test_learned \\
        --order docs/benchmarks/per_pixel_study_test_order --headroom docs/benchmarks/per_pixel_headroom_test

Every row is a paired difference over the same test prompts and noises, recomputed from the saved
per-prompt means (``per_prompt_mean`` in each ``per_pixel_study.json``) with 95 % bootstrap intervals:
against synchronous at the same steps, against the best fixed table (chosen on val) and against the
learned grid (each prompt's score averaged over the grid's seeds). Oracle rows come from the
headroom run, which reports its own differences. Prints markdown; ``--out FILE`` writes it too.
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np


def _load(folder: str, name: str) -> dict:
    with open(os.path.join(folder, name)) as f:
        return json.load(f)


def _diff(a: np.ndarray, b: np.ndarray) -> str:
    from tpm.comparison.stats import paired_bootstrap

    d = paired_bootstrap(a, b, num_resamples=4000)
    mark = " ✓" if d.low > 0 else ""
    return f"{d.estimate:+.4f} [{d.low:+.4f}, {d.high:+.4f}]{mark}"


def _fmt(d: list[float] | None) -> str:
    if not d:
        return ""
    return f"{d[0]:+.4f} [{d[1]:+.4f}, {d[2]:+.4f}]" + (" ✓" if d[1] > 0 else "")


def table(fixed: dict, learned: dict | None, order: dict | None, headroom: dict | None,
          best: dict[str, str], labels: dict[str, str]) -> str:
    """Markdown: one line per (steps, row); ``best`` maps steps -> the best fixed table's spec."""
    lines = ["| steps | row | mean | - synchronous | - best fixed table | - learned grid |", "|---|---|---|---|---|---|"]
    for k in sorted(fixed["per_prompt_mean"], key=int):
        per = {n: np.array(v) for n, v in fixed["per_prompt_mean"][k].items()}
        if learned and k in learned["per_prompt_mean"]:
            per.update({n: np.array(v) for n, v in learned["per_prompt_mean"][k].items() if n not in per})
        grids = [n for n in per if labels.get(n, "").startswith("learned grid")]
        grid = np.mean([per[n] for n in grids], axis=0) if grids else None
        sync, ref = per["synchronous"], per[best[k]]
        hr = (headroom or {}).get("steps", {}).get(k)
        if hr:
            lines.append(f"| {k} | per-prompt oracle (best of {len(hr['tables'])} tables per prompt) | | | "
                         f"{_fmt(hr['per_prompt_oracle_minus_best_table'])} | |")
            lines.append(f"| {k} | per-pixel oracle (concave on ground-truth object masks) | {hr['per_pixel_oracle']:.4f} | "
                         f"{_fmt(hr['per_pixel_oracle_minus_synchronous'])} | "
                         f"{_fmt(hr['per_pixel_oracle_minus_best_table'])} | |")
        for name, v in per.items():
            if name not in labels and name != "synchronous":
                continue
            row = [k, labels.get(name, name), f"{v.mean():.4f}",
                   "" if name == "synchronous" else _diff(v, sync),
                   "" if name == best[k] else _diff(v, ref),
                   "" if grid is None or name in grids else _diff(v, grid)]
            lines.append("| " + " | ".join(row) + " |")
    if order:
        lines += ["", f"Per-object order, on the {order['categories']} prompts only ({order['n_prompts']}):", "",
                  "| steps | row | mean | - synchronous | - the same without order |", "|---|---|---|---|---|"]
        for k, ps in order.get("pairs", {}).items():
            per = {n: np.array(v) for n, v in order["per_prompt_mean"][k].items()}
            for pair in ps:
                a, b = pair.split(" - ")
                lines.append(f"| {k} | {labels.get(a, a)} | {per[a].mean():.4f} | {_diff(per[a], per['synchronous'])} | "
                             f"{_diff(per[a], per[b])} (vs {labels.get(b, b)}) |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fixed", required=True, help="per_pixel_study output folder: fixed policies, all prompts")
    ap.add_argument("--learned", default="", help="per_pixel_study output folder: learned policies, all prompts")
    ap.add_argument("--order", default="", help="per_pixel_study output folder with --pairs, order-targeted prompts")
    ap.add_argument("--headroom", default="", help="per_pixel_headroom output folder (oracle bounds)")
    ap.add_argument("--best", default="4=shifted_grid:shift=3.0,20=dm_concave",
                    help="steps=spec of the best fixed table, chosen on val")
    ap.add_argument("--labels", default="", help="';'-separated spec=label (split at the last '=', so a label holds no '='; rows without a label are left out)")
    ap.add_argument("--out", default="")
    args = ap.parse_args(argv)
    fixed = _load(args.fixed, "per_pixel_study.json")
    learned = _load(args.learned, "per_pixel_study.json") if args.learned else None
    order = _load(args.order, "per_pixel_study.json") if args.order else None
    headroom = _load(args.headroom, "per_pixel_headroom.json") if args.headroom else None
    best = dict(x.split("=", 1) for x in args.best.split(","))
    labels = dict(x.rsplit("=", 1) for x in args.labels.split(";") if x)
    text = table(fixed, learned, order, headroom, best, labels)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    return text


if __name__ == "__main__":
    main()
