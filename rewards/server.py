"""Serve one reward over loopback HTTP, so a scorer with conflicting dependencies, or on another
GPU, can be used through the same contract (client: ``rewards.remote.RemoteReward``).

Written on the standard library's ``ThreadingHTTPServer``: the protocol is two endpoints and
JSON, and no web framework is among the project's dependencies.

Protocol (JSON bodies, never pickle):
- ``GET /health`` -> ``{"status": "ok", "reward": NAME}``
- ``POST /score`` with ``{"prompts": [...], "encoding": "safetensors", "images": BASE64}`` where
  BASE64 is a safetensors file holding ``pixels`` (N, 3, H, W) float32 in [0, 1] (lossless), or
  ``{"encoding": "png", "images": [BASE64 PNG, ...]}`` (8-bit, smaller) -> ``{"scores": [...]}``;
  a non-finite score travels as ``null`` so the client reports it with its index in the caller's
  batch. A user error answers 400 ``{"error": message}``; anything else 500 with the message.

Command line (wired as ``tpm reward-serve``): ``NAME [--host H] [--port P] [--device D]
[--dtype T] [--batch-size B] [--option key=value ...]``; option values are parsed as JSON when
they parse (numbers, true/false, lists), else kept as strings.
"""

from __future__ import annotations

import argparse
import json
import logging
import threading
from collections.abc import Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from rewards.base import RewardError, RewardModel, load
from rewards.remote import DEFAULT_PORT, decode_images, scores_to_json

log = logging.getLogger(__name__)
MAX_BODY = 1 << 30  # 1 GiB; a request above this is refused rather than read into memory


# -- server ---------------------------------------------------------------------------------------
def _handler(reward: RewardModel, lock: threading.Lock) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _send(self, status: int, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, fmt, *args):  # route access logs to logging, not stderr
            log.debug("%s " + fmt, self.address_string(), *args)

        def do_GET(self):
            if self.path == "/health":
                self._send(200, {"status": "ok", "reward": reward.name})
            else:
                self._send(404, {"error": f"unknown path {self.path}; use GET /health or POST /score"})

        def do_POST(self):
            if self.path != "/score":
                self._send(404, {"error": f"unknown path {self.path}; use POST /score"})
                return
            try:
                length = int(self.headers.get("Content-Length", "0"))
                if length <= 0 or length > MAX_BODY:
                    raise RewardError(f"request body of {length} bytes; expected 1 byte to {MAX_BODY}")
                body = json.loads(self.rfile.read(length))
                if not isinstance(body, dict) or "prompts" not in body or "images" not in body:
                    raise RewardError("body must be a JSON object with 'images', 'prompts' and 'encoding'")
                try:
                    images = decode_images(body["images"], body.get("encoding", "safetensors"))
                except RewardError:
                    raise
                except Exception as e:  # corrupt base64 / PNG / safetensors bytes
                    raise RewardError(f"could not decode the images ({type(e).__name__}: {e})") from None
                with lock:  # one model, one forward at a time
                    scores = reward.raw_scores(images, body["prompts"])
                self._send(200, {"scores": scores_to_json(scores)})
            except (RewardError, ValueError, KeyError, TypeError) as e:
                self._send(400, {"error": str(e)})
            except Exception as e:  # keep serving; the client shows the message
                log.exception("scoring failed")
                self._send(500, {"error": f"{type(e).__name__}: {e}"})

    return Handler


def make_server(reward: RewardModel | str, host: str = "127.0.0.1", port: int = DEFAULT_PORT,
                **options) -> ThreadingHTTPServer:
    """Build (and load) the reward and bind the server; call ``serve_forever()`` on the result.

    ``reward``: a registered name (built with ``options``) or a reward object; ``port=0`` picks a
    free port (read it from ``server.server_address[1]``).
    """
    if isinstance(reward, str):
        reward = load(reward, **options)
    elif options:
        raise RewardError("options are only used when the reward is given by name")
    reward._ensure_loaded()  # fail at start (missing weights), not on the first request
    server = ThreadingHTTPServer((host, port), _handler(reward, threading.Lock()))
    server.daemon_threads = True
    server.reward = reward
    return server


def serve(name: str, host: str = "127.0.0.1", port: int = DEFAULT_PORT, **options) -> None:
    """Serve reward ``name`` (built with ``options``) until interrupted."""
    server = make_server(name, host, port, **options)
    print(f"serving reward {name!r} on http://{host}:{server.server_address[1]} (Ctrl-C to stop)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


def parse_options(pairs: Sequence[str]) -> dict:
    """``["k=v", ...]`` -> dict; values parsed as JSON where possible (``3``, ``true``, ``[1,2]``)."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise RewardError(f"--option expects key=value, got {pair!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tpm reward-serve", description="Serve a reward model over loopback HTTP.")
    p.add_argument("name", help="registered reward name, e.g. imagereward, hpsv2, pickscore, clipscore")
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default loopback only)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help="TCP port (0 picks a free one)")
    p.add_argument("--device", default="cpu", help="device the reward runs on, e.g. cuda:1")
    p.add_argument("--dtype", default="float32", help="model dtype: float32, float16 or bfloat16")
    p.add_argument("--batch-size", type=int, default=16, help="images per forward pass on the server")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="reward constructor option (repeatable), e.g. --option hps_version=v2.0")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import rewards  # noqa: F401  (registers every reward)

    try:
        options = parse_options(args.option)
        options.update(device=args.device, dtype=args.dtype, batch_size=args.batch_size)
        serve(args.name, args.host, args.port, **options)
    except RewardError as e:
        print(f"error: {e}")
        return 2
    except OSError as e:  # port taken, host not local
        print(f"error: could not listen on {args.host}:{args.port} ({e}); choose another --port or --host")
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
