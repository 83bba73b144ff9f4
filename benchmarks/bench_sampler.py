"""Wall time of ``tpm.sample`` against the stock ``FluxPipeline.__call__``; prints JSON.

One run times, at equal steps and batch, on a mid-size random Flux (4 dual + 4 single blocks,
width 256 or 512, a factor-1 VAE so that 32x32 images are a 16x16 = 256-token grid):

- ``pipe``: ``pipe(prompts, ...)``, the stock loop;
- ``tpm_none``: ``tpm.sample(pipe, ..., policy=None)`` (the pipeline's own grid);
- ``tpm_sync``: ``tpm.sample(..., policy=policies.Synchronous())``;
- ``asyndm``: ``tpm.sample(..., policy=policies.load("asyndm"))`` when ``policies.concave`` exists
  (concave schedule with cross-attention masks: attention capture and non-uniform fields).

Each variant is warmed up once, then timed ``--repeats`` times, interleaved (pipe, tpm_none,
tpm_sync, asyndm, pipe, ...) so that load changes on a shared machine hit all alike; the
median is reported. Latents are returned (``output_type="latent"``) so the decode is not timed.
``distinct_rows_per_step`` counts the rows of the distinct-time table per transformer call
(one untimed run per policy): the batch size for synchronous fields.

    python benchmarks/bench_sampler.py --width 256 --steps 10 --repeats 5 --batch 2 [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import torch

import tpm
from tpm.testing import tiny_flux_pipeline

PROMPTS = [
    "a red circle left of a blue square",
    "two dogs riding a bike on the beach",
    "a photo of an astronaut riding a horse on the moon",
    "three yellow triangles above a green car",
]


def build(width: int):
    pipe = tiny_flux_pipeline(num_layers=4, num_single_layers=4, heads=width // 64, head_dim=64, text_dim=64,
                              vae_blocks=(4,), latent_channels=1)
    return pipe


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--width", type=int, default=256, help="transformer width (heads x 64)")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--size", type=int, default=32, help="image side in pixels (token grid = size / 2)")
    # One thread by default: on a shared, loaded CPU, multi-threaded tiny ops mostly wait on each other.
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (0: torch's default)")
    args = ap.parse_args(argv)
    if args.width % 64:
        ap.error(f"--width must be a multiple of 64 (head_dim 64), got {args.width}")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    pipe = build(args.width)
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.batch)]
    common = dict(num_inference_steps=args.steps, guidance_scale=3.5, height=args.size, width=args.size,
                  output_type="latent", max_sequence_length=16)

    import policies

    variants = {
        "pipe": lambda: pipe(prompts, generator=torch.Generator().manual_seed(0), **common).images,
        "tpm_none": lambda: tpm.sample(pipe, prompts, generator=torch.Generator().manual_seed(0), **common).images,
        "tpm_sync": lambda: tpm.sample(pipe, prompts, policy=sync, generator=torch.Generator().manual_seed(0),
                                       **common).images,
    }
    sync = policies.Synchronous()
    asyndm = None
    try:
        import policies.concave  # noqa: F401

        asyndm = policies.load("asyndm")
        variants["asyndm"] = lambda: tpm.sample(pipe, prompts, policy=asyndm,
                                                generator=torch.Generator().manual_seed(0), **common).images
    except (ImportError, policies.PolicyError) as e:
        asyndm_error = f"{type(e).__name__}: {e}"
    else:
        asyndm_error = None

    # correctness guard: the synchronous variants must agree before their times mean anything
    ref = variants["pipe"]()
    sync_diff = max((variants[k]() - ref).abs().max().item() for k in ("tpm_none", "tpm_sync"))

    # distinct (sample, time) rows per transformer call (untimed)
    rows: dict[str, list[int]] = {}
    for name in [k for k in variants if k != "pipe"]:
        seen: list[int] = []
        h = pipe.transformer.time_text_embed.register_forward_hook(
            lambda m, a, o, seen=seen: seen.append(o.shape[0]))
        try:
            variants[name]()
        finally:
            h.remove()
        rows[name] = seen

    times: dict[str, list[float]] = {k: [] for k in variants}
    for k in variants:  # warm-up
        variants[k]()
    for _ in range(args.repeats):
        for k, fn in variants.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}

    result = {
        "benchmark": "bench_sampler",
        "model": {"class": "FluxTransformer2DModel (random)", "dual_blocks": 4, "single_blocks": 4,
                  "width": args.width, "heads": args.width // 64, "head_dim": 64,
                  "params_M": round(sum(p.numel() for p in pipe.transformer.parameters()) / 1e6, 2)},
        "image": [args.size, args.size], "tokens": (args.size // 2) ** 2, "text_tokens": 16,
        "batch": args.batch, "steps": args.steps, "repeats": args.repeats,
        "device": "cpu", "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "machine": platform.processor() or platform.machine(),
        "sync_max_abs_diff_vs_pipe": sync_diff,
        "median_s": {k: round(v, 4) for k, v in med.items()},
        "all_s": {k: [round(x, 4) for x in v] for k, v in times.items()},
        "ratio": {f"{k}/pipe": round(med[k] / med["pipe"], 3) for k in med if k != "pipe"},
        "distinct_rows_per_step": rows,
        "asyndm": "policies.load('asyndm')" if asyndm is not None else f"skipped ({asyndm_error})",
    }
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
