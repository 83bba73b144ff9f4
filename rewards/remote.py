"""Client side of the remote reward: the reward contract answered by a reward server.

``rewards.load("remote", url="http://127.0.0.1:8765")`` behaves like any reward: images + prompts
-> (N,) scores, batched (one request per ``batch_size`` images, split further to fit the limits
the server announces on ``/health``). Two protocols (formats in ``rewards.wire``):

- ``protocol="tpm"`` (default): ``tpm reward-serve``; images travel as safetensors (lossless
  float32, the default) or PNG (8-bit);
- ``protocol="flow_factory"``: a reward server written to Flow-Factory's ``reward_server/``
  template (``POST /compute``, base64 PNGs, ``{"rewards": [...]}``); ``tpm reward-serve`` speaks
  it too. ``extra={...}`` is sent as the request's ``extra`` field, which such servers pass to
  their ``compute_reward`` as keyword arguments.

Connection failures, timeouts and 503 (server busy) are retried with exponential backoff; after
the last try one :class:`RewardError` says which server did not answer and how to start it.
Errors reported by the server (bad input, missing weights, 401, 413) are raised at once with the
server's message. ``token`` (default: the ``TPM_REWARD_TOKEN`` environment variable) is sent as
``Authorization: Bearer TOKEN``.
"""

from __future__ import annotations

import os
import time

import torch

from rewards.base import RewardError, RewardModel, register_reward
from rewards.wire import ENCODINGS, PROTOCOLS, SCORE_PATH, encode_images, encoded_bytes_per_image

DEFAULT_PORT = 8765
TOKEN_ENV = "TPM_REWARD_TOKEN"
_HEADROOM = 4096  # bytes of JSON and prompts around the images in one request


@register_reward("remote")
class RemoteReward(RewardModel):
    """``url``: server base URL; ``protocol``: "tpm" or "flow_factory"; ``timeout``: seconds per
    request; ``retries``: tries per request; ``backoff``: first wait between tries in seconds
    (doubles each time); ``encoding``: "safetensors" (exact; tpm only) or "png" (8-bit; the
    default for flow_factory); ``token``: shared secret; ``extra``: flow_factory ``extra`` field."""

    def __init__(self, url: str = f"http://127.0.0.1:{DEFAULT_PORT}", timeout: float = 120.0, retries: int = 3,
                 backoff: float = 0.5, encoding: str | None = None, protocol: str = "tpm",
                 token: str | None = None, extra: dict | None = None, **kwargs):
        super().__init__(**kwargs)
        if retries < 1:
            raise RewardError(f"retries must be >= 1, got {retries}")
        if protocol not in PROTOCOLS:
            raise RewardError(f"unknown reward-server protocol {protocol!r}; use one of {list(PROTOCOLS)}")
        encoding = encoding or ("safetensors" if protocol == "tpm" else "png")
        if encoding not in ENCODINGS:
            raise RewardError(f"unknown image encoding {encoding!r}; use 'safetensors' or 'png'")
        if protocol == "flow_factory" and encoding != "png":
            raise RewardError("Flow-Factory's reward-server protocol carries PNG images only; use encoding='png'")
        if extra is not None and (protocol != "flow_factory" or not isinstance(extra, dict)):
            raise RewardError("extra= is a dict sent with protocol='flow_factory' only")
        self.url = url.rstrip("/")
        self.protocol = protocol
        self.timeout = float(timeout)
        self.retries = retries
        self.backoff = float(backoff)
        self.encoding = encoding
        self.extra = extra
        self.token = token if token is not None else (os.environ.get(TOKEN_ENV) or None)
        self.server_reward: str | None = None
        self.limits: dict = {}

    def _request(self, method: str, path: str, **kwargs) -> dict:
        import requests

        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        last = "no answer"
        for attempt in range(self.retries):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            try:
                r = requests.request(method, self.url + path, timeout=self.timeout, headers=headers, **kwargs)
            except (requests.ConnectionError, requests.Timeout) as e:
                last = type(e).__name__
                continue
            try:
                body = r.json()
            except ValueError:
                raise RewardError(f"reward server {self.url} answered {r.status_code} with non-JSON "
                                  f"{r.text[:200]!r}; is it a reward server speaking protocol {self.protocol!r}?"
                                  ) from None
            message = body.get("error", body.get("detail", body)) if isinstance(body, dict) else body
            if r.status_code == 503:  # busy: worth another try
                last = f"503 {message}"
                continue
            if r.status_code == 401:
                raise RewardError(f"reward server {self.url} refused the request (401): {message}. Pass token= "
                                  f"or set {TOKEN_ENV} to the server's token")
            if r.status_code != 200:
                raise RewardError(f"reward server {self.url} ({r.status_code}): {message}")
            return body
        raise RewardError(
            f"reward server {self.url} did not answer {method} {path} after {self.retries} tries "
            f"(timeout {self.timeout:g} s; last error: {last}). Start it with "
            f"`tpm reward-serve NAME --port {self.url.rsplit(':', 1)[-1]}` or pass url= of a running server"
        )

    def check(self) -> None:
        """The server answers ``GET /health`` (its limits are kept for the requests to come)."""
        self._ensure_loaded()

    def _load(self) -> None:
        health = self._request("GET", "/health")
        self.server_reward = health.get("reward") if isinstance(health, dict) else None
        limits = health.get("limits") if isinstance(health, dict) else None
        self.limits = limits if isinstance(limits, dict) else {}

    def _request_size(self, n: int, height: int, width: int) -> int:
        """Images per request that fit the server's announced limits (all of them if none)."""
        step = n
        lim = self.limits
        if "max_images" in lim:
            step = min(step, int(lim["max_images"]))
        if "max_request_pixels" in lim:
            step = min(step, int(lim["max_request_pixels"]) // max(height * width, 1))
        if "max_request_bytes" in lim:
            per = encoded_bytes_per_image(height, width, self.encoding)
            step = min(step, (int(lim["max_request_bytes"]) - _HEADROOM) // per)
        return max(step, 1)  # one image over a limit: the server's 400 names the limit

    def _score(self, pixels: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        step = self._request_size(len(prompts), pixels.shape[-2], pixels.shape[-1])
        out = []
        for s in range(0, len(prompts), step):
            out += self._post(pixels[s:s + step], prompts[s:s + step])
        return torch.tensor([float("nan") if v is None else v for v in out], dtype=torch.float32)

    def _post(self, pixels: torch.Tensor, prompts: list[str]) -> list:
        images = encode_images(pixels, self.encoding)
        if self.protocol == "tpm":
            body, key = {"prompts": prompts, "encoding": self.encoding, "images": images}, "scores"
        else:
            body, key = {"prompts": prompts, "images": images}, "rewards"
            if self.extra:
                body["extra"] = self.extra
        answer = self._request("POST", SCORE_PATH[self.protocol], json=body)
        scores = answer.get(key) if isinstance(answer, dict) else None
        if not isinstance(scores, list) or len(scores) != len(prompts):
            got = f"{len(scores)} scores" if isinstance(scores, list) else f"no {key!r} list"
            raise RewardError(f"reward server {self.url} returned {got} for {len(prompts)} images")
        return scores
