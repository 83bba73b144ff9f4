"""Backbone adapters: a diffusers pipeline + a transformer forward with a per-token time field.

``get_backbone(pipe)`` picks the adapter for the pipeline's class. Supported:
``FluxPipeline`` (FLUX.1), ``StableDiffusion3Pipeline`` (SD3, SD3.5), ``StableDiffusionPipeline``
(SD 1.x / 2.x UNets) and ``StableDiffusionXLPipeline`` (SDXL).
"""

from tpm.backbones.base import Backbone, BackboneError, Conditioning, Prediction
from tpm.backbones.flux import FluxBackbone, flux_transformer_forward
from tpm.backbones.sd3 import SD3Backbone, sd3_transformer_forward
from tpm.backbones.unet import StableDiffusionBackbone, StableDiffusionXLBackbone

# Explicit registry: pipeline family name -> adapter class; the supported pipelines follow from it.
BACKBONES: dict[str, type[Backbone]] = {"flux": FluxBackbone, "sd3": SD3Backbone, "sd": StableDiffusionBackbone,
                                        "sdxl": StableDiffusionXLBackbone}
SUPPORTED_PIPELINES = tuple(cls.pipeline_class_name for cls in BACKBONES.values())


def get_backbone(pipe, time_resolution: float | None = None, time_levels: int | None = None) -> Backbone:
    """The adapter for ``pipe``; raises :class:`BackboneError` for unsupported pipelines."""
    if isinstance(pipe, Backbone):
        return pipe
    for cls in BACKBONES.values():
        if cls.accepts(pipe):
            return cls(pipe, time_resolution=time_resolution, time_levels=time_levels)
    raise BackboneError(
        f"tpm does not support {type(pipe).__name__}; supported pipelines: {', '.join(SUPPORTED_PIPELINES)}"
    )


__all__ = [
    "BACKBONES",
    "Backbone",
    "BackboneError",
    "Conditioning",
    "FluxBackbone",
    "Prediction",
    "SD3Backbone",
    "SUPPORTED_PIPELINES",
    "StableDiffusionBackbone",
    "StableDiffusionXLBackbone",
    "flux_transformer_forward",
    "get_backbone",
    "sd3_transformer_forward",
]
