"""Score any image against a testbed prompt, constraint by constraint (GenEval-style, exact here).

Pipeline, per image:

1. **Pixel colours.** A decoder blurs edges into mixtures of an object's colour and the background,
   so each pixel is matched to the *segment* from the background to each palette colour, not to
   the colour itself: it belongs to colour c when its best segment is c's, it lies less than
   ``max_residual`` (0-255 units) from it, and it is at least ``min_alpha`` of the way from the
   background to c. Everything else is background. With ``background="border"`` (the plain
   16-token domain) the background is one colour: the median of the border pixels when that is
   close to the nominal one (generated backgrounds drift a little). With ``background="local"``
   (the spatial domain, whose backgrounds have gradients, a horizon and texture) it is estimated
   per pixel: background tones are muted (chroma at most :data:`tpm.testbed.background.MAX_CHROMA`)
   while every object colour is saturated, so the low-chroma pixels are taken as background and
   spread under the objects by normalised Gaussian smoothing (a narrow kernel, then a wide one
   where the narrow one sees no background, e.g. inside a large object).
2. **Objects.** Connected components (4-neighbourhood) of each colour; components smaller than
   ``min_area`` of the image are specks and dropped; holes are filled.
3. **Shapes**, from the component's soft coverage (its pixels' fractions of colour, rim
   included), which resolves what a 7-px binary mask cannot: an apex-up triangle's row profile
   is skewed (skewness -0.57, kept by any symmetric blur; disks and squares 0), and coverage over
   (tallest column x widest row) is 1 for a square and pi/4 for a disk. A component whose mask
   overlaps the chosen ideal shape in its bounding box by IoU < ``min_fit``, or whose aspect ratio
   exceeds ``max_aspect``, is an unrecognised blob that matches no phrase.
4. **Checks**, per object phrase i of the prompt: ``obj{i}:present`` (a shape of that kind),
   ``obj{i}:color`` (one of them has the stated colour; only when a colour is stated),
   ``obj{i}:count`` (exactly that many of that colour and shape; only for numbers >= 2); and
   ``relation`` (the largest match of phrase 0 against the largest of phrase 1, centres apart by
   more than ``relation_margin`` of the image along the relation's axis). The score is the
   fraction of checks passed, as in GenEval's per-prompt accuracy, and ``all_correct`` whether all
   passed.

Written by hand (with scipy.ndimage for labelling) because the checks are this domain's own.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from PIL import Image
from scipy import ndimage

from tpm.testbed.grammar import BACKGROUND, COLORS, DomainError, SceneSpec, as_spec
from tpm.testbed.render import MIN_SIZE, relation_holds

_COLOR_NAMES = list(COLORS)
_PALETTE = np.array([COLORS[c] for c in _COLOR_NAMES], dtype=np.float32)
_FOUR_NEIGHBOURS = ndimage.generate_binary_structure(2, 1)
# Square vs disk: coverage / (tallest column x widest row) is 1 for a square, pi/4 for a disk.
_SQUARE_VS_CIRCLE = (1 + np.pi / 4) / 2
# An apex-up triangle's row profile grows linearly downwards: skewness -2*sqrt(2)/5 ~ -0.57;
# disks and squares are symmetric (0). A symmetric blur keeps the third cumulant, so the sign
# survives blur; the threshold sits halfway.
_TRIANGLE_SKEW = -np.sqrt(2) / 5


@dataclass(frozen=True)
class Detection:
    """One coloured component: ``shape`` is None for a blob that fits no shape."""

    color: str
    shape: str | None
    area: int
    center: tuple[float, float]  # (x, y) as fractions of the image width / height
    bbox: tuple[int, int, int, int]  # x0, y0, x1, y1 in pixels, end exclusive
    fit: float  # IoU of the mask with the chosen shape ideal in its bounding box
    mask: np.ndarray | None = field(default=None, compare=False, repr=False)  # (H, W) bool, holes filled


@dataclass
class VerifyResult:
    checks: dict[str, bool]
    score: float
    all_correct: bool
    spec: SceneSpec | None = None
    detections: list[Detection] = field(default_factory=list)


def _templates(h: int, w: int) -> dict[str, np.ndarray]:
    """Ideal shapes filling an h x w box, sampled at pixel centres."""
    y = (np.arange(h, dtype=np.float32) + 0.5)[:, None] / h  # in (0, 1), 0 at the top
    x = (np.arange(w, dtype=np.float32) + 0.5)[None, :] / w
    circle = (x - 0.5) ** 2 + (y - 0.5) ** 2 <= 0.25
    triangle = np.abs(x - 0.5) <= 0.5 * y  # apex at the top centre, base along the bottom
    return {"circle": circle, "square": np.ones((h, w), bool), "triangle": triangle}


def to_array(image) -> np.ndarray:
    """PIL image, (H, W, 3) array (uint8 or float in [0, 1]) or (3, H, W) tensor in [0, 1] -> float32 (H, W, 3) in 0..255."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.float32)
    if hasattr(image, "detach"):  # a torch tensor, (3, H, W) in [0, 1]
        t = image.detach().float().cpu()
        if t.ndim != 3 or t.shape[0] != 3:
            raise DomainError(f"an image tensor must be (3, H, W) in [0, 1], got shape {tuple(t.shape)}")
        return t.clamp(0, 1).permute(1, 2, 0).numpy() * 255.0
    arr = np.asarray(image)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise DomainError(f"an image array must be (H, W, 3), got shape {arr.shape}")
    if arr.dtype == np.uint8:
        return arr.astype(np.float32)
    return np.clip(arr.astype(np.float32), 0, 1) * 255.0


class Verifier:
    """Checks images against testbed prompts; see the module docstring for the method.

    ``size``: resize images to ``size`` x ``size`` first (None keeps each image's own size);
    ``background``: ``"border"`` (one background colour) or ``"local"`` (per-pixel estimate, for
    backgrounds with content); :meth:`for_domain` picks it and the speck size for a testbed domain.
    """

    BACKGROUND_MODES = ("border", "local")

    def __init__(
        self,
        size: int | None = None,
        *,
        background: str = "border",
        max_residual: float = 60.0,
        min_alpha: float = 0.5,
        min_area: float = 0.004,
        min_fit: float = 0.6,
        max_aspect: float = 1.6,
        relation_margin: float = 0.08,
    ):
        if size is not None and size < MIN_SIZE:
            raise DomainError(f"verifier size must be >= {MIN_SIZE} px, got {size}")
        if not 0 < min_alpha <= 1:
            raise DomainError(f"min_alpha must be in (0, 1], got {min_alpha}")
        if background not in self.BACKGROUND_MODES:
            raise DomainError(f"background must be one of {list(self.BACKGROUND_MODES)}, got {background!r}")
        self.size = size
        self.background = background
        self.max_residual = max_residual
        self.min_alpha = min_alpha
        self.min_area = min_area
        self.min_fit = min_fit
        self.max_aspect = max_aspect
        self.relation_margin = relation_margin

    @classmethod
    def for_domain(cls, domain: str = "shapes", **kwargs) -> Verifier:
        """The verifier for a testbed domain: ``"shapes"`` (plain background) or ``"spatial"``
        (per-pixel background; specks below 1.2 % of the image, a third of the smallest object)."""
        if domain == "spatial":
            return cls(**{"background": "local", "min_area": 0.012, **kwargs})
        if domain != "shapes":
            raise DomainError(f"unknown testbed domain {domain!r}; use 'shapes' or 'spatial'")
        return cls(**kwargs)

    # -- pixels -> detections ------------------------------------------------------------------
    def _pixels(self, image) -> np.ndarray:
        arr = to_array(image)
        if self.size is not None and arr.shape[:2] != (self.size, self.size):
            pil = Image.fromarray(np.clip(arr, 0, 255).round().astype(np.uint8))
            arr = np.asarray(pil.resize((self.size, self.size), Image.Resampling.BOX), dtype=np.float32)
        if min(arr.shape[:2]) < MIN_SIZE:
            raise DomainError(f"image is {arr.shape[1]}x{arr.shape[0]}; the verifier needs >= {MIN_SIZE} px a side")
        return arr

    def _background(self, arr: np.ndarray) -> np.ndarray:
        border = np.concatenate([arr[0], arr[-1], arr[:, 0], arr[:, -1]])
        est = np.median(border, axis=0)
        nominal = np.array(BACKGROUND, np.float32)
        return est if np.linalg.norm(est - nominal) < 60 else nominal

    def local_background(self, arr: np.ndarray) -> np.ndarray:
        """(H, W, 3) per-pixel background estimate of a (H, W, 3) 0-255 image (``background="local"``)."""
        from tpm.testbed.background import MAX_CHROMA

        chroma = arr.max(2) - arr.min(2)
        weight = (chroma <= MAX_CHROMA + 12).astype(np.float32)
        if weight.sum() == 0:
            return np.broadcast_to(np.array(BACKGROUND, np.float32), arr.shape).copy()
        h, w = chroma.shape
        est = np.zeros_like(arr)
        have = np.zeros((h, w), bool)
        for sigma in (0.06 * max(h, w), 0.2 * max(h, w)):
            num = np.stack([ndimage.gaussian_filter(arr[..., c] * weight, sigma, mode="nearest") for c in range(3)], -1)
            den = ndimage.gaussian_filter(weight, sigma, mode="nearest")
            ok = (den > 0.05) & ~have
            est[ok] = num[ok] / den[ok, None]
            have |= ok
        if not have.all():
            est[~have] = np.median(arr[weight > 0], axis=0)
        return est

    def _classify(self, image) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per pixel: best colour index (H, W), its coverage in [0, 1] (H, W) and the label map."""
        arr = self._pixels(image)
        if self.background == "local":
            bg = self.local_background(arr).reshape(-1, 1, 3)
        else:
            bg = self._background(arr)[None, None, :]
        p = arr.reshape(-1, 1, 3) - bg  # (N, 1, 3)
        d = _PALETTE[None] - bg  # (N or 1, C, 3): directions from the background to each colour
        alpha = np.clip((p * d).sum(2) / (d * d).sum(2), 0.0, 1.5)  # (N, C); > 1: more saturated than the palette
        resid = np.linalg.norm(p - alpha[..., None] * d, axis=2)
        best = resid.argmin(1)
        idx = np.arange(len(p))
        a, r = alpha[idx, best], resid[idx, best]
        close = r <= self.max_residual
        labels = np.where(close & (a >= self.min_alpha), best + 1, 0)
        cover = np.where(close, np.minimum(a, 1.0), 0.0)
        shape = arr.shape[:2]
        return best.reshape(shape), cover.reshape(shape).astype(np.float32), labels.reshape(shape)

    def label_pixels(self, image) -> np.ndarray:
        """(H, W) int map: 0 background, k > 0 the k-th colour of ``COLORS``."""
        return self._classify(image)[2]

    def detect(self, image) -> list[Detection]:
        """Every coloured component of ``image`` large enough to be an object, with its shape."""
        best, cover, labels = self._classify(image)
        h, w = labels.shape
        min_px = max(3, int(round(self.min_area * h * w)))
        out = []
        for k, color in enumerate(_COLOR_NAMES, start=1):
            comps, n = ndimage.label(labels == k, structure=_FOUR_NEIGHBOURS)
            if n == 0:
                continue
            sizes = np.bincount(comps.ravel(), minlength=n + 1)
            for j, sl in enumerate(ndimage.find_objects(comps), start=1):
                if sizes[j] < min_px:  # most noise components: skip before any per-component work
                    continue
                mask = ndimage.binary_fill_holes(comps[sl] == j)
                area = int(mask.sum())
                if area < min_px:
                    continue
                # The component's soft coverage: its pixels (holes count as covered) plus a 1-px
                # rim of partially covered ones.
                big = tuple(slice(max(s.start - 1, 0), s.stop + 1) for s in sl)
                body = ndimage.binary_fill_holes(comps[big] == j)
                rim = ndimage.binary_dilation(body) & (best[big] == k - 1)
                soft = np.where(rim, cover[big], 0.0)
                soft[body] = np.maximum(soft[body], self.min_alpha)
                det = self._describe(mask, soft, sl, color, area, h, w)
                full = np.zeros((h, w), bool)
                full[sl] = mask
                out.append(dataclasses.replace(det, mask=full))
        return out

    def _describe(self, mask: np.ndarray, soft: np.ndarray, sl, color: str, area: int, h: int, w: int) -> Detection:
        # Features of the soft coverage, not of the binary mask: a 7-px shape's mask cannot tell a
        # disk from a square (corners are cut either way) and loses a triangle's apex under blur.
        rows, cols = soft.sum(1), soft.sum(0)
        mass = max(float(soft.sum()), 1e-6)
        height, width = float(cols.max()), float(rows.max())
        y = np.arange(len(rows), dtype=np.float64)
        mu = float((rows * y).sum()) / mass
        var = float((rows * (y - mu) ** 2).sum()) / mass
        skew = float((rows * (y - mu) ** 3).sum()) / mass / max(var, 1e-6) ** 1.5
        if skew < _TRIANGLE_SKEW:
            shape = "triangle"
        else:
            fill = mass / max(height * width, 1e-6)
            shape = "square" if fill > _SQUARE_VS_CIRCLE else "circle"
        tpl = _templates(*mask.shape)[shape]
        fit = float((mask & tpl).sum() / (mask | tpl).sum())
        if fit < self.min_fit or max(height, width) > self.max_aspect * min(height, width):
            shape = None
        ys, xs = np.nonzero(mask)
        cx = (xs.mean() + sl[1].start + 0.5) / w
        cy = (ys.mean() + sl[0].start + 0.5) / h
        return Detection(color, shape, area, (float(cx), float(cy)),
                         (sl[1].start, sl[0].start, sl[1].stop, sl[0].stop), fit)

    # -- detections -> checks --------------------------------------------------------------------
    def check(self, spec: SceneSpec, detections: list[Detection]) -> dict[str, bool]:
        checks: dict[str, bool] = {}
        best: list[Detection | None] = []
        for i, o in enumerate(spec.objects):
            same_shape = [d for d in detections if d.shape == o.shape]
            matched = same_shape if o.color is None else [d for d in same_shape if d.color == o.color]
            checks[f"obj{i}:present"] = bool(same_shape)
            if o.color is not None:
                checks[f"obj{i}:color"] = bool(matched)
            if o.count > 1:
                checks[f"obj{i}:count"] = len(matched) == o.count
            best.append(max(matched, key=lambda d: d.area) if matched else None)
        if spec.relation is not None:
            a, b = best
            checks["relation"] = (
                a is not None and b is not None
                and relation_holds(a.center, b.center, spec.relation, self.relation_margin)
            )
        return checks

    def verify(self, image, prompt: str | SceneSpec) -> VerifyResult:
        """Check one image against one prompt; raises :class:`DomainError` for prompts outside the grammar."""
        spec = as_spec(prompt)
        detections = self.detect(image)
        checks = self.check(spec, detections)
        passed = sum(checks.values())
        return VerifyResult(checks, passed / len(checks), passed == len(checks), spec, detections)

    def verify_batch(self, images, prompts: Sequence[str | SceneSpec]) -> list[VerifyResult]:
        """``images``: a sequence of images or an (N, 3, H, W) tensor in [0, 1]; one prompt each."""
        if isinstance(prompts, str | SceneSpec):
            prompts = [prompts]
        specs = [as_spec(p) for p in prompts]  # fail on a bad prompt before any image work
        n = len(images)
        if n != len(specs):
            raise DomainError(f"got {n} images but {len(specs)} prompts; pass one prompt per image")
        return [self.verify(images[i], specs[i]) for i in range(n)]
