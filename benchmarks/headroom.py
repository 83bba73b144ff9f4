"""Headroom before training: how much do fixed timestep policies gain over the synchronous sampler?

    python benchmarks/headroom.py                      # testbed Flux, val prompts, 4 noise sets
    python benchmarks/headroom.py --steps 2,3 --seeds 8 --out outputs/headroom

A learned policy is only worth training where schedules matter, and it has to beat the best
fixed policy of every family, not only the synchronous sampler. This script scores, on the same
prompts and noises (:mod:`tpm.grpo.evaluation`: image j of noise set s starts from the same noise
under every policy):

- the synchronous sampler at 1/2/3/4/6/10/20 steps (how much the backbone gains from steps);
- at each step count in ``--steps``, every member of each fixed family: shifted grids
  (``shifted_grid``), AsyncDiff's pseudo-timestep with a constant r (``constant_deviation``), AsynDM's
  concave schedules with cross-attention masks and for all tokens, with reweighting (``asyndm``,
  ``dm_concave``), and AsyncPatch's uncertainty-guided patches (``uncertainty``).

Each difference is a paired bootstrap over prompts (each prompt's noise sets averaged), 95 %.
Choices are made on val prompts (the default split); report claims on test with other noises.
Prints JSON and writes ``headroom.json`` and ``headroom.md`` (a table) to ``--out``.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from verifier_bench import VerifierBench, paired_interval, write_report

FAMILIES: dict[str, list[tuple[str, dict]]] = {
    "shifted_grid": [("shifted_grid", {"shift": s}) for s in (1.5, 2.0, 2.5, 3.0)],
    "constant_deviation": [("constant_deviation", {"r": r}) for r in (0.35, 0.42, 0.58, 0.65)],
    "concave": [("asyndm", {}), ("asyndm:exponential", {}), ("asyndm:piecewise_linear", {}),
                ("asyndm", {"weight": 0.5}), ("dm_concave", {}), ("dm_concave:exponential", {}),
                ("dm_concave", {"weight": 0.5})],
    "uncertainty": [("uncertainty", {"strength": s}) for s in (0.25, 0.5, 1.0)],
}
SYNC_STEPS = (1, 2, 3, 4, 6, 10, 20)


def label(name: str, opts: dict) -> str:
    return name + "".join(f" {k}={v}" for k, v in opts.items())


def main(argv: list[str] | None = None) -> dict:
    import policies

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="testbed:flux")
    ap.add_argument("--prompts", default="testbed:val")
    ap.add_argument("--steps", default="2,3", help="step counts at which the fixed families are scored")
    ap.add_argument("--seeds", type=int, default=4, help="noise sets (0..n-1) per prompt")
    ap.add_argument("--families", default=",".join(FAMILIES))
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="outputs/headroom")
    args = ap.parse_args(argv)
    bench = VerifierBench(args.model, args.prompts, threads=args.threads, batch_size=args.batch_size)
    prompts, noise_sets = bench.prompts, range(args.seeds)
    t0 = time.time()

    def scores(policy, steps: int) -> np.ndarray:  # (prompts,) mean over the noise sets
        return bench.scores(policy, steps, noise_sets)

    sync = {k: scores(None, k) for k in SYNC_STEPS}
    report: dict = {"model": args.model, "prompts": args.prompts, "n_prompts": len(prompts),
                    "noise_sets": args.seeds, "synchronous": {str(k): round(float(v.mean()), 4) for k, v in sync.items()},
                    "families": {}}
    top = sync[max(SYNC_STEPS)]
    for k in (int(x) for x in args.steps.split(",")):
        base = sync[k] if k in sync else scores(None, k)
        rows = {}
        for fam in args.families.split(","):
            for name, opts in FAMILIES[fam]:
                sc = scores(policies.load(name, **opts), k)
                rows[label(name, opts)] = {"family": fam, "mean": round(float(sc.mean()), 4),
                                           "minus_synchronous": paired_interval(sc, base)}
        best = {}
        for fam in args.families.split(","):
            members = {n: r for n, r in rows.items() if r["family"] == fam}
            name = max(members, key=lambda n: members[n]["mean"])
            best[fam] = name
        report["families"][str(k)] = {"synchronous": round(float(base.mean()), 4),
                                      "synchronous_20_minus": paired_interval(top, base), "members": rows, "best": best}
    report["seconds"] = round(time.time() - t0, 1)
    write_report(args.out, "headroom", report, markdown(report))
    return report


def markdown(report: dict) -> str:
    lines = [f"Synchronous ({report['prompts']}, {report['n_prompts']} prompts x {report['noise_sets']} noises): "
             + ", ".join(f"{k} steps {v:.3f}" for k, v in report["synchronous"].items()), ""]
    for k, block in report["families"].items():
        lines += [f"### {k} steps (synchronous {block['synchronous']:.3f}; 20 steps gain "
                  f"{block['synchronous_20_minus'][0]:+.3f})", "", "| policy | family | score | minus synchronous [95 %] |",
                  "|---|---|---|---|"]
        for name, r in sorted(block["members"].items(), key=lambda kv: -kv[1]["mean"]):
            d = r["minus_synchronous"]
            lines.append(f"| {name} | {r['family']} | {r['mean']:.3f} | {d[0]:+.3f} [{d[1]:+.3f}, {d[2]:+.3f}] |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
