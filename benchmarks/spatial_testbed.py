"""The spatial testbed's design targets, measured on a prompt split: steps, colour, headroom, maps.

    python benchmarks/spatial_testbed.py --model testbed:spatial --prompts testbed:spatial-val \\
        --noise-sets 0,1 --steps 1,2,3,4,6,10,20,50 --out docs/benchmarks/spatial_testbed

What it reports (JSON on stdout; ``--out`` also gets ``spatial_testbed.json``, a step-curve PNG and
a sample grid with each column's prompt above it):

- **step curve**: the verifier score and the fidelity score (``rewards.load("testbed_fidelity")``)
  of the synchronous sampler at every ``--steps`` count, with bootstrap intervals over prompts;
  the paired difference 20 - 6 steps of the verifier, the fidelity and their *composite* (here the
  plain mean of the two raw scores, a fixed combination: the z-scored training composite depends on
  the batch);
- **colour**: at the reference step count, over ``--colour-seeds`` noises per single-object prompt
  (seeds 10000, 10001, ...), the fraction of images whose largest detected object has the prompt's
  colour, whatever its shape (``single_object_colour_rate``), and the fraction that pass the
  verifier's ``obj0:color`` check, which also needs the prompt's shape
  (``single_object_shape_and_colour_rate``);
- **alignment headroom**: the verifier's mean and all-correct rate per category at the reference
  steps, and which checks fail (present / colour / count / relation);
- **maps**: for ``--map-prompts`` prompts sampled synchronously at the reference steps, the AsynDM
  mask (Eq. 7: tokens where some object word's map exceeds its mean) of every joint-attention layer
  at every step, against the tokens at least half covered by the objects the verifier detects in
  the final image: IoU per layer, averaged over steps (and over the first, middle and last third
  of the steps), with bootstrap intervals over prompts.

Noise: image j of noise set s starts from ``tpm.grpo.evaluate``'s noise for (s, j), the same at
every step count, so differences between step counts are paired.
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np
import torch

from tpm.comparison.stats import bootstrap_mean, paired_bootstrap


def _interval(x: np.ndarray) -> list[float]:
    b = bootstrap_mean(np.asarray(x, dtype=np.float64), list(range(len(x))))
    return [round(b.estimate, 4), round(b.low, 4), round(b.high, 4)]


def _paired(a: np.ndarray, b: np.ndarray) -> list[float]:
    d = paired_bootstrap(a, b, num_resamples=4000)
    return [round(d.estimate, 4), round(d.low, 4), round(d.high, 4)]


def score_images(verifier, images, prompts) -> dict[str, np.ndarray]:
    """Per image: verifier score, all-correct, fidelity, and the failed check kinds."""
    from tpm.testbed.fidelity import fidelity
    from tpm.testbed.grammar import parse_prompt

    out = {"verifier": [], "all_correct": [], "fidelity": []}
    fails: list[list[str]] = []
    for img, p in zip(images, prompts):
        spec = parse_prompt(p)
        r = verifier.verify(img, spec)
        out["verifier"].append(r.score)
        out["all_correct"].append(float(r.all_correct))
        out["fidelity"].append(fidelity(img, spec, verifier).score)
        fails.append([k.split(":")[-1] for k, ok in r.checks.items() if not ok])
    res = {k: np.array(v) for k, v in out.items()}
    res["fails"] = fails
    return res


class _MapProbe:
    """Synchronous sampling that asks the backbone for the object words' maps of some layers."""

    def __new__(cls, layers: list[int]):
        from policies.masks import object_positions
        from tpm.policy import Synchronous

        class Probe(Synchronous):
            def attention_layers(self, num_layers):
                return list(layers)

            def attention_layers_for(self, backbone):
                return list(layers)

            def attention_tokens(self, prompts, text_words):
                return [object_positions(p, tw) for p, tw in zip(prompts, text_words)]

        return Probe()


def single_colour(pipe, prompts: list[str], verifier, seeds: int, steps: int) -> dict:
    """Single-object prompts: is the object drawn in the prompt's colour (and shape)?"""
    if not prompts:
        return {"single_object_colour_rate": None, "single_object_shape_and_colour_rate": None,
                "n_single_images": 0}
    from tpm.sampler import sample
    from tpm.testbed.grammar import parse_prompt
    from tpm.testbed.models import call_kwargs

    colour_ok: list[bool] = []
    both_ok: list[bool] = []
    for s in range(seeds):
        gen = torch.Generator().manual_seed(10_000 + s)
        out = sample(pipe, prompts, generator=gen, **call_kwargs(pipe, num_inference_steps=steps))
        for img, p in zip(out.images, prompts):
            want = parse_prompt(p).objects[0].color
            if want is None:  # "a circle": any colour is right
                continue
            dets = verifier.detect(img)
            colour_ok.append(bool(dets) and max(dets, key=lambda d: d.area).color == want)
            both_ok.append(verifier.verify(img, p).checks.get("obj0:color", False))
    return {"single_object_colour_rate": round(float(np.mean(colour_ok)), 4),
            "single_object_shape_and_colour_rate": round(float(np.mean(both_ok)), 4),
            "n_single_images": len(colour_ok)}


def token_truth(mask: np.ndarray, grid: tuple[int, int]) -> torch.Tensor:
    """(h, w) bool: tokens whose pixel cell is at least half covered by ``mask``."""
    cov = torch.nn.functional.adaptive_avg_pool2d(torch.from_numpy(mask.astype(np.float32))[None, None], grid)[0, 0]
    return cov >= 0.5


def map_iou(pipe, prompts: list[str], steps: int, verifier, seed: int, batch_size: int) -> dict:
    """IoU of each layer's AsynDM masks with the detected objects (see the module docstring)."""
    from policies.masks import attention_mask, object_positions
    from tpm.backbones import get_backbone
    from tpm.sampler import sample
    from tpm.testbed.models import call_kwargs

    bb = get_backbone(pipe)
    n_layers = bb.num_attention_layers
    kwargs = call_kwargs(pipe, num_inference_steps=steps)
    sets = [[layer] for layer in range(n_layers)] + [list(range(n_layers))]  # each layer, then all averaged
    per_layer: dict[int, list[np.ndarray]] = {i: [] for i in range(len(sets))}
    for b0 in range(0, len(prompts), batch_size):
        batch = prompts[b0:b0 + batch_size]
        truths = None
        for si, layers in enumerate(sets):
            gen = torch.Generator().manual_seed(seed * 7919 + b0)
            out = sample(pipe, batch, policy=_MapProbe(layers), generator=gen, return_trajectory=True, **kwargs)
            traj = out.trajectory
            if truths is None:  # the images do not depend on which layer is read
                truths = []
                for img in out.images:
                    dets = verifier.detect(img)
                    m = np.zeros(np.asarray(img).shape[:2], bool)
                    for d in dets:
                        m |= d.mask
                    truths.append(token_truth(m, traj.grid))
            positions = [object_positions(p, tw) for p, tw in zip(batch, traj.text_words)]
            ious = np.full((len(batch), steps), np.nan)
            for k, maps in enumerate(traj.attention):
                masks = attention_mask(maps.float(), positions)
                for i, t in enumerate(truths):
                    if not t.any() or not positions[i]:
                        continue
                    inter = (masks[i] & t).sum().item()
                    union = (masks[i] | t).sum().item()
                    ious[i, k] = inter / max(union, 1)
            per_layer[si].append(ious)
    rows = []
    for si, chunks in per_layer.items():
        layer = sets[si] if len(sets[si]) > 1 else sets[si][0]
        ious = np.concatenate(chunks)  # (prompts, steps)
        keep = ~np.isnan(ious).all(1)
        ious = ious[keep]
        if not keep.any():  # nothing detected in any image: no ground truth to score against
            rows.append({"layer": layer, "iou": None, "iou_by_third": None, "n_prompts": 0})
            continue
        thirds = np.array_split(np.arange(steps), 3)
        rows.append({"layer": layer, "iou": _interval(np.nanmean(ious, 1)),
                     "iou_by_third": [round(float(np.nanmean(ious[:, t])), 4) for t in thirds],
                     "n_prompts": int(keep.sum())})
    return {"steps": steps, "layers": rows, "default_layers": bb.default_attention_layers()}


def main(argv: list[str] | None = None) -> dict:
    import rewards  # noqa: F401  (registers the testbed rewards)
    from tpm.backbones import get_backbone
    from tpm.grpo import evaluate
    from tpm.grpo.reward import TrainingReward
    from tpm.loading import load_model, load_prompts
    from tpm.testbed.grammar import parse_prompt
    from tpm.testbed.verifier import Verifier

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="testbed:spatial")
    ap.add_argument("--prompts", default="testbed:spatial-val")
    ap.add_argument("--num-prompts", type=int, default=0, help="0 = the whole split")
    ap.add_argument("--noise-sets", default="0,1")
    ap.add_argument("--steps", default="1,2,3,4,6,10,20,50")
    ap.add_argument("--reference-steps", type=int, default=20)
    ap.add_argument("--compare", default="6,20", help="the two step counts whose paired difference is reported")
    ap.add_argument("--map-prompts", type=int, default=64)
    ap.add_argument("--colour-seeds", type=int, default=8, help="noises per single-object prompt for the colour rate")
    ap.add_argument("--grid-prompts", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    pipe = load_model(args.model)
    bb = get_backbone(pipe)
    prompts = load_prompts(args.prompts, n=args.num_prompts or None, seed=0)
    verifier = Verifier.for_domain(getattr(getattr(pipe, "tpm_testbed_config", None), "domain", "spatial"))
    noise_sets = [int(s) for s in args.noise_sets.split(",")]
    step_counts = sorted({int(s) for s in args.steps.split(",")} | {args.reference_steps})
    fails_at_ref: list[list[str]] = []

    def metrics(images, ps):
        res = score_images(verifier, images, ps)
        if collect_fails[0]:
            fails_at_ref.extend(res.pop("fails"))
        else:
            res.pop("fails")
        return {k: torch.from_numpy(v).float() for k, v in res.items()}

    collect_fails = [False]
    reward = TrainingReward(metrics, lambda m: m["verifier"])
    curve: dict[int, dict[str, np.ndarray]] = {}
    for k in step_counts:
        runs = []
        for s in noise_sets:
            collect_fails[0] = k == args.reference_steps
            runs.append(evaluate(pipe, None, prompts, reward, seed=s, num_inference_steps=k,
                                 rollout_batch_size=args.batch_size, sample_kwargs=bb.sample_kwargs()).metrics)
        curve[k] = {m: np.mean([r[m] for r in runs], axis=0) for m in runs[0]}
        print(f"steps {k}: verifier {curve[k]['verifier'].mean():.4f} fidelity {curve[k]['fidelity'].mean():.4f}",
              flush=True)
    a, b = (int(s) for s in args.compare.split(","))
    comp = {k: (v["verifier"] + v["fidelity"]) / 2 for k, v in curve.items()}
    cats = [parse_prompt(p).category for p in prompts]
    ref = curve[args.reference_steps]
    single = np.array([c == "single" for c in cats])
    per_cat = {c: {"n": int(sum(x == c for x in cats)),
                   "verifier": round(float(ref["verifier"][np.array(cats) == c].mean()), 4),
                   "all_correct": round(float(ref["all_correct"][np.array(cats) == c].mean()), 4)}
               for c in dict.fromkeys(cats)}
    # failed checks by kind, over every image at the reference steps (all noise sets)
    kinds: dict[str, int] = {}
    for f in fails_at_ref:
        for kind in f:
            kinds[kind] = kinds.get(kind, 0) + 1
    single_prompts = [p for p, c in zip(prompts, cats) if c == "single"]
    colour = single_colour(pipe, single_prompts, verifier, args.colour_seeds, args.reference_steps)
    report = {
        "benchmark": "spatial_testbed", "model": args.model, "prompts": args.prompts, "n_prompts": len(prompts),
        "noise_sets": noise_sets, "grid": list(bb.grid(*bb.resolve_size(None, None))),
        "curve": {str(k): {"verifier": _interval(v["verifier"]), "fidelity": _interval(v["fidelity"]),
                           "all_correct": round(float(v["all_correct"].mean()), 4)} for k, v in curve.items()},
        f"gain_{a}_to_{b}": {"verifier": _paired(curve[b]["verifier"], curve[a]["verifier"]),
                             "fidelity": _paired(curve[b]["fidelity"], curve[a]["fidelity"]),
                             "composite": _paired(comp[b], comp[a])},
        "reference_steps": args.reference_steps,
        **colour,
        "per_category": per_cat, "failed_checks": kinds,
        "single_verifier": round(float(ref["verifier"][single].mean()), 4) if single.any() else None,
    }
    if args.map_prompts:
        subset = load_prompts(args.prompts, n=args.map_prompts, seed=1)
        report["maps"] = map_iou(pipe, subset, args.reference_steps, verifier, seed=noise_sets[0],
                                 batch_size=args.batch_size)
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "spatial_testbed.json"), "w") as f:
            f.write(text + "\n")
        plot_curve(report, os.path.join(args.out, "step_curve.png"))
        if args.grid_prompts:
            grid_png(pipe, prompts, cats, args.grid_prompts, args.reference_steps, os.path.join(args.out, "samples.png"))
    return report


def plot_curve(report: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ks = sorted(int(k) for k in report["curve"])
    fig, ax = plt.subplots(figsize=(5, 3.2))
    for name, color in (("verifier", "#4c72b0"), ("fidelity", "#dd8452")):
        m = [report["curve"][str(k)][name] for k in ks]
        ax.plot(ks, [r[0] for r in m], "o-", color=color, label=name)
        ax.fill_between(ks, [r[1] for r in m], [r[2] for r in m], color=color, alpha=0.2)
    ax.set_xscale("log")
    ax.set_xticks(ks)
    ax.set_xticklabels([str(k) for k in ks])
    ax.set_xlabel("sampling steps (synchronous)")
    ax.set_ylabel("score")
    ax.set_title(f"{report['model']}, {report['prompts']} ({report['n_prompts']} prompts)", fontsize=8)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def grid_png(pipe, prompts: list[str], cats: list[str], n: int, steps: int, path: str, rows: int = 3) -> None:
    """``n`` prompts spread over the categories (columns, prompt above), ``rows`` noises each."""
    import textwrap

    from PIL import Image, ImageDraw

    from tpm.sampler import sample
    from tpm.testbed.models import call_kwargs

    order = sorted(range(len(prompts)), key=lambda i: (cats[i], i))
    by_cat: dict[str, list[int]] = {}
    for i in order:
        by_cat.setdefault(cats[i], []).append(i)
    chosen: list[int] = []
    while len(chosen) < min(n, len(prompts)):
        for c in list(by_cat):
            if by_cat[c] and len(chosen) < n:
                chosen.append(by_cat[c].pop(0))
    cols = [prompts[i] for i in chosen]
    cell, pad, top = 128, 4, 44
    sheet = Image.new("RGB", (len(cols) * (cell + pad) + pad, top + rows * (cell + pad) + pad), "white")
    draw = ImageDraw.Draw(sheet)
    for r in range(rows):
        out = sample(pipe, cols, generator=torch.Generator().manual_seed(500 + r),
                     **call_kwargs(pipe, num_inference_steps=steps))
        for c, img in enumerate(out.images):
            sheet.paste(img.resize((cell, cell), Image.NEAREST), (pad + c * (cell + pad), top + r * (cell + pad)))
    for c, prompt in enumerate(cols):
        draw.multiline_text((pad + c * (cell + pad) + 2, 2), "\n".join(textwrap.wrap(prompt, 22)[:3]), fill="black")
    sheet.save(path)


if __name__ == "__main__":
    main()
