"""Per-pixel policies against synchronous sampling, scored on verifier, fidelity and their mean.

    python benchmarks/per_pixel_study.py --model testbed:spatial --prompts testbed:spatial-val \\
        --policies "asyndm;asyndm:weight=0.5;dm_concave" --steps 4,20 --noise-sets 0,1 \\
        --out docs/benchmarks/per_pixel_study_val

For every step count and every policy (``;``-separated specs, as ``policies.load`` reads them),
all prompts are sampled from the evaluation noises of each noise set (``tpm.grpo.evaluation``:
noise set s of prompt j is the same for every policy and step count) and scored by the testbed's
verifier and fidelity reward. Each row reports the mean of each metric and its paired difference
to synchronous sampling at the same step count, with 95 % bootstrap intervals over prompts (each
prompt's noise sets averaged). ``--more-steps`` adds synchronous rows at larger step counts, so a
policy at K steps can be set against synchronous at 2K (AsyncPatch's "fewer steps" claim).
``--categories`` keeps only prompts of some grammar categories (e.g. ``two,binding,relation`` for
per-object order). ``--against`` adds every row's paired difference (mean metric) to other rows, e.g.
the best fixed table; ``--pairs "A-B;C-D"`` reports chosen pairs of rows on every metric (a learned
per-token field against the learned grid of the same seed). Each row's per-prompt means are saved,
so any other pair can be computed later with the same prompts and noises.

Make choices (variants, strengths, layers) on val prompts; report claims on test prompts with noise
sets no choice was made on. Prints JSON; ``--out`` also writes ``per_pixel_study.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np
import torch

METRICS = ("verifier", "fidelity", "mean")


def _paired(a: np.ndarray, b: np.ndarray) -> list[float]:
    from tpm.comparison.stats import paired_bootstrap

    d = paired_bootstrap(a, b, num_resamples=4000)
    return [round(d.estimate, 4), round(d.low, 4), round(d.high, 4)]


class Scorer:
    """Samples the prompts from the evaluation noises; per image: verifier and fidelity scores."""

    def __init__(self, pipe, prompts: list[str], batch_size: int):
        import rewards
        from tpm.backbones import get_backbone

        self.pipe, self.prompts, self.batch_size = pipe, prompts, batch_size
        self.sample_kwargs = get_backbone(pipe).sample_kwargs()
        self.verifier, self.fidelity = rewards.load("testbed_spatial"), rewards.load("testbed_fidelity")

    def scores(self, spec: str | None, steps: int, noise_sets: list[int]) -> dict[str, np.ndarray]:
        """metric -> (N,) scores, each prompt averaged over ``noise_sets``."""
        import policies
        from tpm.grpo.evaluation import evaluation_seeds
        from tpm.sampler import sample

        per_set: dict[str, list[np.ndarray]] = {"verifier": [], "fidelity": []}
        for s in noise_sets:
            seeds = evaluation_seeds(len(self.prompts), s)
            v, f = [], []
            for lo in range(0, len(self.prompts), self.batch_size):
                hi = min(lo + self.batch_size, len(self.prompts))
                policy = None if spec in (None, "synchronous") else policies.load(spec)
                gens = [torch.Generator().manual_seed(int(x)) for x in seeds[lo:hi]]
                out = sample(self.pipe, self.prompts[lo:hi], policy=policy, num_inference_steps=steps,
                             generator=gens, output_type="pt", **self.sample_kwargs)
                images = out.images.float().cpu()
                v.append(self.verifier(images, self.prompts[lo:hi]).numpy())
                f.append(self.fidelity(images, self.prompts[lo:hi]).numpy())
            per_set["verifier"].append(np.concatenate(v))
            per_set["fidelity"].append(np.concatenate(f))
        res = {k: np.mean(v, axis=0) for k, v in per_set.items()}
        res["mean"] = (res["verifier"] + res["fidelity"]) / 2
        return res


def main(argv: list[str] | None = None) -> dict:
    from tpm.loading import load_model, load_prompts
    from tpm.testbed.grammar import parse_prompt

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="testbed:spatial")
    ap.add_argument("--prompts", default="testbed:spatial-val")
    ap.add_argument("--num-prompts", type=int, default=0, help="0 = the whole split")
    ap.add_argument("--categories", default="", help="comma-separated grammar categories to keep (default all)")
    ap.add_argument("--policies", required=True, help="';'-separated policy specs")
    ap.add_argument("--steps", default="4,20")
    ap.add_argument("--more-steps", default="", help="extra step counts for synchronous rows only")
    ap.add_argument("--noise-sets", default="0,1")
    ap.add_argument("--against", default="", help="';'-separated rows (specs in --policies, or synchronous) "
                    "every row is also compared with")
    ap.add_argument("--pairs", default="", help="';'-separated 'A-B' pairs of rows (use ' - ' when a spec holds '-')")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    pipe = load_model(args.model)
    prompts = load_prompts(args.prompts, n=args.num_prompts or None, seed=0)
    if args.categories:
        keep = set(args.categories.split(","))
        prompts = [p for p in prompts if parse_prompt(p).category in keep]
        if not prompts:
            raise SystemExit(f"no prompt of {args.prompts} is in categories {sorted(keep)}")
    scorer = Scorer(pipe, prompts, args.batch_size)
    sets = [int(s) for s in args.noise_sets.split(",")]
    specs = [s for s in args.policies.split(";") if s]
    against = [s for s in args.against.split(";") if s]
    pairs = [tuple(x.strip() for x in (p.split(" - ") if " - " in p else p.split("-", 1)))
             for p in args.pairs.split(";") if p]
    unknown = [s for s in against + [x for p in pairs for x in p] if s != "synchronous" and s not in specs]
    if unknown:
        raise SystemExit(f"--against / --pairs name rows that are not in --policies: {unknown}")
    report: dict = {"benchmark": "per_pixel_study", "model": args.model, "prompts": args.prompts,
                    "categories": args.categories or "all", "n_prompts": len(prompts), "noise_sets": sets,
                    "steps": {}, "synchronous_more_steps": {}}
    more = {int(k): scorer.scores(None, int(k), sets) for k in args.more_steps.split(",") if k}
    for k, sc in more.items():
        report["synchronous_more_steps"][str(k)] = {m: round(float(sc[m].mean()), 4) for m in METRICS}
    for k in (int(s) for s in args.steps.split(",")):
        sync = scorer.scores(None, k, sets)
        rows = {"synchronous": {m: round(float(sync[m].mean()), 4) for m in METRICS}}
        scores = {"synchronous": sync}
        for spec in specs:
            sc = scores[spec] = scorer.scores(spec, k, sets)
            rows[spec] = {**{m: round(float(sc[m].mean()), 4) for m in METRICS},
                          **{f"{m}_minus_synchronous": _paired(sc[m], sync[m]) for m in METRICS}}
            for km, sm in more.items():  # against synchronous with more steps
                rows[spec][f"mean_minus_synchronous_{km}"] = _paired(sc["mean"], sm["mean"])
            print(json.dumps({"steps": k, spec: rows[spec]}), flush=True)
        for spec in specs:
            rows[spec]["mean_minus"] = {a: _paired(scores[spec]["mean"], scores[a]["mean"])
                                        for a in against if a != spec}
        report["steps"][str(k)] = rows
        report.setdefault("pairs", {})[str(k)] = {
            f"{a} - {b}": {m: _paired(scores[a][m], scores[b][m]) for m in METRICS} for a, b in pairs}
        report.setdefault("per_prompt_mean", {})[str(k)] = {
            name: [round(float(x), 5) for x in sc["mean"]] for name, sc in scores.items()}
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "per_pixel_study.json"), "w") as f:
            f.write(text + "\n")
        with open(os.path.join(args.out, "per_pixel_study.md"), "w") as f:
            f.write(markdown(report))
    return report


def markdown(r: dict) -> str:
    f = "{:+.4f} [{:+.4f}, {:+.4f}]".format
    lines = [f"{r['model']}, {r['prompts']} ({r['categories']}; {r['n_prompts']} prompts x noise sets "
             f"{r['noise_sets']}); differences to synchronous at the same steps, paired over prompts", "",
             "| steps | policy | verifier | fidelity | mean | verifier - sync | fidelity - sync | mean - sync |",
             "|---|---|---|---|---|---|---|---|"]
    for k, rows in r["steps"].items():
        for name, v in rows.items():
            diffs = [f(*v[f"{m}_minus_synchronous"]) if f"{m}_minus_synchronous" in v else "" for m in METRICS]
            lines.append(f"| {k} | {name} | {v['verifier']:.4f} | {v['fidelity']:.4f} | {v['mean']:.4f} | "
                         + " | ".join(diffs) + " |")
    for k, v in r["synchronous_more_steps"].items():
        lines.append(f"| {k} | synchronous | {v['verifier']:.4f} | {v['fidelity']:.4f} | {v['mean']:.4f} | | | |")
    extra = [f"- {name} at {k} steps minus synchronous at {key.rsplit('_', 1)[1]} steps (mean): {f(*d)}"
             for k, rows in r["steps"].items() for name, v in rows.items()
             for key, d in v.items() if key.startswith("mean_minus_synchronous_")]
    extra += [f"- {k} steps, {name} minus {other} (mean): {f(*d)}" for k, rows in r["steps"].items()
              for name, v in rows.items() for other, d in v.get("mean_minus", {}).items()]
    extra += [f"- {k} steps, {pair}: " + ", ".join(f"{m} {f(*d[m])}" for m in METRICS)
              for k, ps in r.get("pairs", {}).items() for pair, d in ps.items()]
    if extra:
        lines += [""] + extra
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
