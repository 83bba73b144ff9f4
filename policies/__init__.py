"""Timestep policies, one file per family, each readable as its paper's method.

``policies.load(name_or_path, **options)`` builds a registered policy by name (e.g.
``"synchronous"``, ``"asyndm"``, ``"asyndm:piecewise_linear"``) or restores an exported one
from a directory holding ``config.json`` (+ ``model.safetensors``) or from a Hub repo id
(``"org/name"``, through huggingface_hub's cache). A folder written by ``tpm export-scheduler``
(``scheduler_config.json``) loads as the state-free policy that replays its table
(:class:`tpm.schedulers.ScheduleTable`).
"""

from __future__ import annotations

import os

from policies import concave as _concave
from policies.compose import Compose, compose
from policies.concave import Concave
from policies.field import FieldPolicy
from policies.field_table import FieldTable
from policies.masks import find_objects, mask_from_image
from policies.shifted import ShiftedGrid
from policies.spatial import Inpaint, Raster, inpaint_policy, outpaint_policy
from policies.tpm import TPM, ConstantDeviation
from policies.uncertainty import UncertaintyPatches
from policies.uncertainty_head import UncertaintyHead
from policies.velocity_scale import VelocityScale
from tpm.loading import LoadError, parse_spec
from tpm.policy import Policy, PolicyError, Synchronous, read_policy_config, registered_policies

# Named presets: name -> (registered policy, options). "name:variant" picks a schedule variant.
PRESETS: dict[str, tuple[str, dict]] = {
    "synchronous": ("synchronous", {}),
    "tpm": ("tpm", {}),
    "velocity_scale": ("velocity_scale", {}),
    "field": ("field", {}),
    "shifted_grid": ("shifted_grid", {}),
    "constant_deviation": ("constant_deviation", {}),
    "uncertainty": ("uncertainty_patches", {"source": "x0_change"}),
    **_concave.PRESETS,
}
# Variant words after "name:" and the options they set, per preset family.
VARIANTS: dict[str, dict[str, dict]] = {"asyndm": _concave.VARIANTS, "dm_concave": _concave.VARIANTS}


def available() -> list[str]:
    """Every name :func:`load` accepts (besides directories)."""
    return sorted(set(PRESETS) | set(registered_policies()))


def load(name_or_path: str | os.PathLike, *, revision: str | None = None, token: str | bool | None = None,
         **options) -> Policy:
    """A policy by registered name / preset, from an exported directory, or from a Hub repo.

    Names take variant words and options after colons: ``"asyndm:exponential"``,
    ``"dm_concave:weight=0.5"``, ``"shifted_grid:shift=2.5"``; keyword ``options`` are added on top.
    A Hub repo id ``"org/name"`` (``"org/name@rev"``, or ``revision=`` a branch, tag or commit) is
    read through huggingface_hub's cache, offline too when it is cached (:mod:`tpm.hub`); an
    existing local folder of the same name wins (write ``./org/name`` to be explicit).
    """
    from tpm.hub import HubError, is_repo_id, resolve

    key = str(name_or_path)
    base_name = key.partition(":")[0]
    # Names win over same-named folders (running from the repo root, "tpm" is also a directory).
    is_name = base_name in PRESETS or base_name in registered_policies()
    if not is_name and not os.path.isdir(key) and is_repo_id(key):
        try:
            folder = resolve(key, revision=revision, token=token)
        except HubError as e:  # say both readings: a mistyped local path looks like a repo id
            schedule = _hub_schedule(key, revision, token) if "no config.json" in str(e) else None
            if schedule is not None:
                return schedule
            raise PolicyError(f"no local folder {key!r}, and as a Hub repo id: {e}") from None
        try:
            return _from_folder(folder, options)
        except PolicyError as e:
            raise PolicyError(f"Hub repo {key!r} holds no usable tpm policy: {e}") from None
    if revision is not None:
        raise PolicyError(f"revision={revision!r} applies to Hub repo ids (org/name); {key!r} is not one")
    if not is_name and (os.path.isdir(key) or os.sep in key or key.startswith(".")):
        return _from_folder(key, options)
    try:
        base, words, named = parse_spec(key)
    except LoadError as e:
        raise PolicyError(str(e)) from None
    opts: dict = {}
    if base in PRESETS:
        reg, preset = PRESETS[base]
        opts.update(preset)
        for word in words:
            opts.update(_variant_options(base, word))
    elif base in registered_policies():
        reg = base
        if words:
            raise PolicyError(f"policy {base!r} has no variant {words[0]!r}; give options as key=value")
    else:
        raise PolicyError(f"unknown policy {key!r}; valid names: {available()} or a policy directory")
    opts.update(named)
    opts.update(options)
    return registered_policies()[reg](**opts)


def _hub_schedule(repo_id: str, revision, token) -> Policy | None:
    """A Hub repo holding an exported schedule (``tpm export-scheduler``) as its replaying policy, or None."""
    from tpm.hub import HubError
    from tpm.schedulers import ScheduleError, table_policy

    try:
        return table_policy(repo_id, revision=revision, token=token)
    except (HubError, ScheduleError):
        return None


def _from_folder(path: str, options: dict) -> Policy:
    from tpm.schedulers import is_scheduler_folder, table_policy

    if not os.path.isfile(os.path.join(path, "config.json")) and is_scheduler_folder(path):
        # An exported schedule (tpm export-scheduler): replayed as a state-free policy, so that
        # tpm compare / tpm sample run it next to policies.
        if options:
            raise PolicyError("options cannot be combined with an exported schedule folder")
        return table_policy(path)
    cfg = read_policy_config(path)
    cls = registered_policies().get(cfg["policy"])
    if cls is None:
        raise PolicyError(f"{path} holds policy {cfg['policy']!r}, which is not registered; known: {available()}")
    if options:
        raise PolicyError("options cannot be combined with a saved policy directory; edit its config.json")
    return cls.from_pretrained(path)


def _variant_options(base: str, variant: str) -> dict:
    table = VARIANTS.get(base, {})
    if variant not in table:
        raise PolicyError(f"policy {base!r} has no variant {variant!r}; variants: {sorted(table) or 'none'}")
    return table[variant]


__all__ = ["Compose", "Concave", "ConstantDeviation", "FieldPolicy", "FieldTable", "Inpaint", "Policy", "PolicyError", "Raster", "ShiftedGrid", "Synchronous", "TPM",
           "UncertaintyHead", "UncertaintyPatches", "VelocityScale", "available", "compose", "find_objects", "inpaint_policy",
           "load", "mask_from_image", "outpaint_policy"]
