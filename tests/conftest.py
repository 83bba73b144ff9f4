"""Shared fixtures for the top-level tests."""

import importlib.util
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def load_benchmark():
    """``load_benchmark(name)``: the module of ``benchmarks/<name>.py`` (scripts, not a package)."""

    def load(name: str):
        spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "benchmarks", f"{name}.py"))
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod

    return load
