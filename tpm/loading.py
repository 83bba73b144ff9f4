"""Turning what a user names into objects: models (diffusers pipelines) and prompt sets.

Models, :func:`load_model` (``spec``):

- ``tiny:flux`` / ``tiny:sd3``: random tiny pipelines of the real classes (:mod:`tpm.tiny`),
  to check plumbing offline;
- ``testbed:NAME``: a shipped testbed checkpoint (``flux``, ``sd3``, ``flux-asyncpatch``, ``unet``,
  ``spatial``: the 64-token spatial testbed Flux);
- a folder holding ``testbed.json``: a testbed pipeline written by ``recipes/train_testbed.py``;
- a diffusers folder (``save_pretrained``) or a hub id, read through the HF cache (offline
  machines need it cached).

LoRA adapters, :func:`load_lora` (``load_model(..., lora=...)``), are loaded into the frozen
backbone with diffusers' LoRA loaders, which use peft: a diffusers LoRA (``save_lora_weights``, the
format of hub LoRAs, which diffusers also converts from other trainers' layouts), a folder written
by ``PeftModel.save_pretrained`` (``adapter_config.json`` + ``adapter_model.safetensors``, as
Flow-GRPO / DanceGRPO checkpoints are saved), or a file written by ``transformer.save_lora_adapter``.

Prompt sets, :func:`load_prompts` (``spec``):

- a registered set (:func:`available_sets`): ``testbed:train``, ``testbed:val``, ``testbed:test``
  (the testbed's splits), ``testbed:spatial-train`` / ``-val`` / ``-test`` (the spatial testbed's:
  the same compositions, at most four objects), ``animal-activity`` (AsynDM's "a(n) [animal] [activity]" prompts,
  generated from the word lists below), and the public benchmarks ``drawbench``, ``geneval``,
  ``t2i-compbench``, ``coco``, which we do not ship: give their data as ``NAME=SOURCE`` (a local
  file or a hub id, e.g. ``drawbench=sayakpaul/drawbench``) and the set's default column is used;
- a local ``.txt`` file (one prompt per line), or a ``.csv``, ``.json`` / ``.jsonl``,
  ``.parquet`` file or data folder;
- a folder with ``train.txt`` / ``test.txt`` (the ``dataset/NAME/`` layout flow_grpo ships its
  prompt sets in): ``split`` picks the file;
- a hub dataset id (read through the HF cache).

Files other than ``.txt`` and hub ids are read with ``datasets.load_dataset``. A subset of ``n``
prompts is drawn without replacement by a seeded ``random.Random`` and kept in the set's order,
so the same (spec, n, seed) always gives the same prompts.

Policies and rewards are not resolved here: ``tpm`` does not import ``policies`` or ``rewards``
(they import ``tpm``); the command line (:mod:`tpm.app.cli`) does that wiring. Everything here raises
:class:`LoadError` with a message that says what to do; nothing exits the process.
"""

from __future__ import annotations

import os
import random
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

TESTBED_PREFIX = "testbed:"
TINY_PREFIX = "tiny:"


class LoadError(ValueError):
    """A model or prompt set that cannot be loaded as named."""


class PromptSetError(LoadError):
    """A prompt set that cannot be loaded (unknown name, empty file, missing column)."""


# =============================================================================================
# Models
# =============================================================================================
def _torch_dtype(dtype):
    import torch

    if isinstance(dtype, torch.dtype):
        return dtype
    found = getattr(torch, dtype, None) if isinstance(dtype, str) else None
    if not isinstance(found, torch.dtype):
        raise LoadError(f"dtype {dtype!r} is not a torch dtype; use float32, float16 or bfloat16")
    return found


def _tiny(kind: str):
    from tpm import tiny

    builders = {"flux": tiny.tiny_flux_pipeline, "sd3": tiny.tiny_sd3_pipeline}
    if kind not in builders:
        raise LoadError(f"unknown tiny model {kind!r}; choose from {sorted(builders)} (e.g. tiny:flux)")
    return builders[kind]()


def _testbed(name_or_path: str, dtype):
    from tpm.testbed.models import load_pipeline

    try:
        return load_pipeline(name_or_path, dtype=dtype)
    except (FileNotFoundError, ValueError) as e:  # unknown name, missing checkpoint, not a testbed folder
        raise LoadError(str(e)) from None


def _missing_path(spec: str) -> bool:
    """A local path that is not there (as opposed to a hub id "owner/name")."""
    return (not os.path.exists(spec)
            and (spec.startswith((".", "/", "~")) or spec.count("/") > 1 or (os.sep != "/" and os.sep in spec)))


def _diffusers(spec: str, dtype):
    from diffusers import DiffusionPipeline

    if _missing_path(spec):
        raise LoadError(f"model path {spec!r} does not exist; pass a diffusers folder, a hub id (owner/name), "
                        "testbed:NAME or tiny:flux|sd3")
    try:
        pipe = DiffusionPipeline.from_pretrained(spec, torch_dtype=dtype)
    except Exception as e:  # every loading failure means the same thing to the user
        first = (str(e).splitlines() or [""])[0][:200]
        raise LoadError(
            f"could not load model {spec!r} ({type(e).__name__}: {first}); pass a local folder saved with "
            "`save_pretrained`, or a hub id available in your HF cache ($HF_HOME): offline machines cannot "
            "download weights") from None
    pipe.set_progress_bar_config(disable=True)
    return pipe


def literal(text: str) -> Any:
    """A command-line value as bool, int or float when it reads as one, else the string itself."""
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def _join_urls(parts: list[str]) -> list[str]:
    """Glue back a URL value that splitting on ":" cut: ``url=http``, ``//host``, ``8000/v1``."""
    out: list[str] = []
    i = 0
    while i < len(parts):
        p = parts[i]
        if p.partition("=")[2].lower() in ("http", "https") and i + 1 < len(parts) and parts[i + 1].startswith("//"):
            p, i = f"{p}:{parts[i + 1]}", i + 1
            if i + 1 < len(parts) and re.match(r"\d+(/|$)", parts[i + 1]):  # the port (and path)
                p, i = f"{p}:{parts[i + 1]}", i + 1
        out.append(p)
        i += 1
    return out


def parse_spec(spec: str) -> tuple[str, list[str], dict[str, Any]]:
    """``name:word:key=value...`` -> (name, variant words, options): how policies and rewards are named
    with options on a command line (``dm_concave:exponential:weight=0.5``, ``clipscore:device=cpu``).
    A value may be an http(s) URL with a port (``vlm_judge:url=http://127.0.0.1:8000/v1``)."""
    name, *parts = _join_urls(str(spec).split(":"))
    words = [p for p in parts if p and "=" not in p]
    options = {}
    for p in parts:
        key, eq, value = p.partition("=")
        if eq:
            if not key:
                raise LoadError(f"option {p!r} in {spec!r} must be key=value")
            options[key] = literal(value)
    return name, words, options


def load_model(spec: str, dtype: str | Any = "float32", device=None, lora=None):
    """A diffusers pipeline from ``spec`` (module docstring), in ``dtype``, moved to ``device`` if given.

    ``dtype`` is a torch dtype or its name ("float32", "float16", "bfloat16"). Testbed and tiny
    models are built in float32 and cast when another dtype is asked for. ``lora``: LoRA adapters to
    load into the backbone (:func:`parse_lora` forms: ``"PATH_OR_ID[:SCALE],..."`` or a list).
    """
    if not isinstance(spec, str) or not spec.strip():
        raise LoadError("model must be a diffusers folder, a hub id, testbed:NAME or tiny:flux|sd3; got "
                        f"{spec!r}")
    torch_dtype = _torch_dtype(dtype)
    if spec.startswith(TINY_PREFIX):
        pipe = _tiny(spec[len(TINY_PREFIX):])
        if torch_dtype != pipe.transformer.dtype:
            pipe = pipe.to(torch_dtype)
    elif spec.startswith(TESTBED_PREFIX):
        pipe = _testbed(spec[len(TESTBED_PREFIX):], torch_dtype)
    elif os.path.isfile(os.path.join(spec, "testbed.json")):
        pipe = _testbed(spec, torch_dtype)
    else:
        pipe = _diffusers(spec, torch_dtype)
    if lora:
        pipe = load_lora(pipe, lora)
    return pipe.to(device) if device is not None else pipe


# ======================================================================================# LoRA adapters
# =============================================================================================
@dataclass(frozen=True)
class LoraSpec:
    source: str  # a file, a folder or a hub id
    scale: float = 1.0


def parse_lora(lora) -> list[LoraSpec]:
    """``"a,b:0.5"`` / ``["a", "b:0.5"]`` / ``[("b", 0.5)]`` / LoraSpec(s) -> a list of :class:`LoraSpec`.

    A trailing ``:SCALE`` that reads as a number is the adapter's weight (default 1).
    """
    if lora is None:
        return []
    items = [lora] if isinstance(lora, (str, LoraSpec)) else list(lora)
    items = [part for item in items for part in (item.split(",") if isinstance(item, str) else [item])]
    specs = []
    for item in items:
        if isinstance(item, LoraSpec):
            specs.append(item)
            continue
        if isinstance(item, (tuple, list)) and len(item) == 2:
            source, scale = str(item[0]), item[1]
        elif isinstance(item, str):
            source, scale = item.strip(), 1.0
            head, colon, tail = source.rpartition(":")
            if colon and head:
                try:
                    source, scale = head, float(tail)
                except ValueError:
                    pass
        else:
            raise LoadError(f"LoRA {item!r}: give PATH_OR_ID or PATH_OR_ID:SCALE")
        if not source:
            raise LoadError(f"empty LoRA entry in {lora!r}; give PATH_OR_ID[:SCALE], comma-separated")
        try:
            scale = float(scale)
        except (TypeError, ValueError):
            raise LoadError(f"LoRA {source!r}: scale {scale!r} is not a number") from None
        specs.append(LoraSpec(source, scale))
    return specs


_PIPELINE_PREFIXES = ("transformer.", "text_encoder.", "text_encoder_2.", "text_encoder_3.", "unet.")
PEFT_PREFIX = "base_model.model."


def _lora_error(source: str, why: str) -> LoadError:
    return LoadError(
        f"LoRA {source!r}: {why}. Pass a diffusers LoRA (a .safetensors file or a folder / hub id holding "
        "pytorch_lora_weights.safetensors), or a folder saved by PeftModel.save_pretrained (adapter_config.json "
        "+ adapter_model.safetensors) for this model's backbone")


def _safetensors_keys(path: str) -> list[str]:
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as f:
            return list(f.keys())
    except Exception as e:  # not a safetensors file
        raise _lora_error(path, f"cannot be read as safetensors ({type(e).__name__})") from None


def _load_peft_folder(pipe, folder: str, name: str) -> None:
    """A ``PeftModel.save_pretrained`` folder: its config gives rank, alpha and targets exactly."""
    import json
    from dataclasses import fields

    from peft import LoraConfig
    from safetensors.torch import load_file

    weights = os.path.join(folder, "adapter_model.safetensors")
    if not os.path.isfile(weights):
        raise _lora_error(folder, "has adapter_config.json but no adapter_model.safetensors (only safetensors "
                                  "are read; re-save with safe_serialization=True)")
    with open(os.path.join(folder, "adapter_config.json"), encoding="utf-8") as f:
        config = json.load(f)
    if str(config.get("peft_type", "LORA")).upper() != "LORA":
        raise _lora_error(folder, f"is a peft {config.get('peft_type')} adapter, not a LoRA")
    init = {f.name for f in fields(LoraConfig) if f.init}
    metadata = {k: v for k, v in config.items() if k in init and k not in ("base_model_name_or_path", "revision")}
    state = {k.removeprefix(PEFT_PREFIX): v for k, v in load_file(weights).items()}
    pipe.transformer.load_lora_adapter(state, prefix=None, adapter_name=name, metadata=metadata)


def _load_one(pipe, source: str, name: str) -> None:
    if os.path.isdir(source) and os.path.isfile(os.path.join(source, "adapter_config.json")):
        return _load_peft_folder(pipe, source, name)
    if os.path.isdir(source):
        files = sorted(f for f in os.listdir(source) if f.endswith(".safetensors"))
        if not files:
            raise _lora_error(source, "holds no .safetensors file")
        file = "pytorch_lora_weights.safetensors" if "pytorch_lora_weights.safetensors" in files else files[0]
        if len(files) > 1 and file != "pytorch_lora_weights.safetensors":
            raise _lora_error(source, f"holds several .safetensors files {files}; pass the LoRA file itself")
        source = os.path.join(source, file)
    if os.path.isfile(source):
        keys = _safetensors_keys(source)
        if not any(".lora_" in k or "lora_" in k.split(".")[0] or ".lora." in k for k in keys):
            raise _lora_error(source, "holds no LoRA weights (no lora_A / lora_B / lora_down tensors)")
        if not any(k.startswith(_PIPELINE_PREFIXES) for k in keys) and any(".lora_A." in k for k in keys):
            # transformer.save_lora_adapter: the backbone's own names, rank/alpha in the file's metadata
            if any(k.startswith(PEFT_PREFIX) for k in keys):
                from safetensors.torch import load_file

                state = {k.removeprefix(PEFT_PREFIX): v for k, v in load_file(source).items()}
                return pipe.transformer.load_lora_adapter(state, prefix=None, adapter_name=name)
            return pipe.transformer.load_lora_adapter(os.path.dirname(source) or ".", prefix=None, adapter_name=name,
                                                      weight_name=os.path.basename(source))
        return pipe.load_lora_weights(os.path.dirname(source) or ".", weight_name=os.path.basename(source),
                                      adapter_name=name)
    if _missing_path(source) or source.endswith(".safetensors"):
        raise _lora_error(source, "does not exist")
    folder = _hub_peft_folder(source)
    if folder is not None:
        return _load_peft_folder(pipe, folder, name)
    return pipe.load_lora_weights(source, adapter_name=name)  # a hub id, through the HF cache


def _hub_peft_folder(repo_id: str) -> str | None:
    """The local snapshot folder of a hub repo saved by ``PeftModel.save_pretrained`` (None if the repo
    has no ``adapter_config.json`` or cannot be reached: diffusers' loader then reports the problem)."""
    from huggingface_hub import hf_hub_download

    try:
        config = hf_hub_download(repo_id, "adapter_config.json")
        hf_hub_download(repo_id, "adapter_model.safetensors")
    except Exception:  # not a peft repo, or offline without it cached
        return None
    return os.path.dirname(config)


def _adapters(pipe) -> set[str]:
    import torch

    names: set[str] = set()
    for comp in pipe.components.values():
        if isinstance(comp, torch.nn.Module):
            names |= set(getattr(comp, "peft_config", None) or {})
    return names


def _lora_layers(pipe, name: str) -> int:
    """How many modules of ``pipe`` hold adapter ``name``."""
    import torch

    count = 0
    for comp in pipe.components.values():
        if isinstance(comp, torch.nn.Module):
            count += sum(1 for m in comp.modules() if name in (getattr(m, "lora_A", None) or {}))
    return count


def _file_lora_layers(source: str) -> int | None:
    """Number of LoRA layers in a local peft/diffusers-format file (None: unknown or another layout)."""
    if os.path.isdir(source):
        for f in ("adapter_model.safetensors", "pytorch_lora_weights.safetensors"):
            if os.path.isfile(os.path.join(source, f)):
                source = os.path.join(source, f)
                break
    if not (os.path.isfile(source) and source.endswith(".safetensors")):
        return None
    keys = [k for k in _safetensors_keys(source) if ".lora_A." in k]
    return len({k.split(".lora_A.")[0] for k in keys}) or None


class _Quiet:
    """Silence diffusers' logging and peft's warnings while loading: their failures come back as one
    LoadError and a partial match is checked by counting layers instead."""

    def __enter__(self):
        import logging

        self.logger = logging.getLogger("diffusers")
        self.level = self.logger.level
        self.logger.setLevel(logging.CRITICAL)
        self.warn = warnings.catch_warnings()
        self.warn.__enter__()
        warnings.simplefilter("ignore")

    def __exit__(self, *exc):
        self.warn.__exit__(*exc)
        self.logger.setLevel(self.level)


def load_lora(pipe, lora):
    """Load the LoRA adapters ``lora`` (:func:`parse_lora`) into ``pipe``'s frozen modules, each at its scale.

    The adapters stay as peft LoRA layers (unfused) so they can be switched off or rescaled with
    ``pipe.set_adapters`` / ``pipe.disable_lora()``; every parameter is frozen afterwards. Loading
    more adapters later makes exactly the new ones active.
    """
    import torch

    specs = parse_lora(lora)
    if not specs:
        return pipe
    if not hasattr(pipe, "load_lora_weights") or not hasattr(getattr(pipe, "transformer", None), "load_lora_adapter"):
        raise LoadError(f"{type(pipe).__name__} cannot load LoRA adapters (no diffusers LoRA loader)")
    names = []
    for spec in specs:
        before = _adapters(pipe)
        name = next(f"tpm_lora_{i}" for i in range(len(before) + 1) if f"tpm_lora_{i}" not in before)
        try:
            with _Quiet():
                _load_one(pipe, spec.source, name)
        except LoadError:
            raise
        except Exception as e:  # diffusers / peft / hub errors: one message
            text = str(e)
            mismatch = next((ln.strip() for ln in text.splitlines() if "size mismatch" in ln), None)
            if mismatch:
                raise _lora_error(spec.source, f"its layer shapes do not fit this model ({mismatch[:200]}); is it "
                                               "a LoRA for another model?") from None
            first = (text.splitlines() or [""])[0][:200]
            raise _lora_error(spec.source, f"could not be loaded ({type(e).__name__}: {first}); a hub id must be "
                                           "in your HF cache ($HF_HOME) on offline machines") from None
        if name not in _adapters(pipe) - before:
            raise _lora_error(spec.source, "matched no module of this model (is it a LoRA for another model?)")
        expected, found = _file_lora_layers(spec.source), _lora_layers(pipe, name)
        if expected is not None and found < expected:
            raise _lora_error(spec.source, f"only {found} of its {expected} LoRA layers match modules of this "
                                           "model; is it a LoRA for another model?")
        names.append(name)
    pipe.set_adapters(names, adapter_weights=[s.scale for s in specs])
    for comp in pipe.components.values():
        if isinstance(comp, torch.nn.Module):
            comp.requires_grad_(False).eval()
    return pipe


def model_token_size(spec: str) -> int | None:
    """Image pixels per latent token side (VAE factor x 2) read from a model's config files without
    loading weights, for checking image sizes early; None when they are not readable here (tiny
    models, hub ids not in the cache)."""
    import json

    from tpm.testbed.models import CHECKPOINT_DIR

    if not isinstance(spec, str) or spec.startswith(TINY_PREFIX):
        return None
    folder = str(CHECKPOINT_DIR / spec[len(TESTBED_PREFIX):]) if spec.startswith(TESTBED_PREFIX) else spec
    vae_config = os.path.join(folder, "vae", "config.json")
    if not os.path.isfile(vae_config) and not os.path.exists(folder) and spec.count("/") == 1:
        try:
            from huggingface_hub import try_to_load_from_cache

            found = try_to_load_from_cache(spec, "vae/config.json")
            vae_config = found if isinstance(found, str) else vae_config
        except Exception:  # no cache, bad id: the loader reports it properly later
            return None
    try:
        with open(vae_config) as f:
            channels = json.load(f)["block_out_channels"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return 2 ** (len(channels) - 1) * 2  # Flux packs 2x2 latents per token, SD3 patchifies by 2


def default_model() -> str:
    """``testbed:flux`` when its checkpoint is shipped, else ``tiny:flux`` (a random pipeline)."""
    from tpm.testbed.models import CHECKPOINT_DIR

    return "testbed:flux" if (CHECKPOINT_DIR / "flux" / "model_index.json").is_file() else "tiny:flux"


# =============================================================================================
# Prompt sets
# =============================================================================================
# Our own word lists (AsynDM evaluates on "a(n) [animal] [activity]" prompts; we generate ours).
ANIMALS: tuple[str, ...] = (
    "cat", "dog", "horse", "monkey", "rabbit", "zebra", "spider", "bird", "sheep", "deer", "cow", "goat",
    "lion", "tiger", "bear", "raccoon", "fox", "wolf", "lizard", "beetle", "ant", "butterfly", "fish",
    "shark", "whale", "dolphin", "squirrel", "mouse", "rat", "snake", "turtle", "frog", "chicken", "duck",
    "goose", "bee", "pig", "turkey", "fly", "llama", "camel", "bat", "gorilla", "hedgehog", "kangaroo",
    "elephant", "owl", "penguin", "otter", "octopus",
)
ACTIVITIES: tuple[str, ...] = (
    "riding a bike", "playing chess", "washing the dishes", "reading a book", "playing the guitar",
    "flying a kite", "baking a cake", "driving a car", "painting a picture", "skateboarding",
    "drinking coffee", "typing on a laptop",
)

TEXT_COLUMNS = ("prompt", "Prompts", "prompts", "Prompt", "caption", "text", "sentence")
TESTBED_SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class PromptSet:
    name: str
    description: str
    column: str | None = None  # default column for sets read from a file / hub id
    generate: Callable[[], list[str]] | None = None  # sets we build ourselves
    needs_source: bool = False  # public sets: the user gives a file or a hub id


def animal_activity() -> list[str]:
    """Every "a(n) [animal] [activity]" prompt, animals outer, activities inner."""
    out = []
    for animal in ANIMALS:
        article = "an" if animal[0] in "aeiou" else "a"
        out += [f"{article} {animal} {act}" for act in ACTIVITIES]
    return out


def _testbed_split(split: str, domain: str = "shapes") -> Callable[[], list[str]]:
    def gen() -> list[str]:
        from tpm.testbed import get_split

        return [item.prompt for item in get_split(split, domain=domain)]

    return gen


SETS: dict[str, PromptSet] = {
    s.name: s
    for s in (
        PromptSet("animal-activity", "AsynDM's a(n) [animal] [activity] prompts (generated)", generate=animal_activity),
        *(PromptSet(f"{TESTBED_PREFIX}{sp}", f"testbed {sp} split", generate=_testbed_split(sp)) for sp in TESTBED_SPLITS),
        *(PromptSet(f"{TESTBED_PREFIX}spatial-{sp}", f"spatial testbed {sp} split (at most four objects)",
                    generate=_testbed_split(sp, "spatial")) for sp in TESTBED_SPLITS),
        PromptSet("drawbench", "DrawBench (Saharia et al.); give drawbench=FILE_OR_HUB_ID", column="Prompts",
                  needs_source=True),
        PromptSet("geneval", "GenEval metadata jsonl; give geneval=FILE_OR_HUB_ID", column="prompt",
                  needs_source=True),
        PromptSet("t2i-compbench", "T2I-CompBench .txt files; give t2i-compbench=FILE_OR_HUB_ID", column="text",
                  needs_source=True),
        PromptSet("coco", "MS-COCO captions; give coco=FILE_OR_HUB_ID", column="caption", needs_source=True),
    )
}
# The first spelling of the testbed splits; still read, with a warning.
_DEPRECATED = {f"testbed-{sp}": f"{TESTBED_PREFIX}{sp}" for sp in TESTBED_SPLITS}


def available_sets() -> list[str]:
    return sorted(SETS)


def testbed_domain(spec: Any) -> str | None:
    """``"shapes"`` or ``"spatial"`` when ``spec`` names one of the testbed's splits (whose prompts the
    testbed verifier scores: ``testbed:val``, ``testbed:spatial-val``, ...), else None."""
    if not isinstance(spec, str):
        return None
    name = _DEPRECATED.get(spec, spec)
    if name in {f"{TESTBED_PREFIX}{sp}" for sp in TESTBED_SPLITS}:
        return "shapes"
    if name in {f"{TESTBED_PREFIX}spatial-{sp}" for sp in TESTBED_SPLITS}:
        return "spatial"
    return None


def is_testbed_prompt_set(spec: Any) -> bool:
    """Whether ``spec`` names one of the testbed's splits (whose prompts the testbed verifier scores)."""
    return testbed_domain(spec) is not None


def _canonical(name: str) -> str:
    if name in _DEPRECATED:
        warnings.warn(f"prompt set {name!r} is now spelled {_DEPRECATED[name]!r}", DeprecationWarning, stacklevel=3)
        return _DEPRECATED[name]
    return name


_LOADERS = {".txt": "text", ".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}


def _read_text_file(path: str, column: str | None) -> list[str]:
    if column not in (None, "text"):
        raise PromptSetError(f"{path!r} is a text file (one prompt per line); it has no column {column!r}")
    with open(path, encoding="utf-8", errors="replace") as f:
        prompts = [line.strip() for line in f if line.strip()]
    if not prompts:
        raise PromptSetError(f"prompt file {path!r} is empty; put one prompt per line (.txt) or rows with a "
                             "prompt column (.csv/.json)")
    return prompts


def read_dataset_prompts(source: str, column: str | None = None, split: str = "train") -> list[str]:
    """Prompts from a local file / folder or a hub dataset id (``datasets.load_dataset`` except for .txt)."""
    kwargs: dict = {}
    layout = _split_file(source, split)
    if layout is not None:
        return _read_text_file(layout, column)
    if os.path.isfile(source):
        ext = os.path.splitext(source)[1].lower()
        if ext not in _LOADERS:
            raise PromptSetError(f"prompt file {source!r}: unsupported extension {ext!r}; use one of {sorted(_LOADERS)}")
        if ext == ".txt":
            return _read_text_file(source, column)
        if os.path.getsize(source) == 0:
            raise PromptSetError(f"prompt file {source!r} is empty; put one prompt per line (.txt) or rows with a "
                                 "prompt column (.csv/.json)")
        args: tuple = (_LOADERS[ext],)
        kwargs = {"data_files": source}
        if ext == ".tsv":
            kwargs["delimiter"] = "\t"
    elif os.path.isdir(source):
        args = (source,)
    elif _looks_like_path(source):
        raise PromptSetError(f"prompt file {source!r} does not exist")
    else:
        args = (source,)
    import datasets

    try:
        ds = datasets.load_dataset(*args, split=split, **kwargs)
    except (FileNotFoundError, ConnectionError, OSError, ValueError) as e:
        where = "file" if os.path.exists(source) else "hub dataset id (not in the HF cache and no network?)"
        raise PromptSetError(f"could not read prompts from {source!r} as a {where}: {e}") from None
    names = list(ds.column_names)
    if column is None:
        column = next((c for c in TEXT_COLUMNS if c in names), None)
        if column is None:
            raise PromptSetError(f"{source!r} has no prompt column among {list(TEXT_COLUMNS)}; its columns are "
                                 f"{names}: pass the one to use (--prompt-column / column=)")
    if column not in names:
        raise PromptSetError(f"{source!r} has no column {column!r}; its columns are {names}: pass the right one "
                             "with --prompt-column / column=")
    prompts = [str(p).strip() for p in ds[column] if p is not None and str(p).strip()]
    if not prompts:
        raise PromptSetError(f"{source!r} column {column!r} holds no non-empty prompt")
    return prompts


def _split_file(source: str, split: str) -> str | None:
    """``SPLIT.txt`` of a folder in the ``dataset/NAME/{train,test}.txt`` layout (one prompt per line,
    as flow_grpo ships its prompt sets); None for other folders. A folder of that layout without the
    split asked for raises, naming the splits it has."""
    if not os.path.isdir(source):
        return None
    path = os.path.join(source, f"{split}.txt")
    if os.path.isfile(path):
        return path
    have = sorted(f[:-4] for f in os.listdir(source) if f[:-4] in ("train", "test", "val", "validation")
                  and f.endswith(".txt"))
    if have:
        raise PromptSetError(f"prompt folder {source!r} has no {split}.txt (it has {', '.join(h + '.txt' for h in have)}); "
                             "pick one of those splits (train_split / eval_split, --prompt-split)")
    return None


def _looks_like_path(source: str) -> bool:
    """A missing local path (as opposed to a hub id "owner/name")."""
    return (source.startswith((".", "/", "~")) or source.count("/") > 1 or os.sep != "/" and os.sep in source
            or os.path.splitext(source)[1].lower() in _LOADERS)


def load_prompts(spec: str, n: int | None = None, seed: int = 0, column: str | None = None,
                 split: str = "train") -> list[str]:
    """The prompts of ``spec`` (module docstring), optionally a seeded subset of ``n`` of them.

    ``column`` and ``split`` pick the column and dataset split of a file / hub prompt set.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise PromptSetError(f"prompt set must be a name, a file or a hub id; valid names: {available_sets()}")
    name, has_source, source = spec.partition("=")
    name = _canonical(name)
    if name in SETS:
        ps = SETS[name]
        if ps.generate is not None:
            if has_source:
                raise PromptSetError(f"prompt set {name!r} is generated; it takes no source ({spec!r})")
            prompts = ps.generate()
        else:
            if not source:
                raise PromptSetError(f"prompt set {name!r} is not shipped: give its data as {name}=FILE_OR_HUB_ID")
            prompts = read_dataset_prompts(source, column or ps.column, split)
    elif has_source:
        raise PromptSetError(f"unknown prompt set {name!r}; valid names: {available_sets()}")
    elif name.startswith(TESTBED_PREFIX):
        raise PromptSetError(f"unknown testbed split {name!r}; the testbed's prompt sets are "
                             f"{', '.join(TESTBED_PREFIX + sp for sp in TESTBED_SPLITS)} and "
                             f"{', '.join(TESTBED_PREFIX + 'spatial-' + sp for sp in TESTBED_SPLITS)}")
    elif os.path.exists(spec) or "/" in spec or _looks_like_path(spec):
        prompts = read_dataset_prompts(spec, column, split)
    else:
        raise PromptSetError(f"unknown prompt set {spec!r}: not a set name, an existing file or a hub id "
                             f"(owner/name); valid names: {available_sets()}")
    return subset(prompts, n, seed)


def subset(prompts: list[str], n: int | None, seed: int = 0) -> list[str]:
    """``n`` of ``prompts`` drawn without replacement (seeded), in their original order."""
    if n is None or n >= len(prompts):
        return list(prompts)
    if n < 1:
        raise PromptSetError(f"the number of prompts must be >= 1, got {n}")
    keep = sorted(random.Random(seed).sample(range(len(prompts)), n))
    return [prompts[i] for i in keep]
