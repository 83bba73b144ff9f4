"""Pieces of the testbed training recipe (``recipes/train_testbed.py``): rendered data, the VAE
fit, the flow-matching loss with a per-token time field, and image grids.

Flow matching per token (the convention of SPEC §1): ``x_tau = (1 - tau) x0 + tau * noise`` with
``tau`` a (B, h, w) field from ``tpm.testbed.timestep_samplers``; the model predicts the velocity
``noise - x0`` and the loss is its mean squared error (SD3 / Flux training objective, applied per
token as in AsyncPatch §3.1). The model is queried through the backbone adapter
(``tpm.backbones``), whose forward takes a per-token time and equals the stock forward on uniform
fields, so synchronous and AsyncPatch training share one code path.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm

__all__ = [
    "RenderedData",
    "flow_matching_loss",
    "image_grid",
    "pack_latents",
    "render_dataset",
    "train_vae",
    "fit_latent_normalization",
    "sample_grid",
    "TrainTestbedConfig",
    "train_testbed",
]


@dataclass
class RenderedData:
    """Rendered ground-truth images (N, 3, R, R) in [-1, 1] and their prompts."""

    images: torch.Tensor
    prompts: list[str]


def render_dataset(n: int, resolution: int, split: str = "train", seed: int = 0, progress: bool = True) -> RenderedData:
    """``n`` prompts of ``split`` (categories drawn uniformly), each rendered once with its own seed."""
    from tpm.testbed.render import render
    from tpm.testbed.splits import sample_prompts

    items = sample_prompts(n, split=split, seed=seed)
    arr = np.empty((n, resolution, resolution, 3), dtype=np.uint8)
    for i, it in enumerate(tqdm(items, desc="render", disable=not progress)):
        arr[i] = np.asarray(render(it.spec, size=resolution, seed=seed * 1_000_003 + i).convert("RGB"))
    images = torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    return RenderedData(images, [it.prompt for it in items])


def train_vae(
    vae,
    images: torch.Tensor,
    *,
    steps: int,
    batch_size: int = 32,
    lr: float = 2e-3,
    kl_weight: float = 1e-6,
    seed: int = 0,
    log=None,
    progress: bool = True,
) -> float:
    """Fit an ``AutoencoderKL`` to ``images`` (N, 3, R, R) in [-1, 1]: L1 + MSE reconstruction from the
    posterior mean plus a small KL term (the latent-diffusion VAE loss without the
    perceptual/adversarial parts, which flat-colour shapes do not need). Decoding the mean rather
    than a posterior sample makes it a plain autoencoder that converges in a few hundred CPU steps;
    the diffusion model only ever sees posterior means (``fit_latent_normalization``) and the KL
    term keeps them bounded. Returns the last loss."""
    gen = torch.Generator().manual_seed(seed)
    device = next(vae.parameters()).device
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.05)
    vae.train()
    loss_val = float("nan")
    for step in tqdm(range(steps), desc="vae", disable=not progress):
        idx = torch.randint(len(images), (batch_size,), generator=gen)
        x = images[idx].to(device)
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.mode()).sample
        kl = post.kl().mean() / x[0].numel()
        loss = F.l1_loss(rec, x) + F.mse_loss(rec, x) + kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        loss_val = float(loss.detach())
        if log is not None and step % 50 == 0:
            log({"vae/loss": loss_val, "vae/kl": float(kl.detach())}, step)
    vae.eval()
    return loss_val


@torch.no_grad()
def fit_latent_normalization(vae, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Set ``vae.config.shift_factor`` / ``scaling_factor`` so the dataset's latents have zero mean and
    unit variance (as SD3 / Flux VAEs do), and return those normalised latents (posterior means)."""
    device = next(vae.parameters()).device
    lat = torch.cat(
        [vae.encode(images[i : i + batch_size].to(device)).latent_dist.mean.cpu() for i in range(0, len(images), batch_size)]
    )
    shift, scale = float(lat.mean()), float(1.0 / lat.std())
    vae.register_to_config(shift_factor=shift, scaling_factor=scale)
    return (lat - shift) * scale


def pack_latents(pipe, latents: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) normalised latents -> the pipeline's native layout (Flux: packed 2x2 tokens)."""
    from diffusers import FluxPipeline

    if isinstance(pipe, FluxPipeline):
        b, c, h, w = latents.shape
        return FluxPipeline._pack_latents(latents, b, c, h, w)
    return latents


def flow_matching_loss(bb, x0: torch.Tensor, tau: torch.Tensor, cond, noise: torch.Tensor) -> torch.Tensor:
    """Per-token flow-matching loss: MSE between ``bb.predict(x_tau, tau)`` and ``noise - x0``.

    Args:
        bb: a ``tpm.backbones`` adapter.
        x0, noise: clean latents and Gaussian noise in the pipeline's native layout.
        tau: (B, h, w) time field on the token grid, 1 = noise.
        cond: ``bb.encode(...)`` conditioning of the batch's prompts.
    """
    t = bb.expand_field(tau).to(x0.dtype)
    x_t = (1 - t) * x0 + t * noise
    v = bb.predict(x_t, tau, cond).velocity
    return F.mse_loss(v.float(), (noise - x0).float())


def image_grid(images: list[Image.Image], ncol: int | None = None, pad: int = 2) -> Image.Image:
    """Tile equally sized PIL images into one grid image (white padding)."""
    if not images:
        raise ValueError("image_grid needs at least one image")
    ncol = ncol or math.ceil(math.sqrt(len(images)))
    nrow = math.ceil(len(images) / ncol)
    w, h = images[0].size
    grid = Image.new("RGB", (ncol * (w + pad) + pad, nrow * (h + pad) + pad), (255, 255, 255))
    for i, im in enumerate(images):
        r, c = divmod(i, ncol)
        grid.paste(im.convert("RGB"), (pad + c * (w + pad), pad + r * (h + pad)))
    return grid


# ---------------------------------------------------------------------------------------------
# The training run used by recipes/train_testbed.py
# ---------------------------------------------------------------------------------------------


def _help(text: str):
    return {"help": text}


@dataclass
class TrainTestbedConfig:
    """Configuration of ``recipes/train_testbed.py`` (every field is a command-line flag)."""

    backbone: str = field(default="flux", metadata=_help("Pipeline family: 'flux' or 'sd3'."))
    timestep_sampler: str = field(
        default="sync",
        metadata=_help("Training-time field sampler: 'sync' (logit-normal), 'patchwise', 'perlin' or "
                       "'controlled' (AsyncPatch App. C)."),
    )
    time_loc: float = field(
        default=0.5,
        metadata=_help("Location m of the logit-normal time sigmoid(N(m, s^2)) ('sync' mean, 'controlled' mean_loc). "
                       "m > 0 trains more at high noise, where the prompt decides the composition."),
    )
    time_scale: float = field(default=1.0, metadata=_help("Scale s of the logit-normal time distribution."))
    output_dir: str = field(default="outputs/testbed-flux", metadata=_help("Run folder: logs, grids, vae/, pipeline/."))
    vae_path: str | None = field(
        default=None,
        metadata=_help("Folder of an already trained AutoencoderKL (e.g. a previous run's <output_dir>/vae "
                       "or tpm/testbed/checkpoints/flux/vae) to reuse instead of training one."),
    )
    init_from: str | None = field(
        default=None,
        metadata=_help("Pipeline folder (or shipped name) whose transformer and text encoders initialise this run "
                       "(continue training); its sizes must match the flags."),
    )
    resolution: int = field(default=32, metadata=_help("Image side in pixels."))
    latent_channels: int = field(default=8, metadata=_help("VAE latent channels (Flux packs 2x2 of them per token)."))
    vae_channels: list[int] = field(
        default_factory=lambda: [16, 32, 32],
        metadata=_help("AutoencoderKL block widths; the VAE downsamples by 2**(len - 1), a token covers twice that."),
    )
    num_images: int = field(default=20000, metadata=_help("Rendered training images (train split, one epoch)."))
    vae_steps: int = field(default=800, metadata=_help("VAE optimisation steps (when no --vae-path)."))
    vae_batch_size: int = field(default=16, metadata=_help("VAE batch size."))
    steps: int = field(default=4500, metadata=_help("Transformer optimisation steps (the LR schedule's length)."))
    stop_step: int | None = field(
        default=None,
        metadata=_help("Stop after this many steps while keeping the LR schedule of --steps (reproduces a run "
                       "that --max-minutes cut short: pass its steps_done)."),
    )
    max_minutes: float | None = field(
        default=None,
        metadata=_help("Stop the transformer stage early after this many wall-clock minutes (the steps done "
                       "are recorded in train_report.json); None trains all --steps."),
    )
    batch_size: int = field(default=64, metadata=_help("Transformer batch size (per process)."))
    learning_rate: float = field(default=1e-3, metadata=_help("Peak AdamW learning rate (transformer and text encoders)."))
    warmup_steps: int = field(default=50, metadata=_help("Linear warm-up steps, then cosine decay to 10 per cent."))
    cond_dropout: float = field(default=0.1, metadata=_help("Probability of training on the empty prompt (for CFG)."))
    ema_decay: float = field(default=0.995, metadata=_help("EMA decay of the weights that are saved and sampled."))
    max_sequence_length: int = field(
        default=10, metadata=_help("Text tokens per prompt (the longest testbed prompt is 8 words + <eos>)."))
    head_dim: int = field(default=32, metadata=_help("Transformer attention head dim."))
    num_heads: int = field(default=4, metadata=_help("Transformer attention heads."))
    num_layers: int = field(default=2, metadata=_help("Flux double-stream / SD3 joint blocks."))
    num_single_layers: int = field(default=2, metadata=_help("Flux single-stream blocks (ignored for sd3)."))
    num_inference_steps: int = field(default=20, metadata=_help("Sampling steps for grids and the saved default."))
    guidance_scale: float = field(default=1.0, metadata=_help("Saved default CFG scale (1 = conditional only)."))
    grid_prompts: int = field(default=16, metadata=_help("Validation prompts in the per-epoch PNG grid."))
    seed: int = field(default=0, metadata=_help("Seed for data, initialisation and time fields."))
    threads: int = field(default=1, metadata=_help("torch CPU threads (1 is fastest on a busy 2-core machine)."))
    save_dtype: str = field(default="float16", metadata=_help("dtype of the saved pipeline: float16 or float32."))

    def __post_init__(self):
        from tpm.testbed.timestep_samplers import TIMESTEP_SAMPLERS

        if self.timestep_sampler not in TIMESTEP_SAMPLERS:
            raise ValueError(f"--timestep-sampler must be one of {sorted(TIMESTEP_SAMPLERS)}")
        if self.save_dtype not in ("float16", "float32"):
            raise ValueError("--save-dtype must be float16 or float32")
        if not 0 <= self.cond_dropout < 1:
            raise ValueError("--cond-dropout must be in [0, 1)")

    def model_config(self):
        from tpm.testbed.models import TestbedModelConfig

        return TestbedModelConfig(
            backbone=self.backbone, resolution=self.resolution, latent_channels=self.latent_channels,
            vae_channels=tuple(self.vae_channels), max_sequence_length=self.max_sequence_length,
            num_heads=self.num_heads, head_dim=self.head_dim,
            num_layers=self.num_layers, num_single_layers=self.num_single_layers,
            num_inference_steps=self.num_inference_steps, guidance_scale=self.guidance_scale,
        )


@torch.no_grad()
def sample_grid(pipe, prompts: list[str], seed: int = 0, **overrides) -> Image.Image:
    """One image per prompt with the pipeline's testbed defaults, tiled into a grid."""
    from tpm.testbed.models import call_kwargs

    gen = torch.Generator().manual_seed(seed)
    images = pipe(prompts, generator=gen, **call_kwargs(pipe, **overrides)).images
    return image_grid(images, ncol=min(8, len(images)))


def _lr_lambda(warmup: int, total: int):
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        frac = (step - warmup) / max(1, total - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, frac)))

    return f


def _time_kwargs(cfg: TrainTestbedConfig) -> dict:
    """The logit-normal location/scale in the keyword names of the chosen sampler."""
    if cfg.timestep_sampler == "sync":
        return {"mean": cfg.time_loc, "std": cfg.time_scale}
    if cfg.timestep_sampler == "controlled":
        return {"mean_loc": cfg.time_loc, "mean_scale": cfg.time_scale}
    return {}


def train_testbed(cfg: TrainTestbedConfig) -> dict:
    """Train a testbed pipeline end to end and save it to ``<output_dir>/pipeline``.

    Stages: render ``num_images`` train-split images; fit (or load) the VAE and normalise its
    latents; train transformer + text encoders with the flow-matching loss under the chosen time
    sampler, logging to tensorboard (accelerate trackers) and writing a PNG grid per epoch; save
    the EMA weights. Single process (CPU or one GPU). Returns timings and sizes.
    """
    import json
    import time
    from pathlib import Path

    from accelerate import Accelerator
    from diffusers import AutoencoderKL
    from diffusers.training_utils import EMAModel

    from tpm.backbones import get_backbone
    from tpm.testbed.models import build_pipeline, save_pipeline
    from tpm.testbed.splits import sample_prompts
    from tpm.testbed.timestep_samplers import get_timestep_sampler

    torch.set_num_threads(cfg.threads)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    acc = Accelerator(log_with="tensorboard", project_dir=str(out))
    if acc.num_processes > 1:
        raise RuntimeError("train_testbed runs in one process (the models are tiny); launch without --multi_gpu")
    hparams = {k: v for k, v in vars(cfg).items() if isinstance(v, (int, float, str, bool))}
    acc.init_trackers("train_testbed", config=hparams)
    log = acc.log
    device = acc.device
    mcfg = cfg.model_config()
    t_start = time.time()

    data = render_dataset(cfg.num_images, cfg.resolution, split="train", seed=cfg.seed)
    t_vae = time.time()
    if cfg.vae_path:
        vae = AutoencoderKL.from_pretrained(cfg.vae_path, torch_dtype=torch.float32).to(device)
    else:
        torch.manual_seed(cfg.seed)
        from tpm.testbed.models import build_vae

        vae = build_vae(mcfg).to(device)
        train_vae(vae, data.images, steps=cfg.vae_steps, batch_size=cfg.vae_batch_size, seed=cfg.seed,
                  log=lambda d, s: log(d, step=s))
    vae.eval()
    latents = fit_latent_normalization(vae, data.images)
    if not cfg.vae_path:
        vae.save_pretrained(out / "vae")
    t_vae = time.time() - t_vae

    pipe = build_pipeline(mcfg, vae=vae, seed=cfg.seed).to(device)
    bb = get_backbone(pipe)
    names = ["transformer", "text_encoder", "text_encoder_2"] + (["text_encoder_3"] if cfg.backbone == "sd3" else [])
    trainable = [pipe.components[n] for n in names]
    if cfg.init_from:
        from tpm.testbed.models import load_pipeline

        src = load_pipeline(cfg.init_from)
        for n in names:
            pipe.components[n].load_state_dict(src.components[n].state_dict())
    params = [p for m in trainable for p in m.parameters()]
    opt = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(cfg.warmup_steps, cfg.steps))
    opt, sched = acc.prepare(opt, sched)
    ema = EMAModel(params, decay=cfg.ema_decay)
    sampler = get_timestep_sampler(cfg.timestep_sampler, **_time_kwargs(cfg))
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    h = w = cfg.resolution // mcfg.token_size
    grid_prompts = [it.prompt for it in sample_prompts(cfg.grid_prompts, split="val", seed=cfg.seed)]
    steps_per_epoch = max(1, cfg.num_images // cfg.batch_size)

    def save_grid(tag: str) -> None:
        ema.store(params)
        ema.copy_to(params)
        sample_grid(pipe, grid_prompts, seed=cfg.seed).save(out / f"samples_{tag}.png")
        ema.restore(params)

    t_train = time.time()
    for m in trainable:
        m.train()
    bar = tqdm(range(cfg.steps), desc=f"train {cfg.backbone}/{cfg.timestep_sampler}", disable=not acc.is_local_main_process)
    loss_avg = None
    steps_done = 0
    for step in bar:
        idx = torch.randint(len(latents), (cfg.batch_size,), generator=gen)
        prompts = [
            "" if float(u) < cfg.cond_dropout else data.prompts[i]
            for i, u in zip(idx.tolist(), torch.rand(cfg.batch_size, generator=gen))
        ]
        x0 = pack_latents(pipe, latents[idx].to(device))
        tau = sampler(cfg.batch_size, h, w, generator=gen).to(device)
        noise = torch.randn(x0.shape, generator=gen).to(device)
        cond = bb.encode(prompts, guidance_scale=1.0, max_sequence_length=mcfg.max_sequence_length)
        loss = flow_matching_loss(bb, x0, tau, cond, noise)
        opt.zero_grad(set_to_none=True)
        acc.backward(loss)
        acc.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        ema.step(params)
        loss_avg = float(loss) if loss_avg is None else 0.98 * loss_avg + 0.02 * float(loss)
        bar.set_postfix(loss=f"{loss_avg:.4f}")
        if step % 10 == 0:
            log({"train/loss": float(loss), "train/lr": sched.get_last_lr()[0]}, step=step)
        out_of_time = (cfg.max_minutes is not None and time.time() - t_train > 60 * cfg.max_minutes) or (
            cfg.stop_step is not None and step + 1 >= cfg.stop_step
        )
        if (step + 1) % steps_per_epoch == 0 or step + 1 == cfg.steps or out_of_time:
            for m in trainable:
                m.eval()
            last = step + 1 == cfg.steps or out_of_time
            save_grid("final" if last else f"epoch{(step + 1) // steps_per_epoch:03d}")
            for m in trainable:
                m.train()
        steps_done = step + 1
        if out_of_time:
            break
    t_train = time.time() - t_train
    ema.copy_to(params)
    for m in trainable:
        m.eval()
    n_params = {name: sum(p.numel() for p in c.parameters())
                for name, c in pipe.components.items() if isinstance(c, torch.nn.Module)}
    report = {
        "backbone": cfg.backbone,
        "timestep_sampler": cfg.timestep_sampler,
        "seconds_total": round(time.time() - t_start, 1),
        "seconds_vae": round(t_vae, 1),
        "seconds_transformer": round(t_train, 1),
        "steps_done": steps_done,
        "batch_size": cfg.batch_size,
        "final_loss_ema": loss_avg,
        "parameters": n_params,
        "device": str(device),
        "torch_threads": cfg.threads,
    }
    mcfg.extra = {"training": report, "train_config": hparams}
    save_pipeline(pipe, out / "pipeline", mcfg, dtype=getattr(torch, cfg.save_dtype))
    (out / "train_report.json").write_text(json.dumps(report, indent=2))
    acc.end_training()
    return report
