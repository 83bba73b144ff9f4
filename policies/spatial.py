"""Spatial schedules: inpainting, outpainting, autoregressive raster groups (AsyncPatch §3.2).

A spatial schedule decides *where* the image is generated, not how fast: each token follows the
pipeline's own time grid, but on its own clock.

- :class:`Inpaint` (AsyncPatch Eq. 4-5). Known tokens start clean and stay at time 0; the
  others start from noise and follow the synchronous grid to 0. The model sees the clean
  context at every step, so (for a backbone trained on mixed per-token times, like the
  ``flux-asyncpatch`` testbed model) the update of the missing tokens is the conditional
  generation of the missing region given the known one, with no copy-pasting and no fine-tuning.
  The known latents reach the sampler through :meth:`tpm.policy.Policy.known_region`, which
  writes them in before the first step and keeps them bit-exact; input guidance (AsyncPatch §3.3)
  is the sampler's ``input_guidance=`` option.
- Outpainting is inpainting with the known region inside the canvas
  (:func:`outpaint_policy`).
- :class:`Raster` (AsyncPatch §3.2, "autoregressive generation"). The grid is cut into groups in
  raster order; during stage g only group g is denoised (over its share of the K steps, along the
  pipeline's grid compressed into that stage), earlier groups are already clean and later ones
  are still pure noise. Time disparities here are maximal (0 next to 1): a backbone trained only
  on synchronous times will not cope (AsynDM App. D.2); use a model trained like AsyncPatch.

Masks follow diffusers' convention: white (1) = the region to generate, black (0) = keep. A
token is known only if none of its pixels is to be generated. The pixels to generate are set to
the known pixels' mean colour before VAE encoding so that nothing of what they held leaks into
neighbouring latents (AsyncPatch App. E trains a mask-aware autoencoder for the same reason; we
cannot, so known tokens next to the hole still see the filled colour through the encoder).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from tpm.fields import grid_time, synchronous_next
from tpm.policy import Action, KnownRegion, Policy, PolicyError, State, register_policy


# --------------------------------------------------------------------------------------------
# Inpainting / outpainting
# --------------------------------------------------------------------------------------------
@dataclass
class InpaintConfig:
    latent_shape: list[int] | None = None  # (B or 1, N, C_tok) of the known latents, set by the builder
    grid: list[int] | None = None  # (h, w) token grid the mask is on

    def __post_init__(self):
        if self.latent_shape is not None and len(self.latent_shape) != 3:
            raise PolicyError(f"latent_shape must be (B, N, C_tok), got {self.latent_shape}")
        if self.grid is not None and len(self.grid) != 2:
            raise PolicyError(f"grid must be (h, w), got {self.grid}")


@register_policy("inpaint")
class Inpaint(Policy):
    """Known tokens held at time 0 from the start; the rest on the synchronous grid (Eq. 4).

    Build with :func:`inpaint_policy` (image + mask -> latents), or directly from
    ``image_latents`` (B or 1, N, C_tok) and ``known`` (B or 1, h, w) bool.
    """

    paper = "AsyncPatch Diffusion: spatially-flexible image generation (zero-shot inpainting as a spatial schedule, §3.2-3.3)"

    config_class = InpaintConfig

    def __init__(self, config: InpaintConfig | None = None, image_latents: torch.Tensor | None = None,
                 known: torch.Tensor | None = None, **kwargs):
        if image_latents is not None or known is not None:
            if image_latents is None or known is None:
                raise PolicyError("Inpaint needs both image_latents and known (or use policies.spatial.inpaint_policy)")
            known = torch.as_tensor(known)
            if known.ndim == 2:
                known = known[None]
            if known.dtype != torch.bool:
                raise PolicyError(f"known must be a bool mask on the token grid, got {known.dtype}")
            if image_latents.ndim != 3:
                raise PolicyError(f"image_latents must be tokens (B, N, C_tok), got shape {tuple(image_latents.shape)}")
            if image_latents.shape[1] != known.shape[1] * known.shape[2]:
                raise PolicyError(f"image_latents has {image_latents.shape[1]} tokens but the mask grid "
                                  f"{tuple(known.shape[1:])} has {known.shape[1] * known.shape[2]}")
            kwargs["latent_shape"] = list(image_latents.shape)
            kwargs["grid"] = list(known.shape[1:])
        super().__init__(config, **kwargs)
        if self.config.latent_shape is None or self.config.grid is None:
            raise PolicyError("Inpaint needs the known image: build it with "
                              "policies.spatial.inpaint_policy(pipe, image, mask)")
        b = self.config.latent_shape[0]
        if image_latents is None:  # placeholders filled by from_pretrained
            image_latents = torch.zeros(self.config.latent_shape)
            known = torch.zeros(b, *self.config.grid, dtype=torch.bool)
        self.register_buffer("image_latents", image_latents.detach().float().clone())
        self.register_buffer("known", known.detach().clone())

    def known_region(self) -> KnownRegion:
        return KnownRegion(tokens=self.image_latents, mask=self.known)

    def act(self, state: State) -> Action:
        if tuple(state.grid) != tuple(self.config.grid):
            raise PolicyError(
                f"this inpainting policy was built for a {self.config.grid[0]}x{self.config.grid[1]} token grid, "
                f"but sampling runs on {state.grid[0]}x{state.grid[1]}; sample at the image's height and width"
            )
        known = self.known.to(state.tau.device).expand_as(state.tau)
        tau_next = torch.where(known, torch.zeros_like(state.tau), synchronous_next(state))
        return Action(tau_next=tau_next, mask=~known)


def _to_mask_array(mask) -> np.ndarray:
    """A binary (H, W) float array from a PIL image / array / tensor; 1 = generate."""
    from PIL import Image

    if isinstance(mask, Image.Image):
        arr = np.asarray(mask.convert("L"), dtype=np.float64) / 255.0
    else:
        arr = torch.as_tensor(mask).detach().cpu().double().numpy()
        if arr.ndim == 3 and arr.shape[0] == 1:
            arr = arr[0]
        if arr.ndim != 2:
            raise PolicyError(f"mask must be a single-channel (H, W) image, got shape {arr.shape}")
        if arr.max(initial=0) > 1:
            arr = arr / 255.0
    bad = ~np.isin(arr, (0.0, 1.0))
    if bad.any():
        raise PolicyError(
            f"the mask must be binary (black = keep, white = generate); {int(bad.sum())} pixels are neither "
            "(e.g. anti-aliased edges): threshold it first"
        )
    return arr


def _to_image_tensor(image) -> torch.Tensor:
    """(1, 3, H, W) in [0, 1] from a PIL image, an (H, W, 3) array or a (3, H, W) / (1, 3, H, W) tensor
    in [0, 1]. We do not use the pipeline's image processor here: it silently resizes images whose
    size does not fit the VAE, and an inpainting mask must stay aligned with its image."""
    from PIL import Image

    if isinstance(image, Image.Image):
        t = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0).permute(2, 0, 1)
    elif isinstance(image, np.ndarray):
        t = torch.from_numpy(image.astype(np.float32))
        t = t.permute(2, 0, 1) if t.ndim == 3 and t.shape[-1] == 3 else t
    else:
        t = torch.as_tensor(image, dtype=torch.float32)
    if t.ndim == 3:
        t = t[None]
    if t.ndim != 4 or t.shape[:2] != (1, 3):
        raise PolicyError(f"image must be one RGB image (PIL, (H, W, 3) array or (3, H, W) tensor), got {tuple(t.shape)}")
    if float(t.min()) < 0 or float(t.max()) > 1:
        raise PolicyError("image tensors must hold values in [0, 1]")
    return t


def encode_image(pipe, image: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) in [-1, 1] -> the backbone's latent tokens (B, N, C_tok), VAE posterior mean,
    normalised and packed as the pipeline's own latents are (:meth:`tpm.backbones.Backbone.encode_images`)."""
    from tpm.backbones import get_backbone

    bb = get_backbone(pipe)
    return bb.to_tokens(bb.encode_images(image)).float()


@torch.no_grad()
def inpaint_policy(pipe, image, mask) -> Inpaint:
    """An :class:`Inpaint` policy for ``pipe`` from an image and a binary mask (white = generate).

    The image's size is the sampling size (pass it as ``height``/``width`` to ``tpm.sample``); it
    must be divisible by the backbone's token size, and the mask must have the same size.
    """
    from tpm.backbones import get_backbone

    bb = get_backbone(pipe)
    img = _to_image_tensor(image)
    h_px, w_px = img.shape[-2:]
    fill = _to_mask_array(mask)
    if fill.shape != (h_px, w_px):
        raise PolicyError(f"mask is {fill.shape[1]}x{fill.shape[0]} (WxH) but the image is {w_px}x{h_px}; "
                          "they must have the same size")
    ts = bb.token_size
    if h_px % ts or w_px % ts:
        raise PolicyError(f"image size {w_px}x{h_px} must be divisible by {ts} (the backbone's token size); "
                          "resize or crop it")
    fill_t = torch.from_numpy(fill).float()
    img = 2 * img - 1  # [-1, 1] as the VAE expects
    keep = 1 - fill_t
    # To-generate pixels take the known pixels' mean colour: what they held cannot leak into the
    # known latents, and a neutral colour draws a weaker edge around the hole than black or grey.
    mean = (img * keep).sum((-2, -1), keepdim=True) / keep.sum().clamp(min=1)
    img = img * keep + mean * fill_t
    tokens = encode_image(pipe, img)
    grid = (h_px // ts, w_px // ts)
    # A token is known only if none of its pixels is to be generated.
    fill_tok = torch.nn.functional.max_pool2d(fill_t[None, None], ts)[0]
    known = fill_tok < 0.5
    return Inpaint(image_latents=tokens.cpu(), known=known.reshape(1, *grid))


def outpaint_policy(pipe, image, height: int, width: int, top: int = 0, left: int = 0) -> Inpaint:
    """Outpainting: ``image`` placed at (``top``, ``left``) on a ``height`` x ``width`` canvas; the
    rest is generated. Returns an :class:`Inpaint` policy (sample at ``height`` x ``width``)."""
    img = _to_image_tensor(image)
    ih, iw = img.shape[-2:]
    if top < 0 or left < 0 or top + ih > height or left + iw > width:
        raise PolicyError(f"a {iw}x{ih} image at (top={top}, left={left}) does not fit a {width}x{height} canvas")
    canvas = torch.full((1, 3, height, width), 0.5)
    canvas[..., top:top + ih, left:left + iw] = img
    mask = torch.ones(height, width)
    mask[top:top + ih, left:left + iw] = 0
    return inpaint_policy(pipe, canvas, mask)


# --------------------------------------------------------------------------------------------
# Autoregressive raster groups
# --------------------------------------------------------------------------------------------
@dataclass
class RasterConfig:
    rows_per_group: int = 1  # token rows in one group
    cols_per_group: int | None = None  # token columns in one group; None = the whole row

    def __post_init__(self):
        if self.rows_per_group < 1 or (self.cols_per_group is not None and self.cols_per_group < 1):
            raise PolicyError("rows_per_group and cols_per_group must be >= 1")


def raster_groups(grid: tuple[int, int], rows: int, cols: int | None) -> torch.Tensor:
    """(h, w) long tensor: each token's group index, groups numbered in raster order."""
    h, w = grid
    cols = w if cols is None else min(cols, w)
    r = torch.arange(h)[:, None] // rows
    c = torch.arange(w)[None, :] // cols
    per_row = -(-w // cols)
    return r * per_row + c


def stage_bounds(num_steps: int, num_groups: int) -> list[int]:
    """Step index where each stage starts (num_groups + 1 values, last = K), as even as possible."""
    return [g * num_steps // num_groups for g in range(num_groups + 1)]


@register_policy("raster")
class Raster(Policy):
    """AsyncPatch's autoregressive schedule: groups denoised one after another in raster order."""

    paper = "AsyncPatch Diffusion: spatially-flexible image generation (autoregressive raster schedule, §3.2)"

    config_class = RasterConfig

    def act(self, state: State) -> Action:
        k, n = state.step, state.num_steps
        groups = raster_groups(state.grid, self.config.rows_per_group, self.config.cols_per_group)
        g_count = int(groups.max()) + 1
        if n < g_count:
            raise PolicyError(f"the raster schedule has {g_count} groups and needs at least that many steps; "
                              f"got num_inference_steps={n} (use more steps or larger groups)")
        bounds = stage_bounds(n, g_count)
        stage = max(g for g in range(g_count) if bounds[g] <= k)
        start, length = bounds[stage], bounds[stage + 1] - bounds[stage]
        # The active group walks the whole grid (position 0 -> K) within its stage.
        pos = torch.tensor(n * (k + 1 - start) / length, dtype=torch.float64)
        t_active = grid_time(state.sigmas.to(torch.float64), pos).to(state.tau.dtype)
        groups = groups.to(state.tau.device).expand_as(state.tau)
        tau_next = torch.where(groups < stage, torch.zeros_like(state.tau),
                               torch.where(groups == stage, t_active, state.sigmas[0].to(state.tau.dtype)))
        if k + 1 == n:
            tau_next = torch.zeros_like(tau_next)
        return Action(tau_next=tau_next, mask=groups == stage)

