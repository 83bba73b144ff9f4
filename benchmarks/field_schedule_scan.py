"""How good is the best *prompt-independent* action of the field policy? A scan on fixed per-step tables.

    python benchmarks/field_schedule_scan.py                                   # val: the scan
    python benchmarks/field_schedule_scan.py --prompts testbed:test --seed 1000 --noise-sets 8 \\
        --points '[[[0.3, 0.6], [0.6, 0.6], [0, 0]]]'                          # test: chosen points only

The default learned policy (``recipes/grpo_flux.py``: the field policy with one grid move and one
conditioning shift per sample and step) can read the state, but it may also just learn one schedule
for every prompt. This benchmark measures what such a fixed schedule can reach in the very same
action space, so a learned policy's gain can be split into "found a good schedule" and "adapts to
the prompt and noise". A point is a table ``[[grid_d, cond_d] for each step]`` of the values
``d = 2u - 1`` of :mod:`policies.field` (0 everywhere = the synchronous sampler; the grid move of
the last step is ignored). Every point acts through :meth:`policies.field.FieldPolicy.fields`, so
the constraints and maps are the policy's own (:class:`policies.field_table.FieldTable`).
``tpm search`` finds such a table by coordinate search instead of this exhaustive two-stage scan,
and saves it as a policy.

The scan has two stages, at K steps: every combination of ``--grid-values`` for the grid moves of
steps 0..K-2 (conditioning off), then every combination of ``--cond-values`` for the conditioning
shifts of all K steps at the best grid of stage one. Scores are paired with the synchronous sampler
on the same prompts and noises (:mod:`tpm.grpo.evaluation`) and differences are paired bootstraps
over prompts, 95 %. Make the scan on val; score chosen points on test with ``--points``.
Prints JSON and writes ``scan.json`` and ``scan.md`` to ``--out``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import time

import numpy as np
from verifier_bench import VerifierBench, paired_interval, write_report


def fixed_field_policy(base, table: list[list[float]]):
    """The table ``table[k] = [grid_d, cond_d]`` at step k as a :class:`policies.field_table.FieldTable` with the
    geometry of field policy ``base`` (the package's fixed-table policy; ``tpm search`` searches the same space)."""
    from policies.field_table import FieldTable

    return FieldTable.like(base, {"grid": [row[0] for row in table], "cond": [row[1] for row in table]})


def main(argv: list[str] | None = None) -> dict:
    from policies.field import FieldPolicy

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="testbed:flux")
    ap.add_argument("--prompts", default="testbed:val")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0, help="first evaluation noise set")
    ap.add_argument("--noise-sets", type=int, default=2, help="noise sets seed .. seed + n - 1 per prompt")
    ap.add_argument("--grid-values", default="-0.6,-0.3,0,0.3,0.6,0.9")
    ap.add_argument("--cond-values", default="-0.6,-0.3,0,0.3,0.6")
    ap.add_argument("--points", help="JSON list of tables [[grid_d, cond_d], ...] to score instead of the scan")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="outputs/field_schedule_scan")
    args = ap.parse_args(argv)
    bench = VerifierBench(args.model, args.prompts, threads=args.threads, batch_size=args.batch_size)
    prompts, noise_sets = bench.prompts, range(args.seed, args.seed + args.noise_sets)
    grid = bench.backbone.grid(*bench.backbone.resolve_size(None, None))
    # one decision group per sample (a fixed table gives every token the same values anyway)
    base = FieldPolicy.for_pipeline(bench.pipe, patch=math.gcd(*grid), token_offsets=False, learn_cond=True)
    k_steps = args.steps
    t0 = time.time()

    def scores(policy) -> np.ndarray:
        return bench.scores(policy, k_steps, noise_sets)

    sync = scores(None)
    rows: list[dict] = []

    def score(table: list[list[float]], stage: str) -> dict:
        if len(table) != k_steps:
            raise SystemExit(f"a point needs {k_steps} rows [grid_d, cond_d], got {table}")
        sc = scores(fixed_field_policy(base, table))
        row = {"stage": stage, "table": table, "mean": round(float(sc.mean()), 4),
               "minus_synchronous": paired_interval(sc, sync)}
        rows.append(row)
        return row

    if args.points:
        for table in json.loads(args.points):
            score(table, "points")
    else:
        values = [float(v) for v in args.grid_values.split(",")]
        for moves in itertools.product(values, repeat=k_steps - 1):
            score([[m, 0.0] for m in moves] + [[0.0, 0.0]], "grid")
        best = max((r for r in rows if r["stage"] == "grid"), key=lambda r: r["mean"])["table"]
        conds = [float(v) for v in args.cond_values.split(",")]
        for shifts in itertools.product(conds, repeat=k_steps):
            score([[row[0], c] for row, c in zip(best, shifts)], "cond")
    report = {"model": args.model, "prompts": args.prompts, "n_prompts": len(prompts), "steps": k_steps,
              "noise_sets": list(noise_sets),
              "synchronous": round(float(sync.mean()), 4), "best": max(rows, key=lambda r: r["mean"]),
              "points": rows, "seconds": round(time.time() - t0, 1)}
    write_report(args.out, "scan", report, markdown(report))
    return report


def markdown(report: dict, top: int = 10) -> str:
    lines = [f"{report['prompts']}, {report['n_prompts']} prompts x noise sets {report['noise_sets']}, "
             f"{report['steps']} steps, synchronous {report['synchronous']:.4f}", "",
             "| table [grid_d, cond_d] per step | stage | score | minus synchronous [95 %] |", "|---|---|---|---|"]
    for r in sorted(report["points"], key=lambda r: -r["mean"])[:top]:
        d = r["minus_synchronous"]
        lines.append(f"| {r['table']} | {r['stage']} | {r['mean']:.4f} | {d[0]:+.4f} [{d[1]:+.4f}, {d[2]:+.4f}] |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
