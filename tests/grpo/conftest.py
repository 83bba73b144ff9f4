"""Shared tiny pieces for the GRPO tests: a tiny random Flux pipeline, a small TPM, a cheap reward."""

from __future__ import annotations

import pytest
import torch

import policies
from tpm.tiny import tiny_flux_pipeline

PROMPTS = ["a red circle", "two blue squares", "a green triangle", "a yellow square on the left"]


@pytest.fixture(scope="session")
def flux_pipe():
    return tiny_flux_pipeline()


def small_tpm(pipe, cls=None, seed: int = 0, **options):
    torch.manual_seed(seed)
    cls = cls or policies.TPM
    opts = {"width": 32, "heads": 2, "layers": 2, "image_grid": 4, "text_tokens": 2, **options}
    return cls.for_pipeline(pipe, **opts)


def brightness(images, prompts):
    """A cheap deterministic reward: mean pixel value per image."""
    return images.float().mean(dim=(1, 2, 3))


@pytest.fixture(scope="module")
def testbed_flux(tmp_path_factory):
    """A saved testbed Flux folder of the smallest size, for runs of ``tpm train`` in a subprocess."""
    from tpm.testbed.models import TestbedModelConfig, build_pipeline, save_pipeline

    cfg = TestbedModelConfig(backbone="flux", vae_channels=(8, 8), latent_channels=4, text_dim=16, t5_dim=32,
                             num_heads=2, head_dim=16, num_layers=1, num_single_layers=1, text_layers=1)
    path = tmp_path_factory.mktemp("tb") / "flux"
    save_pipeline(build_pipeline(cfg), path, cfg, dtype=torch.float32)
    return path
