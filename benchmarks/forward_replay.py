"""AsynDM's transformer calls replayed one by one: stock forward against tpm's; prints JSON.

``bench_sampler.py`` times whole sampling runs, which on a shared CPU drift by several percent
between runs of identical work. This script isolates the transformer, where AsynDM's extra cost
would be, and interleaves at the finest grain that still times real work: it records the
transformer calls of one AsynDM sampling run (inputs, per-token time fields, captured layers and
object tokens), then, for every recorded call in turn, runs each variant on that call's inputs,
rotating the variant order from call to call:

- ``stock``: ``FluxTransformer2DModel.forward`` at the first token's time (one time per sample);
- ``uniform``: tpm's forward with that same uniform field (no extra work: the noise floor);
- ``per_token_gather``: tpm's forward with the recorded field and maps, per-token rows gathered
  for every token (``tile_sizes=()``);
- ``tiles``: the same with the default tiles (:meth:`tpm.backbones.modulation.TokenTime.in_tiles`);
- ``tiles_no_maps``: tiles without capturing the attention maps.

Reported per variant: the mean of the per-call ratios to ``stock`` with a bootstrap 95 % interval
over calls, and the median. Process CPU time, one torch thread (``--clock cpu``).

    python benchmarks/forward_replay.py --tokens 1024x512 --steps 8 --rounds 6
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def record_calls(pipe, policy, prompts, size: int, text_tokens: int, steps: int) -> list:
    """The (args, kwargs) of every ``flux_transformer_forward`` call of one AsynDM run."""
    import tpm
    import tpm.backbones.flux as flux

    calls, forward = [], flux.flux_transformer_forward

    def recorded(*args, **kwargs):
        calls.append((args, kwargs))
        return forward(*args, **kwargs)

    flux.flux_transformer_forward = recorded
    try:
        tpm.sample(pipe, prompts, policy=policy, generator=torch.Generator().manual_seed(0), num_inference_steps=steps,
                   height=size, width=size, output_type="latent", max_sequence_length=text_tokens, guidance_scale=3.5)
    finally:
        flux.flux_transformer_forward = forward
    return calls


def main(argv=None) -> dict:
    import bench_sampler as bench

    from tpm.backbones.flux import flux_transformer_forward
    from tpm.backbones.modulation import TILE_SIZES

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", default="1024x512", help="image x text tokens")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=6, help="passes over the recorded calls")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    image_tokens, text_tokens = bench.parse_tokens(args.tokens)[0]
    pipe = bench.build_pipeline("width256", text_tokens, 64)
    size = bench.image_side(pipe, image_tokens)
    policy = bench.make_rows(pipe, ["asyndm"], size)["asyndm"]
    prompts = [bench.PROMPTS[i % len(bench.PROMPTS)] for i in range(args.batch)]
    calls = record_calls(pipe, policy, prompts, size, text_tokens, args.steps)
    tr = pipe.transformer

    def stock(i):
        (_, x, tau, ctx, pooled, img_ids, txt_ids), kw = calls[i][0][:7], calls[i][1]
        tr(hidden_states=x, timestep=tau[:, 0], guidance=kw.get("guidance"), pooled_projections=pooled,
           encoder_hidden_states=ctx, txt_ids=txt_ids, img_ids=img_ids, return_dict=False)

    def ours(i, sizes, uniform=False, maps=True):
        a, kw = list(calls[i][0]), dict(calls[i][1], tile_sizes=sizes)
        if uniform:
            a[2] = a[2][:, :1].expand_as(a[2]).contiguous()
        if uniform or not maps:
            kw["attention_layers"] = None
        flux_transformer_forward(*a, **kw)

    variants = {"stock": stock, "uniform": lambda i: ours(i, TILE_SIZES, uniform=True),
                "per_token_gather": lambda i: ours(i, ()), "tiles": lambda i: ours(i, TILE_SIZES),
                "tiles_no_maps": lambda i: ours(i, TILE_SIZES, maps=False)}
    names = list(variants)
    ratios: dict[str, list[float]] = {k: [] for k in names[1:]}
    seconds: dict[str, float] = dict.fromkeys(names, 0.0)
    with torch.no_grad():
        for r in range(args.rounds):
            for i in range(len(calls)):
                k0 = (r * len(calls) + i) % len(names)
                t = {}
                for k in names[k0:] + names[:k0]:
                    start = time.process_time()
                    variants[k](i)
                    t[k] = time.process_time() - start
                    seconds[k] += t[k]
                for k in ratios:
                    ratios[k].append(t[k] / t["stock"])
    result = {
        "benchmark": "forward_replay", "image_tokens": image_tokens, "text_tokens": text_tokens,
        "batch": args.batch, "steps": args.steps, "rounds": args.rounds, "calls": len(calls) * args.rounds,
        **bench.environment(),
        "ratio_to_stock": {k: bench.bootstrap_mean(v) for k, v in ratios.items()},
        "total_s": {k: round(v, 2) for k, v in seconds.items()},
    }
    return bench.emit(result, args.out)


if __name__ == "__main__":
    main()
