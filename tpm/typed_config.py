"""Typed dataclass configs from YAML mappings and command-line flags, with errors that name the field.

:func:`coerce_fields` lays a mapping (a YAML section, parsed flags) over a dataclass instance and
converts every value to its field's annotated type, or raises :class:`ConfigError` naming the field
(``grpo.learning_rate must be a number, got 'abc'``). :func:`add_flags` gives every field of a
dataclass a command-line flag whose text goes through the same conversion, and :func:`read_yaml`
turns a missing or malformed file into one line.

Why not ``transformers.HfArgumentParser`` / ``trl.TrlParser``: the recipe config is nested (a
``RecipeConfig`` holding a ``GRPOConfig`` under ``grpo:``, as the shipped YAML files and AsyncDiff's
settings are written) and both levels have a field ``eval_prompts`` (a prompt set, and a count),
while HfArgumentParser parses flat dataclasses into one argparse namespace, where the two collide;
it also passes ``dict`` fields to argparse as the type (so ``--policy_options`` cannot be parsed)
and TrlParser sets YAML values as argparse defaults, which argparse converts only when they are
strings, so ``save_every: 2.5`` or ``batch_size: true`` from a file would pass unchecked. The
conversion below is the part neither does; the flags are ordinary argparse.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import types
import typing
from typing import Any, Union


class ConfigError(ValueError):
    """A config value or file that cannot be used; the message names the field or the file."""


_NONE_WORDS = ("none", "null", "~")
_TRUE = ("true", "yes", "on", "1")
_FALSE = ("false", "no", "off", "0")


def field_types(cls) -> dict[str, Any]:
    """Resolved annotations of a dataclass (modules use ``from __future__ import annotations``)."""
    return typing.get_type_hints(cls)


def _optional(tp) -> tuple[Any, bool]:
    """(inner type, whether None is allowed) of ``X | None``."""
    origin = typing.get_origin(tp)
    if origin is Union or origin is types.UnionType:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        allows_none = len(args) < len(typing.get_args(tp))
        return (args[0] if len(args) == 1 else Union[tuple(args)]), allows_none  # noqa: UP007 (built at run time)
    return tp, tp is Any


def parse_mapping_text(text: str, name: str) -> dict[str, Any]:
    """A mapping given on the command line: a YAML / JSON mapping (``{"width": 64}``, ``{width: 64}``)
    or ``key=value`` pairs separated by commas (``width=64,layers=2``)."""
    text = text.strip()
    if not text:
        return {}
    if text.startswith("{"):
        import yaml

        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ConfigError(f"{name}: could not parse {text!r} as a JSON / YAML mapping "
                              f"({_yaml_problem(e)})") from None
        if not isinstance(value, dict):
            raise ConfigError(f"{name} must be a mapping, got {text!r}")
        return value
    from tpm.loading import literal

    out: dict[str, Any] = {}
    for part in text.split(","):
        key, eq, value = part.partition("=")
        if not eq or not key.strip():
            raise ConfigError(f"{name}: {part!r} is not key=value; give key=value,key=value or a JSON mapping "
                              "such as '{\"key\": 1}'")
        out[key.strip()] = literal(value.strip())
    return out


def coerce(value: Any, tp: Any, name: str) -> Any:
    """``value`` converted to type ``tp`` (int, float, bool, str, ``X | None``, ``dict[str, X]``, Any);
    strings are read as the command line writes them. Raises :class:`ConfigError` naming ``name``."""
    inner, allows_none = _optional(tp)
    if value is None or (isinstance(value, str) and value.strip().lower() in _NONE_WORDS and inner is not str):
        if allows_none:
            return None
        raise ConfigError(f"{name} must not be empty (null)")
    if isinstance(value, str) and value.strip().lower() in _NONE_WORDS and allows_none:
        return None
    if inner is Any:
        return value
    origin = typing.get_origin(inner)
    if origin is Union or origin is types.UnionType:  # e.g. bool | str: the first that takes it
        for option in typing.get_args(inner):
            try:
                return coerce(value, option, name)
            except ConfigError:
                continue
        raise ConfigError(f"{name}: {value!r} is none of {typing.get_args(inner)}")
    if inner is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
            return value.strip().lower() in _TRUE
        raise ConfigError(f"{name} must be true or false, got {value!r}")
    if inner is int:
        if isinstance(value, bool):
            raise ConfigError(f"{name} must be an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                pass
        raise ConfigError(f"{name} must be an integer, got {value!r}")
    if inner is float:
        if isinstance(value, bool):
            raise ConfigError(f"{name} must be a number, got {value!r}")
        if isinstance(value, (int, float)):
            out = float(value)
        elif isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
            try:
                out = float(value.strip())
            except ValueError:
                raise ConfigError(f"{name} must be a number, got {value!r}") from None
        else:
            raise ConfigError(f"{name} must be a number, got {value!r}")
        if not math.isfinite(out):
            raise ConfigError(f"{name} must be a finite number, got {value!r}")
        return out
    if inner is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{name} must be a string, got {value!r} ({type(value).__name__}); quote it")
    if origin is dict or inner is dict:
        if isinstance(value, str):
            value = parse_mapping_text(value, name)
        if not isinstance(value, dict):
            raise ConfigError(f"{name} must be a mapping, got {value!r}")
        key_tp, val_tp = (typing.get_args(inner) or (Any, Any))
        return {coerce(k, key_tp, f"{name} key"): coerce(v, val_tp, f"{name}[{k!r}]") for k, v in value.items()}
    if dataclasses.is_dataclass(inner):
        raise ConfigError(f"{name} is a section: give it as a mapping of its fields")
    return value


def convert(cls, data: dict[str, Any], where: str = "") -> dict[str, Any]:
    """The keys of ``data`` converted to the types of ``cls``'s fields (nested dataclass fields are
    sections: their mapping is converted the same way). Unknown keys raise, listing the valid ones."""
    types_ = field_types(cls)
    prefix = f"{where}." if where else ""
    if not isinstance(data, dict):
        raise ConfigError(f"{where or cls.__name__} must be a mapping of {cls.__name__} fields, got {data!r}")
    unknown = sorted(set(data) - set(types_), key=str)
    if unknown:
        raise ConfigError(f"unknown {'keys' if len(unknown) > 1 else 'key'} {', '.join(prefix + str(k) for k in unknown)}"
                          f"; valid keys{' of ' + where if where else ''}: {', '.join(sorted(types_))}")
    out = {}
    for key, value in data.items():
        if dataclasses.is_dataclass(types_[key]):
            out[key] = convert(types_[key], value or {}, prefix + key)
        else:
            out[key] = coerce(value, types_[key], prefix + key)
    return out


def build(cls, data: dict[str, Any]):
    """``cls(**data)`` with nested sections built too; the dataclass's own checks become :class:`ConfigError`."""
    types_ = field_types(cls)
    kwargs = {k: build(types_[k], v) if dataclasses.is_dataclass(types_[k]) and isinstance(v, dict) else v
              for k, v in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (ValueError, TypeError) as e:
        raise ConfigError(str(e)) from None


def merge(base: dict[str, Any], over: dict[str, Any], sections: tuple[str, ...] = ()) -> dict[str, Any]:
    """``over`` laid on ``base``: keys replace, except ``sections`` (nested configs), merged key by key."""
    out = dict(base)
    for k, v in over.items():
        out[k] = {**(out.get(k) or {}), **v} if k in sections and isinstance(v, dict) else v
    return out


# ---- files -----------------------------------------------------------------------------------------
def _yaml_problem(e: Exception) -> str:
    mark = getattr(e, "problem_mark", None)
    problem = getattr(e, "problem", None) or str(e).splitlines()[0]
    return f"{problem} at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else problem


def read_yaml(path: str) -> dict[str, Any]:
    """A YAML mapping from ``path``; a missing, malformed or non-mapping file raises one line."""
    import yaml

    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file {path!r} does not exist") from None
    except IsADirectoryError:
        raise ConfigError(f"config file {path!r} is a folder; give a .yaml file") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path!r} is not valid YAML: {_yaml_problem(e)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path!r} must hold a mapping of config keys, got a {type(data).__name__}")
    return data


# ---- flags -----------------------------------------------------------------------------------------
def _type_words(tp) -> str:
    inner, allows_none = _optional(tp)
    origin = typing.get_origin(inner)
    if origin is dict or inner is dict:
        word = "MAPPING"
    elif inner is bool:
        word = "BOOL"
    elif inner in (int, float):
        word = inner.__name__.upper()
    else:
        word = "TEXT"
    return word + ("|none" if allows_none else "")


def add_flags(parser: argparse.ArgumentParser, cls, dest_prefix: str, names: dict[str, list[str]],
              title: str, consts: dict[str, str] | None = None) -> None:
    """Add a flag per field of ``cls``; ``names[field]`` are its option strings. Values stay text (or
    None when absent) and are converted by :func:`convert`; a bool flag alone means true, a field in
    ``consts`` alone means its const."""
    consts = consts or {}
    group = parser.add_argument_group(title)
    types_ = field_types(cls)
    for f in dataclasses.fields(cls):
        if f.name not in names or dataclasses.is_dataclass(types_[f.name]):
            continue
        kwargs: dict[str, Any] = dict(dest=f"{dest_prefix}{f.name}", default=None,
                                      help=f.metadata.get("help", "") or None, metavar=_type_words(types_[f.name]))
        if f.name in consts:
            kwargs.update(nargs="?", const=consts[f.name])
        elif _optional(types_[f.name])[0] is bool:
            kwargs.update(nargs="?", const="true")
        group.add_argument(*names[f.name], **kwargs)
