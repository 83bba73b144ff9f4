"""A client for OpenAI-compatible chat-completions servers (vLLM, sglang, the OpenAI API), for image judges.

:class:`ChatClient` sends one ``POST {url}/chat/completions`` per image: a user message whose content
is the image as a ``data:image/png;base64,...`` URL followed by the text, at temperature 0 with a small
``max_tokens``, as the field's VLM-judged rewards do (one image per request keeps every server's
multimodal batching in charge of throughput). Requests of a batch run on ``concurrency`` threads; the
answers come back in order. A request is tried again after a connection error, a timeout, a 429 or a
5xx, waiting ``backoff`` seconds doubled per try (capped at ``max_backoff``, with a little jitter so
the threads do not retry in lockstep), or exactly what a ``Retry-After`` header asks (capped the same
way). Anything else (after the last try, or a 4xx, or a body that is not a chat completion) stops the
whole batch with one :class:`~rewards.base.RewardError` that names the server and says what to do.

The API key comes from ``api_key=`` or the environment variable named by ``api_key_env``
(``OPENAI_API_KEY``); it is sent as a bearer token and never appears in a message or a ``repr``.

Plain HTTP (``requests``, already a dependency) rather than the ``openai`` package: the protocol is one
JSON POST, the ``openai`` client would add a dependency tree (httpx, pydantic) for it, and its own
retry loop and exception classes would have to be switched off and mapped back to the single error
every reward raises here. The loopback server of the tests (``tpm.testbed.judge``) also answers the
``openai`` client, which checks that the two sides speak the same protocol.
"""

from __future__ import annotations

import base64
import email.utils
import io
import os
import queue
import random
import threading
import time
from collections.abc import Sequence
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from urllib.parse import urlsplit

import numpy as np
import torch
from PIL import Image

from rewards.base import RewardError

API_KEY_ENV = "OPENAI_API_KEY"
RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
IMAGE_FORMATS = ("png", "jpeg")


def image_data_url(image: torch.Tensor | Image.Image, fmt: str = "png") -> str:
    """A (3, H, W) tensor in [0, 1] or a PIL image -> ``data:image/<fmt>;base64,...`` (8-bit RGB)."""
    if fmt not in IMAGE_FORMATS:
        raise RewardError(f"image_format must be one of {list(IMAGE_FORMATS)}, got {fmt!r}")
    if isinstance(image, torch.Tensor):
        arr = (image.detach().float().cpu().clamp(0, 1).permute(1, 2, 0).numpy() * 255.0).round().astype(np.uint8)
        image = Image.fromarray(arr)
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format=fmt.upper(), **({"quality": 95} if fmt == "jpeg" else {}))
    return f"data:image/{fmt};base64,{base64.b64encode(buf.getvalue()).decode('ascii')}"


def image_message(data_url: str, text: str) -> list[dict]:
    """The chat messages for one image and its question: the image first, then the text."""
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url}},
                                         {"type": "text", "text": text}]}]


def retry_after_seconds(value: str | None) -> float | None:
    """A ``Retry-After`` header (seconds or an HTTP date) -> seconds to wait, or None."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def normalize_url(url: str, what: str) -> str:
    """The API base: ``http(s)://host:port/v1`` (``/v1`` added when the URL has no path), no trailing slash."""
    parts = urlsplit(str(url))
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise RewardError(f"{what}: url must be an http(s) API base such as http://127.0.0.1:8000/v1, got {url!r}")
    base = str(url).rstrip("/")
    return base if parts.path.strip("/") else base + "/v1"


class _Abort(Exception):
    """Another request of the batch already failed for good: stop without another try."""


class ChatClient:
    """Chat completions for batches of single-image questions; see the module docstring.

    ``url``: API base (``.../v1``); ``model``: the served model name; ``timeout``: seconds per request;
    ``retries``: tries per request; ``concurrency``: requests in flight; ``max_tokens`` /
    ``temperature``: generation settings; ``extra_body``: more request fields (e.g. ``{"top_k": 1}``);
    ``what``: how errors name this client.
    """

    def __init__(self, url: str, model: str, *, api_key: str | None = None, api_key_env: str = API_KEY_ENV,
                 timeout: float = 60.0, retries: int = 4, backoff: float = 0.5, max_backoff: float = 30.0,
                 concurrency: int = 8, max_tokens: int = 32, temperature: float = 0.0,
                 extra_body: dict | None = None, what: str = "VLM judge"):
        self.what = what
        self.url = normalize_url(url, what)
        if not model or not isinstance(model, str):
            raise RewardError(f"{what}: model= must name the served model (as the server lists it at /v1/models)")
        for name, value, low in (("timeout", timeout, 0), ("backoff", backoff, -1), ("max_backoff", max_backoff, -1)):
            if not float(value) > low:
                raise RewardError(f"{what}: {name} must be {'> 0' if low == 0 else '>= 0'}, got {value}")
        for name, value in (("retries", retries), ("concurrency", concurrency), ("max_tokens", max_tokens)):
            if int(value) != value or value < 1:
                raise RewardError(f"{what}: {name} must be an integer >= 1, got {value!r}")
        self.model = model
        self.timeout, self.retries, self.concurrency = float(timeout), int(retries), int(concurrency)
        self.backoff, self.max_backoff = float(backoff), float(max_backoff)
        self.max_tokens, self.temperature = int(max_tokens), float(temperature)
        self.extra_body = dict(extra_body or {})
        self.api_key_env = api_key_env
        self._api_key = api_key if api_key is not None else os.environ.get(api_key_env) or None
        self._sessions: queue.SimpleQueue = queue.SimpleQueue()

    @property
    def endpoint(self) -> str:
        return self.url + "/chat/completions"

    def __repr__(self) -> str:  # never shows the key
        return (f"ChatClient(url={self.url!r}, model={self.model!r}, concurrency={self.concurrency}, "
                f"api_key={'set' if self._api_key else 'unset'})")

    # -- batch -----------------------------------------------------------------------------------
    def complete(self, conversations: Sequence[list[dict]]) -> list[str]:
        """One request per conversation (a list of chat messages), ``concurrency`` at a time -> the
        replies' text, in order. Raises one :class:`RewardError` for the first request that fails."""
        conversations = list(conversations)
        if not conversations:
            return []
        abort = threading.Event()
        with ThreadPoolExecutor(max_workers=min(self.concurrency, len(conversations))) as pool:
            futures = [pool.submit(self._ask, messages, abort) for messages in conversations]
            try:
                wait(futures, return_when=FIRST_EXCEPTION)  # the first failure ends the batch, whichever it is
                failed = next((f for f in futures if f.done() and not f.cancelled() and f.exception()), None)
                if failed is not None:
                    raise failed.exception()
                return [f.result() for f in futures]
            except BaseException:
                abort.set()  # the other threads stop before their next try; queued ones never start
                for f in futures:
                    f.cancel()
                raise

    # -- one request -------------------------------------------------------------------------------
    def _headers(self) -> dict:
        headers = {"Content-Type": "application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        return headers

    def _wait(self, attempt: int, retry_after: float | None, abort: threading.Event) -> None:
        if retry_after is not None:
            delay = min(retry_after, self.max_backoff)
        else:
            delay = min(self.backoff * 2 ** (attempt - 1), self.max_backoff) * (1 + 0.25 * random.random())
        if abort.wait(delay):
            raise _Abort

    def _ask(self, messages: list[dict], abort: threading.Event) -> str:
        import requests

        body = {"model": self.model, "messages": messages, "max_tokens": self.max_tokens,
                "temperature": self.temperature, **self.extra_body}
        try:
            session = self._sessions.get_nowait()
        except queue.Empty:
            session = requests.Session()
        try:
            last, retry_after = "", None
            for attempt in range(self.retries):
                if attempt:
                    self._wait(attempt, retry_after, abort)
                if abort.is_set():
                    raise _Abort
                retry_after = None
                try:
                    r = session.post(self.endpoint, json=body, headers=self._headers(), timeout=self.timeout)
                except requests.Timeout:
                    last = f"no reply within timeout={self.timeout:g} s"
                    continue
                except requests.ConnectionError as e:
                    last = f"could not connect ({type(e).__name__})"
                    continue
                if r.status_code in RETRY_STATUSES:
                    last = f"HTTP {r.status_code}: {_server_message(r)}"
                    retry_after = retry_after_seconds(r.headers.get("Retry-After"))
                    continue
                if r.status_code != 200:
                    raise self._refused(r)
                return self._content(r)
            raise RewardError(self._gave_up(last))
        except _Abort:
            return ""
        finally:
            self._sessions.put(session)

    def _gave_up(self, last: str) -> str:
        head = f"{self.what} at {self.url} failed {self.retries} tries (last: {last})"
        if last.startswith("could not connect"):
            port = urlsplit(self.url).port or 8000
            return (f"{head}. Nothing answers there: start an OpenAI-compatible server (e.g. `vllm serve "
                    f"{self.model} --port {port}`) or pass url= of a running one (the API base, ending in /v1)")
        if last.startswith("no reply"):
            return f"{head}. The server is too slow for this load: raise timeout= or lower concurrency="
        return f"{head}. The server is overloaded or failing: lower concurrency=, raise retries=, or check its log"

    def _refused(self, r) -> RewardError:
        msg = _server_message(r)
        head = f"{self.what} at {self.url} refused the request (HTTP {r.status_code}: {msg})"
        if r.status_code in (401, 403):
            return RewardError(f"{head}; pass api_key= or set ${self.api_key_env} to a key the server accepts")
        if r.status_code == 404:
            return RewardError(f"{head}; url= must be the API base that serves /chat/completions (usually ending "
                               f"in /v1) and model= ({self.model!r}) a model it serves (see {self.url}/models)")
        return RewardError(f"{head}; check model= ({self.model!r}), max_tokens= and that the model accepts images")

    def _content(self, r) -> str:
        try:
            data = r.json()
            message = data["choices"][0]["message"]
            content = message.get("content")
        except (ValueError, KeyError, IndexError, TypeError, AttributeError):
            raise RewardError(
                f"{self.what} at {self.url} answered with something that is not a chat completion "
                f"({r.text[:200]!r}); url= must point at an OpenAI-compatible server") from None
        if isinstance(content, list):  # some servers return content parts
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        return content if isinstance(content, str) else ""


def _server_message(r) -> str:
    """The error message in an OpenAI-style error body, else the start of the body."""
    try:
        data = r.json()
        err = data.get("error", data) if isinstance(data, dict) else data
        msg = err.get("message", err) if isinstance(err, dict) else err
        return str(msg)[:200]
    except ValueError:
        return (r.text or r.reason or "")[:200].strip()
