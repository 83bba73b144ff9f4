"""A bounded load test of ``python -m rewards.server`` on loopback, in its own process so that its
memory and threads can be read from /proc: concurrent clients, stalled clients, an oversized PNG,
an oversized float request and bad pixels at the same time.

The server runs with small caps (4 MiB bodies, 8 connections, 512² pixels per image, 1 Mpx per
request, 0.5 s socket timeout) so the test stays short; the same run at default caps and larger
numbers is ``benchmarks/reward_server_load.py``.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from rewards.loadtest import ServerProcess, run_load
from rewards.testbed import TestbedReward
from tpm.testbed import render, sample_prompts

MAX_CLIENTS = 8
# Peak RSS growth allowed over the ready server. By construction: at most two 4 MiB bodies are held
# (the body budget), one request is decoded at a time (~3 further copies of 4 MiB), the verifier
# works on <= 1 Mpx (a few 12 MB float copies), and each of the 8 handler threads' malloc arenas
# may keep its own peak: about 170 MB in the worst case. Measured: ~30 MB. For scale, one 4000²
# PNG took the unhardened server to 4.8 GB.
RSS_GROWTH_BOUND_MB = 200


@pytest.mark.slow  # a server process (torch import) plus ~8 s of load
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads memory and threads from /proc")
def test_server_survives_load_within_memory_and_thread_bounds():
    prompts = [it.prompt for it in sample_prompts(4, seed=0)]
    pixels = torch.stack([torch.from_numpy(np.asarray(render(p, 64, seed=i), dtype=np.float32) / 255).permute(2, 0, 1)
                          for i, p in enumerate(prompts)])
    args = ["testbed", "--max-clients", str(MAX_CLIENTS), "--max-request-mb", "4", "--max-image-pixels",
            str(512 * 512), "--max-request-pixels", str(1 << 20), "--socket-timeout", "0.5", "--request-timeout", "5"]
    with ServerProcess(args) as srv:
        out = run_load(srv.url, pixels, prompts, clients=8, requests_per_client=2, stalled=16, socket_timeout=0.5,
                       big_float_mb=8)
        status = srv.status()
        log = srv.log()
        assert srv.proc.poll() is None, log  # still up

    expected = TestbedReward()(pixels, prompts)
    assert out["requests_served"] == 16 and out["requests_failed"] == 0, out["errors"]
    for scores in out["scores"]:  # lossless transport of the same per-image verifier: same scores
        torch.testing.assert_close(scores, expected, rtol=0, atol=0)
    assert out["statuses"] == {"png_4000px": 400, "float_13MB_body": 413, "uint8": 400, "nan": 400,
                               "float_0_255": 400}
    assert out["stalled_dropped"] == 16 and out["health_after"] == 200
    # Threads: the handlers are bounded by --max-clients (+ a few for threads starting while others exit).
    assert status["peak_threads"] <= srv.baseline["threads"] + MAX_CLIENTS + 4, status
    assert status["peak_rss_mb"] - srv.baseline["rss_mb"] < RSS_GROWTH_BOUND_MB, status
    # No traceback spam: at most one line per client the server dropped or refused.
    assert "Traceback" not in log
    assert len(log.splitlines()) <= out["stalled_clients"] + 8, log
