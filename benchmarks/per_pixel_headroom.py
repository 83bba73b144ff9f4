"""What could choosing time per prompt or per pixel gain at all? Oracle bounds before any training.

    python benchmarks/per_pixel_headroom.py --model testbed:spatial --prompts testbed:spatial-val \\
        --steps 4,20 --choose-sets 0,1 --score-sets 2,3 --out docs/benchmarks/per_pixel_headroom_val

Every policy is scored on the same prompts and noises (noise set s of prompt j is the same for
every policy; ``tpm.grpo.evaluation``'s seeds), by ``--reward`` (default: the mean of the spatial
testbed's verifier and fidelity scores, a fixed combination). At each step count:

- **fixed tables** (``--tables``): state-free schedules, every prompt on the same one;
- **per-prompt oracle**: for each prompt the table that scored best on the *choose* noise sets,
  scored on the *score* noise sets, against the single table that was best on average on the
  choose sets (also scored on the score sets). "Hindsight" picks per prompt on the score sets
  themselves: an upper bound no prompt-level predictor reaches; "per-sample hindsight" picks per
  (prompt, noise): a bound for any policy that chooses among the tables from the prompt and its noise;
- **per-pixel oracle**: AsynDM's concave schedule (Prop. 1) on the tokens of the objects that the
  verifier detects in the synchronous 20-step image of the *same* noise (a ground-truth mask,
  known only with hindsight), against synchronous, DM_concave (every token on the concave
  schedule) and AsynDM's own cross-attention masks (Eq. 7).

Differences are paired over prompts (each prompt's score-set noises averaged) with 95 % bootstrap
intervals. Prints JSON; ``--out`` also writes ``per_pixel_headroom.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np
import torch

DEFAULT_TABLES = ("synchronous,shifted_grid:shift=0.5,shifted_grid:shift=2.0,shifted_grid:shift=3.0,"
                  "dm_concave:weight=0.5,dm_concave,constant_deviation:r=0.3,constant_deviation:r=0.7")


def _paired(a: np.ndarray, b: np.ndarray) -> list[float]:
    from tpm.comparison.stats import paired_bootstrap

    d = paired_bootstrap(a, b, num_resamples=4000)
    return [round(d.estimate, 4), round(d.low, 4), round(d.high, 4)]


class Scorer:
    """Samples ``prompts`` from the evaluation noises and scores every image (per prompt, per noise set)."""

    def __init__(self, pipe, prompts: list[str], reward: str, batch_size: int):
        import rewards
        from tpm.backbones import get_backbone

        self.pipe, self.prompts, self.batch_size = pipe, prompts, batch_size
        self.sample_kwargs = get_backbone(pipe).sample_kwargs()
        if reward == "spatial_mean":
            v, f = rewards.load("testbed_spatial"), rewards.load("testbed_fidelity")
            self.reward = lambda images, ps: (v(images, ps) + f(images, ps)) / 2
        else:
            self.reward = rewards.load(reward)

    def images(self, policy_for, steps: int, noise_set: int) -> torch.Tensor:
        """(N, 3, H, W) images; ``policy_for(lo, hi)`` gives the policy of prompts[lo:hi] (None: synchronous)."""
        from tpm.grpo.evaluation import evaluation_seeds
        from tpm.sampler import sample

        seeds = evaluation_seeds(len(self.prompts), noise_set)
        out = []
        for lo in range(0, len(self.prompts), self.batch_size):
            hi = min(lo + self.batch_size, len(self.prompts))
            gens = [torch.Generator().manual_seed(int(s)) for s in seeds[lo:hi]]
            res = sample(self.pipe, self.prompts[lo:hi], policy=policy_for(lo, hi), num_inference_steps=steps,
                         generator=gens, output_type="pt", **self.sample_kwargs)
            out.append(res.images.float().cpu())
        return torch.cat(out)

    def scores(self, policy_for, steps: int, noise_sets: list[int]) -> np.ndarray:
        """(len(noise_sets), N) rewards."""
        return np.stack([self.reward(self.images(policy_for, steps, s), self.prompts).numpy() for s in noise_sets])


def object_masks(images: torch.Tensor, grid: tuple[int, int], verifier, coverage: float) -> torch.Tensor:
    """(N, h, w) bool: tokens whose pixels are at least ``coverage`` covered by detected objects."""
    out = []
    for img in images:
        m = np.zeros(img.shape[1:], bool)
        for d in verifier.detect(img):
            m |= d.mask
        cov = torch.nn.functional.adaptive_avg_pool2d(torch.from_numpy(m.astype(np.float32))[None, None], grid)
        out.append(cov[0, 0] >= coverage)
    return torch.stack(out)


def main(argv: list[str] | None = None) -> dict:
    import policies
    from tpm.backbones import get_backbone
    from tpm.loading import load_model, load_prompts
    from tpm.testbed.verifier import Verifier

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="testbed:spatial")
    ap.add_argument("--prompts", default="testbed:spatial-val")
    ap.add_argument("--num-prompts", type=int, default=0, help="0 = the whole split")
    ap.add_argument("--steps", default="4,20")
    ap.add_argument("--tables", default=DEFAULT_TABLES, help="comma-separated fixed policies (name:key=value)")
    ap.add_argument("--choose-sets", default="0,1", help="noise sets the per-prompt oracle chooses on")
    ap.add_argument("--score-sets", default="2,3", help="noise sets every row is scored on")
    ap.add_argument("--mask-steps", type=int, default=20, help="steps of the synchronous run whose objects give the mask")
    ap.add_argument("--mask-coverage", type=float, default=0.25, help="token coverage that puts a token in the mask")
    ap.add_argument("--reward", default="spatial_mean", help="'spatial_mean' (verifier + fidelity) / 2, or a reward name")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    pipe = load_model(args.model)
    bb = get_backbone(pipe)
    grid = bb.grid(*bb.resolve_size(None, None))
    prompts = load_prompts(args.prompts, n=args.num_prompts or None, seed=0)
    scorer = Scorer(pipe, prompts, args.reward, args.batch_size)
    choose = [int(s) for s in args.choose_sets.split(",")]
    score = [int(s) for s in args.score_sets.split(",")]
    tables = [t for t in args.tables.split(",") if t]
    verifier = Verifier.for_domain(getattr(getattr(pipe, "tpm_testbed_config", None), "domain", "spatial"))

    # Ground-truth masks: the objects of the synchronous images of the score sets' noises.
    masks = {s: object_masks(scorer.images(lambda lo, hi: None, args.mask_steps, s), grid, verifier,
                             args.mask_coverage) for s in score}
    report: dict = {"benchmark": "per_pixel_headroom", "model": args.model, "prompts": args.prompts,
                    "n_prompts": len(prompts), "reward": args.reward, "choose_sets": choose, "score_sets": score,
                    "mask_fraction": round(float(torch.stack(list(masks.values())).float().mean()), 4), "steps": {}}
    for k in (int(s) for s in args.steps.split(",")):
        table_scores = {t: scorer.scores(lambda lo, hi, t=t: policies.load(t), k, choose + score) for t in tables}
        a = {t: v[:len(choose)].mean(0) for t, v in table_scores.items()}  # (N,) on the choose sets
        b = {t: v[len(choose):].mean(0) for t, v in table_scores.items()}  # (N,) on the score sets
        names = list(tables)
        A, B = np.stack([a[t] for t in names]), np.stack([b[t] for t in names])  # (T, N)
        best = names[int(A.mean(1).argmax())]
        per_prompt = B[A.argmax(0), np.arange(B.shape[1])]
        hindsight = B.max(0)
        per_sample = np.stack([table_scores[t][len(choose):] for t in names]).max(0).mean(0)  # (N,)
        sync = b["synchronous"] if "synchronous" in b else scorer.scores(lambda lo, hi: None, k, score).mean(0)

        def user_policy(s):
            return lambda lo, hi: policies.load("concave", user_mask=masks[s][lo:hi].float())

        oracle_pixel = np.mean([scorer.scores(user_policy(s), k, [s])[0] for s in score], axis=0)
        dm = scorer.scores(lambda lo, hi: policies.load("dm_concave"), k, score).mean(0)
        asyndm = scorer.scores(lambda lo, hi: policies.load("asyndm"), k, score).mean(0)
        report["steps"][str(k)] = {
            "tables": {t: round(float(b[t].mean()), 4) for t in names},
            "best_table": best, "synchronous": round(float(sync.mean()), 4),
            "per_prompt_oracle_minus_best_table": _paired(per_prompt, b[best]),
            "per_prompt_hindsight_minus_best_table": _paired(hindsight, b[best]),
            "per_sample_hindsight_minus_best_table": _paired(per_sample, b[best]),
            "per_pixel_oracle": round(float(oracle_pixel.mean()), 4),
            "per_pixel_oracle_minus_synchronous": _paired(oracle_pixel, sync),
            "per_pixel_oracle_minus_dm_concave": _paired(oracle_pixel, dm),
            "per_pixel_oracle_minus_best_table": _paired(oracle_pixel, b[best]),
            "asyndm_minus_synchronous": _paired(asyndm, sync),
            "asyndm_minus_per_pixel_oracle": _paired(asyndm, oracle_pixel),
        }
        print(json.dumps({k: report["steps"][str(k)]}), flush=True)
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "per_pixel_headroom.json"), "w") as f:
            f.write(text + "\n")
        with open(os.path.join(args.out, "per_pixel_headroom.md"), "w") as f:
            f.write(markdown(report))
    return report


def markdown(r: dict) -> str:
    f = "{:+.4f} [{:+.4f}, {:+.4f}]".format
    lines = [f"{r['model']}, {r['prompts']} ({r['n_prompts']} prompts); reward {r['reward']}; per-prompt choice on "
             f"noise sets {r['choose_sets']}, every row scored on {r['score_sets']}; mask fraction {r['mask_fraction']}",
             "", "| steps | best table | per-prompt oracle - best | hindsight - best | per-sample hindsight - best | "
             "per-pixel oracle - sync | per-pixel oracle - dm_concave | per-pixel oracle - best table | asyndm - sync |",
             "|---|---|---|---|---|---|---|---|---|"]
    for k, v in r["steps"].items():
        lines.append(f"| {k} | {v['best_table']} ({v['tables'][v['best_table']]:.4f}) | "
                     f"{f(*v['per_prompt_oracle_minus_best_table'])} | {f(*v['per_prompt_hindsight_minus_best_table'])} | "
                     f"{f(*v['per_sample_hindsight_minus_best_table'])} | "
                     f"{f(*v['per_pixel_oracle_minus_synchronous'])} | {f(*v['per_pixel_oracle_minus_dm_concave'])} | "
                     f"{f(*v['per_pixel_oracle_minus_best_table'])} | {f(*v['asyndm_minus_synchronous'])} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
