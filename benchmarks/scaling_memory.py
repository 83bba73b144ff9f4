"""Memory of FLUX.1-dev and SD3.5-medium GRPO per GPU: parameter counts and activation peaks, measured on
the CPU at the real widths with truncated depth, and the per-GPU table extrapolated from them. Prints JSON.

    python benchmarks/scaling_memory.py [--out docs/benchmarks/scaling_memory.json] [--quick]

- **Weights.** Every component is built on the meta device from its published config (exact counts,
  no memory). The transformer is also built at depth 1-3 and its count extrapolated per block
  (``base + blocks x per-block``); both are reported, so the per-block extrapolation is checked.
- **Rollout activations.** ``tpm.grpo.rollout.rollout`` (the trainer's own rollout: ``tpm.sample`` with
  the TPM policy deciding, under ``no_grad``) on a pipeline whose transformer has the real widths and
  1-2 blocks of each kind, with random weights in bfloat16, tiny text encoders and a tiny VAE (their
  share is measured apart), in a fresh process: the growth of peak RSS (``VmHWM``, reset after the
  weights are built) over the rollout. Run at two depths to check that a no-grad forward's peak does
  not grow with depth (blocks run one after another, each block's temporaries are freed), and at two
  batch sizes to get the per-sample slope.
- **VAE decode.** The real AutoencoderKL (FLUX.1-dev and SD3.5 share its shape: 16 latent channels,
  128-256-512-512) decoding one and two images at 512^2 and 1024^2, full size, random weights, bf16.
- **Policy.** ``policies.TPM`` with the presets' options, at 16 bytes per parameter (fp32 weights,
  gradient, two AdamW moments); its replay runs on stored records, not through the backbone.

Per GPU, for ``B`` samples denoised at once (``rollout_batch_size``; SD3's CFG doubles the transformer's
batch): transformer + VAE weights, + text encoders unless ``--prompt-cache``, + the four AsyncDiff reward
models in half precision unless they run on a reward server, + policy, + rollout activations(B) +
VAE decode(B) + CUDA context (an assumption: 0.5 GiB, not measurable here). CPU memory figures are RSS:
they include allocator slack, so they bound the tensors from above.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GiB = 2 ** 30
CUDA_CONTEXT = 0.5 * GiB  # assumption (CUDA context + cuBLAS workspace); gpu_check.py measures the rest
HALF = 2  # bytes: the presets run float16, bf16 has the same size

# Published configs (FLUX.1-dev, stable-diffusion-3.5-medium); only shapes matter.
FLUX = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
            num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
            axes_dims_rope=(16, 56, 56))
SD35M = dict(sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64,
             num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
             pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=384,
             dual_attention_layers=tuple(range(13)), qk_norm="rms_norm")
T5_XXL = dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
              feed_forward_proj="gated-gelu", is_encoder_decoder=False)
CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
              num_attention_heads=12, max_position_embeddings=77, projection_dim=768)
CLIP_G = dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
              num_attention_heads=20, max_position_embeddings=77, projection_dim=1280, hidden_act="gelu")
VAE = dict(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(128, 256, 512, 512),
           layers_per_block=2, down_block_types=("DownEncoderBlock2D",) * 4,
           up_block_types=("UpDecoderBlock2D",) * 4, use_quant_conv=False, use_post_quant_conv=False)
MODELS = {
    "flux-dev": {"text": 512, "cfg": 1, "encoders": {"clip_l": CLIP_L, "t5_xxl": T5_XXL}},
    "sd35-medium": {"text": 256 + 77, "cfg": 2, "encoders": {"clip_l": CLIP_L, "clip_g": CLIP_G, "t5_xxl": T5_XXL}},
}
POLICY = dict(width=256, layers=4, heads=8, image_grid=8, text_tokens=8)  # the presets' policy_options


# -- weights ----------------------------------------------------------------------------------------
def _count(build) -> int:
    from accelerate import init_empty_weights

    with init_empty_weights():
        model = build()
    if hasattr(model, "tie_weights"):  # T5's input embedding is shared (transformers ties it after init)
        model.tie_weights()
    return sum(p.numel() for p in model.parameters())


def flux(**over):
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel(**{**FLUX, **over})


def sd3(**over):
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel(**{**SD35M, **over})


def weights() -> dict:
    """Exact counts (meta builds) and the per-block extrapolation from truncated builds."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    c = {k: _count(lambda k=k: flux(num_layers=k[0], num_single_layers=k[1])) for k in [(1, 1), (2, 1), (1, 2)]}
    double, single = c[2, 1] - c[1, 1], c[1, 2] - c[1, 1]
    flux_ext = c[1, 1] + 18 * double + 37 * single
    # SD3: the last block is context-pre-only, so per block = depth 3 - depth 2; dual attention adds attn2.
    s2 = _count(lambda: sd3(num_layers=2, dual_attention_layers=()))
    s3 = _count(lambda: sd3(num_layers=3, dual_attention_layers=()))
    dual = _count(lambda: sd3(num_layers=3, dual_attention_layers=(0,))) - s3
    sd3_ext = s2 + 22 * (s3 - s2) + 13 * dual
    enc = {
        "t5_xxl": _count(lambda: T5EncoderModel(T5Config(**T5_XXL))),
        "clip_l": _count(lambda: CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_L))),
        "clip_g": _count(lambda: CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_G))),
    }
    return {
        "flux-dev": {"transformer": _count(flux), "transformer_extrapolated": flux_ext,
                     "per_double_block": double, "per_single_block": single, "depth_1_1": c[1, 1]},
        "sd35-medium": {"transformer": _count(sd3), "transformer_extrapolated": sd3_ext,
                        "per_block": s3 - s2, "per_dual_attention": dual, "depth_2": s2},
        "encoders": enc,
        "vae": _count(lambda: AutoencoderKL(**VAE)),
    }


# -- one measurement, in its own process --------------------------------------------------------------
def _hwm_reset() -> float:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status("VmRSS")


def _status(key: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("needs Linux /proc")


def _pipeline(model: str, side: int, depth: int):
    """A pipeline at the real transformer widths, ``depth`` blocks of each kind, tiny text encoders and VAE."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from tpm import tiny as T

    tok = T.word_tokenizer(max_length=77)
    text = MODELS[model]["text"] - (77 if model == "sd35-medium" else 0)
    # tiny VAE with the real 8x downsampling and 16 latent channels: the latents have the real shape
    vae = T.autoencoder((4, 4, 4, 4), 16, sample_size=side, norm_groups=1, seed=1, use_quant_conv=False,
                        use_post_quant_conv=False)
    t5 = T.t5_encoder(len(tok), 4096, d_kv=8, layers=1, heads=4, seed=3, eos_token_id=2)
    clip_kw = dict(layers=1, heads=2, max_length=77, seed=2, bos_token_id=3, eos_token_id=2, pad_token_id=0)
    defaults = {"max_sequence_length": text}
    if model == "flux-dev":
        tr = flux(num_layers=depth, num_single_layers=depth).eval()
        return T.assemble_pipeline("flux", scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, transformer=tr,
                                   text_encoders=[T.clip_text_encoder(len(tok), 768, **clip_kw), t5],
                                   tokenizers=[tok, T.word_tokenizer(max_length=text)], defaults=defaults)
    tr = sd3(num_layers=depth + 1, dual_attention_layers=tuple(range(depth)), sample_size=side // 8).eval()
    return T.assemble_pipeline(
        "sd3", scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae, transformer=tr,
        text_encoders=[T.clip_text_encoder(len(tok), 768, projection=True, **clip_kw),
                       T.clip_text_encoder(len(tok), 1280, projection=True, **clip_kw), t5],
        tokenizers=[tok, T.word_tokenizer(max_length=77), T.word_tokenizer(max_length=text)], defaults=defaults)


def measure_rollout(model: str, side: int, batch: int, depth: int) -> dict:
    import torch

    import policies
    from tpm.grpo.rollout import rollout

    torch.set_num_threads(2)
    torch.manual_seed(0)
    pipe = _pipeline(model, side, depth).to(dtype=torch.bfloat16)
    policy = policies.TPM.for_pipeline(pipe, **POLICY)
    params = sum(p.numel() for p in pipe.transformer.parameters())
    prompts = ["a photo of a cat on the grass", "a red car"] * batch
    kwargs = {"guidance_scale": 5.0}
    rollout(pipe, policy, prompts[:1], [0], num_inference_steps=2, height=64, width=64, sample_kwargs=kwargs)
    base = _hwm_reset()
    t0 = time.perf_counter()
    rollout(pipe, policy, prompts[:batch], list(range(batch)), num_inference_steps=2, height=side, width=side,
            rollout_batch_size=batch, sample_kwargs=kwargs)
    return {"model": model, "side": side, "batch": batch, "depth": depth, "transformer_params": params,
            "policy_params": sum(p.numel() for p in policy.parameters()),
            "peak_growth_bytes": _status("VmHWM") - base, "seconds": round(time.perf_counter() - t0, 1)}


def measure_vae(side: int, batch: int) -> dict:
    import torch
    from diffusers import AutoencoderKL

    torch.set_num_threads(2)
    torch.manual_seed(0)
    vae = AutoencoderKL(**VAE).eval().to(torch.bfloat16)
    z = torch.randn(batch, 16, side // 8, side // 8, dtype=torch.bfloat16)
    with torch.no_grad():
        vae.decode(torch.randn(1, 16, 8, 8, dtype=torch.bfloat16))
        base = _hwm_reset()
        t0 = time.perf_counter()
        vae.decode(z)
    return {"side": side, "batch": batch, "peak_growth_bytes": _status("VmHWM") - base,
            "seconds": round(time.perf_counter() - t0, 1)}


def _sub(*args) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)}
    out = subprocess.run([sys.executable, __file__, *map(str, args)], env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{args} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# -- the table -------------------------------------------------------------------------------------------
def table(w: dict, roll: list[dict], vae: list[dict], reward_weights: float) -> dict:
    """Per-GPU GiB for B = 1, 2, 4, 8 with/without the prompt cache and the reward server, with the
    measured truncated-depth figures next to the extrapolations they check."""
    out = {}
    for model, spec in MODELS.items():
        tr = w[model]["transformer"] * HALF
        enc = sum(w["encoders"][k] for k in spec["encoders"]) * HALF
        for side in (512, 1024):
            r = {(m["batch"], m["depth"]): m for m in roll if m["model"] == model and m["side"] == side}
            v = {m["batch"]: m["peak_growth_bytes"] for m in vae if m["side"] == side}
            if (1, 1) not in r or 1 not in v:
                continue
            a1 = r[1, 1]["peak_growth_bytes"]
            slope = (r[2, 1]["peak_growth_bytes"] - a1) if (2, 1) in r else a1  # per sample
            v_slope = (v[2] - v[1]) if 2 in v else v[1]
            policy = r[1, 1]["policy_params"] * 16
            rows = {}
            for b in (1, 2, 4, 8):
                act = a1 + (b - 1) * slope
                dec = v[1] + (b - 1) * v_slope
                fixed = tr + w["vae"] * HALF + policy + CUDA_CONTEXT + act + dec
                rows[b] = {"activations_GiB": round(act / GiB, 2), "vae_decode_GiB": round(dec / GiB, 2),
                           "cache+server": round(fixed / GiB, 1),
                           "cache, rewards on GPU": round((fixed + reward_weights) / GiB, 1),
                           "no cache, server": round((fixed + enc) / GiB, 1),
                           "no cache, rewards on GPU": round((fixed + enc + reward_weights) / GiB, 1)}
            checks = {f"depth {d}, batch {b}": round(m["peak_growth_bytes"] / GiB, 3) for (b, d), m in sorted(r.items())}
            checks.update({f"vae batch {b}": round(x / GiB, 3) for b, x in sorted(v.items())})
            out[f"{model} {side}"] = {
                "tokens": {"image": (side // 16) ** 2, "text": spec["text"], "transformer_batch_per_sample": spec["cfg"]},
                "weights_GiB": {"transformer": round(tr / GiB, 2), "text_encoders": round(enc / GiB, 2),
                                "vae": round(w["vae"] * HALF / GiB, 3), "policy_train_state": round(policy / GiB, 3),
                                "rewards_half": round(reward_weights / GiB, 2)},
                "per_gpu_GiB": rows, "measured_truncated_depth_GiB": checks,
            }
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="also write the JSON here")
    ap.add_argument("--quick", action="store_true", help="512^2 only, one depth/batch check (about 3 minutes)")
    ap.add_argument("--reward-params", type=float, default=3.41e9,
                    help="parameters of the rewards on each GPU without a server (default: the four AsyncDiff "
                         "rewards, measured by bench_rewards.py --memory)")
    args = ap.parse_args(argv)
    w = weights()
    sides = (512,) if args.quick else (512, 1024)
    roll, vae = [], []
    for model in MODELS:
        for side in sides:
            cases = [(1, 1), (2, 1)] + ([] if side == 1024 else [(1, 2)])  # depth check once per model
            for batch, depth in cases if not args.quick or model == "flux-dev" else [(1, 1)]:
                roll.append(_sub("rollout", model, side, batch, depth))
    for side in sides:
        for batch in (1, 2):
            vae.append(_sub("vae", side, batch))
    report = {
        "benchmark": "per-GPU memory of FLUX.1-dev / SD3.5-medium GRPO: counts on meta, activations measured on "
                     "CPU at real widths and truncated depth (bf16), extrapolated",
        "torch": __import__("torch").__version__, "machine": platform.machine(), "cuda_context_GiB_assumed": 0.5,
        "weights_params": w, "rollout_measurements": roll, "vae_measurements": vae,
        "table": table(w, roll, vae, args.reward_params * HALF),
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return report


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "rollout":
        print(json.dumps(measure_rollout(sys.argv[2], *map(int, sys.argv[3:6]))))
    elif len(sys.argv) > 1 and sys.argv[1] == "vae":
        print(json.dumps(measure_vae(*map(int, sys.argv[2:4]))))
    else:
        main()
