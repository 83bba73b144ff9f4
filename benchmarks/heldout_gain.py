"""Does a trained policy beat fixed schedules on held-out prompts? The acceptance test of a learned policy.

    python benchmarks/heldout_gain.py --policies outputs/grpo_flux/policy --steps 3 \\
        --baselines shifted_grid:shift=2.0,dm_concave:weight=0.5 --prompts testbed:test --seeds 1000-1007

On the same prompts and noises (the evaluation protocol, :mod:`tpm.comparison.protocol`: noise set s
of prompt j is the same for every policy, and the same as a training report's and ``tpm compare``'s
with that noise set), it scores the synchronous sampler at ``--steps`` and at ``--reference-steps``, every
fixed baseline and every given policy at ``--steps``, and reports, for each policy, with 95 %
paired bootstrap intervals over prompts (each prompt's noise sets averaged):

- its gain over the synchronous sampler at the same steps (the same NFE: one call per step);
- its difference to the best fixed baseline (the baseline with the highest mean);
- the fraction of the gap between synchronous at ``--steps`` and at ``--reference-steps`` it closes.

Make choices (step count, baselines) on val prompts; run this on test prompts with noise seeds no
choice was made on. Prints JSON; ``--out`` also gets ``heldout.json`` and ``heldout.md``, whose
``compare_command`` is the ``tpm compare`` run that scores the same images (its means and
differences to synchronous equal these).
"""

from __future__ import annotations

import argparse

import numpy as np
from verifier_bench import VerifierBench, paired_interval, write_report


def parse_seeds(text: str) -> list[int]:
    out: list[int] = []
    for part in text.split(","):
        a, _, b = part.partition("-")
        out += list(range(int(a), int(b) + 1)) if b else [int(a)]
    return out


def ratio_interval(num: np.ndarray, den: np.ndarray, resamples: int = 4000, seed: int = 0) -> list[float]:
    """mean(num) / mean(den) with a percentile bootstrap over prompts (paired rows)."""
    rng = np.random.default_rng(seed)
    n = len(num)
    idx = rng.integers(0, n, size=(resamples, n))
    r = num[idx].mean(1) / den[idx].mean(1)
    return [round(float(num.mean() / den.mean()), 3), round(float(np.percentile(r, 2.5)), 3),
            round(float(np.percentile(r, 97.5)), 3)]


def main(argv: list[str] | None = None) -> dict:
    import policies

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--policies", required=True, help="comma-separated policy directories (or names)")
    ap.add_argument("--baselines", default="shifted_grid:shift=2.0,dm_concave:weight=0.5",
                    help="comma-separated fixed policies (name:key=value, see policies.load)")
    ap.add_argument("--model", default="testbed:flux")
    ap.add_argument("--prompts", default="testbed:test")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--reference-steps", type=int, default=20)
    ap.add_argument("--seeds", default="1000-1007", help="noise sets, e.g. 1000-1007 or 3,5,8")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reward", default=None,
                    help="registered reward to score with (default: the testbed verifier of the prompts' domain)")
    ap.add_argument("--out", default="")
    args = ap.parse_args(argv)
    bench = VerifierBench(args.model, args.prompts, threads=args.threads, batch_size=args.batch_size,
                          reward=args.reward)
    prompts, seeds = bench.prompts, parse_seeds(args.seeds)

    def scores(policy, steps: int) -> np.ndarray:
        return bench.scores(policy, steps, seeds)

    k = args.steps
    sync, ref = scores(None, k), scores(None, args.reference_steps)
    base = {spec: scores(policies.load(spec), k) for spec in filter(None, args.baselines.split(","))}
    best = max(base, key=lambda s: base[s].mean()) if base else None
    report = {"prompts": args.prompts, "n_prompts": len(prompts), "seeds": seeds, "steps": k,
              "synchronous": round(float(sync.mean()), 4),
              f"synchronous_{args.reference_steps}": round(float(ref.mean()), 4),
              "gap": paired_interval(ref, sync),
              "baselines": {s: {"mean": round(float(v.mean()), 4), "minus_synchronous": paired_interval(v, sync)}
                            for s, v in base.items()},
              "best_fixed": best, "policies": {},
              "compare_command": compare_command(args, seeds, list(base), list(filter(None, args.policies.split(","))))}
    for spec in filter(None, args.policies.split(",")):
        sc = scores(policies.load(spec), k)
        row = {"mean": round(float(sc.mean()), 4), "minus_synchronous": paired_interval(sc, sync),
               "gap_closed": ratio_interval(sc - sync, ref - sync)}
        if best is not None:
            row["minus_best_fixed"] = paired_interval(sc, base[best])
        report["policies"][spec] = row
    write_report(args.out, "heldout", report, markdown(report, args.reference_steps))
    return report


def compare_command(args, seeds: list[int], baselines: list[str], policies: list[str]) -> str:
    """The ``tpm compare`` command that scores the same prompts and noises with the same reward."""
    import shlex

    from tpm.loading import testbed_domain

    reward = args.reward or ("testbed_spatial" if testbed_domain(args.prompts) == "spatial" else "testbed")
    argv = ["tpm", "compare", "--model", args.model, "--prompts", args.prompts, "--num-prompts", "0",
            "--seed-list", ",".join(map(str, seeds)), "--steps", str(args.steps), "--reference-steps",
            str(args.reference_steps), "--rewards", reward, "--policies", ",".join(["synchronous", *baselines, *policies])]
    return " ".join(shlex.quote(a) for a in argv)


def markdown(r: dict, ref_steps: int) -> str:
    f = "{:+.4f} [{:+.4f}, {:+.4f}]".format
    lines = [f"{r['prompts']}, {r['n_prompts']} prompts x {len(r['seeds'])} noise sets ({r['seeds'][0]}..{r['seeds'][-1]}); "
             f"{r['steps']} steps; synchronous {r['synchronous']:.4f}, at {ref_steps} steps "
             f"{r[f'synchronous_{ref_steps}']:.4f} (gap {f(*r['gap'])})", "",
             "| method | score | minus synchronous | minus best fixed | gap closed |", "|---|---|---|---|---|"]
    for s, v in r["baselines"].items():
        lines.append(f"| {s} | {v['mean']:.4f} | {f(*v['minus_synchronous'])} | | |")
    for s, v in r["policies"].items():
        g = v["gap_closed"]
        mb = f(*v["minus_best_fixed"]) if "minus_best_fixed" in v else "-"
        lines.append(f"| {s} | {v['mean']:.4f} | {f(*v['minus_synchronous'])} | {mb} | {g[0]:.2f} [{g[1]:.2f}, {g[2]:.2f}] |")
    lines += ["", "The same images in `tpm compare`:", "", "```bash", r["compare_command"], "```"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
