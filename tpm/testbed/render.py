"""Render a :class:`SceneSpec` to an RGB image: flat shapes on a plain light background.

Objects are axis-aligned squares, circles and upright triangles (apex up) inside square boxes,
placed at random without overlap (a gap of ~6 % of the image between boxes) and with any
stated relation holding by a wide margin: the centres differ by >= 20 % of the image along the
relation's axis, and by less than that along the other axis. Shapes are drawn with PIL at 4x
and box-downsampled, so edges are anti-aliased like a decoder's output. Box sizes shrink with
the number of objects, never below 7 px, so a 32x32 image holds up to five recognisable shapes.
Written by hand: the layout rules are this domain's own.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from PIL import Image, ImageDraw

from tpm.testbed.grammar import BACKGROUND, COLORS, DomainError, SceneSpec, as_spec

MIN_SIZE = 16
MIN_OBJECT_PX = 7
RELATION_MARGIN = 0.2  # min centre offset along a relation's axis, as a fraction of the image side
_SUPERSAMPLE = 4
# (low, high) box side as a fraction of the image side, by number of shapes drawn
_SIZE_RANGE = {1: (0.30, 0.42), 2: (0.26, 0.34), 3: (0.22, 0.28)}
_SIZE_RANGE_MANY = (0.20, 0.24)


@dataclass(frozen=True)
class PlacedObject:
    """One drawn shape: its box is [x, x + size) x [y, y + size) in pixels of the output image."""

    shape: str
    color: str
    x: float
    y: float
    size: float
    phrase: int  # index of the object phrase in the spec this shape realises

    @property
    def center(self) -> tuple[float, float]:
        return (self.x + self.size / 2, self.y + self.size / 2)


def relation_holds(a: tuple[float, float], b: tuple[float, float], relation: str, margin: float) -> bool:
    """Does centre ``a`` stand in ``relation`` to centre ``b`` (image coordinates, y down)?"""
    dx, dy = b[0] - a[0], b[1] - a[1]
    return {
        "left of": dx > margin,
        "right of": -dx > margin,
        "above": dy > margin,
        "below": -dy > margin,
    }[relation]


def _apart(a: PlacedObject, b: PlacedObject, gap: float) -> bool:
    return (
        a.x + a.size + gap <= b.x or b.x + b.size + gap <= a.x or a.y + a.size + gap <= b.y or b.y + b.size + gap <= a.y
    )


def layout(spec: SceneSpec | str, size: int = 64, seed: int = 0) -> list[PlacedObject]:
    """Positions, sizes and colours of every shape of ``spec`` in a ``size`` x ``size`` image."""
    spec = as_spec(spec)
    if size < MIN_SIZE:
        raise DomainError(f"image size must be >= {MIN_SIZE} px, got {size}")
    rng = random.Random(seed)
    n = spec.n_drawn
    lo, hi = _SIZE_RANGE.get(n, _SIZE_RANGE_MANY)
    gap = max(2.0, 0.06 * size)
    margin = max(1.0, 0.03 * size)
    # A colourless phrase gets one random colour for all its copies.
    colors = [o.color or rng.choice(list(COLORS)) for o in spec.objects]
    wanted = [(i, o.shape, colors[i]) for i, o in enumerate(spec.objects) for _ in range(o.count)]
    for _ in range(200):
        placed: list[PlacedObject] = []
        for phrase, shape, color in wanted:
            s = max(float(MIN_OBJECT_PX), rng.uniform(lo, hi) * size)
            for _ in range(100):
                cand = PlacedObject(
                    shape, color, rng.uniform(margin, size - margin - s), rng.uniform(margin, size - margin - s), s, phrase
                )
                if all(_apart(cand, p, gap) for p in placed):
                    placed.append(cand)
                    break
            else:
                break
        if len(placed) == n and (spec.relation is None or _relation_ok(placed, spec.relation, size)):
            return placed
    raise DomainError(f"could not lay out {spec.to_prompt()!r} in a {size}x{size} image; use a larger size")


def _relation_ok(placed: list[PlacedObject], relation: str, size: int) -> bool:
    a, b = placed[0].center, placed[1].center
    along = abs(b[0] - a[0]) if relation in ("left of", "right of") else abs(b[1] - a[1])
    across = abs(b[1] - a[1]) if relation in ("left of", "right of") else abs(b[0] - a[0])
    return relation_holds(a, b, relation, RELATION_MARGIN * size) and across < along


def draw(objects: list[PlacedObject], size: int) -> Image.Image:
    """Draw placed shapes on the plain background (anti-aliased by 4x supersampling)."""
    k = _SUPERSAMPLE
    img = Image.new("RGB", (size * k, size * k), BACKGROUND)
    d = ImageDraw.Draw(img)
    for o in objects:
        x0, y0, s = o.x * k, o.y * k, o.size * k
        box = [x0, y0, x0 + s - 1, y0 + s - 1]
        fill = COLORS[o.color]
        if o.shape == "circle":
            d.ellipse(box, fill=fill)
        elif o.shape == "square":
            d.rectangle(box, fill=fill)
        else:
            d.polygon([(x0, y0 + s - 1), (x0 + s - 1, y0 + s - 1), (x0 + (s - 1) / 2, y0)], fill=fill)
    return img.resize((size, size), Image.Resampling.BOX)


def render(spec: SceneSpec | str, size: int = 64, seed: int = 0) -> Image.Image:
    """An RGB ``size`` x ``size`` image of ``spec`` (a :class:`SceneSpec` or a prompt); seeded layout."""
    return draw(layout(spec, size, seed), size)
