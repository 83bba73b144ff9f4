"""GRPO run folders and checkpoints that survive a kill and resume exactly.

A run folder holds ``checkpoints/checkpoint-<iteration>/`` (the policy and, with a KL term, its
frozen reference as ``config.json`` + safetensors; optimizer, scheduler and torch RNG state in a
``weights_only`` torch file; iteration, history and the Python / NumPy RNG states as JSON),
``policy/`` (the exported result), ``run.json`` and ``logs/``. A checkpoint is written to a
temporary folder and renamed, which is atomic on one filesystem, so a kill leaves either the old
or the new checkpoint complete. We do not use ``accelerator.save_state`` because its RNG files are
pickles that need ``torch.load(weights_only=False)``.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from typing import Any

import numpy as np
import torch

from tpm.grpo.config import GRPOConfig, GRPOConfigError

CHECKPOINTS = "checkpoints"
STATE_FILE = "trainer_state.json"
TRAINING_STATE = "training_state.pt"
RUN_MARKERS = (CHECKPOINTS, "policy", "run.json")


def latest_checkpoint(output_dir: str) -> str | None:
    """The newest complete checkpoint folder of a run, or None."""
    root = os.path.join(output_dir, CHECKPOINTS)
    if not os.path.isdir(root):
        return None
    done = [d for d in os.listdir(root) if d.startswith("checkpoint-") and
            os.path.isfile(os.path.join(root, d, STATE_FILE))]
    if not done:
        return None
    return os.path.join(root, max(done, key=lambda d: int(d.split("-")[1])))


def check_output_dir(config: GRPOConfig) -> bool:
    """Refuse a folder holding another run unless resuming / overwriting; True if it must be cleared."""
    out = config.output_dir
    has_run = any(os.path.exists(os.path.join(out, m)) for m in RUN_MARKERS)
    if config.resume:
        if latest_checkpoint(out) is None:
            raise GRPOConfigError(f"--resume: {out} has no checkpoint to resume from; drop --resume to start")
        return False
    if has_run and not config.overwrite:
        raise GRPOConfigError(f"{out} holds another run; pass --resume to continue it, --overwrite to "
                              "replace it, or choose another --output-dir")
    return has_run


def clear_run(output_dir: str) -> None:
    """Delete a previous run's files (checkpoints, policy, run.json, logs) from ``output_dir``."""
    for m in (*RUN_MARKERS, "logs"):
        path = os.path.join(output_dir, m)
        if os.path.isdir(path):
            shutil.rmtree(path)
        elif os.path.exists(path):
            os.remove(path)


BEST_WEIGHTS = "best_policy.safetensors"


def save_checkpoint(output_dir: str, iteration: int, policy, reference, optimizer, scheduler,
                    state: dict[str, Any], keep: int, best: dict[str, torch.Tensor] | None = None) -> str:
    """Write ``checkpoint-<iteration>`` atomically and keep the newest ``keep``; returns its path.

    ``state`` is JSON-able trainer state (history, evaluations); the iteration and the RNG states
    are added here.
    """
    root = os.path.join(output_dir, CHECKPOINTS)
    os.makedirs(root, exist_ok=True)
    name = f"checkpoint-{iteration:06d}"
    tmp = os.path.join(root, f".tmp-{name}")
    if os.path.exists(tmp):
        shutil.rmtree(tmp)
    policy.save_pretrained(os.path.join(tmp, "policy"))
    if reference is not None:  # the KL anchor must survive a resume too
        reference.save_pretrained(os.path.join(tmp, "reference"))
    if best is not None:  # keep_best's candidate so far
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in best.items()}, os.path.join(tmp, BEST_WEIGHTS))
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "torch_rng": torch.get_rng_state()}, os.path.join(tmp, TRAINING_STATE))
    full = {**state, "iteration": iteration, "python_rng": _jsonable(random.getstate()),
            "numpy_rng": _jsonable(np.random.get_state())}
    with open(os.path.join(tmp, STATE_FILE), "w") as f:
        json.dump(full, f)
    path = os.path.join(root, name)
    if os.path.exists(path):
        shutil.rmtree(path)
    os.replace(tmp, path)
    done = sorted((d for d in os.listdir(root) if d.startswith("checkpoint-")), key=lambda d: int(d.split("-")[1]))
    for old in done[:-keep]:
        shutil.rmtree(os.path.join(root, old), ignore_errors=True)
    return path


def load_best(path: str) -> dict[str, torch.Tensor] | None:
    """The keep_best candidate's weights stored in a checkpoint (CPU), or None."""
    from safetensors.torch import load_file

    best = os.path.join(path, BEST_WEIGHTS)
    return load_file(best) if os.path.isfile(best) else None


def load_checkpoint(path: str, policy, reference, optimizer, scheduler, device) -> dict[str, Any]:
    """Restore weights, optimizer, scheduler and every RNG from ``path``; returns the saved trainer state."""
    from safetensors.torch import load_file

    weights = os.path.join(path, "policy", "model.safetensors")
    policy.load_state_dict({k: v.to(device) for k, v in load_file(weights).items()}, strict=True)
    ref = os.path.join(path, "reference", "model.safetensors")
    if reference is not None and os.path.isfile(ref):
        reference.load_state_dict({k: v.to(device) for k, v in load_file(ref).items()}, strict=True)
    st = torch.load(os.path.join(path, TRAINING_STATE), weights_only=True, map_location="cpu")
    optimizer.load_state_dict(st["optimizer"])
    scheduler.load_state_dict(st["scheduler"])
    torch.set_rng_state(st["torch_rng"])
    with open(os.path.join(path, STATE_FILE)) as f:
        state = json.load(f)
    random.setstate(_python_state(state.pop("python_rng")))
    np.random.set_state(_numpy_state(state.pop("numpy_rng")))
    return state


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        return {"__ndarray__": obj.tolist(), "dtype": str(obj.dtype)}
    if isinstance(obj, (tuple, list)):
        return [_jsonable(x) for x in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def _python_state(obj: list) -> tuple:
    version, internal, gauss = obj
    return (version, tuple(internal), gauss)


def _numpy_state(obj: list) -> tuple:
    name, keys, pos, has_gauss, cached = obj
    return (name, np.asarray(keys["__ndarray__"], dtype=keys["dtype"]), pos, has_gauss, cached)
