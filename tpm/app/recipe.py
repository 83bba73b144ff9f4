"""The training run's configuration: :class:`RecipeConfig`, the shipped presets, and the command line.

A run's config is resolved in layers, each a mapping of :class:`RecipeConfig` keys with a ``grpo:``
section of :class:`tpm.grpo.GRPOConfig` fields (merged key by key; every other mapping is replaced
whole):

1. the field defaults of the two dataclasses;
2. a preset shipped in the package (``tpm/presets/NAME.yaml``; ``--preset NAME``; the command's
   default, ``grpo_flux`` for ``tpm train``);
3. ``--config FILE.yaml``, laid over the preset (or over another preset it names as ``base:``,
   ``base: null`` meaning the field defaults);
4. the command-line flags: every field has one (``--model``, ``--learning-rate`` or
   ``--grpo.learning_rate``, ``--policy-options '{"width": 64}'`` or ``width=64,layers=2``).

Every value is converted to its field's type and checked (:mod:`tpm.typed_config`); an error names
the field and where it came from. Rewards are ``spec -> weight``; a spec names a reward as everywhere
else (:func:`rewards.load`): a registered name or an import path ``package.module:Name``, with
``:key=value`` options. On the command line ``--rewards`` takes ``a,b`` (equal weights),
``a=0.7,b=0.3`` or a JSON mapping.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import policies  # noqa: F401  (registers the policies a run can name)
from tpm.app import trl_names
from tpm.grpo.config import GRPOConfig
from tpm.policy import trainable_policies
from tpm.typed_config import ConfigError, add_flags, build, coerce, convert, field_types, merge, read_yaml

TRAINABLE = tuple(trainable_policies())
DTYPES = ("float32", "float16", "bfloat16")
DEFAULT_PRESET = "grpo_flux"
BASE_KEY = "base"  # a YAML file's base: a preset name, or null for the field defaults


@dataclass
class RecipeConfig:
    """model: "testbed:flux" / "testbed:sd3", a testbed or diffusers folder, a hub id, "tiny:flux".
    dtype: weights dtype of a diffusers model ("float32", "float16", "bfloat16").
    lora: a LoRA adapter (folder or hub id) loaded into the frozen backbone; None = none.
    prompt_cache: encode the training and eval prompts once (:mod:`tpm.prompt_cache`) and free the text
    encoders from the device; prompt_cache_file: where the embeddings are kept (safetensors).
    policy: trainable policy name (:data:`TRAINABLE`); policy_options: its constructor
    options (token/text widths and the token grid are read from the pipeline).
    warm_start: a fixed policy a policy that takes one (``takes_warm_start``, the field policy) imitates before GRPO, as {"policy": name, **options};
    warm_start_prompts / warm_start_iterations: how many training prompts it is run on, fitting steps.
    rewards: name -> weight (several are z-scored and summed, AsyncDiff Eq. 16); a name is a
    registered reward or an import path "package.module:Name"; reward_options: name -> options.
    train_prompts / eval_prompts: any prompt set ``tpm.loading.load_prompts`` reads ("testbed:train",
    a .txt / .csv / .jsonl file, a folder with train.txt / test.txt, a hub dataset id);
    train_split / eval_split: the split read from a folder or hub dataset; prompt_column: the column
    of a csv / json / hub set. baselines: label -> {"policy": name, **options}, fixed policies
    reported at the run's step count. reference_steps: the synchronous step count reported as the
    quality a few-step policy aims at. grpo: GRPOConfig fields."""

    model: str = field(default="testbed:flux", metadata={
        "help": "testbed:flux | testbed:sd3 | a testbed or diffusers folder | a hub id | tiny:flux"})
    dtype: str = field(default="float32", metadata={"help": f"weights dtype of the backbone, one of {DTYPES}"})
    lora: str | None = field(default=None, metadata={"help": "LoRA adapter (folder or hub id) for the frozen backbone"})
    prompt_cache: bool = field(default=False, metadata={
        "help": "encode the training and eval prompts once before training and move the text encoders off the "
                "device (the trained policy is unchanged)"})
    prompt_cache_file: str | None = field(default=None, metadata={
        "help": "safetensors file of cached prompt embeddings, read when present and written back (keyed by prompt "
                "and text encoders, so runs can share it); default OUTPUT/prompt_cache.safetensors"})
    policy: str = field(default="tpm", metadata={"help": f"trainable policy, one of {TRAINABLE}"})
    policy_options: dict[str, Any] = field(default_factory=dict, metadata={"help": "the policy's constructor options"})
    warm_start: dict[str, Any] | None = field(default=None, metadata={
        "help": "fixed policy the field policy imitates before GRPO, e.g. '{policy: shifted_grid, shift: 2}'"})
    warm_start_prompts: int = field(default=512, metadata={"help": "training prompts the warm start is fitted on"})
    warm_start_iterations: int = field(default=300, metadata={"help": "fitting steps of the warm start"})
    rewards: dict[str, float] = field(default_factory=lambda: {"testbed": 1.0}, metadata={
        "help": "reward -> weight: 'a,b' (equal), 'a=0.7,b=0.3' or JSON; a reward is a registered name or an "
                "import path package.module:Name"})
    reward_options: dict[str, dict[str, Any]] = field(default_factory=dict, metadata={
        "help": "reward -> its options, JSON, e.g. '{\"clipscore\": {\"device\": \"cuda\"}}'"})
    train_prompts: str = field(default="testbed:train", metadata={
        "help": "prompt set (tpm compare's: a set name, .txt/.csv/.jsonl file, folder with train.txt/test.txt, "
                "hub id)"})
    eval_prompts: str = field(default="testbed:val", metadata={"help": "held-out prompt set (as --train-prompts)"})
    train_split: str = field(default="train", metadata={"help": "split of a folder / hub train prompt set"})
    eval_split: str = field(default="test", metadata={"help": "split of a folder / hub held-out prompt set"})
    prompt_column: str | None = field(default=None, metadata={"help": "column of a csv / json / hub prompt set"})
    baselines: dict[str, dict[str, Any]] = field(default_factory=dict, metadata={
        "help": "label -> {policy: name, **options}: fixed policies in the held-out report"})
    reference_steps: int = field(default=20, metadata={"help": "synchronous step count reported as the target"})
    grpo: GRPOConfig = field(default_factory=GRPOConfig)

    def __post_init__(self):
        types = field_types(RecipeConfig)
        for f in dataclasses.fields(self):
            if f.name == "grpo":
                if isinstance(self.grpo, dict):
                    self.grpo = build(GRPOConfig, convert(GRPOConfig, self.grpo, "grpo"))
                elif not isinstance(self.grpo, GRPOConfig):
                    raise ConfigError(f"grpo must be a GRPOConfig or a mapping of its fields, got {self.grpo!r}")
            else:
                setattr(self, f.name, coerce(getattr(self, f.name), types[f.name], f.name))

        def need(cond: bool, msg: str):
            if not cond:
                raise ConfigError(msg)

        need(self.dtype in DTYPES, f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        need(self.policy in TRAINABLE, f"policy must be a trainable policy, one of {TRAINABLE}; got {self.policy!r}")
        need(self.reference_steps >= 1, f"reference_steps must be >= 1, got {self.reference_steps}")
        need(self.warm_start_prompts >= 1, f"warm_start_prompts must be >= 1, got {self.warm_start_prompts}")
        need(self.warm_start_iterations >= 0, f"warm_start_iterations must be >= 0, got {self.warm_start_iterations}")
        need(bool(self.rewards), "rewards is empty; name at least one reward with its weight (e.g. testbed: 1.0)")
        bad = {k: w for k, w in self.rewards.items() if not math.isfinite(w) or w == 0}
        need(not bad, f"rewards: weights must be finite and non-zero, got {bad}")
        unknown = sorted(set(self.reward_options) - set(self.rewards))
        need(not unknown, f"reward_options given for {unknown}, which have no weight in rewards")
        warm = [name for name, cls in trainable_policies().items() if cls.takes_warm_start]
        need(self.warm_start is None or self.policy in warm,
             f"warm_start imitates a fixed policy with a policy that takes a warm start ({', '.join(warm)}); policy is "
             f"{self.policy!r} (set warm_start: null, or policy: {warm[0] if warm else '...'})")
        for what, spec in ([("warm_start", self.warm_start)] if self.warm_start is not None else []) + \
                [(f"baselines[{label!r}]", spec) for label, spec in self.baselines.items()]:
            need(isinstance(spec, dict) and isinstance(spec.get("policy"), str),
                 f"{what} must be a mapping with a 'policy' key naming a fixed policy, got {spec!r}")
        need(bool(self.train_prompts.strip()), "train_prompts is empty; name a prompt set")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ---- presets ---------------------------------------------------------------------------------------
def _preset_dir():
    return resources.files("tpm") / "presets"


def available_presets() -> list[str]:
    return sorted(p.name[:-5] for p in _preset_dir().iterdir() if p.name.endswith(".yaml"))


def preset_path(name: str) -> str:
    path = _preset_dir() / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"unknown preset {name!r}; presets: {', '.join(available_presets())}")
    return str(path)


def _layers(data: dict[str, Any], source: str, seen: tuple[str, ...] = ()) -> list[tuple[dict, str]]:
    """The (mapping, source) layers a YAML mapping stands for, its ``base`` chain first; trl's names are
    read as ours (:mod:`tpm.app.trl_names`)."""
    data = trl_names.translate(dict(data), source, {f.name for f in dataclasses.fields(RecipeConfig)})
    if BASE_KEY not in data:
        return [(data, source)]
    base = data.pop(BASE_KEY)
    if base is None:
        return [(data, source)]
    if not isinstance(base, str):
        raise ConfigError(f"{source}: base must be a preset name or null, got {base!r}")
    if base in seen:
        raise ConfigError(f"{source}: presets name each other as base in a circle ({' -> '.join((*seen, base))})")
    return [*_layers(read_yaml(preset_path(base)), f"preset {base}", (*seen, base)), (data, source)]


def _starts_over(data: dict[str, Any]) -> bool:
    return BASE_KEY in data


def load_preset(name: str) -> dict[str, Any]:
    """A preset as one mapping (its base chain applied), not yet converted."""
    return _flatten(_layers(read_yaml(preset_path(name)), f"preset {name}", (name,)))


def _flatten(layers: list[tuple[dict, str]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for data, source in layers:
        try:
            out = merge(out, convert(RecipeConfig, data), sections=("grpo",))
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None
    return out


# ---- rewards on the command line -------------------------------------------------------------------
def _weighted(part: str) -> tuple[str, str | None]:
    """``SPEC=WEIGHT`` -> (SPEC, WEIGHT); a reward spec alone -> (spec, None). A spec's own options are
    ``key=value`` too (``clipscore:device=cuda``), so the text after the last ``=`` is a weight only when
    the text before it is a whole spec: every word after the name (and an import path's attribute) is
    ``key=value``."""
    import rewards

    spec, eq, weight = part.rpartition("=")
    if not eq:
        return part, None
    try:
        rewards.parse_reward_spec(spec)
    except rewards.RewardError:
        return part, None  # "clipscore:scale=2": the "=" belongs to an option
    return spec.strip(), weight


def parse_reward_weights(value: Any, name: str = "rewards") -> dict[str, float]:
    """``a,b`` (equal weights), ``a=0.7,b=0.3``, a JSON / YAML mapping, or a list of names. A reward is named
    as everywhere (:func:`rewards.parse_reward_spec`): ``clipscore:device=cuda=0.5`` weighs
    ``clipscore:device=cuda`` 0.5."""
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("{"):
            return coerce(text, dict[str, float], name)
        parts = [_weighted(p.strip()) for p in text.split(",") if p.strip()]
        if not parts:
            raise ConfigError(f"{name} is empty; name at least one reward (e.g. testbed)")
        if all(weight is None for _, weight in parts):
            return {spec: 1.0 / len(parts) for spec, _ in parts}
        out = {}
        for spec, weight in parts:
            if weight is None or not spec:
                raise ConfigError(f"{name}: {spec!r} has no weight; give every reward as NAME=WEIGHT, or none")
            out[spec] = coerce(weight, float, f"{name}[{spec!r}]")
        return out
    if isinstance(value, (list, tuple)):
        return parse_reward_weights(",".join(str(v) for v in value), name)
    return coerce(value, dict[str, float], name)


# ---- the command line ------------------------------------------------------------------------------
_RECIPE = "recipe."
_GRPO = "grpo."


def _flag_names() -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """``--field-name`` for every field; GRPO fields also as ``--grpo.field_name`` (their YAML key), the
    only spelling of ``grpo.eval_prompts``, whose flat name is the recipe's ``--eval-prompts``."""
    recipe = {f.name: [f"--{f.name.replace('_', '-')}"] for f in dataclasses.fields(RecipeConfig) if f.name != "grpo"}
    taken = {n for names in recipe.values() for n in names}
    grpo = {}
    for f in dataclasses.fields(GRPOConfig):
        flat = f"--{f.name.replace('_', '-')}"
        grpo[f.name] = [*([flat] if flat not in taken else []), f"--grpo.{f.name}"]
    for flag, name in trl_names.TRL_FLAGS.items():  # trl's spelling of the same setting
        grpo[name].append(flag)
    return recipe, grpo


def build_parser(description: str = "", preset: str = DEFAULT_PRESET, prog: str | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog, description=description or "Train a timestep policy with GRPO (AsyncDiff §3.3).",
        epilog="Mappings: JSON / YAML ('{\"width\": 64}') or key=value,key=value; 'none' clears an optional field. "
               "Order: preset < --config < flags. Presets: " + ", ".join(available_presets()),
    )
    p.add_argument("--preset", default=preset, help=f"a config shipped in the package (tpm/presets/NAME.yaml); "
                                                    f"default: {preset}")
    p.add_argument("--config", help="YAML file of RecipeConfig keys and a 'grpo:' section, over the preset "
                                    "(or over the preset it names as 'base:')")
    p.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")
    p.add_argument("--dry-run", action="store_true", help="print the plan (processes, per-process batch, memory "
                                                          "estimate per device, where rewards run) and exit; "
                                                          "nothing loads")
    recipe, grpo = _flag_names()
    add_flags(p, RecipeConfig, _RECIPE, recipe, "run (RecipeConfig)")
    add_flags(p, GRPOConfig, _GRPO, grpo, "GRPO (GRPOConfig; also --grpo.FIELD)", consts={"resume": "latest"})
    return p


def resolve(args: argparse.Namespace) -> RecipeConfig:
    """The layers of the module docstring, converted and checked; raises :class:`ConfigError`."""
    layers: list[tuple[dict, str]] = [(load_preset(args.preset), f"preset {args.preset}")]
    if args.config:
        data = read_yaml(args.config)
        file_layers = _layers(data, f"config file {args.config}")
        layers = file_layers if _starts_over(data) else layers + file_layers
    top: dict[str, Any] = {}
    grpo: dict[str, Any] = {}
    for dest, value in vars(args).items():
        if value is None:
            continue
        if dest.startswith(_RECIPE):
            key = dest[len(_RECIPE):]
            top[key] = parse_reward_weights(value, key) if key == "rewards" else value
        elif dest.startswith(_GRPO):
            key = dest[len(_GRPO):]
            grpo[key] = trl_names.scale_value(value) if key == "advantage_scale" else value
    if top or grpo:
        layers.append(({**top, **({"grpo": grpo} if grpo else {})}, "command line"))
    merged: dict[str, Any] = {}
    for data, source in layers:
        if source != "command line" and "rewards" in data and not isinstance(data["rewards"], dict):
            data = {**data, "rewards": parse_reward_weights(data["rewards"])}
        try:
            merged = merge(merged, convert(RecipeConfig, data), sections=("grpo",))
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None
    return build(RecipeConfig, merged)


def parse_args(argv: list[str] | None = None, defaults: str | None = None, description: str = "",
               prog: str | None = None) -> RecipeConfig:
    """The run's config from ``argv`` over preset ``defaults`` (``--preset`` overrides it)."""
    trl_names.flag_notes(sys.argv[1:] if argv is None else argv)
    return resolve(build_parser(description, defaults or DEFAULT_PRESET, prog).parse_args(argv))


def config_yaml(cfg: RecipeConfig) -> str:
    """The resolved config as YAML that ``--config`` reads back to the same config (``base: null``)."""
    import yaml

    return yaml.safe_dump({BASE_KEY: None, **cfg.to_dict()}, sort_keys=False)
