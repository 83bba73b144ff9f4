"""``tpm train --dry-run``: what a run will do, from its config and the model's config files alone.

Nothing heavy loads: parameter counts come from each pipeline component built on the meta device
from its ``config.json`` (``accelerate.init_empty_weights``), the process count from the
launcher's environment. The memory figure per device is an estimate, by this formula:

- **weights**: every backbone component (transformer, text encoders, VAE) stays on the device for the
  whole run, ``parameters x bytes of dtype``; with ``prompt_cache`` the text encoders leave it once the
  prompts are encoded (their peak before that is not shown);
- **policy**: ``parameters x 16`` bytes (fp32 weights, gradient, two AdamW moments), plus 4 per
  parameter for the frozen reference when ``kl_coef > 0``; named, not counted (the policy's widths
  follow the loaded backbone; a few MB for the shipped policies);
- **activations** of one rollout forward without gradients, the largest block alive at once:
  ``B x T x d x copies x bytes`` with ``copies`` = 28 for Flux, 21 for SD3 (queries, keys, values,
  the attention output, the 4x-wide MLP, the per-token modulation and the residual stream of one
  block; measured on the CPU at the real widths, ``benchmarks/scaling_memory.py``, docs/scaling.md),
  with ``B = rollout_batch_size`` (x 2 with true CFG: Flux's ``true_cfg_scale``, SD3's
  ``guidance_scale``), ``T`` image + text tokens, ``d`` the transformer width; attention scores,
  ``B x heads x T^2 x bytes``, are listed apart: only an eager attention backend materialises them
  (torch's SDPA does not, on CPU or GPU); plus the decoded images, ``B x 3 x H x W x 4`` bytes;
- **VAE decode** of the rollout batch (its images at once): ``H x W x (2200 + (B - 1) x 1000) x bytes / 2``
  (the SD3/Flux AutoencoderKL measured at 512^2 and 1024^2: the first image of a batch costs about
  2200 bytes per pixel, each further one about 1000).

Rewards are not counted: a reward in the trainer runs on its ``device`` option (CPU by default) in
every process; a ``remote`` reward runs in its server, on that server's device.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
ACTIVATION_COPIES = {"flux": 28, "sd3": 21}  # measured at the real widths (module docstring)
VAE_DECODE_BYTES_PER_PIXEL = (2200, 1000)  # first image, each further one; 2-byte dtypes; measured


def _config_file(spec: str, name: str) -> str | None:
    """``name`` inside a model folder, or a hub id's file in the HF cache (a dry run downloads nothing)."""
    from tpm.loading import TESTBED_PREFIX
    from tpm.testbed.models import CHECKPOINT_DIR

    folder = str(CHECKPOINT_DIR / spec[len(TESTBED_PREFIX):]) if spec.startswith(TESTBED_PREFIX) else spec
    if os.path.isdir(folder):
        path = os.path.join(folder, name)
        return path if os.path.isfile(path) else None
    if spec.count("/") != 1:
        return None
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(spec, name)
    except Exception:  # a malformed id: the loader reports it when the run starts
        return None
    return found if isinstance(found, str) else None


def _read(path: str | None) -> dict | None:
    if path is None:
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def model_configs(spec: str) -> tuple[dict[str, int], dict[str, Any]] | None:
    """(parameter count of every model component, {"pipeline": class name, "transformer": its config,
    "testbed": testbed.json}) from the model's config files, the components built on the meta device;
    None when the configs are not readable here. ``tiny:`` models are built (they are tiny)."""
    import torch

    from tpm.loading import TINY_PREFIX

    if spec.startswith(TINY_PREFIX):
        from tpm.loading import load_model

        pipe = load_model(spec)
        counts = {k: sum(p.numel() for p in v.parameters()) for k, v in pipe.components.items()
                  if isinstance(v, torch.nn.Module)}
        return counts, {"pipeline": type(pipe).__name__, "transformer": dict(pipe.transformer.config),
                        "vae": dict(pipe.vae.config), "testbed": {}}
    index = _read(_config_file(spec, "model_index.json"))
    if index is None:
        return None
    from accelerate import init_empty_weights

    counts = {}
    for name, entry in index.items():
        if name.startswith("_") or not isinstance(entry, list) or entry[0] not in ("diffusers", "transformers"):
            continue
        cfg_path = _config_file(spec, f"{name}/config.json")
        cls = getattr(__import__(entry[0]), entry[1], None)
        if cfg_path is None or cls is None:
            continue
        with init_empty_weights():  # shapes only: no memory, no weights read
            if entry[0] == "diffusers":
                model = cls.from_config(cls.load_config(os.path.dirname(cfg_path)))
            else:
                from transformers import AutoConfig

                model = cls._from_config(AutoConfig.from_pretrained(os.path.dirname(cfg_path)))
        if hasattr(model, "tie_weights"):  # T5 shares its input embedding; transformers ties it after init
            model.tie_weights()
        counts[name] = sum(p.numel() for p in model.parameters())
    return counts, {"pipeline": index.get("_class_name", ""),
                    "transformer": _read(_config_file(spec, "transformer/config.json")) or {},
                    "vae": _read(_config_file(spec, "vae/config.json")) or {},
                    "testbed": _read(_config_file(spec, "testbed.json")) or {}}


def _geometry(cfg, configs: dict[str, Any]) -> dict[str, Any]:
    """Image size, tokens and transformer width the run will use."""
    g = cfg.grpo
    testbed, transformer = configs["testbed"], configs["transformer"]
    vae_factor = 2 ** (len(configs["vae"].get("block_out_channels", [0] * 4)) - 1)
    ts = vae_factor * 2  # Flux packs 2x2 latents per token, SD3 patchifies by 2
    default = testbed.get("resolution") or transformer.get("sample_size", 128) * vae_factor
    height, width = g.height or default, g.width or default
    sd3 = configs["pipeline"].startswith("StableDiffusion3")
    text = g.sample_kwargs.get("max_sequence_length") or testbed.get("max_sequence_length") or (256 if sd3 else 512)
    text += 77 if sd3 else 0  # SD3 joins CLIP's 77 tokens to T5's
    heads = transformer.get("num_attention_heads", 24)
    return {"height": height, "width": width, "image_tokens": (height // ts) * (width // ts), "text_tokens": text,
            "width_d": heads * transformer.get("attention_head_dim", 128), "heads": heads,
            "family": "sd3" if sd3 else "flux"}


def _cfg_doubles(sample_kwargs: dict, configs: dict[str, Any]) -> bool:
    """Whether the transformer sees each sample twice (CFG's negative branch in the same batch): Flux's
    true CFG, and SD3's guidance_scale (true CFG there; the pipeline's default is 7)."""
    if (sample_kwargs.get("true_cfg_scale") or 0) > 1:
        return True
    return configs["pipeline"].startswith("StableDiffusion3") and (sample_kwargs.get("guidance_scale") or 7.0) > 1


def estimate(cfg, processes: int) -> dict[str, Any]:
    """The plan as a dict (see the module docstring for the memory formula); sizes in bytes. ``params`` and
    ``memory`` are None when the model's configs are not readable here."""
    g = cfg.grpo
    local = g.batch_size // processes
    found = model_configs(cfg.model)
    out: dict[str, Any] = {"processes": processes, "local_batch": local, "params": None, "memory": None,
                           "geometry": None, "rollout_batch": None}
    if found is None:
        return out
    params, configs = found
    geo = _geometry(cfg, configs)
    bytes_ = DTYPE_BYTES[cfg.dtype]
    images = min(g.rollout_batch_size, local)
    first, further = VAE_DECODE_BYTES_PER_PIXEL
    b = images * (2 if _cfg_doubles(g.sample_kwargs, configs) else 1)
    t = geo["image_tokens"] + geo["text_tokens"]
    # with the prompt cache the text encoders leave the device once the prompts are encoded
    on_device = {k: v for k, v in params.items() if not (cfg.prompt_cache and k.startswith("text_encoder"))}
    memory = {"weights": sum(on_device.values()) * bytes_,
              "activations": b * t * geo["width_d"] * ACTIVATION_COPIES[geo["family"]] * bytes_
              + b * 3 * geo["height"] * geo["width"] * 4,
              "decode": geo["height"] * geo["width"] * (first + (images - 1) * further) * bytes_ // 2,
              "attention_scores": b * geo["heads"] * t * t * bytes_}
    return {**out, "params": params, "memory": memory, "geometry": geo, "rollout_batch": b}


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.0f}k"


def describe(cfg, processes: int, device: str) -> str:
    """The plan as the lines ``tpm train --dry-run`` prints."""
    g = cfg.grpo
    p = estimate(cfg, processes)
    geo, mem = p["geometry"], p["memory"]
    prompts = g.batch_size // g.group_size
    n_mb = math.ceil(g.batch_size / g.minibatch_size)
    lines = [
        f"plan of `tpm train` (--dry-run: nothing loaded, nothing written); model {cfg.model}, {cfg.dtype}",
        f"processes:   {processes} on {device}" + ("" if processes > 1 else
                                                  " (more: torchrun --nproc_per_node N, or accelerate launch "
                                                  "--multi_gpu --num_processes N)"),
        f"batch:       {g.batch_size} samples per iteration = {prompts} prompts x groups of {g.group_size}; "
        f"{p['local_batch']} per process, denoised {min(g.rollout_batch_size, p['local_batch'])} at a time",
        f"update:      {g.epochs} epoch(s) of {n_mb} minibatches of {g.minibatch_size} drawn from the whole batch "
        f"(about {g.minibatch_size / processes:g} samples per process each), {g.max_iterations} iterations",
    ]
    if p["params"] is None:
        lines.append(f"memory:      unknown: the config files of {cfg.model} are not readable here (a local folder, "
                     f"or a hub id in the HF cache: `hf download {cfg.model} --include '*.json'` fetches them)")
    else:
        parts = ", ".join(f"{k} {_count(v)}" for k, v in p["params"].items()
                          if not (cfg.prompt_cache and k.startswith("text_encoder")))
        if cfg.prompt_cache:
            parts += "; text encoders off the device after the prompt cache is filled"
        total = mem["weights"] + mem["activations"] + mem["decode"]
        lines += [
            f"images:      {geo['height']}x{geo['width']}, {geo['image_tokens']} image + {geo['text_tokens']} text "
            f"tokens, {g.num_inference_steps or 'the pipeline default'} steps",
            f"memory per device (estimate): {_size(total)} = weights {_size(mem['weights'])} ({parts} parameters "
            f"at {DTYPE_BYTES[cfg.dtype]} bytes) + rollout activations {_size(mem['activations'])} (batch "
            f"{p['rollout_batch']}) + VAE decode {_size(mem['decode'])}; + {_size(mem['attention_scores'])} "
            "with an attention backend that materialises scores (eager; not torch's SDPA); + the policy at 16 "
            "bytes per parameter; docs/scaling.md",
        ]
    lines.append("rewards:     " + "; ".join(_where(cfg, name) for name in cfg.rewards))
    return "\n".join(lines)


def _where(cfg, name: str) -> str:
    options = cfg.reward_options.get(name, {})
    if ":" in name:
        return f"{name} (weight {cfg.rewards[name]:g}): by import path, in every process, where its code puts it"
    if name == "remote":
        return f"remote (weight {cfg.rewards[name]:g}): on the reward server at {options.get('url', 'http://127.0.0.1:8765')}"
    device = options.get("device", "cpu")
    return f"{name} (weight {cfg.rewards[name]:g}): in every process, on {device} (weights not in the estimate)"
