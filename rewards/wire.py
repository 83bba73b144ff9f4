"""What travels between the remote reward client (``rewards.remote``) and the reward server
(``rewards.server``): image encodings, the two protocols' field names, and decoding that checks
sizes and values before it allocates anything large.

Protocols (JSON bodies, never pickle):

- ``"tpm"``: ``GET /health`` -> ``{"status": "ok", "reward": NAME, "limits": {...}}``;
  ``POST /score`` ``{"prompts": [...], "encoding": "safetensors" | "png", "images": ...}`` ->
  ``{"scores": [...]}``. ``safetensors``: one base64 safetensors file holding ``pixels``
  (N, 3, H, W), a float dtype, values in [0, 1] (lossless); ``png``: a list of base64 PNGs
  (8-bit). A non-finite score travels as ``null``. Errors: ``{"error": message}``.
- ``"flow_factory"``: the reward-server protocol of Flow-Factory (its ``reward_server/`` template
  and its ``RemotePointwiseRewardModel`` client). ``GET /health`` -> ``{"status": "ok"}``;
  ``POST /compute`` ``{"prompts": [...], "images": [base64 PNG, ...], "extra": {...}}`` ->
  ``{"rewards": [...]}``; errors as FastAPI writes them, ``{"detail": message}``. Flow-Factory's
  client sends the singular keys ``prompt`` / ``image`` while its server template reads the plural
  ones, so the server here accepts both spellings and the client here sends the plural ones
  (what a server built from the template reads). ``video`` / ``condition_*`` fields must be
  empty: the rewards here score images.

Decoding is written here rather than taken from a library because its point is the order of
checks: the PNG header and the safetensors header give the size and dtype before any pixel is
decoded, so a 60 KB PNG that would decode to 16 megapixels is refused in microseconds.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
from dataclasses import asdict, dataclass

import numpy as np
import torch
from PIL import Image

from rewards.base import RewardError

PROTOCOLS = ("tpm", "flow_factory")
ENCODINGS = ("safetensors", "png")
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP")  # what Image.open may try; no exotic decoders on the server
SCORE_PATH = {"tpm": "/score", "flow_factory": "/compute"}
_FLOAT_DTYPES = {"F16": "float16", "BF16": "bfloat16", "F32": "float32", "F64": "float64"}
_DTYPE_NAMES = {"U8": "uint8", "I8": "int8", "I16": "int16", "U16": "uint16", "I32": "int32",
                "U32": "uint32", "I64": "int64", "U64": "uint64", "BOOL": "bool"}
# Values slightly outside [0, 1] (VAE overshoot) are clamped as local rewards clamp them; beyond
# this margin the caller has almost surely sent 0..255 or [-1, 1] pixels, which clamping would
# silently turn into white or half-black images.
_RANGE_MARGIN = 0.5


@dataclass(frozen=True)
class Limits:
    """Per-request caps the server enforces (and announces on ``/health`` so the client splits)."""

    max_request_bytes: int = 128 << 20
    max_images: int = 64
    max_image_pixels: int = 2048 * 2048
    max_request_pixels: int = 8 * 1024 * 1024

    def __post_init__(self):
        for name, value in asdict(self).items():
            if not isinstance(value, int) or value < 1:
                raise RewardError(f"server limit {name} must be a positive integer, got {value!r}")

    def as_json(self) -> dict:
        return asdict(self)


# -- encoding (client) ---------------------------------------------------------------------------
def encode_images(pixels: torch.Tensor, encoding: str = "safetensors") -> str | list[str]:
    """(N, 3, H, W) float in [0, 1] -> JSON-safe payload (base64 safetensors, or base64 PNGs)."""
    if encoding == "safetensors":
        from safetensors.torch import save

        return base64.b64encode(save({"pixels": pixels.float().contiguous()})).decode("ascii")
    if encoding == "png":
        out = []
        for img in pixels:
            arr = (img.clamp(0, 1).permute(1, 2, 0).numpy() * 255.0).round().astype(np.uint8)
            buf = io.BytesIO()
            Image.fromarray(arr).save(buf, format="PNG")
            out.append(base64.b64encode(buf.getvalue()).decode("ascii"))
        return out
    raise RewardError(f"unknown image encoding {encoding!r}; use 'safetensors' or 'png'")


def encoded_bytes_per_image(height: int, width: int, encoding: str) -> int:
    """Upper estimate of one image's share of a request body (PNG: as if incompressible)."""
    raw = 3 * height * width * (4 if encoding == "safetensors" else 1)
    return (raw + 2) // 3 * 4 + 64


# -- decoding (server) ---------------------------------------------------------------------------
def _b64(payload, what: str) -> bytes:
    if not isinstance(payload, str):
        raise RewardError(f"{what} must be a base64 string, got {type(payload).__name__}")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise RewardError(f"{what} is not valid base64") from None


def _check_size(i: int, height: int, width: int, limits: Limits) -> None:
    if height * width > limits.max_image_pixels:
        raise RewardError(
            f"image {i} is {width}x{height} = {width * height} pixels; this server accepts at most "
            f"{limits.max_image_pixels} per image (--max-image-pixels); resize it first"
        )


def _check_request(n: int, total_pixels: int, limits: Limits) -> None:
    if n > limits.max_images:
        raise RewardError(f"{n} images in one request; this server accepts at most {limits.max_images} "
                          "(--max-images); send smaller batches")
    if total_pixels > limits.max_request_pixels:
        raise RewardError(f"{total_pixels} pixels in one request; this server accepts at most "
                          f"{limits.max_request_pixels} (--max-request-pixels); send smaller batches")


def check_pixels(pixels: torch.Tensor) -> None:
    """Refuse non-finite values and values far outside [0, 1], naming the images."""
    flat = pixels.reshape(pixels.shape[0], -1)
    bad = (~torch.isfinite(flat)).any(1).nonzero().flatten().tolist()
    if bad:
        raise RewardError(f"images {bad[:16]} hold NaN or infinite pixel values; send finite values in [0, 1]")
    if flat.numel():
        lo, hi = float(flat.min()), float(flat.max())
        if lo < -_RANGE_MARGIN or hi > 1 + _RANGE_MARGIN:
            raise RewardError(
                f"pixel values span [{lo:g}, {hi:g}]; send floats in [0, 1] (8-bit values: divide by 255; "
                "[-1, 1] values: (x + 1) / 2)"
            )


def decode_safetensors(payload, limits: Limits) -> torch.Tensor:
    """Base64 safetensors -> (N, 3, H, W) float32, reading the header before the tensor."""
    from safetensors.torch import load as st_load

    raw = _b64(payload, "'images'")
    # A safetensors file is an 8-byte little-endian header length, a JSON header, then the data.
    n = int.from_bytes(raw[:8], "little") if len(raw) >= 8 else -1
    if not 2 <= n <= min(len(raw) - 8, 1 << 20):
        raise RewardError("could not decode the images: not a safetensors file")
    try:
        header = json.loads(raw[8:8 + n])
    except (ValueError, UnicodeDecodeError):
        raise RewardError("could not decode the images: the safetensors header is not JSON") from None
    names = sorted(k for k in header if k != "__metadata__") if isinstance(header, dict) else []
    if names != ["pixels"]:
        raise RewardError(f"safetensors payload must hold one tensor 'pixels', got {names}")
    meta = header["pixels"]
    dtype, shape = meta.get("dtype"), meta.get("shape")
    if dtype not in _FLOAT_DTYPES:
        raise RewardError(
            f"pixels are {_DTYPE_NAMES.get(dtype, dtype)}; send float values in [0, 1] (8-bit images: divide "
            "by 255 first, or use encoding='png')"
        )
    if not (isinstance(shape, list) and len(shape) == 4 and shape[1] == 3
            and all(isinstance(s, int) and s >= 0 for s in shape)):
        raise RewardError(f"pixels must be (N, 3, H, W), got shape {shape}")
    if shape[0]:  # one size for all images
        _check_size(0, shape[2], shape[3], limits)
    _check_request(shape[0], shape[0] * shape[2] * shape[3], limits)
    try:
        pixels = st_load(raw)["pixels"]
    except Exception as e:  # truncated or inconsistent data section
        raise RewardError(f"could not decode the images ({type(e).__name__}: {e})") from None
    del raw
    pixels = pixels.float()
    check_pixels(pixels)
    return pixels


def decode_encoded_images(payload, limits: Limits) -> list[Image.Image]:
    """Base64 PNG / JPEG / WebP files -> RGB PIL images, each size checked from its header first."""
    if not isinstance(payload, list):
        raise RewardError(f"'images' must be a list of base64 image files, got {type(payload).__name__}")
    _check_request(len(payload), 0, limits)
    opened, total = [], 0
    for i, item in enumerate(payload):
        data = _b64(item, f"image {i}")
        try:
            im = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)  # reads the header only
        except Image.DecompressionBombError as e:  # only reachable with --max-image-pixels above Pillow's own cap
            raise RewardError(f"image {i}: {e}") from None
        except OSError:
            raise RewardError(f"could not decode image {i}: not a PNG, JPEG or WebP file") from None
        w, h = im.size
        _check_size(i, h, w, limits)
        total += w * h
        _check_request(len(payload), total, limits)
        opened.append(im)
    out = []
    for i, im in enumerate(opened):
        try:
            out.append(im.convert("RGB"))
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            raise RewardError(f"could not decode image {i} ({type(e).__name__}: {e})") from None
    return out


def decode_images(payload, encoding: str, limits: Limits | None = None) -> torch.Tensor | list[Image.Image]:
    limits = limits or Limits()
    if encoding == "safetensors":
        return decode_safetensors(payload, limits)
    if encoding == "png":
        return decode_encoded_images(payload, limits)
    raise RewardError(f"unknown image encoding {encoding!r}; use 'safetensors' or 'png'")


def scores_to_json(scores: torch.Tensor) -> list[float | None]:
    return [float(s) if torch.isfinite(s) else None for s in scores]


def read_score_request(body, protocol: str, limits: Limits) -> tuple[list[str], torch.Tensor | list]:
    """A parsed JSON body of either protocol -> (prompts, images); :class:`RewardError` if malformed."""
    if not isinstance(body, dict):
        raise RewardError("body must be a JSON object")
    if protocol == "tpm":
        if "prompts" not in body or "images" not in body:
            raise RewardError("body must be a JSON object with 'images', 'prompts' and 'encoding'")
        prompts, images = body["prompts"], decode_images(body["images"], body.get("encoding", "safetensors"),
                                                         limits)
    else:
        prompts = body.get("prompts", body.get("prompt"))
        images = body.get("images", body.get("image"))
        if prompts is None or images is None:
            raise RewardError("body must be a JSON object with 'prompts' (or 'prompt') and 'images' (or 'image')")
        for key in ("video", "videos", "condition_images", "condition_videos"):
            if body.get(key):
                raise RewardError(f"{key!r} is not supported: this server scores images only")
        if body.get("extra"):
            raise RewardError("'extra' fields are not supported: tpm rewards take their options when the server "
                              "starts (--option key=value)")
        images = decode_encoded_images(images, limits)
    if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
        raise RewardError("'prompts' must be a list of strings")
    return prompts, images
