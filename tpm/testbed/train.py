"""Pieces of the testbed training recipe (``recipes/train_testbed.py``): rendered data, the VAE
fit, the flow-matching loss with a per-token time field, and sample grids.

Flow matching per token (time 1 = noise, 0 = clean): ``x_tau = (1 - tau) x0 + tau * noise`` with
``tau`` a (B, h, w) field from ``tpm.testbed.timestep_samplers``; the model predicts the velocity
``noise - x0`` and the loss is its mean squared error (SD3 / Flux training objective, applied per
token as in AsyncPatch §3.1). The model is queried through the backbone adapter
(``tpm.backbones``), whose forward takes a per-token time and equals the stock forward on uniform
fields, so synchronous and AsyncPatch training share one code path.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm

__all__ = [
    "RenderedData",
    "flow_matching_loss",
    "render_dataset",
    "train_vae",
    "fit_latent_normalization",
    "sample_grid",
    "save_training_state",
    "load_training_state",
]


@dataclass
class RenderedData:
    """Rendered ground-truth images (N, 3, R, R) in [-1, 1] and their prompts."""

    images: torch.Tensor
    prompts: list[str]


def render_dataset(n: int, resolution: int, split: str = "train", seed: int = 0, progress: bool = True,
                   domain: str = "shapes") -> RenderedData:
    """``n`` prompts of ``split`` of ``domain`` (categories drawn uniformly), each rendered once with its
    own seed: ``"shapes"`` by :func:`tpm.testbed.render.render`, ``"spatial"`` by
    :func:`tpm.testbed.spatial.render_spatial` (backgrounds with content, up to four objects)."""
    from tpm.testbed.render import render
    from tpm.testbed.spatial import render_spatial
    from tpm.testbed.splits import sample_prompts

    draw = render_spatial if domain == "spatial" else render
    items = sample_prompts(n, split=split, seed=seed, domain=domain)
    arr = np.empty((n, resolution, resolution, 3), dtype=np.uint8)
    for i, it in enumerate(tqdm(items, desc="render", disable=not progress)):
        arr[i] = np.asarray(draw(it.spec, size=resolution, seed=seed * 1_000_003 + i).convert("RGB"))
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


@torch.no_grad()
def sample_grid(pipe, prompts: list[str], seed: int = 0, **overrides) -> Image.Image:
    """One image per prompt with the pipeline's testbed defaults, tiled into a grid (8 per row)."""
    from tpm.plots import image_grid
    from tpm.testbed.models import call_kwargs

    gen = torch.Generator().manual_seed(seed)
    images = pipe(prompts, generator=gen, **call_kwargs(pipe, **overrides)).images
    return image_grid(images, cols=min(8, len(images)), pad=2)


STATE_DIR = "state"
_STATE_FILE = "training_state.pt"
_STEP_FILE = "step.json"


def save_training_state(out_dir, modules: dict, *, ema, optimizer, scheduler, generator: torch.Generator,
                        step: int, extra: dict) -> None:
    """Write a resumable training state to ``<out_dir>/state/``, atomically (temp folder + rename).

    Module weights go to one safetensors file each; optimizer, scheduler, EMA and the data
    generator's state to a file that ``torch.load(weights_only=True)`` reads (tensors, numbers and
    lists only: no pickled objects); the step and ``extra`` (e.g. the running loss) to JSON. A kill
    during the write leaves the previous state whole.
    """
    import json
    import os
    import shutil
    from pathlib import Path

    from safetensors.torch import save_model

    out_dir = Path(out_dir)
    tmp = out_dir / (STATE_DIR + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name, m in modules.items():
        save_model(m, str(tmp / f"{name}.safetensors"))  # handles tied weights (T5's shared embedding)
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "ema": ema.state_dict(),
                "generator": generator.get_state()}, tmp / _STATE_FILE)
    (tmp / _STEP_FILE).write_text(json.dumps({"step": step, **extra}))
    final = out_dir / STATE_DIR
    old = out_dir / (STATE_DIR + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def load_training_state(out_dir, modules: dict, *, ema, optimizer, scheduler, generator: torch.Generator) -> dict | None:
    """Restore what :func:`save_training_state` wrote; returns its JSON (``step`` + extra) or None when
    there is no state. A state folder missing a file raises ``RuntimeError`` saying how to start over."""
    import json
    from pathlib import Path

    from safetensors.torch import load_model

    root = Path(out_dir)
    final = root / STATE_DIR
    if not final.exists() and (root / (STATE_DIR + ".old")).exists():  # killed between the two renames
        final = root / (STATE_DIR + ".old")
    if not final.exists():
        return None
    try:
        for name, m in modules.items():
            load_model(m, str(final / f"{name}.safetensors"))
        blob = torch.load(final / _STATE_FILE, weights_only=True)
        info = json.loads((final / _STEP_FILE).read_text())
    except (FileNotFoundError, RuntimeError, ValueError) as e:
        raise RuntimeError(f"the training state in {final} is incomplete or corrupt ({e}); delete it or pass "
                           "--no-resume to start over") from None
    optimizer.load_state_dict(blob["optimizer"])
    scheduler.load_state_dict(blob["scheduler"])
    ema.load_state_dict(blob["ema"])
    generator.set_state(blob["generator"])
    return info
