"""The remote reward against real loopback servers started by the tests: tpm's own server in both
of its protocols, and a stand-in for a Flow-Factory reward server.

Scores are compared with the local reward under equal batching: the remote path scores each
request's images in forwards of the same sizes as the local call, so with lossless safetensors
transport the scores are bit-identical; a different batching could change them in the last bits
(BLAS kernels differ by batch size), which is not what these tests are about.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import re
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import requests
import torch
from PIL import Image

import rewards
from rewards.base import RewardError, RewardModel
from rewards.clip_score import CLIPScore
from rewards.loadtest import black_png, raw_post
from rewards.remote import RemoteReward
from rewards.server import ServerOptions, binding_warning, build_parser, main, make_server, parse_options
from rewards.wire import Limits, encode_images


class NaNEvery(RewardModel):
    """Scores 0, 1, 2, ... over all images it sees, with NaN where the running index is ``bad``."""

    name = "nan_every"

    def __init__(self, bad: int, **kw):
        super().__init__(**kw)
        self.bad, self.seen = bad, 0

    def _load(self):
        pass

    def _score(self, pixels, prompts):
        out = torch.arange(self.seen, self.seen + len(prompts), dtype=torch.float32)
        out[out == self.bad] = float("nan")
        self.seen += len(prompts)
        return out


def start(reward, options: ServerOptions | None = None):
    server = make_server(reward, "127.0.0.1", 0, options)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


def stop(server):
    server.shutdown()
    server.server_close()


@pytest.fixture
def clip_local(tiny_open_clip, open_clip_tokenizer):
    return CLIPScore(model=tiny_open_clip, tokenizer=open_clip_tokenizer, batch_size=2)


@pytest.fixture
def clip_server(clip_local):
    server, url = start(clip_local)
    yield clip_local, url
    stop(server)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def to_pil(images: torch.Tensor, rounding=np.round) -> list[Image.Image]:
    return [Image.fromarray(rounding(im.permute(1, 2, 0).numpy() * 255).astype("uint8")) for im in images]


def st_body(pixels: torch.Tensor, prompts) -> dict:
    from safetensors.torch import save

    return {"prompts": list(prompts), "encoding": "safetensors",
            "images": base64.b64encode(save({"pixels": pixels})).decode("ascii")}


# -- tpm protocol --------------------------------------------------------------------------------
def test_remote_equals_local(clip_server, images, prompts):
    local, url = clip_server
    remote = rewards.load("remote", url=url, batch_size=2)  # three requests of 2, 2, 1 images
    health = requests.get(url + "/health", timeout=5).json()
    assert health["status"] == "ok" and health["reward"] == "clipscore"
    assert health["limits"] == Limits().as_json()
    # Equal batching (forwards of 2, 2, 1 on both sides) and lossless float32 transport: exact.
    torch.testing.assert_close(remote(images, prompts), local(images, prompts), rtol=0, atol=0)
    assert remote.server_reward == "clipscore"


def test_remote_png_equals_local_on_8bit_images(clip_server, images, prompts):
    local, url = clip_server
    pil = to_pil(images)
    remote = RemoteReward(url=url, encoding="png")  # one request; the server's forwards are 2, 2, 1 as local's
    torch.testing.assert_close(remote(pil, prompts), local(pil, prompts), rtol=0, atol=0)


def test_client_splits_requests_to_the_servers_limits(clip_local, images, prompts):
    server, url = start(clip_local, ServerOptions(limits=Limits(max_images=2)))
    try:
        remote = RemoteReward(url=url)  # batch_size 16, but the server takes 2 images per request
        torch.testing.assert_close(remote(images, prompts), clip_local(images, prompts), rtol=0, atol=0)
        assert server.stats["served"] == 3
    finally:
        stop(server)


def test_server_errors_reach_the_client(clip_server, images, prompts):
    _, url = clip_server
    r = requests.post(url + "/score", json={"prompts": ["a"], "encoding": "png", "images": []}, timeout=5)
    assert r.status_code == 400 and "0 images but 1 prompts" in r.json()["error"]
    r = requests.post(url + "/score", data=b"not json", timeout=5)
    assert r.status_code == 400 and "not JSON" in r.json()["error"]
    r = requests.post(url + "/score", json={"prompts": [], "encoding": "pickle", "images": ""}, timeout=5)
    assert r.status_code == 400 and "unknown image encoding" in r.json()["error"]
    r = requests.post(url + "/score", json={"prompts": ["a"], "encoding": "safetensors", "images": "bm90IHN0"},
                      timeout=5)
    assert r.status_code == 400 and "not a safetensors file" in r.json()["error"]
    r = requests.post(url + "/score", json={"prompts": ["a"], "encoding": "png", "images": ["bm90IHN0"]}, timeout=5)
    assert r.status_code == 400 and "image 0: not a PNG, JPEG or WebP file" in r.json()["error"]
    r = requests.post(url + "/score", json={"prompts": ["a"], "encoding": "png", "images": ["%%%"]}, timeout=5)
    assert r.status_code == 400 and "image 0 is not valid base64" in r.json()["error"]
    assert requests.get(url + "/nope", timeout=5).status_code == 404
    assert requests.post(url + "/nope", json={}, timeout=5).status_code == 404
    with pytest.raises(RewardError, match="5 images but 4 prompts"):
        RemoteReward(url=url)(images, prompts[:4])  # caught on the client, nothing sent


@pytest.mark.parametrize("pixels, message", [
    (torch.full((2, 3, 8, 8), 200, dtype=torch.uint8), "pixels are uint8; send float values in"),
    (torch.full((2, 3, 8, 8), float("nan")), r"images \[0, 1\] hold NaN or infinite"),
    (torch.cat([torch.rand(1, 3, 8, 8), torch.full((1, 3, 8, 8), float("inf"))]), r"images \[1\] hold NaN"),
    (torch.full((2, 3, 8, 8), 200.0), "divide by 255"),
    (torch.full((2, 3, 8, 8), -1.0), r"\(x \+ 1\) / 2"),
    (torch.rand(2, 8, 8), r"must be \(N, 3, H, W\)"),
])
def test_bad_pixels_get_400(clip_server, pixels, message):
    _, url = clip_server
    r = requests.post(url + "/score", json=st_body(pixels, ["a", "b"]), timeout=5)
    assert r.status_code == 400 and re.search(message, r.json()["error"]), r.json()


def test_oversized_images_are_refused_from_their_headers(clip_server):
    _, url = clip_server
    # 4000 x 4000 black: ~60 KB of PNG that would decode to 16 Mpx (the old server reached 4.8 GB on it).
    r = requests.post(url + "/score", json={"prompts": ["a"], "encoding": "png", "images": [black_png(4000)]},
                      timeout=10)
    assert r.status_code == 400 and "4000x4000 = 16000000 pixels" in r.json()["error"]
    assert "--max-image-pixels" in r.json()["error"]
    # Same for a safetensors header that announces a huge tensor: refused before its data is touched.
    from safetensors.torch import save

    blob = bytearray(save({"pixels": torch.zeros(1, 3, 4, 4)}))
    header = json.dumps({"pixels": {"dtype": "F32", "shape": [1, 3, 5000, 5000], "data_offsets": [0, 192]}})
    header += " " * ((8 - len(header) % 8) % 8)
    fake = len(header).to_bytes(8, "little") + header.encode() + bytes(blob[-192:])
    r = requests.post(url + "/score", json={"prompts": ["a"], "encoding": "safetensors",
                                            "images": base64.b64encode(fake).decode()}, timeout=10)
    assert r.status_code == 400 and "5000x5000" in r.json()["error"]
    # Too many images / pixels in one request.
    r = requests.post(url + "/score", json=st_body(torch.rand(65, 3, 2, 2), ["a"] * 65), timeout=10)
    assert r.status_code == 400 and "at most 64 (--max-images)" in r.json()["error"]


def test_oversized_request_gets_413_and_a_clear_client_error(clip_local, images, prompts):
    server, url = start(clip_local, ServerOptions(limits=Limits(max_request_bytes=20_000)))
    try:
        r = requests.post(url + "/score", json=st_body(torch.rand(4, 3, 40, 48), ["a"] * 4), timeout=10)
        assert r.status_code == 413 and "at most 20000 (--max-request-mb)" in r.json()["error"]
        # One 40 x 48 float image is ~31 KB of base64: even split to one image, it exceeds the cap.
        with pytest.raises(RewardError, match=r"\(413\).*--max-request-mb"):
            RemoteReward(url=url)(images, prompts)
    finally:
        stop(server)


def test_nan_reported_with_index_in_callers_batch(images, prompts):
    server, url = start(NaNEvery(bad=3, batch_size=1))
    try:
        remote = RemoteReward(url=url, batch_size=2)
        with pytest.raises(RewardError, match=r"images \[3\]"):
            remote(images, prompts)
    finally:
        stop(server)


def test_server_down_is_a_clear_error(images, prompts):
    port = free_port()
    remote = RemoteReward(url=f"http://127.0.0.1:{port}", retries=2, backoff=0.01, timeout=2)
    with pytest.raises(RewardError, match=rf"did not answer GET /health after 2 tries.*tpm reward-serve NAME --port {port}"):
        remote(images, prompts)


# -- token ---------------------------------------------------------------------------------------
def test_token(clip_local, images, prompts, monkeypatch):
    monkeypatch.delenv("TPM_REWARD_TOKEN", raising=False)
    server, url = start(clip_local, ServerOptions(token="s3cret"))
    try:
        assert requests.get(url + "/health", timeout=5).status_code == 200  # health stays open
        r = requests.post(url + "/score", json=st_body(images, prompts), timeout=5)
        assert r.status_code == 401 and "Authorization: Bearer" in r.json()["error"]
        r = requests.post(url + "/score", json=st_body(images, prompts), timeout=5,
                          headers={"Authorization": "Bearer s3cret-not"})
        assert r.status_code == 401
        with pytest.raises(RewardError, match="refused the request \\(401\\).*TPM_REWARD_TOKEN"):
            RemoteReward(url=url, batch_size=2)(images, prompts)
        expected = clip_local(images, prompts)
        torch.testing.assert_close(RemoteReward(url=url, batch_size=2, token="s3cret")(images, prompts), expected,
                                   rtol=0, atol=0)
        monkeypatch.setenv("TPM_REWARD_TOKEN", "s3cret")
        torch.testing.assert_close(RemoteReward(url=url, batch_size=2)(images, prompts), expected, rtol=0, atol=0)
    finally:
        stop(server)


def test_binding_warning():
    assert binding_warning("127.0.0.1", None) is None and binding_warning("localhost", None) is None
    assert binding_warning("::1", None) is None and binding_warning("0.0.0.0", "t") is None
    assert "without a token" in binding_warning("0.0.0.0", None)


# -- stalled and busy clients --------------------------------------------------------------------
def test_stalled_client_is_dropped_with_one_line_and_others_get_503(clip_local, images, prompts, caplog, capfd):
    caplog.set_level(logging.INFO, logger="rewards.server")
    server, url = start(clip_local, ServerOptions(max_clients=1, socket_timeout=0.5, request_timeout=30))
    try:
        host, port = server.server_address[:2]
        stalled = socket.create_connection((host, port))
        stalled.sendall(b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n\r\n")  # and never the body
        time.sleep(0.1)
        assert raw_post(url, "/score", b"{}", busy_wait=0) == 503  # the one slot is taken: answered at once
        remote = RemoteReward(url=url, batch_size=2, retries=10, backoff=0.1)  # retries 503 until the slot frees
        torch.testing.assert_close(remote(images, prompts), clip_local(images, prompts), rtol=0, atol=0)
        stalled.settimeout(5)
        assert stalled.recv(100) == b""  # the server closed it
        stalled.close()
    finally:
        stop(server)
    drops = [r.getMessage() for r in caplog.records if "dropped client" in r.getMessage()]
    assert len(drops) == 1 and "sent 0 of 5000 body bytes" in drops[0]
    assert "Traceback" not in capfd.readouterr().err


def test_trickling_client_is_cut_at_the_request_deadline(clip_local, caplog):
    caplog.set_level(logging.INFO, logger="rewards.server")
    server, _ = start(clip_local, ServerOptions(socket_timeout=5, request_timeout=1))
    try:
        s = socket.create_connection(server.server_address[:2])
        s.sendall(b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n")
        closed = False
        for _ in range(60):  # one byte every 0.1 s: each recv succeeds, only the deadline can end it
            try:
                s.sendall(b" ")
            except OSError:
                closed = True
                break
            time.sleep(0.1)
        s.close()
    finally:
        stop(server)
    assert closed
    assert any("not received within 1 s" in r.getMessage() for r in caplog.records)


# -- Flow-Factory protocol -----------------------------------------------------------------------
class FlowFactoryStandIn(ThreadingHTTPServer):
    """What a server built from Flow-Factory's ``reward_server/`` template does: GET /health ->
    {"status": "ok"}; POST /compute reads ``prompts``, base64 ``images`` (decoded to RGB PIL) and
    ``extra`` (passed on as keyword arguments), answers {"rewards": [...]}; any exception becomes a
    500 with FastAPI's {"detail": message}."""

    def __init__(self, compute):
        self.compute, self.seen_extra = compute, []
        outer = self

        class H(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def _json(self, status, body):
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                self._json(200, {"status": "ok"}) if self.path == "/health" else self._json(404, {"detail": "Not Found"})

            def do_POST(self):
                if self.path != "/compute":
                    return self._json(404, {"detail": "Not Found"})
                data = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                try:
                    extra = data.get("extra") or {}
                    outer.seen_extra.append(extra)
                    images = [Image.open(io.BytesIO(base64.b64decode(b))).convert("RGB") for b in data["images"]]
                    self._json(200, {"rewards": outer.compute(prompts=data["prompts"], images=images, **extra)})
                except Exception as e:
                    self._json(500, {"detail": str(e)})

        super().__init__(("127.0.0.1", 0), H)


def test_client_speaks_flow_factory(clip_local, images, prompts):
    def compute(prompts, images, scale=1.0):
        if prompts[0] == "fail":
            raise ValueError("the judge fell over")
        return [scale * float(s) for s in clip_local(images, prompts)]

    ff = FlowFactoryStandIn(compute)
    threading.Thread(target=ff.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{ff.server_address[1]}"
    try:
        remote = rewards.load("remote", url=url, protocol="flow_factory", batch_size=2, extra={"scale": 2.0})
        expected = 2.0 * clip_local(to_pil(images), prompts)  # PNG transport: the 8-bit images, rounded
        torch.testing.assert_close(remote(images, prompts), expected, rtol=0, atol=0)
        assert ff.seen_extra == [{"scale": 2.0}] * 3 and remote.server_reward is None
        with pytest.raises(RewardError, match=r"\(500\): the judge fell over"):
            RemoteReward(url=url, protocol="flow_factory")(images[:1], ["fail"])
    finally:
        ff.shutdown()
        ff.server_close()


def test_server_speaks_flow_factory(clip_server, images, prompts):
    local, url = clip_server
    # The request exactly as Flow-Factory's RemotePointwiseRewardModel builds it: singular keys,
    # PNGs of the [0, 1] images truncated to uint8, and None for the other modalities.
    truncated = to_pil(images, rounding=np.floor)
    payload = {"prompt": prompts, "image": [base64.b64encode(_png(im)).decode() for im in truncated],
               "video": None, "condition_images": None, "condition_videos": None}
    r = requests.post(url + "/compute", json=payload, timeout=10)
    assert r.status_code == 200 and set(r.json()) == {"rewards"}
    torch.testing.assert_close(torch.tensor(r.json()["rewards"]), local(truncated, prompts), rtol=0, atol=0)
    # The template's plural keys, as our client sends them.
    remote = RemoteReward(url=url, protocol="flow_factory")
    torch.testing.assert_close(remote(images, prompts), local(to_pil(images), prompts), rtol=0, atol=0)
    r = requests.post(url + "/compute", json={**payload, "video": [["x"]]}, timeout=10)
    assert r.status_code == 400 and "'video' is not supported" in r.json()["detail"]
    r = requests.post(url + "/compute", json={"prompt": ["a"]}, timeout=10)
    assert r.status_code == 400 and "'images' (or 'image')" in r.json()["detail"]
    r = requests.post(url + "/compute", json={"prompts": ["a"], "images": [black_png(4000)]}, timeout=10)
    assert r.status_code == 400 and "4000x4000" in r.json()["detail"]


def _png(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def test_client_options_are_checked():
    with pytest.raises(RewardError, match="PNG images only"):
        RemoteReward(protocol="flow_factory", encoding="safetensors")
    with pytest.raises(RewardError, match="unknown reward-server protocol"):
        RemoteReward(protocol="grpc")
    with pytest.raises(RewardError, match="protocol='flow_factory' only"):
        RemoteReward(extra={"a": 1})
    assert RemoteReward(protocol="flow_factory").encoding == "png"
    assert len(encode_images(torch.rand(2, 3, 4, 4), "png")) == 2


# -- command line --------------------------------------------------------------------------------
def test_cli_options_and_bad_name(capsys):
    assert parse_options(["hps_version=v2.0", "batch_size=4", "scale=1.5", "flag=true", "ids=[1,2]"]) == {
        "hps_version": "v2.0", "batch_size": 4, "scale": 1.5, "flag": True, "ids": [1, 2]}
    with pytest.raises(RewardError, match="key=value"):
        parse_options(["oops"])
    args = build_parser().parse_args(["hpsv2", "--port", "9001", "--device", "cuda:1", "--option", "a=1"])
    assert (args.name, args.port, args.device, args.option) == ("hpsv2", 9001, "cuda:1", ["a=1"])
    assert main(["no_such_reward", "--port", "0"]) == 2
    assert "unknown reward 'no_such_reward'" in capsys.readouterr().out
    assert main(["testbed", "--port", "0", "--max-clients", "0"]) == 2
    assert "max_clients must be a positive integer" in capsys.readouterr().out
    assert main(["testbed", "--port", "0", "--token-file", "/nonexistent/token"]) == 2
    assert "could not read --token-file" in capsys.readouterr().out


def test_tpm_reward_serve_help_lists_every_option(capsys):
    from tpm.app.cli import main as tpm_main

    with pytest.raises(SystemExit) as exit_:
        tpm_main(["reward-serve", "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    options = [s for a in build_parser()._actions for s in a.option_strings if s.startswith("--")]
    assert {"--host", "--port", "--device", "--option", "--token-file", "--max-clients"} <= set(options)
    assert [o for o in options if o not in out] == []
    assert "usage: tpm reward-serve" in out


def test_cli_missing_weights_fails_at_start(offline_hub, capsys):
    assert main(["hpsv2", "--port", "0", "--option", "checkpoint=/nonexistent/HPS_v2.1_compressed.pt"]) == 2
    assert "HPS_v2.1_compressed.pt" in capsys.readouterr().out


@pytest.mark.slow
def test_cli_server_subprocess_matches_local(tmp_path, tiny_ir_config, tiny_ir_model, bert_tokenizer, images,
                                             prompts):
    """`python -m rewards.server imagereward ...` in its own process, loading real files, over loopback."""
    import dataclasses
    import os
    import subprocess
    import sys

    from rewards.imagereward import ImageReward
    from rewards.imagereward_mapping import map_name

    # Write the tiny model as an official-format checkpoint, and the tokenizer as a folder.
    ours = tiny_ir_model.state_dict()
    official = {}
    for key, shape in tiny_ir_config.official_shapes().items():
        name = map_name(key)
        official[key] = ours[name] if name else torch.zeros(shape, dtype=torch.long if "position_ids" in key else None)
    torch.save(official, tmp_path / "ImageReward.pt")
    bert_tokenizer.save_pretrained(tmp_path / "tok")
    port = free_port()
    cmd = [sys.executable, "-m", "rewards.server", "imagereward", "--port", str(port), "--batch-size", "2",
           "--option", f"checkpoint={tmp_path / 'ImageReward.pt'}", "--option", f"tokenizer_id={tmp_path / 'tok'}",
           "--option", "config=" + json.dumps(dataclasses.asdict(tiny_ir_config))]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(cmd, cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))), env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        remote = RemoteReward(url=f"http://127.0.0.1:{port}", retries=60, backoff=0.5, timeout=30, batch_size=2)
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            try:
                requests.get(remote.url + "/health", timeout=2)
                break
            except requests.ConnectionError:
                time.sleep(0.5)
        assert proc.poll() is None, proc.stdout.read()
        local = ImageReward(model=tiny_ir_model, tokenizer=bert_tokenizer, batch_size=2)
        # Another process (its own thread count and kernels): equal batching, and a tolerance of
        # 1e-6 for BLAS differences between the processes.
        torch.testing.assert_close(remote(images, prompts), local(images, prompts), rtol=1e-6, atol=1e-6)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
