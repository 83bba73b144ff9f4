"""Prompt sets for comparisons: named sets, local files and hub datasets, with seeded subsets.

``load_prompts(spec, num_prompts=None, seed=0, column=None, split="train")`` where ``spec`` is

- a registered set name (``available_sets()``): ``animal-activity`` (generated from the word lists
  below, AsynDM's "a(n) [animal] [activity]" form), ``testbed-train|val|test`` (the testbed's
  splits), or one of the public benchmarks ``drawbench``, ``geneval``, ``t2i-compbench``,
  ``coco``, which we do not ship: give their data as ``NAME=SOURCE`` (a local file or a hub id,
  e.g. ``drawbench=sayakpaul/drawbench``) and the set's default column is used;
- a local ``.txt`` (one prompt per line), ``.csv``, ``.json`` / ``.jsonl`` file or data folder;
- a hub dataset id (read through the HF cache; offline machines need it cached).

Files and hub ids are read with ``datasets.load_dataset``. A subset of ``num_prompts`` is drawn
without replacement by a seeded ``random.Random`` and kept in the set's order, so the same
(spec, num_prompts, seed) always gives the same prompts.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable
from dataclasses import dataclass

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


class PromptSetError(ValueError):
    """A prompt set that cannot be loaded (unknown name, empty file, missing column)."""


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


def _testbed(split: str) -> Callable[[], list[str]]:
    def gen() -> list[str]:
        from tpm.testbed import get_split

        return [item.prompt for item in get_split(split)]

    return gen


SETS: dict[str, PromptSet] = {
    s.name: s
    for s in (
        PromptSet("animal-activity", "AsynDM's a(n) [animal] [activity] prompts (generated)", generate=animal_activity),
        PromptSet("testbed-train", "testbed train split", generate=_testbed("train")),
        PromptSet("testbed-val", "testbed validation split", generate=_testbed("val")),
        PromptSet("testbed-test", "testbed test split", generate=_testbed("test")),
        PromptSet("drawbench", "DrawBench (Saharia et al.); give drawbench=FILE_OR_HUB_ID", column="Prompts",
                  needs_source=True),
        PromptSet("geneval", "GenEval metadata jsonl; give geneval=FILE_OR_HUB_ID", column="prompt",
                  needs_source=True),
        PromptSet("t2i-compbench", "T2I-CompBench .txt files; give t2i-compbench=FILE_OR_HUB_ID", column="text",
                  needs_source=True),
        PromptSet("coco", "MS-COCO captions; give coco=FILE_OR_HUB_ID", column="caption", needs_source=True),
    )
}


def available_sets() -> list[str]:
    return sorted(SETS)


def _is_testbed_set(spec: str) -> bool:
    return spec.split("=", 1)[0] in ("testbed-train", "testbed-val", "testbed-test")


_LOADERS = {".txt": "text", ".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}


def read_dataset_prompts(source: str, column: str | None = None, split: str = "train") -> list[str]:
    """Prompts from a local file / folder or a hub dataset id, via ``datasets.load_dataset``."""
    import datasets

    kwargs: dict = {}
    if os.path.isfile(source):
        ext = os.path.splitext(source)[1].lower()
        if ext not in _LOADERS:
            raise PromptSetError(f"prompt file {source!r}: unsupported extension {ext!r}; use one of {sorted(_LOADERS)}")
        if os.path.getsize(source) == 0 or (ext == ".txt" and not _has_text(source)):
            raise PromptSetError(f"prompt file {source!r} is empty; put one prompt per line (.txt) or rows with a "
                                 "prompt column (.csv/.json)")
        args: tuple = (_LOADERS[ext],)
        kwargs = {"data_files": source}
        if ext == ".tsv":
            kwargs["delimiter"] = "\t"
        if ext == ".txt":
            column = column or "text"
    elif os.path.isdir(source):
        args = (source,)
    elif _looks_like_path(source):
        raise PromptSetError(f"prompt file {source!r} does not exist")
    else:
        args = (source,)
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


def _has_text(path: str) -> bool:
    with open(path, encoding="utf-8", errors="replace") as f:
        return any(line.strip() for line in f)


def load_prompts(spec: str, num_prompts: int | None = None, seed: int = 0, column: str | None = None,
                 split: str = "train") -> list[str]:
    """The prompts of ``spec`` (see the module docstring), optionally a seeded subset of ``num_prompts``."""
    if not isinstance(spec, str) or not spec.strip():
        raise PromptSetError(f"prompt set must be a name, a file or a hub id; valid names: {available_sets()}")
    name, has_source, source = spec.partition("=")
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
    elif os.path.exists(spec) or "/" in spec or _looks_like_path(spec):
        prompts = read_dataset_prompts(spec, column, split)
    else:
        raise PromptSetError(f"unknown prompt set {spec!r}: not a set name, an existing file or a hub id "
                             f"(owner/name); valid names: {available_sets()}")
    return subset(prompts, num_prompts, seed)


def subset(prompts: list[str], num_prompts: int | None, seed: int = 0) -> list[str]:
    """``num_prompts`` of ``prompts`` drawn without replacement (seeded), in their original order."""
    if num_prompts is None or num_prompts >= len(prompts):
        return list(prompts)
    if num_prompts < 1:
        raise PromptSetError(f"num_prompts must be >= 1, got {num_prompts}")
    keep = sorted(random.Random(seed).sample(range(len(prompts)), num_prompts))
    return [prompts[i] for i in keep]
