"""Which joint-attention layers localise the prompt's objects: AsynDM masks against rendered boxes.

The testbed renders every prompt with known boxes (``tpm.testbed.render.layout``). For each
prompt we draw its scene, encode it with the testbed VAE, noise it to a flow time ``tau``
(``x_tau = (1 - tau) x0 + tau eps``), and run one forward with the maps of one layer (or of a
set of layers, averaged as AsynDM averages them) captured for the object words. The AsynDM mask
(Eq. 7: a token is prompt-related where some object word's map exceeds its mean) is compared with
the ground truth, the tokens that are at least half covered by an object box:

- ``iou``: intersection over union of the mask and the ground truth;
- ``auroc``: how well the object words' mean map ranks covered tokens above uncovered ones
  (threshold-free; 0.5 = chance).

Both are averaged over prompts, noise seeds and times, with a bootstrap interval over prompts.
Choices are made on ``testbed:val``; ``--prompts testbed:test`` reports the chosen sets on test.
Prints JSON; ``--png`` draws the per-layer table as a bar chart.

    python benchmarks/attention_layers.py --model testbed:flux --prompts testbed:val --num-prompts 128
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np
import torch

from tpm.backbones import get_backbone
from tpm.comparison.stats import bootstrap_mean
from tpm.loading import load_model, load_prompts
from tpm.testbed.grammar import parse_prompt
from tpm.testbed.render import draw, layout


def box_mask(objects, size: int) -> np.ndarray:
    """(size, size) bool: pixels inside any object's box."""
    m = np.zeros((size, size), dtype=bool)
    for o in objects:
        x0, y0 = int(round(o.x)), int(round(o.y))
        x1, y1 = int(round(o.x + o.size)), int(round(o.y + o.size))
        m[max(y0, 0):min(y1, size), max(x0, 0):min(x1, size)] = True
    return m


def token_truth(mask: np.ndarray, grid: tuple[int, int]) -> torch.Tensor:
    """(h, w) bool: tokens whose pixel cell is at least half covered."""
    h, w = grid
    cov = torch.from_numpy(mask.astype(np.float32))[None, None]
    cov = torch.nn.functional.adaptive_avg_pool2d(cov, (h, w))[0, 0]
    return cov >= 0.5


def auroc(score: torch.Tensor, truth: torch.Tensor) -> float:
    """Probability that a covered token scores above an uncovered one (ties count half)."""
    pos, neg = score[truth], score[~truth]
    if pos.numel() == 0 or neg.numel() == 0:
        return float("nan")
    diff = pos[:, None] - neg[None, :]
    return float(((diff > 0).float() + 0.5 * (diff == 0).float()).mean())


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="testbed:flux")
    ap.add_argument("--prompts", default="testbed:val")
    ap.add_argument("--num-prompts", type=int, default=128)
    ap.add_argument("--seeds", type=int, default=2, help="noise seeds per prompt")
    ap.add_argument("--times", default="0.9,0.6,0.3", help="flow times at which the maps are read")
    ap.add_argument("--sets", default=None, help="extra layer sets to score, e.g. '1,2;0,1,2,3' (default: "
                    "every single layer, every contiguous pair, and all)")
    ap.add_argument("--out", default=None, help="write the JSON here")
    ap.add_argument("--png", default=None, help="write a bar chart here")
    args = ap.parse_args(argv)
    torch.manual_seed(0)

    import policies
    from policies.masks import attention_mask, object_positions

    pipe = load_model(args.model)
    bb = get_backbone(pipe)
    size = bb.resolve_size(None, None)[0]
    grid = bb.grid(size, size)
    n = bb.num_attention_layers
    if args.sets:
        sets = [[int(i) for i in s.split(",")] for s in args.sets.split(";")]
    else:
        sets = [[i] for i in range(n)] + [[i, i + 1] for i in range(n - 1)] + [list(range(n))]
    times = [float(t) for t in args.times.split(",")]
    prompts = load_prompts(args.prompts, n=args.num_prompts or None, seed=0)
    defaults = getattr(pipe, "tpm_defaults", {})
    cond_kwargs = {"max_sequence_length": defaults.get("max_sequence_length")}
    scale = defaults.get("guidance_scale", 1.0)
    policy = policies.load("asyndm")

    iou = {str(s): [] for s in sets}
    roc = {str(s): [] for s in sets}
    groups = []
    with torch.no_grad():
        for pi, prompt in enumerate(prompts):
            cond = bb.encode([prompt], scale, **{k: v for k, v in cond_kwargs.items() if v is not None})
            words = bb.text_words([prompt], cond.extras["max_sequence_length"])
            pos = object_positions(prompt, words[0])
            if not pos:
                continue
            spec = parse_prompt(prompt)
            for seed in range(args.seeds):
                objs = layout(spec, size=size, seed=seed)
                truth = token_truth(box_mask(objs, size), grid)
                if truth.all() or not truth.any():
                    continue
                img = torch.from_numpy(np.asarray(draw(objs, size), dtype=np.float32) / 127.5 - 1.0)
                x0 = bb.encode_images(img.permute(2, 0, 1)[None])
                noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(1000 + seed))
                for t in times:
                    xt = (1 - t) * x0 + t * noise
                    field = torch.full((1, *grid), t)
                    for s in sets:
                        pred = bb.predict(xt, field, cond, attention_layers=s,
                                          attention_tokens=policy.attention_tokens([prompt], words))
                        maps = pred.attention
                        mask = attention_mask(maps, [pos])[0]
                        inter = (mask & truth).sum().item()
                        union = (mask | truth).sum().item()
                        iou[str(s)].append(inter / union)
                        roc[str(s)].append(auroc(maps[0, pos].mean(0), truth))
                groups += [pi] * len(times)
    rows = []
    for s in sets:
        k = str(s)
        a, r = bootstrap_mean(np.array(iou[k]), groups), bootstrap_mean(np.array(roc[k]), groups)
        rows.append({"layers": s, "iou": [round(a.estimate, 4), round(a.low, 4), round(a.high, 4)],
                     "auroc": [round(r.estimate, 4), round(r.low, 4), round(r.high, 4)]})
    best = max(rows, key=lambda row: row["iou"][0])
    result = {
        "benchmark": "attention_layers", "model": args.model, "prompts": args.prompts,
        "num_prompts": len(set(groups)), "seeds": args.seeds, "times": times, "grid": list(grid),
        "num_layers": n, "rows": rows, "best_by_iou": best["layers"],
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w") as f:
            f.write(text + "\n")
    if args.png:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(1.0 + 0.7 * len(rows), 3.2))
        labels = [",".join(map(str, row["layers"])) for row in rows]
        vals = [row["iou"][0] for row in rows]
        err = [[row["iou"][0] - row["iou"][1] for row in rows], [row["iou"][2] - row["iou"][0] for row in rows]]
        ax.bar(labels, vals, yerr=err, color="#4c72b0", capsize=3)
        ax.set_xlabel("captured layers")
        ax.set_ylabel("mask IoU with object boxes")
        ax.set_title(f"{args.model}, {args.prompts}", fontsize=9)
        fig.tight_layout()
        fig.savefig(args.png, dpi=120)
    return result


if __name__ == "__main__":
    main()
