"""Saving small modules as a directory: ``config.json`` + ``model.safetensors`` (no pickle).

Policies and the uncertainty head share this format and these helpers, so that a directory is
written, read and checked one way, and a broken one fails with the same messages whatever it
holds. ``config.json`` is a JSON object with a key (``key``) that names what the directory
holds; ``model.safetensors`` is present when the module has weights.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

from torch import nn

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


def write_config_and_weights(path: str | os.PathLike, config: dict[str, Any], module: nn.Module | None = None) -> None:
    """Write ``config`` to ``path/config.json`` and, if ``module`` has weights, ``path/model.safetensors``."""
    from safetensors.torch import save_file

    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, CONFIG_NAME), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    state = {} if module is None else {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}
    if state:
        save_file(state, os.path.join(path, WEIGHTS_NAME))


def read_config(path: str | os.PathLike, *, key: str, kind: str, hint: str,
                error: type[Exception] = ValueError) -> dict[str, Any]:
    """``path/config.json`` as a dict that has ``key``; ``error`` with a message saying what is wrong.

    ``kind`` names what the directory should hold ("policy"), ``hint`` how to make one.
    """
    if not os.path.isdir(path):
        raise error(f"{kind} directory {str(path)!r} does not exist")
    cfg_path = os.path.join(path, CONFIG_NAME)
    if not os.path.isfile(cfg_path):
        raise error(f"{path} has no {CONFIG_NAME}: it is not an exported {kind} ({hint})")
    try:
        with open(cfg_path) as f:
            cfg = json.load(f)
    except json.JSONDecodeError as e:
        raise error(f"{cfg_path} is not valid JSON ({e})") from None
    if not isinstance(cfg, dict) or key not in cfg:
        raise error(f"{cfg_path} has no {key!r} key naming the {kind} class")
    return cfg


def load_weights(path: str | os.PathLike, module: nn.Module, *, label: str, kind: str,
                 error: type[Exception] = ValueError) -> None:
    """Load ``path/model.safetensors`` into ``module`` (strict); nothing to do if it has no weights.

    ``label`` names the module in messages (e.g. "'tpm' policy").
    """
    expected = module.state_dict()
    if not expected:
        return
    weights = os.path.join(path, WEIGHTS_NAME)
    if not os.path.isfile(weights):
        raise error(f"{path} has no {WEIGHTS_NAME}, but a {label} has weights")
    from safetensors.torch import load_file

    try:
        loaded = load_file(weights)
    except Exception as e:  # a corrupt or truncated file
        raise error(f"{weights} could not be read ({e}); re-export the {kind}") from None
    bad = {k: (tuple(v.shape), tuple(loaded[k].shape)) for k, v in expected.items()
           if k in loaded and v.shape != loaded[k].shape}
    missing = sorted(set(expected) - set(loaded))
    if bad or missing:
        raise error(
            f"{weights} does not match the {label} built from its config (shape mismatches {bad}, "
            f"missing {missing}); it was made for another configuration or backbone"
        )
    module.load_state_dict(loaded, strict=True)


def read_config_and_weights(path: str | os.PathLike, build: Callable[[dict[str, Any]], nn.Module], *, key: str,
                            kind: str, hint: str, error: type[Exception] = ValueError) -> nn.Module:
    """What :func:`write_config_and_weights` wrote: ``build(config)`` with its weights loaded, in eval mode."""
    cfg = read_config(path, key=key, kind=kind, hint=hint, error=error)
    module = build(cfg)
    load_weights(path, module, label=f"{cfg[key]!r} {kind}", kind=kind, error=error)
    return module.eval()
