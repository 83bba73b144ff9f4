"""Does bounding the distinct conditioning times (``time_levels``) move the testbed score?

A per-token field policy (``policies.FieldPolicy`` with one decision per token and random output
heads, so every token gets its own time) samples the testbed prompts with exact conditioning times
and with its times snapped to ``L`` levels per sample (:func:`tpm.backbones.modulation.snap_to_levels`).
The testbed Flux has 16 tokens, so the default ``L = 64`` never binds there; the levels scanned here
are coarser than the default is at 1024 tokens (spacing = the sample's range / (L - 1)), which makes
this a stress test of the same mechanism. Differences are paired bootstraps over prompts (the same
noises under every setting). Prints JSON; writes ``OUT/time_levels_score.{json,md}`` with ``--out``.

    python benchmarks/time_levels_score.py --prompts testbed:val --levels 2,4,8 --noise-sets 0,1
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from verifier_bench import VerifierBench, paired_interval, write_report  # noqa: E402


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="testbed:flux")
    ap.add_argument("--prompts", default="testbed:val")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--levels", default="2,4,8")
    ap.add_argument("--noise-sets", default="0,1")
    ap.add_argument("--head-scale", type=float, default=1.0, help="std of the random output heads")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)

    import policies

    bench = VerifierBench(args.model, args.prompts)
    noise = [int(s) for s in args.noise_sets.split(",")]
    torch.manual_seed(0)
    base = policies.FieldPolicy.for_pipeline(bench.pipe, patch=1, token_offsets=True, time_levels=None).eval()
    gen = torch.Generator().manual_seed(0)
    for head in (base.net.grid_head, base.net.token_head):  # zero heads = synchronous; random = per-token times
        head.weight.data = torch.randn(head.weight.shape, generator=gen) * args.head_scale
        head.bias.data = torch.randn(head.bias.shape, generator=gen) * args.head_scale

    def with_levels(levels):
        p = policies.FieldPolicy.for_pipeline(bench.pipe, patch=1, token_offsets=True, time_levels=levels).eval()
        p.load_state_dict(base.state_dict())
        return p

    exact = bench.scores(base, args.steps, noise)
    sync = bench.scores(None, args.steps, noise)
    rows = {"exact": {"mean": round(float(exact.mean()), 4)},
            "synchronous": {"mean": round(float(sync.mean()), 4), "minus_exact": paired_interval(sync, exact)}}
    for lv in [int(x) for x in args.levels.split(",")]:
        s = bench.scores(with_levels(lv), args.steps, noise)
        rows[f"levels {lv}"] = {"mean": round(float(s.mean()), 4), "minus_exact": paired_interval(s, exact)}
    report = {"benchmark": "time_levels_score", "model": args.model, "prompts": args.prompts,
              "num_prompts": len(bench.prompts), "steps": args.steps, "noise_sets": noise,
              "tokens": list(base.config.grid), "rows": rows}
    md = ["| setting | testbed | minus exact [95 % CI] |", "|---|---|---|"]
    for k, r in rows.items():
        diff = r.get("minus_exact")
        md.append(f"| {k} | {r['mean']:.4f} | " + ("-" if diff is None else f"{diff[0]:+.4f} [{diff[1]:+.4f}, {diff[2]:+.4f}]") + " |")
    write_report(args.out, "time_levels_score", report, "\n".join(md) + "\n")
    return report


if __name__ == "__main__":
    main()
