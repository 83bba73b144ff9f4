"""Train / val / test splits of testbed prompts by *composition*, and seeded prompt sampling.

The split rule (fixed, independent of any sampling seed):

- An *object type* is a (colour, shape) pair; there are 6 x 3 = 18. Every prompt naming two
  object types (``count`` with a second object, ``relation``, ``binding``) is keyed by the
  unordered pair of its types. The 135 pairs of types with different colours are shuffled once
  with a fixed seed: 15 % go to ``test``, 15 % to ``val``, the rest to ``train``. So "a red circle
  left of a blue square", "a blue square below a red circle", "a red circle and a blue square"
  and "two red circles and a blue square" always share a split, and the pairs in val/test never
  appear together in any training prompt, while each type on its own does.
- Single-type ``count`` prompts ("three green triangles") are keyed by (colour, shape, count);
  the 54 such triples are split with the same fractions.
- ``single`` ("a red circle", all 18 types) and ``two`` ("a circle and a square", 6 prompts) are
  the primitives the backbone must learn to draw: they belong to every split and are excluded
  from the disjointness guarantee.

Domains: ``"shapes"`` (the 16-token testbed, every prompt of the grammar) and ``"spatial"``
(:mod:`tpm.testbed.spatial`: only scenes of at most four shapes, so "four red circles and a blue
square" is left out). A domain only filters prompts; the split of a composition is the same in
both, so the spatial splits are disjoint by composition exactly as the shapes splits are.
"""

from __future__ import annotations

import functools
import itertools
import random
from dataclasses import dataclass

from tpm.testbed.grammar import (
    CATEGORIES,
    COLORS,
    COUNT_WORDS,
    RELATIONS,
    SHAPES,
    DomainError,
    ObjectSpec,
    SceneSpec,
)

SPLITS: tuple[str, ...] = ("train", "val", "test")
DOMAINS: tuple[str, ...] = ("shapes", "spatial")
SHARED_CATEGORIES: tuple[str, ...] = ("single", "two")
HELD_OUT_FRACTION = {"val": 0.15, "test": 0.15}
_SPLIT_SEED = 20261121  # fixed forever: changing it reshuffles which compositions are held out

ObjectType = tuple[str, str]  # (colour, shape)
OBJECT_TYPES: tuple[ObjectType, ...] = tuple((c, s) for c in COLORS for s in SHAPES)


@dataclass(frozen=True)
class PromptItem:
    prompt: str
    spec: SceneSpec
    category: str


def _assign(keys: list) -> dict:
    keys = sorted(keys)
    random.Random(_SPLIT_SEED).shuffle(keys)
    n_test = round(HELD_OUT_FRACTION["test"] * len(keys))
    n_val = round(HELD_OUT_FRACTION["val"] * len(keys))
    out = {k: "test" for k in keys[:n_test]}
    out.update({k: "val" for k in keys[n_test:n_test + n_val]})
    out.update({k: "train" for k in keys[n_test + n_val:]})
    return out


@functools.cache
def _pair_split() -> dict[frozenset, str]:
    pairs = [(a, b) for a, b in itertools.combinations(OBJECT_TYPES, 2) if a[0] != b[0]]
    table = _assign(pairs)
    return {frozenset(k): v for k, v in table.items()}


@functools.cache
def _count_split() -> dict[tuple[str, str, int], str]:
    return _assign([(c, s, n) for (c, s) in OBJECT_TYPES for n in COUNT_WORDS])


def composition_key(spec: SceneSpec) -> tuple:
    """What decides a prompt's split (see the module docstring); equal keys, equal split."""
    objs = spec.objects
    if len(objs) == 2 and all(o.color is not None for o in objs):
        return ("pair", frozenset((o.color, o.shape) for o in objs))
    o = objs[0]
    if len(objs) == 1 and o.count > 1 and o.color is not None:
        return ("count", (o.color, o.shape, o.count))
    return ("shared", spec.to_prompt())


def split_of(spec: SceneSpec) -> str:
    """"train", "val" or "test"; "all" for the shared primitives (single objects, colourless pairs)."""
    kind, key = composition_key(spec)
    if kind == "pair":
        return _pair_split()[key]
    if kind == "count":
        return _count_split()[key]
    return "all"


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise DomainError(f"unknown split {split!r}; use one of {list(SPLITS)}")


def _check_domain(domain: str) -> None:
    if domain not in DOMAINS:
        raise DomainError(f"unknown testbed domain {domain!r}; use one of {list(DOMAINS)}")


def _in_domain(spec: SceneSpec, domain: str) -> bool:
    if domain == "spatial":
        from tpm.testbed.spatial import MAX_OBJECTS

        return spec.n_drawn <= MAX_OBJECTS
    return True


def _check_category(category: str) -> None:
    if category not in CATEGORIES:
        raise DomainError(f"unknown category {category!r}; use one of {list(CATEGORIES)}")


def _all_specs(category: str) -> list[SceneSpec]:
    if category == "single":
        return [SceneSpec((ObjectSpec(s, c),)) for c, s in OBJECT_TYPES]
    if category == "two":
        return [SceneSpec((ObjectSpec(a), ObjectSpec(b))) for a, b in itertools.permutations(SHAPES, 2)]
    ordered = [(a, b) for a, b in itertools.permutations(OBJECT_TYPES, 2) if a[0] != b[0]]
    if category == "binding":
        return [SceneSpec((ObjectSpec(a[1], a[0]), ObjectSpec(b[1], b[0]))) for a, b in ordered]
    if category == "relation":
        return [
            SceneSpec((ObjectSpec(a[1], a[0]), ObjectSpec(b[1], b[0])), rel) for a, b in ordered for rel in RELATIONS
        ]
    if category == "count":
        out = [SceneSpec((ObjectSpec(s, c, n),)) for c, s in OBJECT_TYPES for n in COUNT_WORDS]
        out += [SceneSpec((ObjectSpec(a[1], a[0], n), ObjectSpec(b[1], b[0]))) for a, b in ordered for n in COUNT_WORDS]
        return out
    _check_category(category)
    raise AssertionError("unreachable")


@functools.cache
def enumerate_prompts(category: str, split: str, domain: str = "shapes") -> tuple[PromptItem, ...]:
    """Every distinct prompt of ``category`` in ``split`` of ``domain``, sorted by prompt text."""
    _check_category(category)
    _check_split(split)
    _check_domain(domain)
    items = [
        PromptItem(spec.to_prompt(), spec, category)
        for spec in _all_specs(category)
        if split_of(spec) in (split, "all") and _in_domain(spec, domain)
    ]
    return tuple(sorted(items, key=lambda it: it.prompt))


def sample_prompts(n: int, category: str | None = None, split: str = "train", seed: int = 0,
                   domain: str = "shapes") -> list[PromptItem]:
    """``n`` prompts drawn with replacement; ``category=None`` draws a category uniformly per item.

    Deterministic given (n, category, split, seed, domain).
    """
    if n < 0:
        raise DomainError(f"n must be >= 0, got {n}")
    _check_split(split)
    cats = CATEGORIES if category is None else (category,)
    for c in cats:
        _check_category(c)
    rng = random.Random(seed)
    return [rng.choice(enumerate_prompts(rng.choice(cats), split, domain)) for _ in range(n)]


def get_split(name: str, n: int | None = None, seed: int = 0, domain: str = "shapes") -> list[PromptItem]:
    """All distinct prompts of split ``name`` of ``domain`` (every category), or ``n`` distinct ones
    balanced over categories (round robin over seeded shuffles of each category's prompts)."""
    _check_split(name)
    pools = [list(enumerate_prompts(c, name, domain)) for c in CATEGORIES]
    if n is None:
        return [it for pool in pools for it in pool]
    total = sum(map(len, pools))
    if not 0 <= n <= total:
        raise DomainError(f"split {name!r} has {total} distinct prompts; asked for n={n}")
    rng = random.Random(seed)
    for pool in pools:
        rng.shuffle(pool)
    out: list[PromptItem] = []
    for i in itertools.count():
        for pool in pools:
            if i < len(pool) and len(out) < n:
                out.append(pool[i])
        if len(out) == n:
            return out
    raise AssertionError("unreachable")
