"""Wall time of ``tpm.sample`` with AsynDM's masks against the stock UNet pipeline; prints JSON.

A random ``StableDiffusionPipeline`` in SD's layout (four levels, cross-attention on the first
three, two layers per block, ``--width`` channels at the top level, doubled twice like SD's
320-640-1280-1280) at 64x64 latents, DDIM, CFG 7.5, ``--steps`` steps. Variants, at equal steps and batch:

- ``pipe``: ``pipe(prompts, ...)``, the stock loop;
- ``tpm_sync``: ``tpm.sample(pipe, ..., policy=None)``;
- ``asyndm``: ``tpm.sample(..., policy=policies.load("asyndm"))``: cross-attention maps captured
  from the 1/4-resolution ``attn2`` layers every step, Eq. 7 masks, per-pixel time fields.

``--forward`` times the UNet call alone, which is where the two differ: the time fields (and
captured layers) of an AsynDM run are recorded with a narrow UNet of the same layout at the same
latent size, then replayed, step by step, through the ``--width`` UNet: stock ``unet(x, t)``
against ``unet_forward(x, field, capture=True)`` (per-pixel time maps + Eq. 7 maps). That reaches
SD's own width (``--width 320``), where a whole sampling run per repeat would take too long on a CPU.

Each variant is warmed up once, then timed ``--repeats`` times, interleaved (pipe, tpm_sync,
asyndm, pipe, ...) so that load changes on a shared machine hit all alike; reported: the median
time of each (``--clock``) and the median of the per-repeat ratios to ``pipe``. Latents are returned
(``output_type="latent"``) so the VAE decode, the same in both, is not timed.

    python benchmarks/unet_overhead.py --width 64 --steps 10 --repeats 5
    python benchmarks/unet_overhead.py --forward --width 320 --steps 10 --repeats 2
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
from tpm.tiny import tiny_sd_pipeline

PROMPTS = ["a red circle left of a blue square"]


def main(argv=None) -> dict:
    import policies

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--width", type=int, default=64, help="channels of the top UNet level (SD: 320)")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--latent", type=int, default=64, help="latent side (SD 2.1 at 512 px: 64)")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                    help="wall: perf_counter; cpu: this process's CPU time (with one thread, barely "
                         "disturbed by other load on a shared machine)")
    ap.add_argument("--forward", action="store_true", help="time the UNet calls of a recorded AsynDM run only")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    if args.forward:
        return _forward(args, clock)
    pipe = _pipe(args.width, args.latent)
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
                t0 = clock()
                fn()
                times[name].append(clock() - t0)
    ratios = {name: statistics.median(t / p for t, p in zip(times[name], times["pipe"])) for name in variants}
    report = {
        "unet_params_M": round(sum(p.numel() for p in pipe.unet.parameters()) / 1e6, 2),
        "latent": [args.latent, args.latent], "steps": args.steps, "repeats": args.repeats, "cfg": 7.5,
        "median_seconds": {k: round(statistics.median(v), 3) for k, v in times.items()},
        "median_ratio_to_pipe": {k: round(v, 4) for k, v in ratios.items()},
        "seconds": {k: [round(x, 3) for x in v] for k, v in times.items()},
        "width": args.width, "clock": args.clock, "threads": args.threads, "cpu_count": os.cpu_count(), "machine": platform.machine(),
    }
    print(json.dumps(report, indent=2))
    return report


def _pipe(width: int, latent: int):
    w = width
    return tiny_sd_pipeline(blocks=(w, 2 * w, 4 * w, 4 * w), cross_attention=(True, True, True, False),
                            layers_per_block=2, heads=4, text_dim=64, sample_size=latent)


def _forward(args, clock) -> dict:
    import policies
    import tpm.backbones.unet as unet_adapter
    from tpm.backbones.unet_forward import unet_forward

    # 1. Record the UNet calls of an AsynDM run (narrow UNet, same layout, latent size and steps).
    narrow = _pipe(16, args.latent)
    calls = []
    real = unet_adapter.unet_forward

    def record(unet, sample, timesteps, *a, **kw):
        calls.append((timesteps.clone(), kw.get("capture", False), kw.get("layers")))
        return real(unet, sample, timesteps, *a, **kw)

    size = args.latent * narrow.vae_scale_factor
    unet_adapter.unet_forward = record
    try:
        with torch.no_grad():
            tpm.sample(narrow, PROMPTS, policy=policies.load("asyndm"), num_inference_steps=args.steps,
                       guidance_scale=7.5, height=size, width=size, output_type="latent",
                       generator=torch.Generator().manual_seed(0))
    finally:
        unet_adapter.unet_forward = real
    # 2. Replay the per-pixel steps through the wide UNet, interleaved with the stock call.
    pipe = _pipe(args.width, args.latent)
    unet = pipe.unet
    with torch.no_grad():
        embeds = torch.cat(pipe.encode_prompt(PROMPTS, "cpu", 1, True)[::-1])
    steps = [(i, t, cap, layers) for i, (t, cap, layers) in enumerate(calls) if not bool((t == t.flatten()[0]).all())]
    x = torch.randn(embeds.shape[0], unet.config.in_channels, args.latent, args.latent,
                    generator=torch.Generator().manual_seed(1))
    distinct = []
    times = {"stock": [], "asyndm": []}
    with torch.no_grad():
        for rep in range(args.repeats + 1):  # the first pass is the warm-up
            total = {"stock": 0.0, "asyndm": 0.0}
            for _, t, cap, layers in steps:
                t0 = clock()
                unet(x, t.flatten(1).amax(1), encoder_hidden_states=embeds)
                total["stock"] += clock() - t0
                if rep == 0:  # the untimed warm-up pass also counts the time-table rows
                    distinct.append(_table_rows(unet, x, t, embeds, cap, layers))
                    continue
                t0 = clock()
                unet_forward(unet, x, t, embeds, capture=cap, layers=layers)
                total["asyndm"] += clock() - t0
            if rep:
                for k in times:
                    times[k].append(total[k])
    ratios = [a / s for a, s in zip(times["asyndm"], times["stock"])]
    report = {
        "mode": "forward", "unet_params_M": round(sum(p.numel() for p in unet.parameters()) / 1e6, 2),
        "width": args.width, "latent": [args.latent, args.latent], "steps": args.steps,
        "per_pixel_steps": [i for i, *_ in steps], "batch": int(x.shape[0]),
        "distinct_conditioning_times": distinct,
        "seconds": {k: [round(v, 3) for v in vals] for k, vals in times.items()},
        "ratio_per_repeat": [round(r, 4) for r in ratios], "median_ratio": round(statistics.median(ratios), 4),
        "clock": args.clock, "threads": args.threads, "cpu_count": os.cpu_count(), "machine": platform.machine(),
    }
    print(json.dumps(report, indent=2))
    return report


def _table_rows(unet, x, t, embeds, cap, layers) -> int:
    """Runs ``unet_forward`` once and returns the rows of the time table it built for field ``t``:
    the largest batch the time projection saw (the stock call inside sees one row per sample)."""
    from tpm.backbones.unet_forward import unet_forward

    rows = []
    hook = unet.time_proj.register_forward_hook(lambda _m, args, _o: rows.append(args[0].numel()))
    try:
        unet_forward(unet, x, t, embeds, capture=cap, layers=layers)
    finally:
        hook.remove()
    return max(rows)


if __name__ == "__main__":
    main()
