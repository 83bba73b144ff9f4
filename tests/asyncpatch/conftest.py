"""Tiny random pipelines for the AsyncPatch policy tests (built from config, never downloaded)."""

from __future__ import annotations

import pytest
import torch

from tpm.tiny import tiny_flux_pipeline, tiny_sd3_pipeline


@pytest.fixture(scope="session")
def flux_pipe():
    return tiny_flux_pipeline()


@pytest.fixture(scope="session")
def sd3_pipe():
    return tiny_sd3_pipeline()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
