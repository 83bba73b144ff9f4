"""Load on ``tpm reward-serve`` at its default caps: concurrent clients, stalled clients, a 4000²
black PNG, a ~52 MB float request and bad pixels at once; prints JSON with the requests served,
the clients, and the server's baseline and peak RSS and threads (read from /proc; Linux only).

The server is the ``testbed`` reward (no weights) in its own process. Usage:
``python benchmarks/reward_server_load.py [--clients 32] [--requests 4] [--stalled 50] [--out f.json]``.
Extra server flags go after ``--``, e.g. ``-- --max-clients 16``.
"""

from __future__ import annotations

import argparse
import json
import platform

import numpy as np
import torch

from rewards.loadtest import ServerProcess, run_load
from rewards.server import ServerOptions
from tpm.testbed import render, sample_prompts


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, default=32, help="concurrent scoring clients")
    p.add_argument("--requests", type=int, default=4, help="requests per client")
    p.add_argument("--images", type=int, default=8, help="images per request (64 x 64 testbed renders)")
    p.add_argument("--stalled", type=int, default=50, help="connections that stall")
    p.add_argument("--big-float-mb", type=float, default=52.0, help="size of the large float request")
    p.add_argument("--out", default=None, help="also write the JSON here")
    p.add_argument("server_args", nargs="*", help="extra `tpm reward-serve` flags (after --)")
    args = p.parse_args(argv)

    prompts = [it.prompt for it in sample_prompts(args.images, seed=0)]
    pixels = torch.stack([torch.from_numpy(np.asarray(render(q, 64, seed=i), dtype=np.float32) / 255)
                          .permute(2, 0, 1) for i, q in enumerate(prompts)])
    socket_timeout = ServerOptions().socket_timeout
    for i, a in enumerate(args.server_args[:-1]):
        if a == "--socket-timeout":
            socket_timeout = float(args.server_args[i + 1])
    with ServerProcess(["testbed", "--option", "size=64", *args.server_args]) as srv:
        out = run_load(srv.url, pixels, prompts, clients=args.clients, requests_per_client=args.requests,
                       stalled=args.stalled, socket_timeout=socket_timeout, big_float_mb=args.big_float_mb)
        status = srv.status()
        alive = srv.proc.poll() is None
        log = srv.log()
    out.pop("scores")
    out.update(
        server_alive=alive, server_args=args.server_args,
        baseline_rss_mb=round(srv.baseline["rss_mb"], 1), peak_rss_mb=round(status["peak_rss_mb"], 1),
        rss_growth_mb=round(status["peak_rss_mb"] - srv.baseline["rss_mb"], 1),
        baseline_threads=srv.baseline["threads"], peak_threads=status["peak_threads"],
        log_lines=len(log.splitlines()), tracebacks=log.count("Traceback"),
        machine=platform.machine(), torch=torch.__version__,
    )
    text = json.dumps(out, indent=1)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return out


if __name__ == "__main__":
    main()
