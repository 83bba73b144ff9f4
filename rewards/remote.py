"""Client side of the remote reward: the reward contract answered by ``rewards.server``.

``rewards.load("remote", url="http://127.0.0.1:8765")`` behaves like any reward: images + prompts
-> (N,) scores, batched (one request per ``batch_size`` images). Images travel as safetensors
(lossless float32, the default) or PNG (8-bit), scores as JSON. Connection failures and timeouts
are retried with exponential backoff; after the last try one :class:`RewardError` says which
server did not answer and how to start it. Errors reported by the server (bad input, missing
weights) are raised at once with the server's message.
"""

from __future__ import annotations

import base64
import io
import time

import numpy as np
import torch
from PIL import Image

from rewards.base import RewardError, RewardModel, register_reward

DEFAULT_PORT = 8765


# -- wire format (shared with rewards.server) ---------------------------------------------------------
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


def decode_images(payload, encoding: str) -> torch.Tensor | list[Image.Image]:
    if encoding == "safetensors":
        from safetensors.torch import load as st_load

        tensors = st_load(base64.b64decode(payload))
        if set(tensors) != {"pixels"}:
            raise RewardError(f"safetensors payload must hold one tensor 'pixels', got {sorted(tensors)}")
        return tensors["pixels"]
    if encoding == "png":
        return [Image.open(io.BytesIO(base64.b64decode(s))).convert("RGB") for s in payload]
    raise RewardError(f"unknown image encoding {encoding!r}; use 'safetensors' or 'png'")


def scores_to_json(scores: torch.Tensor) -> list[float | None]:
    return [float(s) if torch.isfinite(s) else None for s in scores]


@register_reward("remote")
class RemoteReward(RewardModel):
    """``url``: server base URL; ``timeout``: seconds per request; ``retries``: tries per request;
    ``backoff``: first wait between tries in seconds (doubles each time); ``encoding``:
    "safetensors" (exact) or "png" (8-bit)."""

    def __init__(self, url: str = f"http://127.0.0.1:{DEFAULT_PORT}", timeout: float = 120.0, retries: int = 3,
                 backoff: float = 0.5, encoding: str = "safetensors", **kwargs):
        super().__init__(**kwargs)
        if retries < 1:
            raise RewardError(f"retries must be >= 1, got {retries}")
        if encoding not in ("safetensors", "png"):
            raise RewardError(f"unknown image encoding {encoding!r}; use 'safetensors' or 'png'")
        self.url = url.rstrip("/")
        self.timeout = float(timeout)
        self.retries = retries
        self.backoff = float(backoff)
        self.encoding = encoding
        self.server_reward: str | None = None

    def _request(self, method: str, path: str, **kwargs) -> dict:
        import requests

        last: Exception | None = None
        for attempt in range(self.retries):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            try:
                r = requests.request(method, self.url + path, timeout=self.timeout, **kwargs)
            except (requests.ConnectionError, requests.Timeout) as e:
                last = e
                continue
            try:
                body = r.json()
            except ValueError:
                raise RewardError(f"reward server {self.url} answered {r.status_code} with non-JSON "
                                  f"{r.text[:200]!r}; is it a tpm reward server?") from None
            if r.status_code != 200:
                raise RewardError(f"reward server {self.url}: {body.get('error', body)}")
            return body
        raise RewardError(
            f"reward server {self.url} did not answer {method} {path} after {self.retries} tries "
            f"(timeout {self.timeout:g} s; last error: {type(last).__name__}). Start it with "
            f"`tpm reward-serve NAME --port {self.url.rsplit(':', 1)[-1]}` or pass url= of a running server"
        )

    def _load(self) -> None:
        self.server_reward = self._request("GET", "/health").get("reward")

    def _score(self, pixels: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        body = {"prompts": prompts, "encoding": self.encoding, "images": encode_images(pixels, self.encoding)}
        scores = self._request("POST", "/score", json=body)["scores"]
        if len(scores) != len(prompts):
            raise RewardError(f"reward server {self.url} returned {len(scores)} scores for {len(prompts)} images")
        return torch.tensor([float("nan") if s is None else s for s in scores], dtype=torch.float32)
