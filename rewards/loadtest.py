"""Load a reward server the way a bad day would: concurrent clients, stalled connections,
oversized images and bodies, bad pixels; and watch its memory and threads from outside.

Used by ``tests/rewards/test_server_load.py`` (small numbers, assertions) and
``benchmarks/reward_server_load.py`` (larger numbers, JSON). :class:`ServerProcess` runs
``python -m rewards.server`` in a child process so its memory is its own; memory and thread
figures come from ``/proc`` (Linux), where ``VmHWM`` is reset once the server is ready, so the
peak is the load's and not the imports'.
"""

from __future__ import annotations

import base64
import io
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from urllib.parse import urlparse

import numpy as np
import torch
from PIL import Image

from rewards.base import RewardError
from rewards.wire import encode_images


def proc_status(pid: int) -> dict:
    """``{"rss_mb", "peak_rss_mb", "threads"}`` of a live process, from /proc (Linux only)."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out["rss_mb" if key == "VmRSS" else "peak_rss_mb"] = int(value.split()[0]) / 1024
            elif key == "Threads":
                out["threads"] = int(value)
    return out


class ServerProcess:
    """``with ServerProcess(["testbed", "--max-clients", "4"]) as srv: srv.url ...``: a reward
    server in a child process on a free loopback port; ``srv.log()`` is its stderr so far."""

    def __init__(self, args: list[str], startup_timeout: float = 180.0, env: dict | None = None):
        self.args, self.startup_timeout = list(args), startup_timeout
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        self.env = {**os.environ, **(env or {})}
        self.env["PYTHONPATH"] = os.pathsep.join(p for p in (root, self.env.get("PYTHONPATH")) if p)
        self.proc: subprocess.Popen | None = None
        self.url = ""
        self._peak_threads = 0
        self._stop = threading.Event()

    def __enter__(self) -> ServerProcess:
        self._stderr = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen([sys.executable, "-m", "rewards.server", *self.args, "--port", "0"],
                                     stdout=subprocess.PIPE, stderr=self._stderr, text=True, env=self.env)
        deadline = time.monotonic() + self.startup_timeout
        line = ""
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line or "serving reward" in line or line.startswith("error"):
                break
        if "serving reward" not in line:
            self.__exit__(None, None, None)
            raise RewardError(f"reward server did not start: {line.strip()} {self.log()[-2000:]}")
        self.url = line.split(" on ", 1)[1].split()[0]
        try:  # measure the load's peak, not the imports' (Linux: 5 resets VmHWM)
            with open(f"/proc/{self.proc.pid}/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            pass
        self.baseline = proc_status(self.proc.pid)
        self._peak_threads = self.baseline["threads"]
        self._monitor = threading.Thread(target=self._watch_threads, daemon=True)
        self._monitor.start()
        return self

    def _watch_threads(self) -> None:
        while not self._stop.wait(0.02) and self.proc.poll() is None:
            try:
                self._peak_threads = max(self._peak_threads, proc_status(self.proc.pid)["threads"])
            except (OSError, KeyError):
                return

    def status(self) -> dict:
        out = proc_status(self.proc.pid)
        out["peak_threads"] = self._peak_threads
        return out

    def log(self) -> str:
        self._stderr.seek(0)
        text = self._stderr.read()
        self._stderr.seek(0, io.SEEK_END)
        return text

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


# -- attacks -------------------------------------------------------------------------------------
def _address(url: str) -> tuple[str, int]:
    u = urlparse(url)
    return u.hostname, u.port


def open_stalled(url: str, n: int, declared_bytes: int = 100_000) -> list[socket.socket]:
    """``n`` connections that stall: even ones send headers promising a body and never send it,
    odd ones send nothing at all."""
    socks = []
    for i in range(n):
        s = socket.create_connection(_address(url), timeout=5)
        if i % 2 == 0:
            s.sendall(f"POST /score HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      f"Content-Length: {declared_bytes}\r\n\r\n".encode())
        socks.append(s)
    return socks


def closed_by_server(socks: list[socket.socket], timeout: float) -> int:
    """How many of ``socks`` the server closed (EOF or reset) within ``timeout`` seconds."""
    deadline, closed = time.monotonic() + timeout, set()
    while len(closed) < len(socks) and time.monotonic() < deadline:
        for i, s in enumerate(socks):
            if i in closed:
                continue
            s.settimeout(0.05)
            try:
                if not s.recv(1 << 16):
                    closed.add(i)
            except TimeoutError:
                pass
            except OSError:
                closed.add(i)
    for s in socks:
        s.close()
    return len(closed)


def raw_post(url: str, path: str, body: bytes, token: str | None = None, busy_wait: float = 20.0) -> int:
    """POST ``body`` over a plain socket; the status code (0 if the connection broke before one
    arrived). A 503 (server busy) is retried for up to ``busy_wait`` seconds."""
    head = (f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n" + (f"Authorization: Bearer {token}\r\n" if token else "") + "\r\n")
    deadline = time.monotonic() + busy_wait
    while True:
        with socket.create_connection(_address(url), timeout=30) as s:
            try:
                s.sendall(head.encode() + body)
            except OSError:
                pass
            answer = b""
            try:  # read the whole answer (the server closes): leaving bytes unread would reset it
                while chunk := s.recv(1 << 16):
                    answer += chunk
            except OSError:
                pass
            first = answer.split(b" ", 2)
            status = int(first[1]) if len(first) > 1 and first[1].isdigit() else 0
        if status != 503 or time.monotonic() > deadline:
            return status
        time.sleep(0.05)


def black_png(side: int) -> str:
    """A base64 PNG of a ``side`` x ``side`` black image: a few KB that decode to side² pixels."""
    buf = io.BytesIO()
    Image.fromarray(np.zeros((side, side, 3), np.uint8)).save(buf, format="PNG", optimize=True)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def bad_pixel_statuses(url: str, token: str | None = None) -> dict:
    """Status codes for uint8, all-NaN and 0..255-float safetensors payloads (each should be 400)."""
    from safetensors.torch import save

    out = {}
    for name, t in (("uint8", torch.full((1, 3, 8, 8), 200, dtype=torch.uint8)),
                    ("nan", torch.full((1, 3, 8, 8), float("nan"))),
                    ("float_0_255", torch.full((1, 3, 8, 8), 200.0))):
        body = {"prompts": ["a"], "encoding": "safetensors",
                "images": base64.b64encode(save({"pixels": t})).decode("ascii")}
        out[name] = raw_post(url, "/score", json.dumps(body).encode(), token=token)
    return out


def run_load(url: str, pixels: torch.Tensor, prompts: list[str], *, clients: int, requests_per_client: int,
             stalled: int, socket_timeout: float, big_png_side: int = 4000, big_float_mb: float = 52.0,
             token: str | None = None) -> dict:
    """Drive the server at ``url`` and return what happened (the caller reads memory and threads).

    ``clients`` threads each score ``pixels``/``prompts`` ``requests_per_client`` times through
    ``RemoteReward`` (which retries 503s), while ``stalled`` connections hang and the oversized
    and bad payloads are sent: a ``big_png_side``² black PNG, a float request of about
    ``big_float_mb`` MB of 512 x 512 images (scored if the server's caps admit it, else 413), and
    uint8 / NaN / 0..255 pixels.
    """
    import requests

    from rewards.remote import RemoteReward

    t0 = time.monotonic()
    socks = open_stalled(url, stalled)
    results: list = []
    errors: list = []

    def client():
        remote = RemoteReward(url=url, retries=12, backoff=0.05, timeout=60, batch_size=len(prompts), token=token)
        for _ in range(requests_per_client):
            try:
                results.append(remote(pixels, prompts))
            except RewardError as e:
                errors.append(str(e))

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    big_png = {"prompts": ["a"], "encoding": "png", "images": [black_png(big_png_side)]}
    n_big = max(1, round(big_float_mb * 1e6 / (3 * 512 * 512 * 4)))
    big = {"prompts": [prompts[0]] * n_big, "encoding": "safetensors",
           "images": encode_images(torch.rand(n_big, 3, 512, 512), "safetensors")}
    big_body = json.dumps(big).encode()
    del big
    statuses = {
        f"png_{big_png_side}px": raw_post(url, "/score", json.dumps(big_png).encode(), token=token),
        f"float_{len(big_body) / 1e6:.0f}MB_body": raw_post(url, "/score", big_body, token=token),
        **bad_pixel_statuses(url, token),
    }
    del big_body
    for t in threads:
        t.join()
    dropped = closed_by_server(socks, timeout=socket_timeout * 3 + 2)
    health = requests.get(url + "/health", timeout=10).status_code
    return {
        "requests_served": len(results), "requests_failed": len(errors), "errors": errors[:3],
        "images_scored": len(results) * len(prompts), "concurrent_clients": clients,
        "stalled_clients": stalled, "stalled_dropped": dropped, "statuses": statuses, "health_after": health,
        "wall_s": round(time.monotonic() - t0, 2), "scores": results,
    }
