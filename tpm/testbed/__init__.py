"""The embedded testbed: a procedural text-to-image domain of coloured shapes.

``grammar`` (prompts <-> scene specs), ``splits`` (train/val/test by composition), ``render``
(scene -> RGB image) and ``verifier`` (image + prompt -> per-constraint checks and a score).
"""

from tpm.testbed.grammar import (
    BACKGROUND,
    CATEGORIES,
    COLORS,
    MAX_COUNT,
    NUMBERS,
    RELATIONS,
    SHAPES,
    VOCAB,
    DomainError,
    ObjectSpec,
    SceneSpec,
    parse_prompt,
)
from tpm.testbed.render import PlacedObject, layout, render
from tpm.testbed.splits import (
    OBJECT_TYPES,
    SPLITS,
    PromptItem,
    composition_key,
    enumerate_prompts,
    get_split,
    sample_prompts,
    split_of,
)
from tpm.testbed.verifier import Detection, Verifier, VerifyResult

__all__ = [
    "BACKGROUND", "CATEGORIES", "COLORS", "MAX_COUNT", "NUMBERS", "OBJECT_TYPES", "RELATIONS", "SHAPES",
    "SPLITS", "VOCAB", "Detection", "DomainError", "ObjectSpec", "PlacedObject", "PromptItem", "SceneSpec",
    "Verifier", "VerifyResult", "composition_key", "enumerate_prompts", "get_split", "layout",
    "parse_prompt", "render", "sample_prompts", "split_of",
]

# --- backbones (models.py) ---
from tpm.testbed.models import (  # noqa: E402
    SHIPPED,
    TestbedModelConfig,
    build_pipeline,
    call_kwargs,
    load_pipeline,
    save_pipeline,
)

__all__ += ["SHIPPED", "TestbedModelConfig", "build_pipeline", "call_kwargs", "load_pipeline", "save_pipeline"]
