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
