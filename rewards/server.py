"""Serve one reward over HTTP, so a scorer with conflicting dependencies, or on another GPU, can be
used through the same contract (client: ``rewards.remote.RemoteReward``).

Endpoints (formats in ``rewards.wire``): ``GET /health``; ``POST /score`` (this project's
protocol: lossless safetensors or PNG images); ``POST /compute`` (Flow-Factory's reward-server
protocol, so its ``RemotePointwiseRewardModel`` can use a tpm reward). Errors answer
``{"error": message, "detail": message}`` (``detail`` is where FastAPI, and so Flow-Factory's
clients, put it): 400 bad input (uint8, NaN or out-of-range pixels, oversized images, malformed
JSON), 401 missing or wrong token, 404, 411, 413 request too large, 503 busy (retry), 500 a
failure of the reward itself.

Hardening, each with an option of ``tpm reward-serve`` (defaults in :class:`ServerOptions`):

- at most ``max_clients`` connections are served at once (one thread each); a connection beyond
  that gets 503 at once, so stalled clients cannot grow the thread count;
- ``socket_timeout`` seconds without a byte drops a client, and the whole request (headers and
  body) must arrive within ``request_timeout`` seconds, however slowly it trickles; a dropped
  client is one log line, never a traceback;
- the body is capped (``Limits.max_request_bytes``, checked on ``Content-Length`` before reading);
  bodies in flight share a budget of two maximal requests, and requests are decoded and scored
  one at a time (the model runs one forward at a time anyway), so memory stays near
  ``model + ~5 x max_request_bytes`` however many clients connect;
- image sizes, counts and dtypes are read from the PNG / safetensors headers before decoding;
- with a token (``--token-file`` or ``TPM_REWARD_TOKEN``), scoring needs
  ``Authorization: Bearer TOKEN`` (compared in constant time); ``/health`` stays open.

Scoring itself is not interrupted: its time is bounded through the pixel caps, and a request that
waits longer than ``request_timeout`` for the model gets 503.

Written on the standard library's ``http.server`` because the protocol is two endpoints and JSON
and no web framework is among the project's dependencies; the connection bounding, deadlines and
budget are what a framework would otherwise configure.
"""

from __future__ import annotations

import argparse
import hmac
import ipaddress
import json
import logging
import os
import socket
import sys
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, HTTPServer

from rewards.base import RewardError, RewardModel, load
from rewards.remote import DEFAULT_PORT, TOKEN_ENV
from rewards.wire import Limits, read_score_request, scores_to_json

log = logging.getLogger(__name__)
PATHS = {"/score": "tpm", "/compute": "flow_factory"}
_DRAIN_SECONDS = 2.0  # after an early 4xx, read and discard the body this long so the client sees the answer


@dataclass(frozen=True)
class ServerOptions:
    """How the server protects itself; see the module docstring."""

    limits: Limits = field(default_factory=Limits)
    max_clients: int = 8
    request_timeout: float = 60.0
    socket_timeout: float = 10.0
    token: str | None = None

    def __post_init__(self):
        if not isinstance(self.max_clients, int) or self.max_clients < 1:
            raise RewardError(f"max_clients must be a positive integer, got {self.max_clients!r}")
        for name in ("request_timeout", "socket_timeout"):
            if not getattr(self, name) > 0:
                raise RewardError(f"{name} must be > 0 seconds, got {getattr(self, name)!r}")
        if self.token is not None and not self.token.strip():
            raise RewardError("the token is empty; put a secret in the token file or TPM_REWARD_TOKEN")


class _ByteBudget:
    """Bytes of request bodies that may be held at once; a request waits for room or gives up."""

    def __init__(self, total: int):
        self.total, self.used = total, 0
        self._cond = threading.Condition()

    def acquire(self, n: int, timeout: float) -> bool:
        with self._cond:
            if not self._cond.wait_for(lambda: self.used + n <= self.total, timeout=max(timeout, 0)):
                return False
            self.used += n
            return True

    def release(self, n: int) -> None:
        with self._cond:
            self.used -= n
            self._cond.notify_all()


def _error_body(message: str) -> dict:
    return {"error": message, "detail": message}


def _raw_response(status: int, reason: str, body: dict, extra_headers: str = "") -> bytes:
    data = json.dumps(body).encode()
    head = (f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\nContent-Length: {len(data)}\r\n"
            f"Connection: close\r\n{extra_headers}\r\n")
    return head.encode() + data


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: RewardServer

    # -- connection life ---------------------------------------------------------------------------
    def setup(self):
        self.timeout = self.server.options.socket_timeout  # per recv / send: a silent client is dropped
        super().setup()
        self.deadline = time.monotonic() + self.server.options.request_timeout
        self.dropped = False
        self.server._watch(self)

    def finish(self):
        self.server._unwatch(self)
        try:
            super().finish()
        except OSError:
            pass

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def client(self) -> str:
        host, port = self.client_address[:2]
        return f"{host}:{port}"

    def log_message(self, fmt, *args):  # access log: debug only
        log.debug("%s " + fmt, self.client(), *args)

    def log_error(self, fmt, *args):  # timeouts and malformed requests: one line
        if "timed out" in fmt:  # http.server's own socket-timeout path
            self.drop(fmt % args)
        elif not self.dropped:
            log.info("client %s: " + fmt, self.client(), *args)

    def drop(self, why: str) -> None:
        if not self.dropped:
            self.dropped = True
            self.server.count("dropped")
            self.server.dropped_clients.add(self.client_address)
            log.info("dropped client %s: %s", self.client(), why)
        self.close_connection = True

    # -- answers -------------------------------------------------------------------------------
    def _send(self, status: int, body: dict, headers: dict | None = None) -> None:
        data = json.dumps(body).encode()
        self.close_connection = True  # one request per connection keeps the deadlines simple
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Connection", "close")
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def _refuse(self, status: int, message: str, length: int = 0, headers: dict | None = None) -> None:
        """Answer before the body is read, then discard what the client still sends (bounded in time),
        so that it reads the answer instead of a connection reset."""
        self.server.count(f"status_{status}")
        self._send(status, _error_body(message), headers)
        self.wfile.flush()
        until = time.monotonic() + min(_DRAIN_SECONDS, max(self.remaining(), 0))
        try:
            self.connection.settimeout(0.2)
            left = length
            while left > 0 and time.monotonic() < until:
                chunk = self.rfile.read1(min(left, 1 << 16))
                if not chunk:
                    break
                left -= len(chunk)
        except OSError:
            pass

    # -- endpoints -----------------------------------------------------------------------------
    def do_GET(self):
        if self.path == "/health":
            self._send(200, {"status": "ok", "reward": self.server.reward.name,
                             "limits": self.server.options.limits.as_json()})
        else:
            self._send(404, _error_body(f"unknown path {self.path}; use GET /health, POST /score or POST /compute"))

    def _authorized(self) -> bool:
        token = self.server.options.token
        if token is None:
            return True
        given = self.headers.get("Authorization", "")
        scheme, _, value = given.partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(value.strip().encode(), token.encode())

    def do_POST(self):
        opts, count = self.server.options, self.server.count
        raw_length = self.headers.get("Content-Length")
        try:
            length = int(raw_length) if raw_length is not None else -1
        except ValueError:
            length = -2
        protocol = PATHS.get(self.path)
        if protocol is None:
            return self._refuse(404, f"unknown path {self.path}; use POST /score or POST /compute", max(length, 0))
        if not self._authorized():
            return self._refuse(401, f"missing or wrong token: send 'Authorization: Bearer TOKEN' (client: token= "
                                     f"or {TOKEN_ENV})", max(length, 0), {"WWW-Authenticate": "Bearer"})
        if length == -1:
            return self._refuse(411, "a Content-Length header is required")
        if length <= 0:
            return self._refuse(400, f"bad Content-Length {raw_length!r}")
        if length > opts.limits.max_request_bytes:
            return self._refuse(413, f"request body of {length} bytes; this server accepts at most "
                                     f"{opts.limits.max_request_bytes} (--max-request-mb): send fewer or smaller "
                                     "images per request", length)
        if not self.server.budget.acquire(length, self.remaining()):
            return self._refuse(503, "server busy (request memory budget full); retry later", length,
                                {"Retry-After": "1"})
        try:
            buf = bytearray()
            while len(buf) < length:
                try:
                    chunk = self.rfile.read1(min(length - len(buf), 1 << 20))
                except OSError as e:  # socket timeout, or the deadline watcher shut the socket
                    chunk, why = b"", f"{type(e).__name__}"
                else:
                    why = "connection closed"
                if not chunk:
                    return self.drop(f"sent {len(buf)} of {length} body bytes ({why})")
                buf += chunk
            self.server._unwatch(self)  # fully received: the read deadline no longer applies
            if not self.server.model_lock.acquire(timeout=max(self.remaining(), 0)):
                return self._refuse(503, "server busy (model in use past the request deadline); retry later",
                                    headers={"Retry-After": "1"})
            try:
                try:  # text, then parse, dropping each copy when done: the peak is two body sizes
                    text = buf.decode()
                    del buf
                    body = json.loads(text)
                    del text
                except (ValueError, UnicodeDecodeError) as e:
                    raise RewardError(f"body is not JSON ({e})") from None
                prompts, images = read_score_request(body, protocol, opts.limits)
                del body
                scores = self.server.reward.raw_scores(images, prompts)
            finally:
                self.server.model_lock.release()
        except (RewardError, ValueError, KeyError, TypeError) as e:
            count("status_400")
            return self._send(400, _error_body(str(e)))
        except Exception as e:  # a failure of the reward itself: keep serving, the client shows it
            count("status_500")
            log.exception("scoring failed")
            return self._send(500, _error_body(f"{type(e).__name__}: {e}"))
        finally:
            self.server.budget.release(length)
        count("served")
        key = "scores" if protocol == "tpm" else "rewards"
        self._send(200, {key: scores_to_json(scores)})


class RewardServer(HTTPServer):
    """An ``HTTPServer`` with a bounded number of handler threads, per-request deadlines and a
    shared body budget; ``serve_forever()`` / ``shutdown()`` / ``server_close()`` as usual."""

    request_queue_size = 128  # a burst of connections waits in the kernel, then gets 503 if still busy

    def __init__(self, address, reward: RewardModel, options: ServerOptions):
        self.reward, self.options = reward, options
        self.stats: Counter = Counter()  # served, dropped, status_NNN: read by the load benchmark
        self._stats_lock = threading.Lock()
        self.dropped_clients: set = set()  # their later socket errors are not logged again
        self.model_lock = threading.Lock()  # one model, one forward (and one decode) at a time
        self.budget = _ByteBudget(2 * options.limits.max_request_bytes)
        self._slots = threading.BoundedSemaphore(options.max_clients)
        self._watched: dict[_Handler, None] = {}
        self._watch_lock = threading.Lock()
        self._closing = threading.Event()
        super().__init__(address, _Handler)
        self._watcher = threading.Thread(target=self._enforce_deadlines, name="deadlines", daemon=True)
        self._watcher.start()

    def count(self, key: str) -> None:
        with self._stats_lock:
            self.stats[key] += 1

    # -- bounded threads ---------------------------------------------------------------------------
    def process_request(self, request, client_address):
        if not self._slots.acquire(blocking=False):
            self.count("status_503")
            self._reject_busy(request)
            return
        try:
            threading.Thread(target=self._work, args=(request, client_address), daemon=True).start()
        except RuntimeError:  # the OS refused a thread
            self._slots.release()
            self._reject_busy(request)

    def _work(self, request, client_address):
        try:
            self.finish_request(request, client_address)
        except Exception:
            self.handle_error(request, client_address)
        finally:
            self.shutdown_request(request)
            self.dropped_clients.discard(client_address)
            self._slots.release()

    def _reject_busy(self, request) -> None:
        msg = f"server busy: {self.options.max_clients} clients are being served (--max-clients); retry later"
        try:
            request.settimeout(0.5)
            request.sendall(_raw_response(503, "Service Unavailable", _error_body(msg), "Retry-After: 1\r\n"))
            request.setblocking(False)
            try:  # take what already arrived, so closing does not reset the connection under the answer
                while request.recv(1 << 16):
                    pass
            except OSError:
                pass
        except OSError:
            pass
        self.shutdown_request(request)

    def handle_error(self, request, client_address):
        """A client that vanished mid-answer: one line, no traceback (a bug of ours keeps its traceback)."""
        if client_address in self.dropped_clients:
            return
        err = sys.exc_info()[1]
        if not isinstance(err, OSError):
            log.exception("error while serving %s:%s", *client_address[:2])
            return
        log.info("client %s:%s went away (%s: %s)", *client_address[:2], type(err).__name__, err)

    # -- deadlines -----------------------------------------------------------------------------
    def _watch(self, handler: _Handler) -> None:
        with self._watch_lock:
            self._watched[handler] = None

    def _unwatch(self, handler: _Handler) -> None:
        with self._watch_lock:
            self._watched.pop(handler, None)

    def _enforce_deadlines(self) -> None:
        interval = min(0.25, self.options.request_timeout / 4)
        while not self._closing.wait(interval):
            now = time.monotonic()
            with self._watch_lock:
                late = [h for h in self._watched if h.deadline < now]
                for h in late:
                    del self._watched[h]
            for h in late:  # a trickling client: end its blocked read
                h.drop(f"request not received within {self.options.request_timeout:g} s (--request-timeout)")
                try:
                    h.connection.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def server_close(self):
        self._closing.set()
        super().server_close()


def make_server(reward: RewardModel | str, host: str = "127.0.0.1", port: int = DEFAULT_PORT,
                options: ServerOptions | None = None, **reward_options) -> RewardServer:
    """Build (and load) the reward and bind the server; call ``serve_forever()`` on the result.

    ``reward``: a registered name (built with ``reward_options``) or a reward object; ``port=0``
    picks a free port (read it from ``server.server_address[1]``).
    """
    if isinstance(reward, str):
        reward = load(reward, **reward_options)
    elif reward_options:
        raise RewardError("reward options are only used when the reward is given by name")
    reward._ensure_loaded()  # fail at start (missing weights), not on the first request
    return RewardServer((host, port), reward, options or ServerOptions())


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def binding_warning(host: str, token: str | None) -> str | None:
    """The warning for serving beyond this machine without a token (None when there is none to give)."""
    if is_loopback(host) or token is not None:
        return None
    return (f"warning: serving on {host or 'every interface'} without a token: anyone who can reach this port can "
            f"use the reward and its memory; set {TOKEN_ENV} or --token-file")


def serve(name: str | RewardModel, host: str = "127.0.0.1", port: int = DEFAULT_PORT,
          options: ServerOptions | None = None, **reward_options) -> None:
    """Serve reward ``name`` (built with ``reward_options``) until interrupted."""
    options = options or ServerOptions()
    server = make_server(name, host, port, options, **reward_options)
    label = server.reward.name
    warning = binding_warning(host, options.token)
    if warning:
        print(warning, file=sys.stderr, flush=True)
    print(f"serving reward {label!r} on http://{host}:{server.server_address[1]} "
          f"(/score tpm, /compute Flow-Factory; Ctrl-C to stop)", flush=True)
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


def build_parser(prog: str = "tpm reward-serve") -> argparse.ArgumentParser:
    d, lim = ServerOptions(), Limits()
    p = argparse.ArgumentParser(
        prog=prog, formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Serve a reward model over HTTP: POST /score (tpm's protocol), POST /compute "
                    "(Flow-Factory's reward-server protocol), GET /health.",
        epilog=f"Token: set {TOKEN_ENV} (or --token-file) on the server and the client; clients then send "
               "'Authorization: Bearer TOKEN'. Without one, keep --host on loopback.")
    p.add_argument("name", help="registered reward name, e.g. imagereward, hpsv2, pickscore, clipscore, testbed")
    p.add_argument("--host", default="127.0.0.1",
                   help="interface to bind; the default serves this machine only, 0.0.0.0 serves every "
                        "interface (then set a token)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help="TCP port (0 picks a free one)")
    p.add_argument("--device", default="cpu", help="device the reward runs on, e.g. cuda:1")
    p.add_argument("--dtype", default="float32", help="model dtype: float32, float16 or bfloat16")
    p.add_argument("--batch-size", type=int, default=16, help="images per forward pass on the server")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="reward constructor option (repeatable), e.g. --option hps_version=v2.0")
    g = p.add_argument_group("limits and security")
    g.add_argument("--token-file", default=None,
                   help=f"file holding a shared secret that clients must send; without it ${TOKEN_ENV} is "
                        "used if set, else scoring needs no token")
    g.add_argument("--max-clients", type=int, default=d.max_clients,
                   help="connections served at once; more get 503 (clients retry)")
    g.add_argument("--max-request-mb", type=float, default=lim.max_request_bytes / (1 << 20),
                   help="largest request body in MiB; larger ones get 413")
    g.add_argument("--max-images", type=int, default=lim.max_images, help="images per request")
    g.add_argument("--max-image-pixels", type=int, default=lim.max_image_pixels,
                   help="height x width of one image, checked before decoding")
    g.add_argument("--max-request-pixels", type=int, default=lim.max_request_pixels,
                   help="pixels summed over one request's images")
    g.add_argument("--request-timeout", type=float, default=d.request_timeout,
                   help="seconds for a request to arrive and reach the model; slower ones are dropped or get 503")
    g.add_argument("--socket-timeout", type=float, default=d.socket_timeout,
                   help="seconds a connection may stay silent before it is dropped")
    return p


def options_from_args(args: argparse.Namespace) -> ServerOptions:
    token = os.environ.get(TOKEN_ENV) or None
    if args.token_file:
        try:
            with open(args.token_file) as f:
                token = f.read().strip()
        except OSError as e:
            raise RewardError(f"could not read --token-file {args.token_file!r} ({e.strerror})") from None
    limits = Limits(max_request_bytes=int(args.max_request_mb * (1 << 20)), max_images=args.max_images,
                    max_image_pixels=args.max_image_pixels, max_request_pixels=args.max_request_pixels)
    return ServerOptions(limits=limits, max_clients=args.max_clients, request_timeout=args.request_timeout,
                         socket_timeout=args.socket_timeout, token=token)


def main(argv: Sequence[str] | None = None, prog: str = "tpm reward-serve") -> int:
    args = build_parser(prog).parse_args(argv)
    import rewards  # noqa: F401  (registers every reward)

    if not logging.getLogger().handlers:  # one line per dropped client, on stderr
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    try:
        options = options_from_args(args)
        reward_options = parse_options(args.option)
        reward_options.update(device=args.device, dtype=args.dtype, batch_size=args.batch_size)
        serve(args.name, args.host, args.port, options, **reward_options)
    except RewardError as e:
        print(f"error: {e}")
        return 2
    except OSError as e:  # port taken, host not local
        print(f"error: could not listen on {args.host}:{args.port} ({e}); choose another --port or --host")
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main(prog="python -m rewards.server"))
