"""Session-scoped tiny pipelines for the core tests (see ``helpers.py``)."""

from __future__ import annotations

import pytest
import torch

from .helpers import shared_pipeline


@pytest.fixture(scope="session")
def flux_pipe():
    return shared_pipeline("flux")


@pytest.fixture(scope="session")
def flux_guidance_pipe():
    return shared_pipeline("flux_guidance")


@pytest.fixture(scope="session")
def sd3_pipe():
    return shared_pipeline("sd3")


@pytest.fixture(scope="session")
def sd35_pipe():
    return shared_pipeline("sd35")


@pytest.fixture(autouse=True)
def _seed_and_threads():
    # One intra-op thread: these models are tiny, and on a shared 2-core machine multi-threaded
    # small ops spend most of their time waiting for each other.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield
    torch.set_num_threads(threads)
