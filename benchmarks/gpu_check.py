"""The checks that need a CUDA device, in one run of a few minutes; prints JSON.

    python benchmarks/gpu_check.py                 # on one GPU (about 5-8 minutes on an H100-class card)
    python benchmarks/gpu_check.py --dry-run       # on a CPU, tiny sizes: checks this script's paths

Sections (each reports ``status`` "ok" or "failed: ..." and its figures; one failing section does
not stop the others):

1. ``cuda_tests``: the tests marked ``cuda`` (``pytest -m cuda``), which skip on a CPU.
2. ``equivalence_bf16``: ``tpm.sample(pipe, policy=None)`` against ``pipe(...)`` in bfloat16 at
   FLUX.1-dev widths (1 dual + 2 single blocks) and SD3.5-medium widths (2 blocks), 1024 image
   tokens, 512 text tokens: max abs difference of the latents, and its size relative to the latents.
3. ``sampler_4096``: ``benchmarks/bench_sampler.py`` at 4096 image / 512 text tokens (wall clock,
   bfloat16): width 256 with synchronous, asyndm, dm_concave and a random per-token field, and
   FLUX.1-dev width with synchronous and the per-token field (exact and default time levels).
4. ``grpo_sd35_medium``: one GRPO iteration of AsyncDiff's TPM on an SD3.5-medium-width
   transformer at full depth (24 blocks, dual attention in the first 13, rms qk-norm; random
   weights, bfloat16), 1024 image tokens, a mean-brightness reward: iteration and rollout time and
   peak GPU memory.

``--dry-run`` runs the same code on the CPU with tiny widths and depths, one step, so that a
broken path shows up before a GPU is lent (it is part of the test suite).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
import traceback

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import bench_sampler  # noqa: E402  (a sibling script, not a package)


def _section(fn, *args) -> dict:
    t0 = time.perf_counter()
    try:
        out = fn(*args)
        out["status"] = "ok"
    except Exception as e:  # a report of what failed is the point of this script
        out = {"status": f"failed: {type(e).__name__}: {e}", "traceback": traceback.format_exc(limit=4)}
    out["seconds"] = round(time.perf_counter() - t0, 1)
    return out


def cuda_tests(ctx: dict) -> dict:
    root = os.path.dirname(HERE)
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider", "tests"]
    if ctx["dry_run"]:
        cmd.append("--collect-only")
    proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=ctx["test_timeout"])
    tail = proc.stdout.strip().splitlines()[-1:] if proc.stdout.strip() else []
    if proc.returncode not in (0, 5):  # 5: nothing collected
        raise RuntimeError(f"pytest exited {proc.returncode}: {' '.join(tail)}")
    return {"command": " ".join(cmd[2:]), "summary": tail[0] if tail else ""}


def _pipelines(ctx: dict):
    if ctx["dry_run"]:
        from tpm.tiny import tiny_flux_pipeline, tiny_sd3_pipeline

        return {"flux": (tiny_flux_pipeline(max_sequence_length=16), 16, 32),
                "sd3": (tiny_sd3_pipeline(max_sequence_length=16), 16, 32)}
    return {"flux-dev": (bench_sampler.build_pipeline("flux-dev", 512, 64), 512, None),
            "sd35-medium": (bench_sampler.build_pipeline("sd35-medium", 512, 64), 512, None)}


def equivalence_bf16(ctx: dict) -> dict:
    import tpm
    from tpm.backbones import get_backbone

    out = {}
    for name, (pipe, text, size) in _pipelines(ctx).items():
        pipe.to(ctx["device"], torch.bfloat16)
        size = size or bench_sampler.image_side(pipe, 1024)
        kw = dict(num_inference_steps=ctx["steps"], height=size, width=size, output_type="latent",
                  max_sequence_length=text)
        kw.update(get_backbone(pipe).sample_kwargs(3.5))
        prompts = bench_sampler.PROMPTS[:2]
        ref = pipe(prompts, generator=torch.Generator().manual_seed(0), **kw).images.float()
        ours = tpm.sample(pipe, prompts, generator=torch.Generator().manual_seed(0), **kw).images.float()
        diff = float((ours - ref).abs().max())
        out[name] = {"image": [size, size], "max_abs_diff": diff,
                     "relative": diff / max(float(ref.abs().max()), 1e-12)}
        pipe.to("cpu")
    return {"cases": out}


def sampler_4096(ctx: dict) -> dict:
    if ctx["dry_run"]:
        runs = [["--preset", "tiny"]]
    else:
        runs = [["--tokens", "4096x512", "--rows", "synchronous,asyndm,dm_concave,field"],
                ["--preset", "flux-dev", "--tokens", "4096x512", "--rows", "synchronous,field,field_exact"]]
    common = ["--steps", str(ctx["steps"]), "--repeats", str(ctx["repeats"]), "--clock", "wall",
              "--device", ctx["device"], "--dtype", "float32" if ctx["dry_run"] else "bfloat16", "--threads", "0"]
    results = []
    for extra in runs:
        res = bench_sampler.main(extra + common, quiet=True)
        results += res["configs"]
    return {"configs": [{k: c[k] for k in ("preset", "image_tokens", "text_tokens", "width", "ratio",
                                           "median_s", "distinct_rows", "peak_memory_GiB")} for c in results]}


def grpo_sd35_medium(ctx: dict) -> dict:
    import policies
    from tpm import tiny as T
    from tpm.grpo import GRPOConfig, GRPOTrainer

    device = torch.device(ctx["device"])
    if ctx["dry_run"]:
        pipe, size, text = T.tiny_sd3_pipeline(max_sequence_length=16), 32, 16
    else:
        pipe = bench_sampler.build_pipeline("sd35-medium", 512, 64)
        full = T.sd3_transformer(sample_size=64, latent_channels=16, layers=24, heads=24, head_dim=64,
                                 text_dim=4096, pooled_dim=2048, seed=0, dual_attention_layers=tuple(range(13)),
                                 qk_norm="rms_norm", pos_embed_max_size=384)
        pipe.transformer = full
        pipe.register_modules(transformer=full)
        size, text = bench_sampler.image_side(pipe, 1024), 512
    pipe.to(device, torch.float32 if ctx["dry_run"] else torch.bfloat16)
    torch.manual_seed(0)
    policy = policies.TPM.for_pipeline(pipe)
    prompts = bench_sampler.PROMPTS * 4

    def brightness(images, prompts):
        return images.float().mean(dim=(1, 2, 3))

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    with tempfile.TemporaryDirectory() as out:
        cfg = GRPOConfig(output_dir=out, max_iterations=10 ** 6, group_size=ctx["group"], batch_size=ctx["group"],
                         rollout_batch_size=ctx["group"], minibatch_size=ctx["group"],
                         num_inference_steps=ctx["grpo_steps"], height=size, width=size, progress=False,
                         sample_kwargs={"max_sequence_length": text})
        tr = GRPOTrainer(cfg, policy, pipe, brightness, prompts)
        tr._prepare_output()

        def timed(fn):
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            res = fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            return res, time.perf_counter() - t0

        record, it_s = timed(tr.train_iteration)
        _, ro_s = timed(lambda: tr.rollout_iteration(tr.iteration))
    return {
        "transformer_parameters_M": round(sum(p.numel() for p in pipe.transformer.parameters()) / 1e6, 1),
        "blocks": len(pipe.transformer.transformer_blocks), "image": [size, size], "group": ctx["group"],
        "steps": ctx["grpo_steps"], "iteration_s": round(it_s, 2), "rollout_s": round(ro_s, 2),
        "peak_memory_GiB": round(torch.cuda.max_memory_allocated() / 2 ** 30, 2) if device.type == "cuda" else None,
        "reward": record.get("reward/total"), "bytes_per_sample_step": record.get("bytes_per_sample_step"),
    }


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes: check the paths, not the figures")
    ap.add_argument("--device", default=None, help="default: cuda (cpu with --dry-run)")
    ap.add_argument("--sections", default="cuda_tests,equivalence_bf16,sampler_4096,grpo_sd35_medium")
    ap.add_argument("--out", default=None, help="also write the JSON here")
    args = ap.parse_args(argv)
    device = args.device or ("cpu" if args.dry_run else "cuda")
    if not args.dry_run and not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA device here; run with --dry-run to check the script on a CPU")
    ctx = {"dry_run": args.dry_run, "device": device, "steps": 1 if args.dry_run else 4,
           "repeats": 1 if args.dry_run else 3, "group": 2 if args.dry_run else 4,
           "grpo_steps": 2 if args.dry_run else 10, "test_timeout": 300}
    sections = {"cuda_tests": cuda_tests, "equivalence_bf16": equivalence_bf16, "sampler_4096": sampler_4096,
                "grpo_sd35_medium": grpo_sd35_medium}
    wanted = args.sections.split(",")
    unknown = sorted(set(wanted) - set(sections))
    if unknown:
        raise SystemExit(f"gpu_check: unknown sections {unknown}; choose from {sorted(sections)}")
    result = {"benchmark": "gpu_check", "dry_run": args.dry_run, "device": device, "torch": torch.__version__,
              "gpu": torch.cuda.get_device_name() if device.startswith("cuda") else None}
    for name in wanted:
        result[name] = _section(sections[name], ctx)
    return bench_sampler.emit(result, args.out)


if __name__ == "__main__":
    main()
