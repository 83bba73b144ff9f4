"""Backgrounds with content for the spatial testbed: a horizon or a gradient plus low-contrast texture.

A real scene's background costs the model effort: it has structure (a horizon, a sky that
brightens towards it) and texture, and it must be drawn everywhere the objects are not. Here a
background is built from three seeded parts, each in 0-255 RGB:

- a **base**: either a vertical gradient between two tones, or a *horizon*: a sky gradient above
  a slightly tilted line at 30-70 % of the height and a ground gradient below it, with a soft
  one-pixel edge;
- a **texture**: smooth value noise (bilinear up-sampling of a coarse random grid, two octaves)
  with an amplitude of 5-12 units, so that it is visible but never looks like an object;
- all tones are **muted**: saturation at most :data:`MAX_SATURATION` and value in
  [:data:`MIN_VALUE`, :data:`MAX_VALUE`], so that a background pixel is never close to one of the
  saturated object colours of :data:`tpm.testbed.grammar.COLORS` (the verifier tells them apart
  by chroma, see :mod:`tpm.testbed.verifier`).

Written by hand: the look of this domain's backgrounds is its own.
"""

from __future__ import annotations

import colorsys
import random

import numpy as np

from tpm.testbed.grammar import COLORS

__all__ = ["BACKGROUND_KINDS", "MAX_CHROMA", "MAX_SATURATION", "background", "muted_tone"]

BACKGROUND_KINDS: tuple[str, ...] = ("gradient", "horizon")
MAX_SATURATION = 0.14
MIN_VALUE, MAX_VALUE = 0.38, 0.86
TEXTURE_AMPLITUDE = (5.0, 12.0)
#: the largest chroma (max - min of R, G, B) any background pixel can have, texture included
MAX_CHROMA = MAX_SATURATION * 255 * MAX_VALUE + 0.2 * TEXTURE_AMPLITUDE[1]
_MIN_DISTANCE_TO_OBJECTS = 110.0  # 0-255 units, from every object colour


def muted_tone(rng: random.Random) -> np.ndarray:
    """One muted RGB tone (float32, 0-255), far from every object colour."""
    palette = np.array(list(COLORS.values()), np.float32)
    for _ in range(100):
        h, s, v = rng.random(), rng.uniform(0.0, MAX_SATURATION), rng.uniform(MIN_VALUE, MAX_VALUE)
        rgb = np.array(colorsys.hsv_to_rgb(h, s, v), np.float32) * 255
        if np.linalg.norm(palette - rgb, axis=1).min() >= _MIN_DISTANCE_TO_OBJECTS:
            return rgb
    raise AssertionError("no muted tone far from the object colours")  # cannot happen with these bounds


def _value_noise(size: int, cells: int, rng: random.Random) -> np.ndarray:
    """Smooth noise in [-1, 1]: a (cells + 1)^2 random grid, bilinearly interpolated to size x size."""
    grid = np.array([[rng.uniform(-1, 1) for _ in range(cells + 1)] for _ in range(cells + 1)], np.float32)
    u = np.linspace(0, cells, size, dtype=np.float32)
    i = np.minimum(u.astype(int), cells - 1)
    f = u - i
    f = f * f * (3 - 2 * f)  # smoothstep: no visible grid lines
    rows = grid[i] * (1 - f)[:, None] + grid[i + 1] * f[:, None]  # (size, cells + 1)
    return rows[:, i] * (1 - f)[None, :] + rows[:, i + 1] * f[None, :]


def _gradient(top: np.ndarray, bottom: np.ndarray, n: int) -> np.ndarray:
    t = np.linspace(0, 1, n, dtype=np.float32)[:, None]
    return top[None] * (1 - t) + bottom[None] * t  # (n, 3)


def background(size: int, seed: int = 0, kind: str | None = None) -> np.ndarray:
    """A (size, size, 3) float32 background in 0-255 (see the module docstring); ``kind`` None draws one."""
    rng = random.Random(seed)
    kind = kind if kind is not None else rng.choice(BACKGROUND_KINDS)
    if kind not in BACKGROUND_KINDS:
        raise ValueError(f"unknown background kind {kind!r}; use one of {list(BACKGROUND_KINDS)}")
    img = np.empty((size, size, 3), np.float32)
    if kind == "gradient":
        img[:] = _gradient(muted_tone(rng), muted_tone(rng), size)[:, None, :]
    else:
        sky = _gradient(muted_tone(rng), muted_tone(rng), size)
        ground = _gradient(muted_tone(rng), muted_tone(rng), size)
        level = rng.uniform(0.3, 0.7) * size
        tilt = rng.uniform(-0.12, 0.12)
        y = np.arange(size, dtype=np.float32)[:, None] + 0.5
        x = np.arange(size, dtype=np.float32)[None, :] + 0.5
        # Signed distance below the horizon line, clipped to [0, 1] over one pixel: a soft edge.
        below = np.clip(y - (level + tilt * (x - size / 2)) + 0.5, 0.0, 1.0)[..., None]
        img[:] = sky[:, None, :] * (1 - below) + ground[:, None, :] * below
    amp = rng.uniform(*TEXTURE_AMPLITUDE)
    texture = 0.65 * _value_noise(size, 4, rng) + 0.35 * _value_noise(size, 9, rng)
    tint = np.array([rng.uniform(0.8, 1.0) for _ in range(3)], np.float32)  # near-grey texture
    img += amp * texture[..., None] * tint
    return np.clip(img, 0, 255)
