"""A loopback OpenAI-compatible chat server whose "VLM" is the testbed verifier.

For tests, benchmarks and trying ``vlm_judge`` / ``bertscore`` without a GPU. It answers
``POST /v1/chat/completions`` as the OpenAI API defines it (request: ``model``, ``messages`` with
``image_url`` data-URL and ``text`` content parts; reply: a ``chat.completion`` object with
``choices[0].message.content``, or an ``{"error": {...}}`` body with the HTTP status) and
``GET /v1/models``. Its answers mean something: it decodes the image and

- when the text is the judge's rubric with a testbed prompt in it (``rubric`` template, AsynDM's
  alignment question by default), it verifies the image against that prompt
  (:class:`tpm.testbed.Verifier`) and answers ``round(score * high)`` on the rubric's 0..``high`` scale;
- otherwise it captions the image from the verifier's detections, in the testbed's words ("two red
  circles and a blue square", left to right).

Faults for protocol tests: ``delay`` seconds per request (slow replies, throughput benchmarks),
``fail_first`` HTTP statuses returned before the first success (429s with ``retry_after``, 5xx),
and ``reply`` modes ``"garbage"`` (a reply with no score), ``"not_json"`` (an HTML body) and
``"no_choices"`` (a JSON body that is not a chat completion). It records the requests it saw and the
largest number it served at once (``max_in_flight``). Run it alone with
``python -m rewards.loopback_judge --port 8011`` (then ``url=http://127.0.0.1:8011/v1``).

Written with the standard library's threading HTTP server: a test fixture needs no web framework.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import re
import threading
import time
from collections import Counter
from collections.abc import Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from PIL import Image

from rewards.vlm_judge import DEFAULT_RUBRIC, PLACEHOLDER
from tpm.testbed import DomainError, Verifier
from tpm.testbed.grammar import COUNT_WORDS, PLURALS

MODEL = "testbed-verifier-vl"
REPLY_MODES = ("score", "garbage", "not_json", "no_choices")
_DATA_URL = re.compile(r"^data:image/(png|jpeg|jpg|webp);base64,(.+)$", re.S)


def caption(detections) -> str:
    """The testbed's words for what the verifier sees, objects grouped by kind, left to right."""
    kinds = Counter()
    first_x: dict[tuple[str, str], float] = {}
    for d in detections:
        if d.shape is None:
            continue
        key = (d.color, d.shape)
        kinds[key] += 1
        first_x[key] = min(first_x.get(key, 1.0), d.center[0])
    if not kinds:
        return "an empty grey background"
    phrases = []
    for key in sorted(kinds, key=first_x.get):
        color, shape = key
        n = kinds[key]
        phrases.append(f"a {color} {shape}" if n == 1 else f"{COUNT_WORDS.get(n, str(n))} {color} {PLURALS[shape]}")
    return " and ".join(phrases)


class LoopbackJudge:
    """The server; use as a context manager (``with LoopbackJudge() as judge: judge.url``) or
    :meth:`start` / :meth:`stop`. ``port=0`` picks a free port."""

    def __init__(self, rubric: str = DEFAULT_RUBRIC, high: int = 9, model: str = MODEL, delay: float = 0.0,
                 fail_first: Sequence[int] = (), retry_after: float | None = None, reply: str = "score",
                 api_key: str | None = None, host: str = "127.0.0.1", port: int = 0, verifier_size: int | None = None):
        if reply not in REPLY_MODES:
            raise ValueError(f"reply must be one of {REPLY_MODES}, got {reply!r}")
        before, _, after = rubric.partition(PLACEHOLDER)
        self._rubric = re.compile(re.escape(before) + "(?P<prompt>.+?)" + re.escape(after), re.S)
        self.high, self.model, self.delay = high, model, float(delay)
        self.fail_first, self.retry_after, self.reply = list(fail_first), retry_after, reply
        self.api_key = api_key
        self.verifier = Verifier(size=verifier_size)
        self.requests: list[dict] = []  # {"body", "authorization", "status"} per request
        self.in_flight = self.max_in_flight = 0
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer((host, port), self._handler())
        self._server.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}/v1"

    def start(self) -> LoopbackJudge:
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> LoopbackJudge:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- answers -------------------------------------------------------------------------------------
    def answer(self, body: dict) -> tuple[int, dict | str, dict]:
        """(status, JSON object or raw text, extra headers) for one chat-completions request body."""
        with self._lock:
            if self.fail_first:
                status = self.fail_first.pop(0)
                headers = {"Retry-After": f"{self.retry_after:g}"} if status == 429 and self.retry_after is not None else {}
                return status, _error(status, "injected failure"), headers
        if body.get("model") != self.model:
            return 404, _error(404, f"The model `{body.get('model')}` does not exist."), {}
        try:
            image, text = _image_and_text(body.get("messages"))
        except ValueError as e:
            return 400, _error(400, str(e)), {}
        if self.reply == "not_json":
            return 200, "<html><body>502 Bad Gateway</body></html>", {}
        if self.reply == "no_choices":
            return 200, {"object": "chat.completion", "choices": []}, {}
        if self.reply == "garbage":
            content = "I am not able to rate this image."
        else:
            m = self._rubric.fullmatch(text)
            try:
                if m:
                    content = str(round(self.verifier.verify(image, m.group("prompt").strip()).score * self.high))
                else:
                    content = caption(self.verifier.detect(image))
            except DomainError as e:
                return 400, _error(400, f"the testbed judge cannot read this request: {e}"), {}
        return 200, _completion(self.model, content), {}

    def _handler(self):
        judge = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as real servers do
            disable_nagle_algorithm = True  # else headers and body wait on delayed ACKs (~40 ms a reply)

            def log_message(self, *args):  # quiet
                pass

            def _send(self, status: int, payload, headers: dict | None = None):
                data = (payload if isinstance(payload, str) else json.dumps(payload)).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "text/html" if isinstance(payload, str) else "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    for k, v in (headers or {}).items():
                        self.send_header(k, v)
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):  # the client timed out and left: nothing to tell
                    self.close_connection = True

            def do_GET(self):
                if self.path.rstrip("/") == "/v1/models":
                    self._send(200, {"object": "list", "data": [{"id": judge.model, "object": "model",
                                                                 "owned_by": "tpm"}]})
                else:
                    self._send(404, _error(404, f"no route {self.path}"))

            def do_POST(self):
                raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                auth = self.headers.get("Authorization")
                if self.path.rstrip("/") != "/v1/chat/completions":
                    return self._send(404, _error(404, f"no route {self.path}"))
                if judge.api_key is not None and auth != f"Bearer {judge.api_key}":
                    return self._send(401, _error(401, "Incorrect API key provided."))
                with judge._lock:
                    judge.in_flight += 1
                    judge.max_in_flight = max(judge.max_in_flight, judge.in_flight)
                try:
                    if judge.delay:
                        time.sleep(judge.delay)
                    body = None
                    try:
                        body = json.loads(raw)
                    except ValueError:
                        status, payload, headers = 400, _error(400, "the request body is not JSON"), {}
                    else:
                        status, payload, headers = judge.answer(body)
                    with judge._lock:
                        judge.requests.append({"body": body, "authorization": auth,
                                               "status": status})
                    self._send(status, payload, headers)
                finally:
                    with judge._lock:
                        judge.in_flight -= 1

        return Handler


def _image_and_text(messages) -> tuple[Image.Image, str]:
    """The image and the text of the last user message (OpenAI content parts)."""
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages must be a non-empty list")
    user = [m for m in messages if isinstance(m, dict) and m.get("role") == "user"]
    if not user or not isinstance(user[-1].get("content"), list):
        raise ValueError("the last user message must have a list of content parts")
    image, texts = None, []
    for part in user[-1]["content"]:
        if part.get("type") == "text":
            texts.append(part.get("text", ""))
        elif part.get("type") == "image_url":
            m = _DATA_URL.match((part.get("image_url") or {}).get("url", ""))
            if not m:
                raise ValueError("image_url must be a base64 data URL (data:image/png;base64,...)")
            image = Image.open(io.BytesIO(base64.b64decode(m.group(2)))).convert("RGB")
    if image is None:
        raise ValueError("the user message has no image_url part")
    return image, "\n".join(texts)


def _completion(model: str, content: str) -> dict:
    return {
        "id": f"chatcmpl-{time.monotonic_ns():x}", "object": "chat.completion", "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "logprobs": None,
                     "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 0, "completion_tokens": len(content.split()), "total_tokens": len(content.split())},
    }


def _error(status: int, message: str) -> dict:
    kinds = {400: "BadRequestError", 401: "AuthenticationError", 404: "NotFoundError", 429: "RateLimitError"}
    return {"error": {"message": message, "type": kinds.get(status, "InternalServerError"), "param": None,
                      "code": status}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="loopback chat-completions judge backed by the testbed verifier")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8011)
    p.add_argument("--delay", type=float, default=0.0, help="seconds to wait before each answer")
    args = p.parse_args(argv)
    judge = LoopbackJudge(host=args.host, port=args.port, delay=args.delay)
    print(f"testbed judge serving model {judge.model!r} at {judge.url}", flush=True)
    try:
        judge._server.serve_forever()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
