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


@pytest.fixture
def load_recipe():
    """``load_recipe(name)``: the module of ``recipes/<name>.py`` (scripts, not a package)."""

    def load(name: str):
        import sys

        key = f"recipe_{name}"
        spec = importlib.util.spec_from_file_location(key, os.path.join(ROOT, "recipes", f"{name}.py"))
        mod = importlib.util.module_from_spec(spec)
        sys.modules[key] = mod  # dataclasses with string annotations look their module up
        spec.loader.exec_module(mod)
        return mod

    return load
