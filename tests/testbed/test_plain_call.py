"""Testbed pipelines called plainly, ``pipe(prompt)``, use the trained resolution, text length, steps, CFG.

The reference is what the README documents for a plain diffusers pipeline loaded from the same
folder: ``FluxPipeline.from_pretrained(folder, torch_dtype=torch.float32)`` called with the
explicit testbed arguments. Both run the same computation on the same batch, so the images must
agree to float32 round-off (1e-6); without the defaults the plain call would pad the prompt to
512 / 256 tokens and draw 1024-pixel images, and these tests fail.
"""

import json

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline, FluxPipeline, StableDiffusion3Pipeline

from tpm.testbed.models import (
    CHECKPOINT_DIR,
    TestbedModelConfig,
    build_pipeline,
    call_kwargs,
    load_pipeline,
    save_pipeline,
)
from tpm.testbed.pipelines import TestbedFluxPipeline, TestbedSD3Pipeline

PROMPTS = ["a red circle above a blue square", "two green triangles"]
PLAIN = {"flux": FluxPipeline, "sd3": StableDiffusion3Pipeline}


def _gen():
    return torch.Generator().manual_seed(0)


@pytest.mark.parametrize("name", ["flux", "sd3"])
def test_shipped_pipeline_called_plainly_equals_the_documented_explicit_call(name, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pipe = load_pipeline(name)
    assert isinstance(pipe, PLAIN[name])
    plain_images = pipe(PROMPTS, generator=_gen(), output_type="np").images

    reference = PLAIN[name].from_pretrained(CHECKPOINT_DIR / name, torch_dtype=torch.float32)
    assert type(reference) is PLAIN[name]  # model_index.json names the diffusers class
    # what the README tells plain users to pass (CFG strength 1: SD3's guidance_scale, Flux's true CFG)
    explicit = {"height": 32, "width": 32, "max_sequence_length": 10, "num_inference_steps": 20,
                **({"guidance_scale": 1.0} if name == "sd3" else {"true_cfg_scale": 1.0})}
    assert explicit == call_kwargs(pipe)
    ref_images = reference(PROMPTS, generator=_gen(), output_type="np", **explicit).images
    assert plain_images.shape == (2, 32, 32, 3)
    np.testing.assert_allclose(plain_images, ref_images, atol=1e-6, rtol=0)


def test_arguments_the_caller_passes_win_and_prompt_may_be_positional():
    cfg = TestbedModelConfig(backbone="flux", vae_channels=(8, 8), latent_channels=4, head_dim=16, num_heads=2,
                             num_layers=1, num_single_layers=1, text_dim=16, t5_dim=32, text_layers=1,
                             num_inference_steps=2)
    pipe = build_pipeline(cfg)
    assert isinstance(pipe, TestbedFluxPipeline)
    a = pipe("a red circle", generator=_gen(), output_type="np", height=16, width=16, num_inference_steps=3).images
    b = FluxPipeline.__call__(pipe, "a red circle", generator=_gen(), output_type="np",
                              **call_kwargs(pipe, height=16, width=16, num_inference_steps=3)).images
    assert a.shape == (1, 16, 16, 3)
    np.testing.assert_allclose(a, b, atol=1e-6, rtol=0)
    # a Flux-specific argument by position-free keyword still reaches the parent unchanged
    c = pipe(prompt="a red circle", generator=_gen(), output_type="np", max_sequence_length=6).images
    d = FluxPipeline.__call__(pipe, prompt="a red circle", generator=_gen(), output_type="np",
                              **call_kwargs(pipe, max_sequence_length=6)).images
    np.testing.assert_allclose(c, d, atol=1e-6, rtol=0)


@pytest.mark.parametrize("backbone", ["flux", "sd3"])
def test_saved_folder_is_a_plain_diffusers_folder_and_the_subclass_reads_its_defaults(tmp_path, backbone):
    cfg = TestbedModelConfig(backbone=backbone, vae_channels=(8, 8), latent_channels=4, head_dim=16, num_heads=2,
                             num_layers=1, num_single_layers=1, text_dim=16, t5_dim=32, text_layers=1,
                             max_sequence_length=7, num_inference_steps=2)
    pipe = build_pipeline(cfg)
    pipe.save_pretrained(tmp_path / "p")  # the subclass's own save_pretrained
    index = json.loads((tmp_path / "p" / "model_index.json").read_text())
    assert index["_class_name"] == PLAIN[backbone].__name__
    assert TestbedModelConfig.from_json((tmp_path / "p" / "testbed.json").read_text()) == cfg
    assert type(DiffusionPipeline.from_pretrained(tmp_path / "p")) is PLAIN[backbone]
    sub = {"flux": TestbedFluxPipeline, "sd3": TestbedSD3Pipeline}[backbone]
    loaded = sub.from_pretrained(tmp_path / "p")
    assert loaded.tpm_defaults == cfg.defaults
    save_pipeline(pipe, tmp_path / "q", cfg, dtype=torch.float32)
    assert type(load_pipeline(tmp_path / "q")) is sub
    np.testing.assert_allclose(loaded("a red circle", generator=_gen(), output_type="np").images,
                               pipe("a red circle", generator=_gen(), output_type="np").images, atol=1e-5)
