"""Train the testbed UNet (a tiny ``StableDiffusionPipeline``) on the procedural shapes domain.

    python recipes/train_testbed_unet.py --output-dir outputs/testbed-unet --max-minutes 18

The recipe of ``recipes/train_testbed.py`` (rendered train split, AdamW with warm-up and cosine
decay, EMA weights, 10 % empty prompts, a PNG grid at the end) with the latent-diffusion loss of
:func:`tpm.testbed.unet.diffusion_loss` at uniform integer timesteps. The VAE, tokenizer and the
starting text encoder are the shipped testbed Flux's (:mod:`tpm.testbed.unet`). Writes
``<output-dir>/pipeline`` (+ testbed.json), ``samples_final.png`` and ``train_report.json``.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import HfArgumentParser


@dataclass
class TrainUNetConfig:
    output_dir: str = field(default="outputs/testbed-unet", metadata={"help": "Run folder."})
    num_images: int = field(default=20000, metadata={"help": "Rendered training images (train split)."})
    steps: int = field(default=2200, metadata={"help": "Optimisation steps (the LR schedule's length)."})
    max_minutes: float | None = field(default=19.0, metadata={"help": "Stop after this many minutes of training."})
    batch_size: int = field(default=64, metadata={"help": "Batch size."})
    learning_rate: float = field(default=1e-3, metadata={"help": "Peak AdamW learning rate."})
    warmup_steps: int = field(default=50, metadata={"help": "Linear warm-up, then cosine decay to 10 per cent."})
    cond_dropout: float = field(default=0.1, metadata={"help": "Probability of the empty prompt (for CFG)."})
    ema_decay: float = field(default=0.995, metadata={"help": "EMA decay of the saved weights."})
    prediction_type: str = field(default="v_prediction", metadata={"help": "epsilon or v_prediction."})
    blocks: list[int] = field(default_factory=lambda: [32, 64], metadata={"help": "UNet channels per level."})
    heads: int = field(default=4, metadata={"help": "Attention heads."})
    seed: int = field(default=0, metadata={"help": "Seed for data, initialisation and timesteps."})
    threads: int = field(default=1, metadata={"help": "torch CPU threads."})
    save_dtype: str = field(default="float16", metadata={"help": "float16 or float32."})


def _lr(warmup: int, total: int):
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        frac = (step - warmup) / max(1, total - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, frac)))

    return f


def train(cfg: TrainUNetConfig) -> dict:
    from diffusers.training_utils import EMAModel

    from tpm.testbed.models import save_pipeline
    from tpm.testbed.splits import sample_prompts
    from tpm.testbed.train import render_dataset, sample_grid
    from tpm.testbed.unet import UNetTestbedConfig, build_unet_pipeline, diffusion_loss, model_config

    torch.set_num_threads(cfg.threads)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    ucfg = UNetTestbedConfig(blocks=list(cfg.blocks), heads=cfg.heads, prediction_type=cfg.prediction_type)
    data = render_dataset(cfg.num_images, 32, split="train", seed=cfg.seed)
    pipe = build_unet_pipeline(ucfg, images=data.images, seed=cfg.seed)
    scale = pipe.vae.config.scaling_factor
    with torch.no_grad():
        latents = torch.cat([pipe.vae.encode(data.images[i:i + 256]).latent_dist.mean
                             for i in range(0, len(data.images), 256)]) * scale
    trainable = [pipe.unet, pipe.text_encoder]
    params = [p for m in trainable for p in m.parameters()]
    opt = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr(cfg.warmup_steps, cfg.steps))
    ema = EMAModel(params, decay=cfg.ema_decay)
    abar = pipe.scheduler.alphas_cumprod
    n_train = pipe.scheduler.config.num_train_timesteps
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    tok = pipe.tokenizer
    for m in trainable:
        m.train()
    t_train = time.time()
    loss_avg, done = None, 0
    bar = tqdm(range(cfg.steps), desc="train unet")
    for step in bar:
        idx = torch.randint(len(latents), (cfg.batch_size,), generator=gen)
        prompts = ["" if float(u) < cfg.cond_dropout else data.prompts[i]
                   for i, u in zip(idx.tolist(), torch.rand(cfg.batch_size, generator=gen))]
        ids = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="pt").input_ids
        embeds = pipe.text_encoder(ids)[0]
        t = torch.randint(n_train, (cfg.batch_size,), generator=gen)
        noise = torch.randn(latents[idx].shape, generator=gen)
        loss = diffusion_loss(pipe.unet, latents[idx], t, embeds, noise, abar, cfg.prediction_type)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        ema.step(params)
        lv = loss.item()
        loss_avg = lv if loss_avg is None else 0.98 * loss_avg + 0.02 * lv
        bar.set_postfix(loss=f"{loss_avg:.4f}")
        done = step + 1
        if cfg.max_minutes is not None and time.time() - t_train > 60 * cfg.max_minutes:
            break
    t_train = time.time() - t_train
    ema.copy_to(params)
    for m in trainable:
        m.eval()
    report = {"steps_done": done, "steps_schedule": cfg.steps, "seconds_train": round(t_train, 1),
              "seconds_total": round(time.time() - t0, 1), "final_loss_ema": loss_avg, "batch_size": cfg.batch_size,
              "torch_threads": cfg.threads,
              "parameters": {n: sum(p.numel() for p in c.parameters()) for n, c in pipe.components.items()
                             if isinstance(c, torch.nn.Module)}}
    mcfg = model_config(ucfg, extra={"training": report, "train_config": asdict(cfg)})
    save_pipeline(pipe, out / "pipeline", mcfg, dtype=getattr(torch, cfg.save_dtype))
    pipe.tpm_defaults = mcfg.defaults
    grid_prompts = [it.prompt for it in sample_prompts(16, split="val", seed=cfg.seed)]
    sample_grid(pipe, grid_prompts, seed=cfg.seed).save(out / "samples_final.png")
    (out / "train_report.json").write_text(json.dumps(report, indent=2))
    return report


def main(argv: list[str] | None = None) -> dict:
    (cfg,) = HfArgumentParser(TrainUNetConfig).parse_args_into_dataclasses(args=sys.argv[1:] if argv is None else argv)
    report = train(cfg)
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
