"""trl's ``GRPOConfig`` names for the same settings, accepted in a run's config and on its command line.

A trl user types ``num_generations``, ``beta``, ``epsilon``, ``scale_rewards`` and writes
``learning_rate``, ``output_dir``, ``seed``, ``report_to`` at the top of a flat YAML file. Where the
meaning is the same, :func:`translate` turns such a mapping into ours (:class:`tpm.grpo.GRPOConfig`
fields under ``grpo:``) and says the canonical name once, so the user learns it; a value trl takes
that means something we do not do is refused with a line saying so.
"""

from __future__ import annotations

import sys
from typing import Any

from tpm.typed_config import ConfigError

# trl name -> GRPOConfig field. The names that are already ours still move from a flat file's top
# level into its grpo: section.
TRL_NAMES = {
    "num_generations": "group_size",
    "beta": "kl_coef",
    "epsilon": "clip_eps",
    "scale_rewards": "advantage_scale",
    "learning_rate": "learning_rate",
    "report_to": "report_to",
    "output_dir": "output_dir",
    "seed": "seed",
}
# Command-line flags for the trl names that differ from ours (--learning-rate and the rest exist already).
TRL_FLAGS = {f"--{name.replace('_', '-')}": field for name, field in TRL_NAMES.items() if name != field}


def scale_value(value: Any) -> Any:
    """trl's ``scale_rewards`` ("group", "batch", "none", or the older bool) as ``advantage_scale``."""
    text = str(value).strip().lower()
    if text in ("true", "group"):
        return "group"
    if text in ("none", "false"):
        raise ConfigError("scale_rewards: none / false (advantages not divided by a std) has no equivalent here; "
                          "advantage_scale takes group or batch")
    return value


def note(trl: str, where: str) -> None:
    """Say the canonical name of a trl name that was used, on stderr (stdout stays the run's output)."""
    print(f"{where}: trl's {trl} is grpo.{TRL_NAMES[trl]} here", file=sys.stderr)


def translate(data: dict[str, Any], where: str, recipe_fields: set[str]) -> dict[str, Any]:
    """A config mapping with trl's names (top level or ``grpo:``) rewritten to ours, each said once."""
    if not isinstance(data, dict):
        return data
    out = dict(data)
    grpo = dict(out.get("grpo") or {}) if isinstance(out.get("grpo") or {}, dict) else out.get("grpo")
    if not isinstance(grpo, dict):
        return data  # convert() reports the bad section
    moved = False
    for section, keys in (("top", [k for k in out if k in TRL_NAMES and k not in recipe_fields]),
                          ("grpo", [k for k in grpo if k in TRL_NAMES and TRL_NAMES[k] != k])):
        for trl in keys:
            value = out.pop(trl) if section == "top" else grpo.pop(trl)
            field = TRL_NAMES[trl]
            if field in grpo:
                raise ConfigError(f"{where}: {trl} and grpo.{field} are the same setting; give one")
            grpo[field] = scale_value(value) if trl == "scale_rewards" else value
            note(trl, where)
            moved = True
    if moved:
        out["grpo"] = grpo
    return out


def flag_notes(argv: list[str]) -> None:
    """Say the canonical name of every trl flag in ``argv``."""
    for arg in argv:
        flag = arg.split("=", 1)[0]
        if flag in TRL_FLAGS:
            note(flag[2:].replace("-", "_"), "command line")
