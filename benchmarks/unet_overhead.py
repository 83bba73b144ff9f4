"""Wall time of ``tpm.sample`` with AsynDM's masks against the stock UNet pipeline; prints JSON.

A random ``StableDiffusionPipeline`` in SD's layout (four levels, cross-attention on the first
three, two layers per block, ``--width`` channels at the top level, doubled twice like SD's
320-640-1280-1280) at 64x64 latents, DDIM, CFG 7.5, ``--steps`` steps. Variants, at equal steps and batch:

- ``pipe``: ``pipe(prompts, ...)``, the stock loop;
- ``tpm_sync``: ``tpm.sample(pipe, ..., policy=None)``;
- ``asyndm``: ``tpm.sample(..., policy=policies.load("asyndm"))``: cross-attention maps captured
  from the 1/4-resolution ``attn2`` layers every step, Eq. 7 masks, per-pixel time fields.

Each variant is warmed up once, then timed ``--repeats`` times, interleaved (pipe, tpm_sync,
asyndm, pipe, ...) so that load changes on a shared machine hit all alike; reported: the median
wall time of each and the median of the per-repeat ratios to ``pipe``. Latents are returned
(``output_type="latent"``) so the VAE decode, the same in both, is not timed.

    python benchmarks/unet_overhead.py --width 64 --steps 10 --repeats 5
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
from tpm.testing import tiny_sd_pipeline

PROMPTS = ["a red circle left of a blue square"]


def main(argv=None) -> dict:
    import policies

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--width", type=int, default=64, help="channels of the top UNet level (SD: 320)")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--latent", type=int, default=64, help="latent side (SD 2.1 at 512 px: 64)")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    w = args.width
    pipe = tiny_sd_pipeline(blocks=(w, 2 * w, 4 * w, 4 * w), cross_attention=(True, True, True, False),
                            layers_per_block=2, heads=4, text_dim=64, sample_size=args.latent)
    size = args.latent * pipe.vae_scale_factor
    kw = dict(num_inference_steps=args.steps, guidance_scale=7.5, height=size, width=size, output_type="latent")
    variants = {
        "pipe": lambda: pipe(PROMPTS, generator=torch.Generator().manual_seed(0), **kw),
        "tpm_sync": lambda: tpm.sample(pipe, PROMPTS, generator=torch.Generator().manual_seed(0), **kw),
        "asyndm": lambda: tpm.sample(pipe, PROMPTS, policy=policies.load("asyndm"),
                                     generator=torch.Generator().manual_seed(0), **kw),
    }
    times: dict[str, list[float]] = {k: [] for k in variants}
    with torch.no_grad():
        for fn in variants.values():
            fn()
        for _ in range(args.repeats):
            for name, fn in variants.items():
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
    ratios = {name: statistics.median(t / p for t, p in zip(times[name], times["pipe"])) for name in variants}
    report = {
        "unet_params_M": round(sum(p.numel() for p in pipe.unet.parameters()) / 1e6, 2),
        "latent": [args.latent, args.latent], "steps": args.steps, "repeats": args.repeats, "cfg": 7.5,
        "median_seconds": {k: round(statistics.median(v), 3) for k, v in times.items()},
        "median_ratio_to_pipe": {k: round(v, 4) for k, v in ratios.items()},
        "seconds": {k: [round(x, 3) for x in v] for k, v in times.items()},
        "threads": args.threads, "cpu_count": os.cpu_count(), "machine": platform.machine(),
    }
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
