"""The remote reward against a real loopback server started by the tests."""

from __future__ import annotations

import socket
import threading

import pytest
import requests
import torch
from PIL import Image

import rewards
from rewards.base import RewardError, RewardModel
from rewards.clip_score import CLIPScore
from rewards.remote import RemoteReward
from rewards.server import build_parser, main, make_server, parse_options


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


def start(reward):
    server = make_server(reward, "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


@pytest.fixture
def clip_server(tiny_open_clip, open_clip_tokenizer):
    local = CLIPScore(model=tiny_open_clip, tokenizer=open_clip_tokenizer, batch_size=4)
    server, url = start(local)
    yield local, url
    server.shutdown()
    server.server_close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_remote_equals_local(clip_server, images, prompts):
    local, url = clip_server
    remote = rewards.load("remote", url=url, batch_size=2)  # three requests
    assert requests.get(url + "/health", timeout=5).json() == {"status": "ok", "reward": "clipscore"}
    torch.testing.assert_close(remote(images, prompts), local(images, prompts), rtol=0, atol=0)
    assert remote.server_reward == "clipscore"


def test_remote_png_equals_local_on_8bit_images(clip_server, images, prompts):
    local, url = clip_server
    pil = [Image.fromarray((im.permute(1, 2, 0).numpy() * 255).round().astype("uint8")) for im in images]
    remote = RemoteReward(url=url, encoding="png")
    torch.testing.assert_close(remote(pil, prompts), local(pil, prompts), rtol=0, atol=0)


def test_server_errors_reach_the_client(clip_server, images, prompts):
    _, url = clip_server
    r = requests.post(url + "/score", json={"prompts": ["a"], "encoding": "png", "images": []}, timeout=5)
    assert r.status_code == 400 and "0 images but 1 prompts" in r.json()["error"]
    r = requests.post(url + "/score", data=b"not json", timeout=5)
    assert r.status_code == 400
    r = requests.post(url + "/score", json={"prompts": [], "encoding": "pickle", "images": ""}, timeout=5)
    assert r.status_code == 400 and "unknown image encoding" in r.json()["error"]
    r = requests.post(url + "/score", json={"prompts": ["a"], "encoding": "safetensors", "images": "bm90IHN0"},
                      timeout=5)
    assert r.status_code == 400 and "could not decode the images" in r.json()["error"]
    assert requests.get(url + "/nope", timeout=5).status_code == 404
    with pytest.raises(RewardError, match="5 images but 4 prompts"):
        RemoteReward(url=url)(images, prompts[:4])  # caught on the client, nothing sent


def test_nan_reported_with_index_in_callers_batch(images, prompts):
    server, url = start(NaNEvery(bad=3, batch_size=1))
    try:
        remote = RemoteReward(url=url, batch_size=2)
        with pytest.raises(RewardError, match=r"images \[3\]"):
            remote(images, prompts)
    finally:
        server.shutdown()
        server.server_close()


def test_server_down_is_a_clear_error(images, prompts):
    port = free_port()
    remote = RemoteReward(url=f"http://127.0.0.1:{port}", retries=2, backoff=0.01, timeout=2)
    with pytest.raises(RewardError, match=rf"did not answer GET /health after 2 tries.*tpm reward-serve NAME --port {port}"):
        remote(images, prompts)


def test_cli_options_and_bad_name(capsys):
    assert parse_options(["hps_version=v2.0", "batch_size=4", "scale=1.5", "flag=true", "ids=[1,2]"]) == {
        "hps_version": "v2.0", "batch_size": 4, "scale": 1.5, "flag": True, "ids": [1, 2]}
    with pytest.raises(RewardError, match="key=value"):
        parse_options(["oops"])
    args = build_parser().parse_args(["hpsv2", "--port", "9001", "--device", "cuda:1", "--option", "a=1"])
    assert (args.name, args.port, args.device, args.option) == ("hpsv2", 9001, "cuda:1", ["a=1"])
    assert main(["no_such_reward", "--port", "0"]) == 2
    assert "unknown reward 'no_such_reward'" in capsys.readouterr().out


def test_cli_missing_weights_fails_at_start(offline_hub, capsys):
    assert main(["hpsv2", "--port", "0", "--option", "checkpoint=/nonexistent/HPS_v2.1_compressed.pt"]) == 2
    assert "HPS_v2.1_compressed.pt" in capsys.readouterr().out


@pytest.mark.slow
def test_cli_server_subprocess_matches_local(tmp_path, tiny_ir_config, tiny_ir_model, bert_tokenizer, images,
                                             prompts):
    """`python -m rewards.server imagereward ...` in its own process, loading real files, over loopback."""
    import dataclasses
    import json
    import os
    import subprocess
    import sys
    import time

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
        remote = RemoteReward(url=f"http://127.0.0.1:{port}", retries=60, backoff=0.5, timeout=30)
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            try:
                requests.get(remote.url + "/health", timeout=2)
                break
            except requests.ConnectionError:
                time.sleep(0.5)
        assert proc.poll() is None, proc.stdout.read()
        local = ImageReward(model=tiny_ir_model, tokenizer=bert_tokenizer)
        torch.testing.assert_close(remote(images, prompts), local(images, prompts), rtol=1e-6, atol=1e-6)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
