"""What every backbone adapter offers besides the forward: widths, packing, pixels <-> latents, CFG arguments."""

from __future__ import annotations

import pytest
import torch

from tpm.backbones import BACKBONES, SUPPORTED_PIPELINES, FluxBackbone, SD3Backbone, get_backbone
from tpm.tiny import tiny_flux_pipeline, tiny_sd3_pipeline


def test_supported_pipelines_follow_the_registry(flux_pipe, sd3_pipe):
    assert SUPPORTED_PIPELINES == tuple(cls.pipeline_class_name for cls in BACKBONES.values())
    assert FluxBackbone.accepts(flux_pipe) and not FluxBackbone.accepts(sd3_pipe)
    assert SD3Backbone.accepts(sd3_pipe) and not SD3Backbone.accepts(object())


@pytest.mark.parametrize("name", ["flux_pipe", "sd3_pipe"])
def test_widths_match_the_tensors(name, request):
    pipe = request.getfixturevalue(name)
    bb = get_backbone(pipe)
    lat = bb.prepare_latents(1, 32, 32, torch.Generator().manual_seed(0))
    assert bb.to_tokens(lat).shape[-1] == bb.token_dim
    cond = bb.encode(["a red circle"], 1.0)
    assert cond.embeds.shape[-1] == bb.text_dim and cond.pooled.shape[-1] == bb.pooled_dim


@pytest.mark.parametrize("name", ["flux_pipe", "sd3_pipe"])
def test_images_to_latents_and_back(name, request):
    pipe = request.getfixturevalue(name)
    bb = get_backbone(pipe)
    pixels = torch.rand(2, 3, 32, 32) * 2 - 1
    native = bb.encode_images(pixels)
    assert native.shape == bb.prepare_latents(2, 32, 32, torch.Generator().manual_seed(0)).shape
    vae = pipe.vae
    z = vae.encode(pixels).latent_dist.mode()
    assert torch.allclose(bb.unpack_latents(native, 32, 32), (z - (vae.config.shift_factor or 0)) * vae.config.scaling_factor,
                          atol=1e-6)
    assert torch.equal(bb.pack_latents(bb.unpack_latents(native, 32, 32)), native)
    images = bb.decode_images(native, 32, 32, "pt")
    assert images.shape == (2, 3, 32, 32)
    assert torch.allclose(images, ((vae.decode(z).sample + 1) / 2).clamp(0, 1), atol=1e-5)
    assert bb.decode_images(native, 32, 32, "latent") is native


def test_cfg_arguments_as_each_pipeline_takes_them():
    flux = get_backbone(tiny_flux_pipeline())  # no guidance embedding: true CFG with an empty negative
    assert flux.sample_kwargs() == {"true_cfg_scale": 1.0}
    assert flux.sample_kwargs(3.0) == {"true_cfg_scale": 3.0, "negative_prompt": ""}
    dev = get_backbone(tiny_flux_pipeline(guidance_embeds=True))  # FLUX.1-dev style: the guidance embedding
    assert dev.sample_kwargs() == {"guidance_scale": 3.5} and dev.sample_kwargs(2) == {"guidance_scale": 2.0}
    sd3_pipe = tiny_sd3_pipeline()
    sd3 = get_backbone(sd3_pipe)
    assert sd3.sample_kwargs() == {"guidance_scale": 7.0} and sd3.sample_kwargs(4.5) == {"guidance_scale": 4.5}
    sd3_pipe.tpm_defaults["guidance_scale"] = 2.0  # a testbed checkpoint's default wins
    assert sd3.sample_kwargs() == {"guidance_scale": 2.0}
