"""Turning what a user names into objects: models (diffusers pipelines) and prompt sets.

Models, :func:`load_model` (``spec``):

- ``tiny:flux`` / ``tiny:sd3``: random tiny pipelines of the real classes (:mod:`tpm.testing`),
  to check plumbing offline;
- ``testbed:NAME``: a shipped testbed checkpoint (``flux``, ``sd3``, ``flux-asyncpatch``);
- a folder holding ``testbed.json``: a testbed pipeline written by ``recipes/train_testbed.py``;
- a diffusers folder (``save_pretrained``) or a hub id, read through the HF cache (offline
  machines need it cached).

Prompt sets, :func:`load_prompts` (``spec``):

- a registered set (:func:`available_sets`): ``testbed:train``, ``testbed:val``, ``testbed:test``
  (the testbed's splits), ``animal-activity`` (AsynDM's "a(n) [animal] [activity]" prompts,
  generated from the word lists below), and the public benchmarks ``drawbench``, ``geneval``,
  ``t2i-compbench``, ``coco``, which we do not ship: give their data as ``NAME=SOURCE`` (a local
  file or a hub id, e.g. ``drawbench=sayakpaul/drawbench``) and the set's default column is used;
- a local ``.txt`` file (one prompt per line), or a ``.csv``, ``.json`` / ``.jsonl``,
  ``.parquet`` file or data folder;
- a hub dataset id (read through the HF cache).

Files other than ``.txt`` and hub ids are read with ``datasets.load_dataset``. A subset of ``n``
prompts is drawn without replacement by a seeded ``random.Random`` and kept in the set's order,
so the same (spec, n, seed) always gives the same prompts.

Policies and rewards are not resolved here: ``tpm`` does not import ``policies`` or ``rewards``
(they import ``tpm``); the command line (:mod:`tpm.cli`) does that wiring. Everything here raises
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
    from tpm import testing

    builders = {"flux": testing.tiny_flux_pipeline, "sd3": testing.tiny_sd3_pipeline}
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


def load_model(spec: str, dtype: str | Any = "float32", device=None):
    """A diffusers pipeline from ``spec`` (module docstring), in ``dtype``, moved to ``device`` if given.

    ``dtype`` is a torch dtype or its name ("float32", "float16", "bfloat16"). Testbed and tiny
    models are built in float32 and cast when another dtype is asked for.
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
    return pipe.to(device) if device is not None else pipe


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


def _testbed_split(split: str) -> Callable[[], list[str]]:
    def gen() -> list[str]:
        from tpm.testbed import get_split

        return [item.prompt for item in get_split(split)]

    return gen


SETS: dict[str, PromptSet] = {
    s.name: s
    for s in (
        PromptSet("animal-activity", "AsynDM's a(n) [animal] [activity] prompts (generated)", generate=animal_activity),
        *(PromptSet(f"{TESTBED_PREFIX}{sp}", f"testbed {sp} split", generate=_testbed_split(sp)) for sp in TESTBED_SPLITS),
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


def is_testbed_prompt_set(spec: Any) -> bool:
    """Whether ``spec`` names one of the testbed's splits (whose prompts the testbed verifier scores)."""
    return isinstance(spec, str) and _DEPRECATED.get(spec, spec) in {f"{TESTBED_PREFIX}{sp}" for sp in TESTBED_SPLITS}


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
                             f"{', '.join(TESTBED_PREFIX + sp for sp in TESTBED_SPLITS)}")
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
