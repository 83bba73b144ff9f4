"""The testbed domain in one import: grammar, composition splits and renderer.

The code lives in ``grammar.py`` (prompts and scene specs), ``splits.py`` (train/val/test by
composition, seeded sampling) and ``render.py`` (scene -> image); this module re-exports them so
``from tpm.testbed.domain import render, sample_prompts`` works as the API contract names it.
"""

from tpm.testbed.grammar import (  # noqa: F401
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
from tpm.testbed.render import PlacedObject, draw, layout, relation_holds, render  # noqa: F401
from tpm.testbed.splits import (  # noqa: F401
    OBJECT_TYPES,
    SPLITS,
    PromptItem,
    composition_key,
    enumerate_prompts,
    get_split,
    sample_prompts,
    split_of,
)
