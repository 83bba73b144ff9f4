"""Train a tiny testbed backbone (Flux or SD3 classes) on the procedural shapes domain.

    accelerate launch recipes/train_testbed.py --backbone flux --timestep-sampler sync \
        --output-dir outputs/testbed-flux
    accelerate launch recipes/train_testbed.py --backbone flux --timestep-sampler controlled \
        --vae-path outputs/testbed-flux/vae --output-dir outputs/testbed-flux-asyncpatch

Optionally ``--config file.yaml`` (keys = the flags' field names) with command-line overrides.
Writes ``<output-dir>/pipeline`` (an ordinary diffusers pipeline + testbed.json), ``vae/`` when it
trained one, ``samples_*.png`` per epoch, tensorboard logs and ``train_report.json``; prints the
report as JSON. The reusable pieces (rendered data, VAE fit, the per-token flow-matching loss,
sample grids) live in ``tpm.testbed.train``; this file is the run.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import HfArgumentParser

from tpm.testbed.train import (
    fit_latent_normalization,
    flow_matching_loss,
    render_dataset,
    sample_grid,
    train_vae,
)


def _help(text: str):
    return {"help": text}


@dataclass
class TrainTestbedConfig:
    """Configuration of ``recipes/train_testbed.py`` (every field is a command-line flag)."""

    backbone: str = field(default="flux", metadata=_help("Pipeline family: 'flux' or 'sd3'."))
    domain: str = field(
        default="shapes",
        metadata=_help("Scenes to train on: 'shapes' (32 px, plain background) or 'spatial' (64 px, up to four "
                       "objects of two sizes on backgrounds with content; pass --resolution 64)."),
    )
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
    p_sync: float = field(
        default=0.25, metadata=_help("'controlled' only: probability of a uniform (synchronous) field in a sample."))
    max_spread: float = field(
        default=0.5, metadata=_help("'controlled' only: largest standard deviation of times within an image."))
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
        metadata=_help("Stop the transformer stage after this many wall-clock minutes of this invocation, save "
                       "the pipeline and the training state; running the same command again resumes. None "
                       "trains all --steps."),
    )
    save_minutes: float = field(
        default=10.0,
        metadata=_help("Write the resumable training state (<output-dir>/state/) every this many minutes, so an "
                       "interrupted run loses at most that much."),
    )
    resume: bool = field(
        default=True,
        metadata=_help("Continue from <output-dir>/state/ when it exists (same command, same flags); "
                       "--no-resume starts over."),
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
    save_dtype: str = field(
        default="float32",
        metadata=_help("dtype of the saved pipeline: float32 (plain DiffusionPipeline.from_pretrained with no "
                       "torch_dtype works) or float16 (half the size; then load with torch_dtype=torch.float32)."),
    )

    def __post_init__(self):
        from tpm.testbed.timestep_samplers import TIMESTEP_SAMPLERS

        if self.timestep_sampler not in TIMESTEP_SAMPLERS:
            raise ValueError(f"--timestep-sampler must be one of {sorted(TIMESTEP_SAMPLERS)}")
        if self.save_dtype not in ("float16", "float32"):
            raise ValueError("--save-dtype must be float16 or float32")
        if not 0 <= self.cond_dropout < 1:
            raise ValueError("--cond-dropout must be in [0, 1)")
        from tpm.testbed.splits import DOMAINS

        if self.domain not in DOMAINS:
            raise ValueError(f"--domain must be one of {list(DOMAINS)}")
        if self.domain == "spatial" and self.resolution < 64:
            raise ValueError("--domain spatial needs --resolution 64 or more (objects must cover 2x2 tokens)")

    def model_config(self):
        from tpm.testbed.models import TestbedModelConfig

        return TestbedModelConfig(
            backbone=self.backbone, domain=self.domain, resolution=self.resolution, latent_channels=self.latent_channels,
            vae_channels=tuple(self.vae_channels), max_sequence_length=self.max_sequence_length,
            num_heads=self.num_heads, head_dim=self.head_dim,
            num_layers=self.num_layers, num_single_layers=self.num_single_layers,
            num_inference_steps=self.num_inference_steps, guidance_scale=self.guidance_scale,
        )


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
        return {"mean_loc": cfg.time_loc, "mean_scale": cfg.time_scale, "p_sync": cfg.p_sync,
                "max_spread": cfg.max_spread}
    return {}


def train_testbed(cfg: TrainTestbedConfig) -> dict:
    """Train a testbed pipeline end to end and save it to ``<output_dir>/pipeline``.

    Stages: render ``num_images`` train-split images of ``cfg.domain``; fit (or load) the VAE and
    normalise its latents; train transformer + text encoders with the flow-matching loss under the
    chosen time sampler, logging to tensorboard (accelerate trackers) and writing a PNG grid per
    epoch; save the EMA weights. Every ``save_minutes`` and at a ``max_minutes`` stop the training
    state goes to ``<output_dir>/state/``; the same command then resumes from it (the VAE from
    ``<output_dir>/vae``, the data re-rendered from the same seeds), so a run can be spread over
    several invocations and survives a kill. Single process (CPU or one GPU). Returns timings and sizes.
    """
    from accelerate import Accelerator
    from diffusers import AutoencoderKL
    from diffusers.training_utils import EMAModel

    from tpm.backbones import get_backbone
    from tpm.testbed.models import build_pipeline, build_vae, load_pipeline, save_pipeline
    from tpm.testbed.splits import sample_prompts
    from tpm.testbed.timestep_samplers import get_timestep_sampler
    from tpm.testbed.train import STATE_DIR, load_training_state, save_training_state

    torch.set_num_threads(cfg.threads)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    resuming = cfg.resume and ((out / STATE_DIR).exists() or (out / (STATE_DIR + ".old")).exists())
    acc = Accelerator(log_with="tensorboard", project_dir=str(out))
    if acc.num_processes > 1:
        raise RuntimeError("train_testbed runs in one process (the models are tiny); launch without --multi_gpu")
    hparams = {k: v for k, v in vars(cfg).items() if isinstance(v, (int, float, str, bool))}
    acc.init_trackers("train_testbed", config=hparams)
    log = acc.log
    device = acc.device
    mcfg = cfg.model_config()
    t_start = time.time()

    data = render_dataset(cfg.num_images, cfg.resolution, split="train", seed=cfg.seed, domain=cfg.domain)
    t_vae = time.time()
    vae_path = cfg.vae_path or (str(out / "vae") if resuming and (out / "vae").is_dir() else None)
    if vae_path:
        vae = AutoencoderKL.from_pretrained(vae_path, torch_dtype=torch.float32).to(device)
    else:
        torch.manual_seed(cfg.seed)
        vae = build_vae(mcfg).to(device)
        train_vae(vae, data.images, steps=cfg.vae_steps, batch_size=cfg.vae_batch_size, seed=cfg.seed,
                  log=lambda d, s: log(d, step=s))
    vae.eval()
    latents = fit_latent_normalization(vae, data.images)
    if not vae_path:
        vae.save_pretrained(out / "vae")
    t_vae = time.time() - t_vae

    pipe = build_pipeline(mcfg, vae=vae, seed=cfg.seed).to(device)
    bb = get_backbone(pipe)
    names = ["transformer", "text_encoder", "text_encoder_2"] + (["text_encoder_3"] if cfg.backbone == "sd3" else [])
    trainable = {n: pipe.components[n] for n in names}
    if cfg.init_from:
        src = load_pipeline(cfg.init_from)
        for n in names:
            pipe.components[n].load_state_dict(src.components[n].state_dict())
    params = [p for m in trainable.values() for p in m.parameters()]
    opt = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(cfg.warmup_steps, cfg.steps))
    ema = EMAModel(params, decay=cfg.ema_decay)
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    start_step, loss_avg, seconds_before = 0, None, 0.0
    if resuming:
        info = load_training_state(out, trainable, ema=ema, optimizer=opt, scheduler=sched, generator=gen)
        start_step, loss_avg = info["step"], info.get("loss_avg")
        seconds_before = info.get("seconds_transformer", 0.0)
        print(f"resuming {out} at step {start_step} of {cfg.steps}", file=sys.stderr)
    opt, sched = acc.prepare(opt, sched)
    sampler = get_timestep_sampler(cfg.timestep_sampler, **_time_kwargs(cfg))
    h = w = cfg.resolution // mcfg.token_size
    grid_prompts = [it.prompt for it in sample_prompts(cfg.grid_prompts, split="val", seed=cfg.seed, domain=cfg.domain)]
    steps_per_epoch = max(1, cfg.num_images // cfg.batch_size)

    def save_grid(tag: str) -> None:
        ema.store(params)
        ema.copy_to(params)
        sample_grid(pipe, grid_prompts, seed=cfg.seed).save(out / f"samples_{tag}.png")
        ema.restore(params)

    def save_state(step: int, seconds: float) -> None:
        save_training_state(out, trainable, ema=ema, optimizer=opt, scheduler=sched, generator=gen, step=step,
                            extra={"loss_avg": loss_avg, "seconds_transformer": seconds})

    t_train = time.time()
    t_saved = t_train
    for m in trainable.values():
        m.train()
    bar = tqdm(range(start_step, cfg.steps), initial=start_step, total=cfg.steps,
               desc=f"train {cfg.backbone}/{cfg.domain}/{cfg.timestep_sampler}", disable=not acc.is_local_main_process)
    steps_done = start_step
    for step in bar:
        idx = torch.randint(len(latents), (cfg.batch_size,), generator=gen)
        prompts = [
            "" if float(u) < cfg.cond_dropout else data.prompts[i]
            for i, u in zip(idx.tolist(), torch.rand(cfg.batch_size, generator=gen))
        ]
        x0 = bb.pack_latents(latents[idx].to(device))
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
        steps_done = step + 1
        now = time.time()
        out_of_time = (cfg.max_minutes is not None and now - t_train > 60 * cfg.max_minutes) or (
            cfg.stop_step is not None and steps_done >= cfg.stop_step
        )
        last = steps_done == cfg.steps or out_of_time
        if steps_done % steps_per_epoch == 0 or last:
            for m in trainable.values():
                m.eval()
            save_grid("final" if last else f"epoch{steps_done // steps_per_epoch:03d}")
            for m in trainable.values():
                m.train()
        if last or now - t_saved > 60 * cfg.save_minutes:
            save_state(steps_done, seconds_before + now - t_train)
            t_saved = now
        if out_of_time:
            break
    t_train = seconds_before + time.time() - t_train
    ema.copy_to(params)
    for m in trainable.values():
        m.eval()
    n_params = {name: sum(p.numel() for p in c.parameters())
                for name, c in pipe.components.items() if isinstance(c, torch.nn.Module)}
    report = {
        "backbone": cfg.backbone,
        "domain": cfg.domain,
        "timestep_sampler": cfg.timestep_sampler,
        "seconds_total": round(time.time() - t_start, 1),
        "seconds_vae": round(t_vae, 1),
        "seconds_transformer": round(t_train, 1),
        "steps_done": steps_done,
        "steps_planned": cfg.steps,
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


def parse_args(argv: list[str]) -> TrainTestbedConfig:
    parser = HfArgumentParser(TrainTestbedConfig)
    if len(argv) >= 2 and argv[0] == "--config":
        import yaml

        with open(argv[1]) as f:
            defaults = yaml.safe_load(f) or {}
        parser.set_defaults(**defaults)
        argv = argv[2:]
    (cfg,) = parser.parse_args_into_dataclasses(args=argv)
    return cfg


def main(argv: list[str] | None = None) -> dict:
    """Parse, train, print the report; a bad option becomes one line and exit status 1."""
    try:
        cfg = parse_args(sys.argv[1:] if argv is None else argv)
    except ValueError as e:  # TrainTestbedConfig's checks
        raise SystemExit(f"error: {e}") from None
    report = train_testbed(cfg)
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
