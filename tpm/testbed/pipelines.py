"""Testbed pipelines that are right when called plainly: ``pipe(prompt)`` uses the trained defaults.

A diffusers pipeline cannot store call defaults: ``FluxPipeline.__call__`` pads every prompt to
``max_sequence_length=512`` tokens and ``StableDiffusion3Pipeline`` to 256, while the testbed
models were trained on 10 text tokens and 32-pixel images. Called with the library's defaults
they see hundreds of padding tokens they never saw in training and draw much worse images.

What we chose: a thin subclass per pipeline family (:class:`TestbedFluxPipeline`,
:class:`TestbedSD3Pipeline`) whose ``__call__`` fills in every argument the caller left out
from the folder's ``testbed.json`` (resolution, ``max_sequence_length``, steps and the CFG
strength, as :func:`call_kwargs` gives them), then runs the parent's
``__call__`` unchanged. Why a subclass rather than a wrapper or a custom pipeline file:

- it is still a ``FluxPipeline`` / ``StableDiffusion3Pipeline`` for ``isinstance``, for
  ``tpm.sample`` (the backbone adapters accept subclasses), ``.to()``, ``.components``,
  callbacks, LoRA loading and every other diffusers feature; nothing is re-implemented;
- a custom pipeline file in the folder would need ``trust_remote_code``, which we never use;
- ``save_pretrained`` keeps the parent's ``_class_name`` in ``model_index.json``, so the folder
  stays an ordinary diffusers folder that plain ``FluxPipeline.from_pretrained`` /
  ``DiffusionPipeline.from_pretrained`` load (they then need the explicit arguments, see the
  README section "Testbed pipelines called plainly").

``TestbedFluxPipeline.from_pretrained(folder)`` reads ``testbed.json`` itself, so the class
works without :func:`tpm.testbed.models.load_pipeline` too. Arguments the caller passes always
win over the defaults. This module does not import :mod:`tpm.testbed.models` (which imports it):
it reads ``testbed.json`` as a plain mapping.
"""

from __future__ import annotations

import functools
import inspect
import json
import os
from pathlib import Path
from typing import Any

from diffusers import FluxPipeline, StableDiffusion3Pipeline

TESTBED_FILE = "testbed.json"

__all__ = ["TESTBED_FILE", "TestbedDefaultsMixin", "TestbedFluxPipeline", "TestbedSD3Pipeline", "call_defaults",
           "call_kwargs", "testbed_class"]


def call_defaults(config: dict[str, Any]) -> dict[str, Any]:
    """``pipe.tpm_defaults`` from a ``testbed.json`` mapping: the call defaults a pipeline cannot store."""
    d = {
        "height": config["resolution"],
        "width": config["resolution"],
        "max_sequence_length": config["max_sequence_length"],
        "num_inference_steps": config["num_inference_steps"],
        "guidance_scale": config["guidance_scale"],
    }
    if config.get("backbone") in ("sd", "sdxl"):  # UNet pipelines take no max_sequence_length (tpm.testbed.unet)
        del d["max_sequence_length"]
    return d


def call_kwargs(pipe, **overrides) -> dict[str, Any]:
    """Keyword arguments for ``pipe(...)`` / ``tpm.sample`` from ``pipe.tpm_defaults``, with the default
    CFG strength passed as the pipeline takes it (:meth:`tpm.backbones.Backbone.sample_kwargs`),
    updated with ``overrides``."""
    from tpm.backbones import get_backbone

    d = dict(getattr(pipe, "tpm_defaults", {}))
    scale = d.pop("guidance_scale", 1.0)
    d.update(get_backbone(pipe).sample_kwargs(scale))
    d.update(overrides)
    return d


class TestbedDefaultsMixin:
    """Call defaults from ``testbed.json`` for a diffusers pipeline class (put it first in the bases).

    ``tpm_defaults`` (``height``, ``width``, ``max_sequence_length``, ``num_inference_steps``,
    ``guidance_scale``) is set by :meth:`from_pretrained` from the folder, or by
    :func:`tpm.testbed.models.load_pipeline` / :func:`tpm.testbed.models.build_pipeline`.
    """

    tpm_defaults: dict[str, Any]
    __test__ = False  # the class names start with "Test"; pytest must not collect them

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        from tpm.tiny import finish_pipeline

        pipe = super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        cfg_file = Path(str(pretrained_model_name_or_path)) / TESTBED_FILE
        if cfg_file.is_file():
            data = json.loads(cfg_file.read_text())
            finish_pipeline(pipe, call_defaults(data))
            pipe.default_sample_size = data["resolution"] // pipe.vae_scale_factor  # height=None: the resolution
            pipe.tpm_testbed_json = cfg_file.read_text()  # written again by save_pretrained
            pipe.tpm_domain = data.get("domain", "shapes")
        return pipe

    def __call__(self, *args, **kwargs):
        parent = _diffusers_parent(type(self)).__call__
        signature = inspect.signature(parent)
        given = signature.bind_partial(self, *args, **kwargs).arguments
        for name, value in call_kwargs(self).items():
            # only what this family's call takes (a UNet pipeline has no max_sequence_length)
            if name not in given and name in signature.parameters:
                kwargs[name] = value
        self._check_call(given.get("prompt"), kwargs.get("height", given.get("height")),
                         kwargs.get("width", given.get("width")))
        return parent(self, *args, **kwargs)

    def _check_call(self, prompt, height, width) -> None:
        """One clear error for what the testbed model cannot draw, instead of diffusers' silent resize
        (sizes) or a picture of unknown words (prompts of the spatial testbed, whose grammar is strict)."""
        factor = getattr(self, "vae_scale_factor", 1) * (2 if hasattr(self, "transformer") else 1)
        for name, value in (("height", height), ("width", width)):
            if value is not None and value % factor:
                raise ValueError(f"{name}={value} is not a multiple of the token size {factor} px of this testbed "
                                 f"model; use e.g. {max(factor, value // factor * factor)}")
        if getattr(self, "tpm_domain", "shapes") != "spatial" or prompt is None:
            return
        from tpm.testbed.grammar import DomainError
        from tpm.testbed.spatial import check_scene

        for p in [prompt] if isinstance(prompt, str) else prompt:
            if p == "":  # the unconditional prompt (classifier-free guidance)
                continue
            try:
                check_scene(p)
            except DomainError as e:
                raise ValueError(f"the spatial testbed cannot draw {p!r}: {e}") from None

    def save_pretrained(self, save_directory: str | os.PathLike, *args, **kwargs):
        """The parent's ``save_pretrained``, then ``model_index.json`` names the parent class (so plain
        diffusers loads the folder) and ``testbed.json`` is written beside it."""
        super().save_pretrained(save_directory, *args, **kwargs)
        index = Path(save_directory) / "model_index.json"
        data = json.loads(index.read_text())
        data["_class_name"] = _diffusers_parent(type(self)).__name__
        index.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
        cfg = getattr(self, "tpm_testbed_config", None)  # a TestbedModelConfig (tpm.testbed.models)
        text = cfg.to_json() if cfg is not None else getattr(self, "tpm_testbed_json", None)
        if text is not None:
            (Path(save_directory) / TESTBED_FILE).write_text(text)


def _diffusers_parent(cls: type) -> type:
    """The first base class that diffusers itself defines (what ``model_index.json`` must name)."""
    for base in cls.__mro__:
        if base.__module__.startswith("diffusers.") and "__call__" in vars(base):
            return base
    raise TypeError(f"{cls.__name__} has no diffusers pipeline among its bases")


def _wrap_call(cls: type) -> type:
    # A fresh function per class that shows the parent's docstring and signature (help(),
    # inspect.signature, IDEs); the work is TestbedDefaultsMixin.__call__.
    @functools.wraps(_diffusers_parent(cls).__call__)
    def __call__(self, *args, **kwargs):
        return TestbedDefaultsMixin.__call__(self, *args, **kwargs)

    cls.__call__ = __call__
    return cls


@_wrap_call
class TestbedFluxPipeline(TestbedDefaultsMixin, FluxPipeline):
    """``FluxPipeline`` whose call defaults are the testbed model's (``testbed.json``)."""


@_wrap_call
class TestbedSD3Pipeline(TestbedDefaultsMixin, StableDiffusion3Pipeline):
    """``StableDiffusion3Pipeline`` whose call defaults are the testbed model's (``testbed.json``)."""


_CLASSES: dict[type, type] = {FluxPipeline: TestbedFluxPipeline, StableDiffusion3Pipeline: TestbedSD3Pipeline}


def testbed_class(pipeline_class: type) -> type:
    """The testbed subclass of a diffusers pipeline class (made once for families added later)."""
    if pipeline_class in _CLASSES.values():
        return pipeline_class
    if pipeline_class not in _CLASSES:
        name = "Testbed" + pipeline_class.__name__
        _CLASSES[pipeline_class] = _wrap_call(type(name, (TestbedDefaultsMixin, pipeline_class),
                                                   {"__module__": __name__, "__doc__": f"``{pipeline_class.__name__}`` "
                                                    "whose call defaults are the testbed model's."}))
    return _CLASSES[pipeline_class]
