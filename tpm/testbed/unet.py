"""The testbed's UNet: an ordinary ``StableDiffusionPipeline`` of tiny size on the shapes domain.

AsynDM's home architecture is an SD-style UNet with DDIM; this builds one for the testbed so its
policies can be measured there with the exact verifier (``tpm compare --model testbed:unet``).

Parts: the shipped testbed Flux's trained ``AutoencoderKL`` (32x32 images -> 8x8x8 latents; SD
pipelines decode ``latents / scaling_factor`` without a shift, so the scale is refit on the data
with no shift), its word-level tokenizer and CLIP text encoder as the starting point (trained on
with the UNet), a two-level ``UNet2DConditionModel`` with cross-attention at both levels, and
``DDIMScheduler`` with SD's noise schedule. Training (``recipes/train_testbed_unet.py``) is the
standard latent-diffusion objective, the same recipe as the Flux testbed otherwise (rendered
train split, AdamW with warm-up and cosine decay, EMA weights, 10 % empty prompts for CFG):
uniform integer timesteps, ``x_t = a_t x0 + b_t eps``, and the MSE to the ``prediction_type``
target (v by default, as SD 2.x's 768 model).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F

__all__ = ["UNetTestbedConfig", "build_unet_pipeline", "diffusion_loss", "model_config"]


@dataclass
class UNetTestbedConfig:
    """Sizes of the testbed UNet pipeline."""

    blocks: list[int] = field(default_factory=lambda: [32, 64])  # channels per UNet level
    heads: int = 4  # attention heads per transformer block
    layers_per_block: int = 1
    norm_groups: int = 8
    prediction_type: str = "v_prediction"  # "epsilon" or "v_prediction"
    num_inference_steps: int = 20
    guidance_scale: float = 1.0
    source: str = "flux"  # shipped testbed checkpoint whose VAE, tokenizer and text encoder start the model


def build_unet_pipeline(cfg: UNetTestbedConfig, images: torch.Tensor | None = None, seed: int = 0):
    """An untrained testbed ``StableDiffusionPipeline``. ``images`` (N, 3, R, R) in [-1, 1], when
    given, refit the VAE's ``scaling_factor`` so the latents have unit variance (no shift)."""
    from diffusers import StableDiffusionPipeline

    from tpm.testbed.models import load_pipeline
    from tpm.tiny import finish_pipeline, sd_scheduler, unet

    src = load_pipeline(cfg.source)
    vae, tok, enc = src.vae, src.tokenizer, src.text_encoder
    vae.register_to_config(shift_factor=None)
    if images is not None:
        with torch.no_grad():
            lat = torch.cat([vae.encode(images[i:i + 256]).latent_dist.mean for i in range(0, len(images), 256)])
        vae.register_to_config(scaling_factor=float(1.0 / lat.std()))
    latent = src.tpm_testbed_config.resolution // src.tpm_testbed_config.vae_factor
    den = unet(blocks=cfg.blocks, cross_attention=[True] * len(cfg.blocks), in_channels=vae.config.latent_channels,
               sample_size=latent, cross_attention_dim=enc.config.hidden_size, heads=cfg.heads,
               layers_per_block=cfg.layers_per_block, norm_groups=cfg.norm_groups, seed=seed)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=enc, tokenizer=tok, unet=den,
                                   scheduler=sd_scheduler("ddim", cfg.prediction_type), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    finish_pipeline(pipe)
    return pipe


def model_config(cfg: UNetTestbedConfig, extra: dict | None = None):
    """The :class:`tpm.testbed.models.TestbedModelConfig` saved beside the pipeline (``testbed.json``)."""
    from tpm.testbed.models import TestbedModelConfig, load_pipeline

    src = load_pipeline(cfg.source).tpm_testbed_config
    return TestbedModelConfig(
        backbone="sd", resolution=src.resolution, vae_channels=src.vae_channels, latent_channels=src.latent_channels,
        text_dim=src.text_dim, text_layers=src.text_layers, max_sequence_length=src.max_sequence_length,
        num_heads=cfg.heads, num_layers=len(cfg.blocks), num_inference_steps=cfg.num_inference_steps,
        guidance_scale=cfg.guidance_scale, extra={"unet": asdict(cfg), **(extra or {})},
    )


def diffusion_loss(unet, x0: torch.Tensor, timesteps: torch.Tensor, embeds: torch.Tensor, noise: torch.Tensor,
                   alphas_cumprod: torch.Tensor, prediction_type: str) -> torch.Tensor:
    """Latent-diffusion loss at integer ``timesteps`` (B,): MSE of the UNet output to the target of
    ``prediction_type`` (``eps``, or ``v = a eps - b x0``)."""
    abar = alphas_cumprod.to(x0.device)[timesteps].view(-1, 1, 1, 1).to(x0.dtype)
    a, b = abar.sqrt(), (1 - abar).sqrt()
    x_t = a * x0 + b * noise
    out = unet(x_t, timesteps, encoder_hidden_states=embeds, return_dict=False)[0]
    target = noise if prediction_type == "epsilon" else a * noise - b * x0
    return F.mse_loss(out.float(), target.float())
