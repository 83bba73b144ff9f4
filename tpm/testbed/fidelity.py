"""Fidelity of a testbed image: how well its objects and background are drawn, as one number in [0, 1].

The verifier (:mod:`tpm.testbed.verifier`) asks *whether* the prompt's objects are there; its
checks saturate after a few sampling steps. Real models keep improving in quality long after
that (what HPS or ImageReward measure), and a testbed needs a score that does the same. This one
looks at how each expected object is drawn, and at the background:

- **shape**: IoU of the object's mask with the ideal shape in its bounding box (the verifier's
  ``fit``);
- **colour**: distance of the mean interior colour from the palette colour, ``exp(-d / 30)``;
- **flatness**: root-mean-square spread of the interior colours, ``exp(-s / 12)`` (flat shapes
  have none);
- **edge sharpness**: partially covered pixels per boundary pixel. An anti-aliased edge has
  about one (:data:`SHARP_EDGE`); a blurred one has several. Score ``min(1, SHARP_EDGE / w)``;
- **background**: root-mean-square of the high-pass residual (image minus a Gaussian blur of
  1 px) over background pixels away from objects, ``exp(-(r / 6)^2)``. The shipped backgrounds are
  smooth, so speckle and noise left by too few steps cost here.

An object's quality is the mean of its four terms. The image's fidelity is
``0.7 * mean over expected objects + 0.3 * background``, where an expected object that is not
found (wrong shape or colour, or too few of them) counts 0. So fidelity follows alignment where
alignment fails, and keeps measuring drawing quality where it does not. The constants are ours;
they were set so that rendered ground truth scores near 1 and blur or colour shifts lower it
(see the tests).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from tpm.testbed.grammar import COLORS, SceneSpec, as_spec
from tpm.testbed.verifier import Detection, Verifier

__all__ = ["SHARP_EDGE", "FidelityResult", "fidelity", "match_objects"]

SHARP_EDGE = 1.25
_OBJECT_WEIGHT = 0.7


@dataclass(frozen=True)
class FidelityResult:
    score: float  # in [0, 1]
    objects: float  # mean quality over expected objects (missing ones 0)
    background: float
    terms: dict[str, float]  # mean shape / colour / flatness / sharpness over found objects (nan if none)


def match_objects(spec: SceneSpec, detections: list[Detection]) -> list[list[Detection]]:
    """Per object phrase, the detections that realise it: right shape, and right colour when one is
    stated; at most the phrase's count, largest first."""
    out = []
    for o in spec.objects:
        found = [d for d in detections if d.shape == o.shape and (o.color is None or d.color == o.color)]
        out.append(sorted(found, key=lambda d: -d.area)[: o.count])
    return out


def _alpha(arr: np.ndarray, bg: np.ndarray, color: str) -> np.ndarray:
    """Per pixel, how far along the segment from the background to ``color`` it lies (clipped to [0, 1])."""
    c = np.array(COLORS[color], np.float32)
    d = c - bg
    return np.clip(((arr - bg) * d).sum(-1) / np.maximum((d * d).sum(-1), 1e-6), 0.0, 1.0)


def _object_terms(arr: np.ndarray, bg: np.ndarray, det: Detection) -> dict[str, float]:
    mask = det.mask
    inner = ndimage.binary_erosion(mask)
    if inner.sum() < 4:
        inner = mask
    pix = arr[inner]
    mean = pix.mean(0)
    colour = float(np.exp(-np.linalg.norm(mean - np.array(COLORS[det.color], np.float32)) / 30.0))
    spread = float(np.sqrt(((pix - mean) ** 2).sum(1).mean()))
    flat = float(np.exp(-spread / 12.0))
    boundary = mask & ~ndimage.binary_erosion(mask)
    ring = ndimage.binary_dilation(mask, iterations=3) & ~ndimage.binary_erosion(mask, iterations=3)
    a = _alpha(arr, bg, det.color)
    partial = float(((a > 0.1) & (a < 0.9) & ring).sum())
    width = partial / max(float(boundary.sum()), 1.0)
    sharp = float(min(1.0, SHARP_EDGE / max(width, 1e-6)))
    return {"shape": float(det.fit), "colour": colour, "flatness": flat, "sharpness": sharp}


def fidelity(image, prompt: str | SceneSpec, verifier: Verifier | None = None) -> FidelityResult:
    """Fidelity of one image for one prompt (see the module docstring); ``verifier`` defaults to the
    spatial domain's (:meth:`Verifier.for_domain`)."""
    spec = as_spec(prompt)
    verifier = verifier or Verifier.for_domain("spatial")
    arr = verifier._pixels(image)
    if verifier.background == "local":
        bg = verifier.local_background(arr)
    else:
        bg = np.broadcast_to(verifier._background(arr), arr.shape)
    detections = verifier.detect(image)
    expected = sum(o.count for o in spec.objects)
    matched = [d for group in match_objects(spec, detections) for d in group]
    terms = [_object_terms(arr, bg, d) for d in matched]
    quality = [float(np.mean(list(t.values()))) for t in terms]
    objects = float(sum(quality) / max(expected, 1))
    # Background: pixels at least 2 px away from anything coloured.
    coloured = np.zeros(arr.shape[:2], bool)
    for d in detections:
        coloured |= d.mask
    chroma = arr.max(2) - arr.min(2)
    from tpm.testbed.background import MAX_CHROMA

    coloured |= chroma > MAX_CHROMA + 12
    away = ~ndimage.binary_dilation(coloured, iterations=2)
    if away.sum() >= 16:
        high = arr - np.stack([ndimage.gaussian_filter(arr[..., c], 1.0, mode="nearest") for c in range(3)], -1)
        rms = float(np.sqrt((high[away] ** 2).sum(1).mean()))
        background = float(np.exp(-((rms / 6.0) ** 2)))
    else:
        background = 0.0
    mean_terms = {k: float(np.mean([t[k] for t in terms])) if terms else float("nan")
                  for k in ("shape", "colour", "flatness", "sharpness")}
    score = _OBJECT_WEIGHT * objects + (1 - _OBJECT_WEIGHT) * background
    return FidelityResult(float(score), objects, background, mean_terms)
