"""The spatial testbed's scenes: up to four objects of two sizes on a background with content.

The shipped 32-pixel testbed draws one or two flat shapes on a plain light background, 16 tokens
in all, so an object covers one or two tokens and nothing about *where* denoising effort goes
can be expressed. The spatial domain keeps the grammar (:mod:`tpm.testbed.grammar`: single,
two, count, binding, relation) and changes the pictures:

- images are :data:`RESOLUTION` = 64 px (8 x 8 = 64 tokens at the testbed's token size of 8 px);
- at most :data:`MAX_OBJECTS` = 4 shapes per scene ("four red circles", "three green squares and
  a blue circle"); a prompt that needs more is refused with :class:`DomainError`;
- each shape is *small* (boxes of 25-30 % of the side, 16-19 px: at least 2 x 2 tokens) or
  *large* (38-47 %, 24-30 px), drawn per shape, so small objects are the hard ones; a scene
  whose sizes do not fit is laid out again with more small shapes;
- the background is one of :mod:`tpm.testbed.background`'s (a horizon or a gradient, with
  low-contrast texture, in muted tones), never the plain light grey of the 16-token domain.

Shapes are drawn by :func:`tpm.testbed.render.draw` with 4x supersampling (anti-aliased like a
decoder's output), over the background. Written by hand: the layout rules are this domain's own.
"""

from __future__ import annotations

import random

import numpy as np
from PIL import Image, ImageDraw

from tpm.testbed.background import background
from tpm.testbed.grammar import COLORS, DomainError, SceneSpec, as_spec
from tpm.testbed.render import PlacedObject, _apart, _relation_ok

__all__ = [
    "MAX_OBJECTS",
    "RESOLUTION",
    "SIZE_CLASSES",
    "check_scene",
    "render_spatial",
    "spatial_layout",
    "draw_on",
]

RESOLUTION = 64
MAX_OBJECTS = 4
#: box side as a fraction of the image side, per size class
SIZE_CLASSES: dict[str, tuple[float, float]] = {"small": (0.25, 0.30), "large": (0.38, 0.47)}
_P_LARGE = 0.5
_GAP = 0.07  # min gap between boxes, fraction of the side: same-colour shapes never touch
_SUPERSAMPLE = 4


def check_scene(spec: SceneSpec | str) -> SceneSpec:
    """The spec, if the spatial domain can draw it; else :class:`DomainError` saying why."""
    spec = as_spec(spec)
    if spec.n_drawn > MAX_OBJECTS:
        raise DomainError(
            f"{spec.to_prompt()!r} has {spec.n_drawn} objects; the spatial testbed draws at most {MAX_OBJECTS}"
        )
    return spec


def spatial_layout(spec: SceneSpec | str, size: int = RESOLUTION, seed: int = 0) -> list[PlacedObject]:
    """Positions, sizes and colours of every shape of ``spec`` in a ``size`` x ``size`` image.

    Sizes are drawn per shape from :data:`SIZE_CLASSES`; relations hold with the same margin as
    in :func:`tpm.testbed.render.layout`. Deterministic given (spec, size, seed).
    """
    spec = check_scene(spec)
    if size < 32:
        raise DomainError(f"the spatial testbed draws images of >= 32 px, got {size}")
    rng = random.Random(seed)
    colors = [o.color or rng.choice(list(COLORS)) for o in spec.objects]
    wanted = [(i, o.shape, colors[i]) for i, o in enumerate(spec.objects) for _ in range(o.count)]
    gap = _GAP * size
    margin = 0.03 * size
    p_large = _P_LARGE
    for attempt in range(400):
        if attempt and attempt % 40 == 0:
            p_large *= 0.5  # crowded scenes: fewer large shapes until they fit
        placed: list[PlacedObject] = []
        for phrase, shape, color in wanted:
            lo, hi = SIZE_CLASSES["large" if rng.random() < p_large else "small"]
            s = rng.uniform(lo, hi) * size
            for _ in range(60):
                cand = PlacedObject(shape, color, rng.uniform(margin, size - margin - s),
                                    rng.uniform(margin, size - margin - s), s, phrase)
                if all(_apart(cand, p, gap) for p in placed):
                    placed.append(cand)
                    break
            else:
                break
        if len(placed) == len(wanted) and (spec.relation is None or _relation_ok(placed, spec.relation, size)):
            return placed
    raise DomainError(f"could not lay out {spec.to_prompt()!r} in a {size}x{size} image")


def draw_on(base: np.ndarray, objects: list[PlacedObject]) -> Image.Image:
    """Draw ``objects`` over a (size, size, 3) 0-255 background, anti-aliased by supersampling.

    Each shape is rasterised as a coverage mask at 4x and box-downsampled, then blended over the
    background, so edge pixels mix the object colour with whatever lies beneath it.
    """
    size = base.shape[0]
    k = _SUPERSAMPLE
    out = base.astype(np.float32).copy()
    for o in objects:
        m = Image.new("L", (size * k, size * k), 0)
        d = ImageDraw.Draw(m)
        x0, y0, s = o.x * k, o.y * k, o.size * k
        box = [x0, y0, x0 + s - 1, y0 + s - 1]
        if o.shape == "circle":
            d.ellipse(box, fill=255)
        elif o.shape == "square":
            d.rectangle(box, fill=255)
        else:
            d.polygon([(x0, y0 + s - 1), (x0 + s - 1, y0 + s - 1), (x0 + (s - 1) / 2, y0)], fill=255)
        cover = np.asarray(m.resize((size, size), Image.Resampling.BOX), np.float32)[..., None] / 255.0
        out = out * (1 - cover) + np.array(COLORS[o.color], np.float32) * cover
    return Image.fromarray(np.clip(out, 0, 255).round().astype(np.uint8))


def render_spatial(spec: SceneSpec | str, size: int = RESOLUTION, seed: int = 0) -> Image.Image:
    """An RGB ``size`` x ``size`` image of ``spec`` on a seeded background with content."""
    objects = spatial_layout(spec, size, seed)
    return draw_on(background(size, seed=seed * 7 + 3), objects)
