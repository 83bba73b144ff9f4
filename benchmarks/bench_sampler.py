"""Cost of ``tpm.sample`` against the stock pipeline call at several token counts; prints JSON.

Presets (random weights, real loading code paths, latents returned so the VAE decode is not timed):

- ``width256`` (default): a Flux with 4 dual + 4 single blocks, 4 heads x 64, a factor-1 VAE, at
  (image, text) tokens (256, 16), (1024, 512) and (4096, 512). Rows: ``synchronous``
  (``tpm.sample`` with the pipeline's grid), ``dm_concave`` (every token on the concave
  schedule), ``asyndm`` (cross-attention masks with the defaults: the last layer's maps, object
  words only), ``asyndm_all_layers`` (every layer's maps, object words only) and ``asyndm_before``
  (every layer, every text token: the defaults before object-token capture), ``field`` (a random learned per-token field, ``policies.FieldPolicy`` with one decision
  per token, random output heads, its default ``time_levels``) and ``field_exact`` (the same with ``time_levels=None``:
  one modulation row per token).
- ``flux-dev``: FLUX.1-dev widths (24 heads x 128, joint 4096, pooled 768, guidance embedding,
  rope 16/56/56) at truncated depth (1 dual + 2 single blocks, FLUX.1-dev's 1:2 ratio), 1024 image
  and 512 text tokens. Rows: ``synchronous``, ``field``, ``field_exact``.
- ``sd35-medium``: SD3.5-medium widths (24 heads x 64, joint 4096, pooled 2048, dual attention in
  the first block, rms qk-norm), 2 blocks, 1024 image tokens, 512 T5 tokens; same rows.

Every row is a ratio to ``pipe`` (the stock ``pipe(...)`` call with the same steps, batch and
seeds). Variants are interleaved (pipe, synchronous, ..., then the next round starting one variant
later); ``ratio`` is the ratio of
the medians over ``--repeats`` and ``paired_ratio`` the median (min, max) of the per-round ratios. ``--clock cpu`` (default) times the process's CPU time with one torch
thread, which other processes on a shared machine barely disturb; ``--clock wall`` times wall
clock. ``distinct_rows`` is the mean number of rows of the per-step time-embedding table (the
batch size for synchronous fields). ``--profile`` adds the torch profiler's top operators for
the asyndm row.

``--forward`` times one transformer call instead of whole sampling runs, which isolates the
per-token time cost at large widths (where a sampling run on a CPU takes minutes): the stock
forward at one time per sample, tpm's forward with that uniform field (``uniform``), with a
random field in which every image token has its own time (``per_token_exact``), and with the same
field bounded to 64 and to 32 time levels (``per_token_levels64``, ``per_token_levels32``).

    python benchmarks/bench_sampler.py                                   # width 256, three token counts
    python benchmarks/bench_sampler.py --preset flux-dev --steps 2 --repeats 3
    python benchmarks/bench_sampler.py --preset sd35-medium --steps 2 --repeats 3
    python benchmarks/bench_sampler.py --preset flux-dev --forward --batch 1 --repeats 3
    python benchmarks/bench_sampler.py --tokens 256x16 --steps 2 --repeats 1   # a quick smoke run
    python benchmarks/bench_sampler.py --pool run1.json run2.json run3.json    # pooled ratios of saved runs
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import statistics
import time

import torch

PROMPTS = [
    "a red circle left of a blue square",
    "two dogs riding a bike on the beach",
    "a photo of an astronaut riding a horse on the moon",
    "three yellow triangles above a green car",
]
PRESETS = {
    "width256": {"tokens": "256x16,1024x512,4096x512",
                 "rows": "synchronous,dm_concave,asyndm,asyndm_all_layers,asyndm_before,field,field_exact"},
    "flux-dev": {"tokens": "1024x512", "rows": "synchronous,field,field_exact"},
    "sd35-medium": {"tokens": "1024x512", "rows": "synchronous,field,field_exact"},
    "tiny": {"tokens": "64x16", "rows": "synchronous,asyndm,dm_concave,field"},  # smoke runs (gpu_check --dry-run)
}


def build_pipeline(preset: str, text_tokens: int, image_size: int):
    """The random pipeline of a preset (parts from :mod:`tpm.tiny`)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from tpm import tiny as T

    vocab_tok = T.word_tokenizer(max_length=77)
    vocab = len(vocab_tok)
    if preset == "tiny":
        return T.tiny_flux_pipeline(vae_blocks=(4,), latent_channels=1, max_sequence_length=text_tokens)
    if preset == "width256":
        return T.tiny_flux_pipeline(num_layers=4, num_single_layers=4, heads=4, head_dim=64, text_dim=64,
                                    vae_blocks=(4,), latent_channels=1, max_sequence_length=text_tokens)
    vae = T.autoencoder((4,), 1 if preset == "flux-dev" else 16, sample_size=image_size, norm_groups=1, seed=1,
                        use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0609,
                        scaling_factor=1.5035)
    t5 = T.t5_encoder(vocab, 4096, d_kv=8, layers=1, heads=4, seed=3, eos_token_id=2)
    clip_kw = dict(layers=1, heads=2, max_length=77, seed=2, bos_token_id=3, eos_token_id=2, pad_token_id=0)
    defaults = {"max_sequence_length": text_tokens}
    if preset == "flux-dev":
        tr = T.flux_transformer(latent_channels=1, layers=1, single_layers=2, heads=24, head_dim=128, text_dim=4096,
                                pooled_dim=768, rope_axes=(16, 56, 56), guidance_embeds=True, seed=0)
        return T.assemble_pipeline(
            "flux", scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, transformer=tr,
            text_encoders=[T.clip_text_encoder(vocab, 768, **clip_kw), t5],
            tokenizers=[vocab_tok, T.word_tokenizer(max_length=text_tokens)], defaults=defaults)
    if preset == "sd35-medium":
        tr = T.sd3_transformer(sample_size=image_size // 1, latent_channels=16, layers=2, heads=24, head_dim=64,
                               text_dim=4096, pooled_dim=2048, seed=0, dual_attention_layers=(0,),
                               qk_norm="rms_norm", pos_embed_max_size=384)
        return T.assemble_pipeline(
            "sd3", scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae, transformer=tr,
            text_encoders=[T.clip_text_encoder(vocab, 768, projection=True, **clip_kw),
                           T.clip_text_encoder(vocab, 1280, projection=True, **clip_kw), t5],
            tokenizers=[vocab_tok, T.word_tokenizer(max_length=77), T.word_tokenizer(max_length=text_tokens)],
            defaults=defaults)
    raise SystemExit(f"unknown preset {preset!r}; choose from {sorted(PRESETS)}")


def image_side(pipe, image_tokens: int) -> int:
    from tpm.backbones import get_backbone

    side = math.isqrt(image_tokens)
    if side * side != image_tokens:
        raise SystemExit(f"image tokens must be a square number, got {image_tokens}")
    return side * get_backbone(pipe).token_size


def make_rows(pipe, names: list[str], size: int) -> dict:
    import policies

    rows = {}
    for name in names:
        if name == "synchronous":
            rows[name] = None
        elif name in ("asyndm", "dm_concave"):
            rows[name] = policies.load(name)
        elif name == "asyndm_all_layers":
            rows[name] = policies.load("asyndm", attention_layers="all")
        elif name == "asyndm_before":
            base = policies.load("asyndm", attention_layers="all")
            cls = type("AsynDMAllTokens", (type(base),), {"attention_tokens": lambda self, p, tw: None})
            rows[name] = cls(config=base.config)
        elif name in ("field", "field_exact"):
            opts = {"patch": 1, "token_offsets": True}
            if name == "field_exact":
                opts["time_levels"] = None
            pol = policies.FieldPolicy.for_pipeline(pipe, (size, size), **opts).eval()
            # The heads start at zero (= synchronous); random heads give every token its own time.
            gen = torch.Generator().manual_seed(0)
            for head in (pol.net.grid_head, pol.net.token_head):
                head.weight.data = torch.randn(head.weight.shape, generator=gen)
                head.bias.data = torch.randn(head.bias.shape, generator=gen)
            rows[name] = pol
        else:
            raise SystemExit(f"unknown row {name!r}")
    return rows


def distinct_rows(pipe, fn) -> float:
    seen: list[int] = []
    h = pipe.transformer.time_text_embed.register_forward_hook(lambda m, a, o: seen.append(o.shape[0]))
    try:
        fn()
    finally:
        h.remove()
    return round(statistics.mean(seen), 1) if seen else 0.0


def interleaved_times(variants: dict, args) -> dict[str, list[float]]:
    """``--repeats`` rounds of every variant in turn (so load changes hit all alike), timed by ``--clock``.

    Round r starts at variant r mod k (a rotation): a machine that slows down or speeds up over a
    round would otherwise always favour the variants that run first. Use a multiple of k repeats
    for an exact balance."""
    cuda = torch.device(args.device).type == "cuda"

    def clock() -> float:
        if cuda:
            torch.cuda.synchronize()
        return time.process_time() if args.clock == "cpu" else time.perf_counter()

    times: dict[str, list[float]] = {k: [] for k in variants}
    names = list(variants)
    for r in range(args.repeats):
        for k in names[r % len(names):] + names[: r % len(names)]:
            t0 = clock()
            variants[k]()
            times[k].append(clock() - t0)
    return times


def paired_ratios(times: dict[str, list[float]], ref: str) -> dict:
    """Per row: the median, min and max over repeats of (row time / ``ref`` time in the same round).
    Pairing within a round cancels slow drifts of a shared machine that a ratio of medians keeps."""
    out = {}
    for k, v in times.items():
        if k != ref:
            r = [a / b for a, b in zip(v, times[ref])]
            out[f"{k}/{ref}"] = {"median": round(statistics.median(r), 3), "min": round(min(r), 3),
                                 "max": round(max(r), 3)}
    return out


def environment() -> dict:
    """Where a timing was taken: torch threads and version, load average, processor."""
    return {"torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "load_average": [round(x, 2) for x in os.getloadavg()],
            "machine": platform.processor() or platform.machine()}


def emit(result: dict, out: str | None, quiet: bool = False) -> dict:
    """Print ``result`` as JSON (unless ``quiet``) and also write it to ``out`` when given."""
    text = json.dumps(result, indent=2)
    if not quiet:
        print(text)
    if out:
        with open(out, "w") as f:
            f.write(text + "\n")
    return result


def bootstrap_mean(x: list[float], n: int = 10000, seed: int = 0) -> dict:
    """Mean of ``x`` with a bootstrap 95 % interval, and the median."""
    rng = random.Random(seed)
    means = sorted(statistics.fmean(rng.choices(x, k=len(x))) for _ in range(n))
    return {"mean": round(statistics.fmean(x), 4),
            "ci95": [round(means[int(0.025 * n)], 4), round(means[int(0.975 * n)], 4)],
            "median": round(statistics.median(x), 4)}


def pool_runs(paths: list[str]) -> dict:
    """Per-round ratios of every row to ``pipe``, pooled over the rounds of several saved runs (same
    config), as a mean with a bootstrap interval: one figure for runs that each drift on their own."""
    per_config: dict[str, dict[str, list[float]]] = {}
    for path in paths:
        with open(path) as f:
            for cfg in json.load(f)["configs"]:
                key = f"{cfg['image_tokens']}x{cfg['text_tokens']}"
                times = cfg["all_s"]
                for row, values in times.items():
                    if row != "pipe":
                        ratios = per_config.setdefault(key, {}).setdefault(f"{row}/pipe", [])
                        ratios.extend(a / b for a, b in zip(values, times["pipe"]))
    return {"benchmark": "bench_sampler --pool", "runs": paths,
            "configs": {k: {row: {"rounds": len(v), **bootstrap_mean(v)} for row, v in rows.items()}
                        for k, rows in per_config.items()}}


def run_config(preset: str, image_tokens: int, text_tokens: int, names: list[str], args) -> dict:
    import tpm

    size = None
    pipe = build_pipeline(preset, text_tokens, 64)
    size = image_side(pipe, image_tokens)
    if preset == "sd35-medium":  # pos-embed size follows the latent grid
        pipe = build_pipeline(preset, text_tokens, size)
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.batch)]
    common = dict(num_inference_steps=args.steps, height=size, width=size, output_type="latent",
                  max_sequence_length=text_tokens)
    if preset != "sd35-medium":
        common["guidance_scale"] = 3.5
    dtype = getattr(torch, args.dtype)
    pipe.to(args.device, dtype)
    rows = {n: (p if p is None else p.to(args.device)) for n, p in make_rows(pipe, names, size).items()}

    def call(policy):
        if policy == "pipe":
            return lambda: pipe(prompts, generator=torch.Generator().manual_seed(0), **common).images
        return lambda: tpm.sample(pipe, prompts, policy=policy, generator=torch.Generator().manual_seed(0),
                                  **common).images

    variants = {"pipe": call("pipe"), **{n: call(p) for n, p in rows.items()}}
    ref = variants["pipe"]()
    sync_diff = float((variants["synchronous"]() - ref).abs().max()) if "synchronous" in variants else None
    table_rows = {n: distinct_rows(pipe, fn) for n, fn in variants.items()}
    cuda = torch.device(args.device).type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()

    times = interleaved_times(variants, args)
    med = {k: statistics.median(v) for k, v in times.items()}
    out = {
        "preset": preset, "image_tokens": image_tokens, "text_tokens": text_tokens, "image": [size, size],
        "device": args.device, "dtype": args.dtype,
        "peak_memory_GiB": round(torch.cuda.max_memory_allocated() / 2 ** 30, 2) if cuda else None,
        "width": pipe.transformer.config.num_attention_heads * pipe.transformer.config.attention_head_dim,
        "params_M": round(sum(p.numel() for p in pipe.transformer.parameters()) / 1e6, 1),
        "sync_max_abs_diff_vs_pipe": sync_diff,
        "ratio": {f"{k}/pipe": round(med[k] / med["pipe"], 3) for k in med if k != "pipe"},
        "paired_ratio": paired_ratios(times, "pipe"),
        "median_s": {k: round(v, 3) for k, v in med.items()},
        "all_s": {k: [round(x, 3) for x in v] for k, v in times.items()},
        "distinct_rows": table_rows,
    }
    if args.profile and "asyndm" in variants:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            variants["asyndm"]()
        top = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[: args.profile]
        total = sum(e.self_cpu_time_total for e in prof.key_averages())
        out["asyndm_profile_top"] = [
            {"op": e.key, "self_cpu_ms": round(e.self_cpu_time_total / 1e3, 1),
             "share": round(e.self_cpu_time_total / total, 3), "calls": e.count} for e in top]
    return out


def run_forward(preset: str, image_tokens: int, text_tokens: int, args) -> dict:
    """One transformer call: stock vs tpm's forward with uniform, per-token and level-bounded fields."""
    from tpm.backbones import flux_transformer_forward, get_backbone, sd3_transformer_forward

    pipe = build_pipeline(preset, text_tokens, 64)
    size = image_side(pipe, image_tokens)
    if preset == "sd35-medium":
        pipe = build_pipeline(preset, text_tokens, size)
    tr = pipe.transformer.to(args.device, getattr(torch, args.dtype))
    bb = get_backbone(pipe)
    grid = bb.grid(size, size)
    b, n = args.batch, grid[0] * grid[1]
    gen = torch.Generator().manual_seed(0)
    dt = next(tr.parameters()).dtype
    flux = preset != "sd35-medium"
    cfg = tr.config
    ctx = torch.randn(b, text_tokens, cfg.joint_attention_dim, generator=gen).to(args.device, dt)
    pooled = torch.randn(b, cfg.pooled_projection_dim, generator=gen).to(args.device, dt)
    tau = torch.full((b,), 0.6)
    per_token = (0.6 + 0.1 * (torch.rand(b, n, generator=gen) - 0.5)).to(args.device)  # all distinct
    if flux:
        x = torch.randn(b, n, cfg.in_channels, generator=gen).to(args.device, dt)
        img_ids = pipe._prepare_latent_image_ids(b, grid[0], grid[1], args.device, dt)
        txt_ids = torch.zeros(text_tokens, 3, device=args.device, dtype=dt)
        guidance = torch.full((b,), 3.5, device=args.device) if cfg.guidance_embeds else None

        def stock():
            return tr(hidden_states=x, timestep=tau.to(args.device, dt), guidance=guidance, pooled_projections=pooled,
                      encoder_hidden_states=ctx, txt_ids=txt_ids, img_ids=img_ids, return_dict=False)[0]

        def ours(field, levels=None):
            return flux_transformer_forward(tr, x, field, ctx, pooled, img_ids, txt_ids, guidance=guidance,
                                            grid=grid, time_levels=levels)[0]
    else:
        p = cfg.patch_size
        x = torch.randn(b, cfg.in_channels, grid[0] * p, grid[1] * p, generator=gen).to(args.device, dt)

        def stock():
            return tr(hidden_states=x, timestep=(tau * 1000).to(args.device, dt), encoder_hidden_states=ctx,
                      pooled_projections=pooled, return_dict=False)[0]

        def ours(field, levels=None):
            return sd3_transformer_forward(tr, x, field.reshape(b, *grid), ctx, pooled, time_levels=levels)[0]

    uniform = tau[:, None].expand(b, n).to(args.device)
    variants = {"stock": stock, "uniform": lambda: ours(uniform), "per_token_exact": lambda: ours(per_token),
                "per_token_levels64": lambda: ours(per_token, 64), "per_token_levels32": lambda: ours(per_token, 32)}
    with torch.no_grad():
        diff = float((variants["uniform"]() - stock()).abs().max())
        times = interleaved_times(variants, args)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "preset": preset, "mode": "forward", "image_tokens": n, "text_tokens": text_tokens, "batch": b,
        "width": cfg.num_attention_heads * cfg.attention_head_dim,
        "blocks": [len(tr.transformer_blocks), len(getattr(tr, "single_transformer_blocks", []))],
        "params_M": round(sum(q.numel() for q in tr.parameters()) / 1e6, 1),
        "uniform_max_abs_diff_vs_stock": diff,
        "ratio": {f"{k}/stock": round(med[k] / med["stock"], 3) for k in med if k != "stock"},
        "paired_ratio": paired_ratios(times, "stock"),
        "median_s": {k: round(v, 3) for k, v in med.items()},
        "all_s": {k: [round(t, 3) for t in v] for k, v in times.items()},
    }


def parse_tokens(text: str) -> list[tuple[int, int]]:
    pairs = []
    for item in text.split(","):
        a, _, b = item.strip().partition("x")
        pairs.append((int(a), int(b)))
    return pairs


def main(argv=None, quiet: bool = False) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="width256", choices=sorted(PRESETS))
    ap.add_argument("--tokens", default=None, help="image x text token counts, e.g. 256x16,1024x512 (preset's)")
    ap.add_argument("--rows", default=None, help="comma list of rows (preset's); see the module docstring")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--clock", choices=("cpu", "wall"), default="cpu",
                    help="cpu: process CPU time (use with one thread); wall: wall clock (use on a GPU)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (0: torch's default)")
    ap.add_argument("--profile", type=int, default=0, help="top-N profiler operators of the asyndm row")
    ap.add_argument("--forward", action="store_true", help="time one transformer call (see the docstring)")
    ap.add_argument("--out", default=None, help="also write the JSON here")
    ap.add_argument("--pool", nargs="+", default=None, metavar="JSON",
                    help="pool the rounds of saved runs (no timing): mean per-round ratio, bootstrap 95 %%")
    args = ap.parse_args(argv)
    if args.pool:
        return emit(pool_runs(args.pool), args.out, quiet)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    preset = PRESETS[args.preset]
    names = (args.rows or preset["rows"]).split(",")
    run = (lambda i, t: run_forward(args.preset, i, t, args)) if args.forward else (
        lambda i, t: run_config(args.preset, i, t, names, args))
    configs = [run(i, t) for i, t in parse_tokens(args.tokens or preset["tokens"])]
    result = {
        "benchmark": "bench_sampler", "preset": args.preset, "batch": args.batch, "steps": args.steps,
        "repeats": args.repeats, "clock": args.clock, **environment(), "configs": configs,
    }
    return emit(result, args.out, quiet)


if __name__ == "__main__":
    main()
