"""GRPO run folders and checkpoints that survive a kill and resume exactly.

A run folder holds ``checkpoints/checkpoint-<iteration>/`` (the policy and, with a KL term, its
frozen reference as ``config.json`` + safetensors; optimizer, scheduler and torch RNG state in a
``weights_only`` torch file; iteration, history and the Python / NumPy RNG states as JSON; the
keep_best candidate and the weight average (``ema_decay``) as safetensors files),
``policy/`` (the exported result), ``run.json`` and ``logs/``. A checkpoint is written to a
temporary folder and renamed, which is atomic on one filesystem, so a kill leaves either the old
or the new checkpoint complete; pruning renames an old checkpoint out of the ``checkpoint-*`` names
before deleting it and runs again at every start, so a kill anywhere leaves at most one extra
checkpoint, gone after the next start or save. We do not use ``accelerator.save_state`` because
its RNG files are pickles that need ``torch.load(weights_only=False)``.

A run folder is held by one process at a time through an exclusive lock on ``.tpm.lock``
(``filelock``, an OS-level lock released when the process dies). ``overwrite`` moves the previous
run into ``.previous-run/`` and deletes it only once the new run has completed an iteration; a new
run that fails before that puts the previous one back.
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
# Everything a run writes at the top of its folder (moved aside as a whole by overwrite).
RUN_FILES = (*RUN_MARKERS, "logs", "policy_last", "config.yaml", "report.json", "report.md", "report.png")
LOCK_FILE = ".tpm.lock"
PREVIOUS = ".previous-run"


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


def has_run(output_dir: str) -> bool:
    return any(os.path.exists(os.path.join(output_dir, m)) for m in RUN_MARKERS)


def resume_checkpoint(config: GRPOConfig) -> str:
    """The checkpoint ``config.resume`` names: ``latest`` in output_dir, a checkpoint folder, or a run folder."""
    target = config.resume
    if target == "latest":
        path = latest_checkpoint(config.output_dir)
        if path is None:
            raise GRPOConfigError(f"--resume: {config.output_dir} has no checkpoint to resume from; drop --resume "
                                  "to start a new run")
        return path
    if os.path.isfile(os.path.join(target, STATE_FILE)):
        return target
    if os.path.isdir(target):
        path = latest_checkpoint(target)
        if path is not None:
            return path
    raise GRPOConfigError(f"--resume {target}: not a checkpoint folder (with {STATE_FILE}) nor a run folder "
                          "holding one; give 'latest', a checkpoints/checkpoint-N folder or a run folder")


def check_output_dir(config: GRPOConfig) -> bool:
    """Refuse a folder holding another run unless resuming / overwriting; True if it must be cleared."""
    out = config.output_dir
    if config.resume is not None:
        path = resume_checkpoint(config)
        inside = os.path.commonpath([os.path.abspath(path), os.path.abspath(out)]) == os.path.abspath(out)
        if not inside and has_run(out):
            raise GRPOConfigError(f"--resume {config.resume}: resuming into {out}, which holds another run; "
                                  "choose an empty --output-dir")
        return False
    if has_run(out) and not config.overwrite:
        raise GRPOConfigError(f"{out} holds another run; pass --resume to continue it, --overwrite to "
                              "replace it, or choose another --output-dir")
    return has_run(out)


def set_aside(output_dir: str) -> str | None:
    """Move a previous run's files into ``output_dir/.previous-run`` (renames: nothing is copied or lost)."""
    previous = os.path.join(output_dir, PREVIOUS)
    if os.path.exists(previous):  # an earlier overwrite that never completed an iteration: that run is the one to keep
        restore_previous(output_dir)
    names = [m for m in RUN_FILES if os.path.lexists(os.path.join(output_dir, m))]
    if not names:
        return None
    os.makedirs(previous)
    for m in names:
        os.replace(os.path.join(output_dir, m), os.path.join(previous, m))
    return previous


def restore_previous(output_dir: str) -> bool:
    """Put a run set aside by :func:`set_aside` back, discarding what the failed new run wrote."""
    previous = os.path.join(output_dir, PREVIOUS)
    if not os.path.isdir(previous):
        return False
    for m in RUN_FILES:
        _remove(os.path.join(output_dir, m))
    for m in os.listdir(previous):
        os.replace(os.path.join(previous, m), os.path.join(output_dir, m))
    os.rmdir(previous)
    return True


def recover(output_dir: str) -> bool:
    """Put back a run that an ``overwrite`` killed before its first iteration had set aside (call with the
    lock held, before looking at the folder); True if one was restored."""
    if not os.path.isdir(os.path.join(output_dir, PREVIOUS)):
        return False
    restore_previous(output_dir)
    print(f"{output_dir}: restored the run that an interrupted --overwrite had set aside")
    return True


def discard_previous(output_dir: str) -> None:
    """Delete the run set aside by :func:`set_aside` (the new run has started cleanly)."""
    _remove(os.path.join(output_dir, PREVIOUS))


def clear_run(output_dir: str) -> None:
    """Delete a previous run's files (checkpoints, policy, run.json, logs, report) from ``output_dir``."""
    for m in RUN_FILES:
        _remove(os.path.join(output_dir, m))


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.remove(path)


# ---- the run folder's lock -------------------------------------------------------------------------
_HELD: dict[str, list] = {}  # realpath -> [FileLock, count]: re-entrant within this process


def acquire_lock(output_dir: str) -> str:
    """Hold the run folder exclusively (re-entrant in one process); raises if another process holds it."""
    from filelock import FileLock, Timeout

    os.makedirs(output_dir, exist_ok=True)
    key = os.path.realpath(output_dir)
    if key in _HELD:
        _HELD[key][1] += 1
        return key
    lock = FileLock(os.path.join(output_dir, LOCK_FILE), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise GRPOConfigError(f"{output_dir} is in use by another training process (lock {LOCK_FILE} is held); "
                              "wait for it to finish or choose another --output-dir") from None
    _HELD[key] = [lock, 1]
    return key


def release_lock(output_dir: str) -> None:
    key = os.path.realpath(output_dir)
    if key not in _HELD:
        return
    _HELD[key][1] -= 1
    if _HELD[key][1] == 0:
        _HELD.pop(key)[0].release()


def config_changes(saved: dict[str, Any], current: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """GRPO fields whose value differs between a checkpoint's config and this run's, except those a
    resumed run may change (:data:`tpm.grpo.config.RESUMABLE_CHANGES`). A field added after the
    checkpoint was written counts as unchanged while it keeps its default (what the old run did)."""
    import dataclasses

    from tpm.grpo.config import RESUMABLE_CHANGES, GRPOConfig

    defaults = {f.name: f.default for f in dataclasses.fields(GRPOConfig) if f.default is not dataclasses.MISSING}
    saved = {**{k: v for k, v in defaults.items() if k in current and k not in saved}, **saved}
    keys = (set(saved) | set(current)) - set(RESUMABLE_CHANGES)
    return {k: (saved.get(k, "<unset>"), current.get(k, "<unset>")) for k in sorted(keys)
            if saved.get(k, "<unset>") != current.get(k, "<unset>")}


def resume_changes(config: GRPOConfig, run_config: dict[str, Any] | None = None,
                   path: str | None = None) -> dict[str, tuple[Any, Any]]:
    """This run's config against the checkpoint it resumes (``path``, default :func:`resume_checkpoint`):
    GRPO fields by name, the recipe's settings (``run_config``) as ``run.<key>``. Raises unless the
    changes are accepted (``accept_config_changes``); returns them."""
    path = path or resume_checkpoint(config)
    with open(os.path.join(path, STATE_FILE)) as f:
        saved = json.load(f)
    saved_config, current = dict(saved.get("config", {})), config.to_dict()
    if not current["sample_kwargs"]:  # filled from the pipeline once it loads; the trainer compares it then
        current.pop("sample_kwargs")
        saved_config.pop("sample_kwargs", None)
    changes = config_changes(saved_config, current)
    changes.update({f"run.{k}": v for k, v in config_changes(saved.get("run_config") or {}, run_config or {}).items()})
    if changes and not config.accept_config_changes:
        listed = "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changes.items())
        raise GRPOConfigError(f"--resume {path}: the config differs from the checkpoint's ({listed}); pass "
                              "--accept-config-changes to continue with the new values, or restore them")
    return changes


def preflight(config: GRPOConfig, run_config: dict[str, Any] | None = None, *, main: bool = True,
              barrier=None) -> tuple[bool, dict[str, tuple[Any, Any]]]:
    """The run folder's checks, the one place both ``tpm train`` (before the model loads) and the trainer
    (again, for callers that use it directly) run them.

    ``main`` (the main process) locks the folder (the caller releases it with :func:`release_lock`,
    error or not; re-entrant, so a second preflight in the same process is free) and puts back a run an interrupted ``overwrite`` set
    aside; then every process refuses a folder holding another run unless resuming or overwriting, and a
    resume whose config differs from its checkpoint's (:func:`resume_changes`), so that all raise
    together. ``barrier``: called between the two (``accelerator.wait_for_everyone``). Returns whether
    the folder holds a run to set aside, and the accepted config changes of a resume.
    """
    if main:
        acquire_lock(config.output_dir)
        recover(config.output_dir)
    if barrier is not None:
        barrier()
    clear = check_output_dir(config)
    changes = resume_changes(config, run_config) if config.resume is not None else {}
    return clear, changes


BEST_WEIGHTS = "best_policy.safetensors"
EMA_WEIGHTS = "ema_policy.safetensors"


def save_checkpoint(output_dir: str, iteration: int, policy, reference, optimizer, scheduler,
                    state: dict[str, Any], keep: int, best: dict[str, torch.Tensor] | None = None,
                    ema: dict[str, torch.Tensor] | None = None) -> str:
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
        _save_weights(tmp, BEST_WEIGHTS, best)
    if ema is not None:  # the moving average of the weights (ema_decay)
        _save_weights(tmp, EMA_WEIGHTS, ema)
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
    prune_checkpoints(output_dir, keep)
    return path


def prune_checkpoints(output_dir: str, keep: int) -> list[str]:
    """Delete all but the newest ``keep`` checkpoints (and leftovers of interrupted saves / prunes).

    Each old checkpoint is first renamed out of the ``checkpoint-*`` names (atomic), then deleted, so
    an interrupted prune never leaves a half-deleted folder that counts as a checkpoint; the trainer
    calls this at every start too, so a kill between a save and its prune is made good even when no
    further save comes (a run killed after its last checkpoint, then resumed).
    """
    root = os.path.join(output_dir, CHECKPOINTS)
    if not os.path.isdir(root):
        return []
    done = sorted((d for d in os.listdir(root) if d.startswith("checkpoint-")), key=lambda d: int(d.split("-")[1]))
    removed = []
    for old in done[:-keep]:
        trash = os.path.join(root, f".trash-{old}")
        os.replace(os.path.join(root, old), trash)
        removed.append(old)
    for d in os.listdir(root):
        if d.startswith(".trash-"):
            shutil.rmtree(os.path.join(root, d), ignore_errors=True)
    return removed


def load_best(path: str) -> dict[str, torch.Tensor] | None:
    """The keep_best candidate's weights stored in a checkpoint (CPU), or None."""
    return _load_weights(path, BEST_WEIGHTS)


def load_ema(path: str) -> dict[str, torch.Tensor] | None:
    """The moving average of the weights stored in a checkpoint (CPU), or None."""
    return _load_weights(path, EMA_WEIGHTS)


def _save_weights(path: str, name: str, weights: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    save_file({k: v.detach().cpu().contiguous() for k, v in weights.items()}, os.path.join(path, name))


def _load_weights(path: str, name: str) -> dict[str, torch.Tensor] | None:
    from safetensors.torch import load_file

    file = os.path.join(path, name)
    return load_file(file) if os.path.isfile(file) else None


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
