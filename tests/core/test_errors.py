"""User-caused errors in ``tpm.sample`` / ``get_backbone``: one clear message each."""

from __future__ import annotations

import pytest
import torch

import tpm
from tpm.backbones import BackboneError, get_backbone
from tpm.fields import synchronous_next
from tpm.policy import Action, Policy, PolicyError
from tpm.tiny import tiny_sd3_pipeline

from .helpers import shared_pipeline


@pytest.mark.parametrize("name", ["flux", "sd3"])
def test_size_not_divisible_by_token_size(name):
    pipe = shared_pipeline(name)
    factor = get_backbone(pipe).token_size
    assert factor == 2  # VAE factor 1 x (Flux packing 2 | SD3 patch 2)
    with pytest.raises(BackboneError, match=f"divisible by {factor}.*33x32"):
        tpm.sample(pipe, "a cat", height=33, width=32, num_inference_steps=1)
    with pytest.raises(BackboneError, match=f"divisible by {factor}"):
        tpm.sample(pipe, "a cat", height=32, width=35, num_inference_steps=1)


def test_size_error_names_the_real_factor():
    """With a two-level VAE (factor 2) and patch 2, sizes must be multiples of 4."""
    pipe = tiny_sd3_pipeline(vae_blocks=(4, 4))
    assert get_backbone(pipe).token_size == 4
    with pytest.raises(BackboneError, match="divisible by 4.*StableDiffusion3Pipeline.*34x32"):
        tpm.sample(pipe, "a cat", height=34, width=32, num_inference_steps=1)
    out = tpm.sample(pipe, "a cat", height=36, width=32, num_inference_steps=1, output_type="latent")
    assert out.images.shape == (1, 4, 18, 16)


def test_unsupported_pipeline_lists_supported_ones():
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    unet = UNet2DModel(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(8,),
                       norm_num_groups=4, down_block_types=("DownBlock2D",), up_block_types=("UpBlock2D",))
    pipe = DDPMPipeline(unet=unet, scheduler=DDPMScheduler())
    for obj in (pipe, object()):
        with pytest.raises(BackboneError, match=r"does not support .*supported pipelines: FluxPipeline, "
                                                r"StableDiffusion3Pipeline"):
            tpm.sample(obj, "a cat")


@pytest.mark.parametrize("steps", [0, -2])
def test_num_inference_steps_must_be_positive(flux_pipe, steps):
    with pytest.raises(PolicyError, match=f"num_inference_steps must be >= 1, got {steps}"):
        tpm.sample(flux_pipe, "a cat", num_inference_steps=steps, height=32, width=32)
    backbone = get_backbone(flux_pipe)
    x = backbone.prepare_latents(1, 32, 32, torch.Generator().manual_seed(0))
    with pytest.raises(BackboneError, match="num_inference_steps must be >= 1"):
        backbone.set_timesteps(steps, x)


def test_policy_must_be_a_policy(flux_pipe):
    with pytest.raises(PolicyError, match="policy must be a tpm Policy.*policies.load"):
        tpm.sample(flux_pipe, "a cat", policy="synchronous", num_inference_steps=1, height=32, width=32)


def test_prompt_type(flux_pipe):
    with pytest.raises(TypeError, match="prompt must be a string or a list of strings"):
        tpm.sample(flux_pipe, ["a cat", 3], num_inference_steps=1, height=32, width=32)


def test_non_flow_matching_scheduler(flux_pipe):
    from diffusers import DDIMScheduler, FluxPipeline

    pipe = FluxPipeline(**{**flux_pipe.components, "scheduler": DDIMScheduler()})
    with pytest.raises(BackboneError, match="FlowMatchEulerDiscreteScheduler.*DDIMScheduler|DDIMScheduler.*Flow"):
        tpm.sample(pipe, "a cat", num_inference_steps=1, height=32, width=32)


class _FieldPolicy(Policy):
    """Returns ``fn(state)`` as tau_next; for the validation tests below."""

    config_class = dict

    def __init__(self, fn, layers=None):
        super().__init__(config={})
        self.fn, self.layers = fn, layers

    def attention_layers(self, num_layers):
        return self.layers

    def act(self, state):
        return Action(tau_next=self.fn(state))



@pytest.mark.parametrize("layers", [[99], [-1]])
def test_attention_layer_out_of_range(flux_pipe, layers):
    n = get_backbone(flux_pipe).num_attention_layers
    with pytest.raises(ValueError, match=f"attention layer.*{n}"):
        tpm.sample(flux_pipe, "a cat", policy=_FieldPolicy(synchronous_next, layers), num_inference_steps=1,
                   height=32, width=32, output_type="latent")



@pytest.mark.parametrize("kind", ["above-one", "nan", "shape"])
def test_policy_field_is_validated(flux_pipe, kind):
    fns = {
        "above-one": lambda s: torch.full_like(s.tau, 1.5),
        "nan": lambda s: torch.full_like(s.tau, float("nan")),
        "shape": lambda s: s.tau[:, :1, :1] * 0.5,
    }
    with pytest.raises(ValueError, match="tau_next"):
        tpm.sample(flux_pipe, "a cat", policy=_FieldPolicy(fns[kind]), num_inference_steps=2, height=32, width=32,
                   output_type="latent")


def test_empty_prompt_list(flux_pipe):
    with pytest.raises((TypeError, ValueError), match="prompt"):
        tpm.sample(flux_pipe, [], num_inference_steps=1, height=32, width=32)
