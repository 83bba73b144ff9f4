"""AsyncDiff's four rewards as clients of four `tpm reward-serve` processes, for a trainer whose GPUs hold
no reward model (recipes/configs/flux_dev_8gpu.yaml names them by import path).

A run's ``rewards`` mapping takes each name once, so four servers need four names: these module-level
instances are they (``rewards.load_by_path`` accepts an instance). Nothing connects at import; the
trainer's start-up check asks each server's /health and stops with one line if one is down.
Host: ``$TPM_REWARD_HOST`` (default 127.0.0.1); ports 8771-8774 in the order below.
"""

import os

from rewards import load

_HOST = os.environ.get("TPM_REWARD_HOST", "127.0.0.1")

imagereward = load("remote", url=f"http://{_HOST}:8771")
hpsv2 = load("remote", url=f"http://{_HOST}:8772")
clipscore = load("remote", url=f"http://{_HOST}:8773")
pickscore = load("remote", url=f"http://{_HOST}:8774")
