"""Evaluate a testbed pipeline with the verifier, per difficulty category; print JSON, write a grid.

    python recipes/eval_testbed.py --pipeline flux --policy synchronous --split val --per-category 64
    python recipes/eval_testbed.py --pipeline flux-asyncpatch --inpaint left --out-dir outputs/eval-inpaint

``--pipeline``: a shipped name (flux, sd3, flux-asyncpatch) or a folder written by the training
recipe (``<output-dir>/pipeline``). ``--policy``: any name ``policies.load`` accepts or an exported
policy folder ("synchronous" = the pipeline's own schedule). ``--inpaint SIDE`` instead renders each
prompt's ground-truth image, keeps the tokens of half of it (left/right/top/bottom) at time 0 and
generates the other half (AsyncPatch zero-shot inpainting, ``policies.spatial.Inpaint``); the
verifier then scores the whole image against the prompt.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch


def _inpaint_factory(pipe, side: str, resolution: int, seed: int):
    from policies.spatial import Inpaint, encode_image
    from tpm.backbones import get_backbone
    from tpm.testbed.render import render

    bb = get_backbone(pipe)
    h, w = bb.grid(resolution, resolution)
    known = torch.zeros(h, w, dtype=torch.bool)
    half = {"left": (slice(None), slice(0, w // 2)), "right": (slice(None), slice(w // 2, None)),
            "top": (slice(0, h // 2), slice(None)), "bottom": (slice(h // 2, None), slice(None))}[side]
    known[half] = True
    # pixels to generate are set to mid-grey before encoding so they cannot leak into the latents
    fill = (~known).float().repeat_interleave(bb.token_size, 0).repeat_interleave(bb.token_size, 1)

    @torch.no_grad()
    def policy_for(items):
        imgs = torch.stack([
            torch.from_numpy(np.asarray(render(it.spec, size=resolution, seed=seed + 17 * i).convert("RGB")))
            .permute(2, 0, 1).float() / 127.5 - 1.0
            for i, it in enumerate(items)
        ])
        tokens = encode_image(pipe, imgs * (1 - fill))
        return Inpaint(image_latents=tokens, known=known[None].expand(len(items), h, w).clone())

    return policy_for


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pipeline", default="flux", help="Shipped testbed name or a pipeline folder.")
    ap.add_argument("--policy", default="synchronous", help="Policy name (policies.load) or exported folder.")
    ap.add_argument("--split", default="val", help="Prompt split: train, val or test.")
    ap.add_argument("--per-category", type=int, default=64, help="Images per difficulty category.")
    ap.add_argument("--num-inference-steps", type=int, default=None, help="Default: the checkpoint's.")
    ap.add_argument("--guidance-scale", type=float, default=None, help="Default: the checkpoint's.")
    ap.add_argument("--inpaint", choices=["left", "right", "top", "bottom"], default=None,
                    help="Zero-shot inpainting: keep this half of the ground truth at time 0.")
    ap.add_argument("--categories", default=None, help="Comma-separated subset of the categories (default: all).")
    ap.add_argument("--batch-size", type=int, default=32, help="Images per sampler call.")
    ap.add_argument("--seed", type=int, default=0, help="Seed of prompts, noise and ground-truth renders.")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads.")
    ap.add_argument("--out-dir", default="outputs/eval-testbed", help="Where the grid PNG and JSON go.")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    from tpm.plots import image_grid
    from tpm.testbed.evaluate import evaluate_pipeline
    from tpm.testbed.models import load_pipeline

    try:
        pipe = load_pipeline(args.pipeline)
        if args.policy != "synchronous" and not args.inpaint:
            import policies

            policy = policies.load(args.policy)
    except (ValueError, FileNotFoundError) as e:  # unknown checkpoint or policy: one line, exit status 1
        raise SystemExit(f"error: {e}") from None
    resolution = pipe.tpm_defaults["height"]
    if args.inpaint:
        policy_for = _inpaint_factory(pipe, args.inpaint, resolution, args.seed)
    elif args.policy == "synchronous":
        policy_for = None
    else:
        policy_for = lambda items: policy  # noqa: E731

    t0 = time.time()
    res = evaluate_pipeline(
        pipe, split=args.split, per_category=args.per_category, num_inference_steps=args.num_inference_steps,
        guidance_scale=args.guidance_scale, policy_for=policy_for,
        categories=tuple(args.categories.split(",")) if args.categories else None, batch_size=args.batch_size, seed=args.seed,
    )
    cats = {c: {"n": r.n, "score": round(r.score, 4), "all_correct": round(r.all_correct, 4)} for c, r in res.items()}
    report = {
        "pipeline": str(args.pipeline),
        "policy": f"inpaint-{args.inpaint}" if args.inpaint else args.policy,
        "split": args.split,
        "num_inference_steps": args.num_inference_steps or pipe.tpm_defaults["num_inference_steps"],
        "guidance_scale": args.guidance_scale if args.guidance_scale is not None else pipe.tpm_defaults["guidance_scale"],
        "categories": cats,
        "mean": {k: round(sum(c[k] for c in cats.values()) / len(cats), 4) for k in ("score", "all_correct")},
        "seconds": round(time.time() - t0, 1),
    }
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = [im for r in res.values() for _, im, _ in r.examples]
    image_grid(rows, cols=8, pad=2).save(out / "grid.png")
    (out / "results.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
