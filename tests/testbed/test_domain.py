"""The testbed grammar, composition splits and renderer."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from tpm.testbed import (
    BACKGROUND,
    CATEGORIES,
    COLORS,
    OBJECT_TYPES,
    RELATIONS,
    SHAPES,
    SPLITS,
    VOCAB,
    DomainError,
    ObjectSpec,
    SceneSpec,
    composition_key,
    enumerate_prompts,
    get_split,
    layout,
    parse_prompt,
    render,
    sample_prompts,
    split_of,
)
from tpm.testbed.render import RELATION_MARGIN, relation_holds
from tpm.testbed.splits import SHARED_CATEGORIES


def all_items(split: str):
    return [it for c in CATEGORIES for it in enumerate_prompts(c, split)]


# -- grammar ---------------------------------------------------------------------------------------
def test_palette_is_well_separated():
    cols = [np.array(c, float) for c in (*COLORS.values(), BACKGROUND)]
    assert len(COLORS) >= 6 and set(SHAPES) >= {"circle", "square", "triangle"}
    assert min(np.linalg.norm(a - b) for a, b in itertools.combinations(cols, 2)) > 120


@pytest.mark.parametrize(
    "prompt, spec",
    [
        ("a red circle", SceneSpec((ObjectSpec("circle", "red"),))),
        ("a circle and a square", SceneSpec((ObjectSpec("circle"), ObjectSpec("square")))),
        ("three green triangles", SceneSpec((ObjectSpec("triangle", "green", 3),))),
        ("two yellow squares and a red circle",
         SceneSpec((ObjectSpec("square", "yellow", 2), ObjectSpec("circle", "red")))),
        ("a red circle left of a blue square",
         SceneSpec((ObjectSpec("circle", "red"), ObjectSpec("square", "blue")), "left of")),
        ("a purple triangle above a cyan circle",
         SceneSpec((ObjectSpec("triangle", "purple"), ObjectSpec("circle", "cyan")), "above")),
    ],
)
def test_parse_examples(prompt, spec):
    assert parse_prompt(prompt) == spec
    assert spec.to_prompt() == prompt
    assert parse_prompt(prompt.upper()) == spec  # case does not matter


def test_every_prompt_round_trips_and_vocab_is_exact():
    words = set()
    for split in SPLITS:
        for it in all_items(split):
            assert parse_prompt(it.prompt) == it.spec
            assert it.spec.to_prompt() == it.prompt
            assert it.spec.category == it.category
            words.update(it.prompt.split())
    # VOCAB holds every word a prompt can contain, and nothing else
    assert words == set(VOCAB)
    assert VOCAB == sorted(VOCAB) and all(w == w.lower() for w in VOCAB)


@pytest.mark.parametrize(
    "prompt, named",
    [
        ("a red dog", "'dog'"),
        ("a crimson circle", "'crimson'"),
        ("an red circle", "'an'"),
        ("a red circle next to a blue square", "'next'"),
    ],
)
def test_unknown_word_is_named(prompt, named):
    with pytest.raises(DomainError, match=f"unknown word {named}"):
        parse_prompt(prompt)


@pytest.mark.parametrize(
    "prompt, says",
    [
        ("", "empty"),
        ("a red circles", "singular"),
        ("two red circle", "plural"),
        ("red circle", "expected 'a' or a number"),
        ("a red", "ends before the shape"),
        ("a red circle and", "ends where an object phrase"),
        ("a red circle left a blue square", "'left of'"),
        ("a red circle and a blue square and a green triangle", "at most two objects"),
        ("two red circles left of a blue square", "two single objects"),
        ("a red circle and a red square", "different colours"),
        ("a red circle and a red circle", "two red circles"),
        ("a circle and a red square", "both name a colour"),
    ],
)
def test_grammar_errors_say_what_is_wrong(prompt, says):
    with pytest.raises(DomainError, match=says):
        parse_prompt(prompt)


# -- sampling and splits ---------------------------------------------------------------------------
def test_sampling_is_deterministic_by_seed():
    a = sample_prompts(200, seed=3)
    assert a == sample_prompts(200, seed=3)
    assert a != sample_prompts(200, seed=4)
    assert sample_prompts(20, "relation", "test", seed=1) == sample_prompts(20, "relation", "test", seed=1)
    assert get_split("val", n=40, seed=2) == get_split("val", n=40, seed=2)
    assert get_split("val", n=40, seed=2) != get_split("val", n=40, seed=5)
    assert {it.category for it in a} == set(CATEGORIES)


def test_sample_respects_category_and_split():
    items = sample_prompts(100, category="binding", split="test", seed=0)
    assert all(it.category == "binding" and split_of(it.spec) == "test" for it in items)
    with pytest.raises(DomainError, match="unknown category"):
        sample_prompts(3, category="colour")
    with pytest.raises(DomainError, match="unknown split"):
        sample_prompts(3, split="dev")


def test_get_split_is_balanced_distinct_and_complete():
    full = get_split("test")
    assert len({it.prompt for it in full}) == len(full)
    sub = get_split("test", n=25, seed=0)
    assert len({it.prompt for it in sub}) == 25
    assert {c: sum(it.category == c for it in sub) for c in CATEGORIES} == {c: 5 for c in CATEGORIES}
    # a category that runs out ("two" has 6 prompts) leaves the rest to the others
    counts = {c: sum(it.category == c for it in get_split("test", n=50, seed=0)) for c in CATEGORIES}
    assert counts == {"single": 11, "two": 6, "count": 11, "relation": 11, "binding": 11}
    assert {it.prompt for it in sub} <= {it.prompt for it in full}
    with pytest.raises(DomainError, match="distinct prompts"):
        get_split("test", n=len(full) + 1)


def test_splits_are_disjoint_in_compositions():
    keys = {s: {composition_key(it.spec) for it in all_items(s) if it.category not in SHARED_CATEGORIES}
            for s in SPLITS}
    for a, b in itertools.combinations(SPLITS, 2):
        assert not keys[a] & keys[b], (a, b)
    # held-out compositions exist in each category that has them
    for s in ("val", "test"):
        for c in ("count", "relation", "binding"):
            assert enumerate_prompts(c, s)
    # a pair of object types shares one split whatever the prompt form: reversed relation,
    # binding and count prompts with the same two types
    spec = parse_prompt("a red circle left of a blue square")
    s = split_of(spec)
    for p in ("a blue square below a red circle", "a red circle and a blue square",
              "a blue square and a red circle", "three red circles and a blue square"):
        assert split_of(parse_prompt(p)) == s


def test_train_covers_every_primitive():
    train = all_items("train")
    singles = {(it.spec.objects[0].color, it.spec.objects[0].shape) for it in train if it.category == "single"}
    assert singles == set(OBJECT_TYPES)
    in_pairs = {(o.color, o.shape) for it in train if it.category == "binding" for o in it.spec.objects}
    assert in_pairs == set(OBJECT_TYPES)  # each type also occurs in some training composition
    assert {it.spec.relation for it in train if it.category == "relation"} == set(RELATIONS)
    assert {it.spec.objects[0].count for it in train if it.category == "count"} == {2, 3, 4}
    # the primitives are in every split
    for s in SPLITS:
        assert {it.prompt for it in all_items(s) if it.category in SHARED_CATEGORIES} == {
            it.prompt for it in train if it.category in SHARED_CATEGORIES
        }


# -- rendering -------------------------------------------------------------------------------------
@pytest.mark.parametrize("size", [32, 64])
def test_layouts_fit_do_not_overlap_and_respect_relations(size):
    for i, it in enumerate(sample_prompts(150, seed=11)):
        objs = layout(it.spec, size, seed=i)
        assert len(objs) == it.spec.n_drawn
        for o in objs:
            assert 0 <= o.x and o.x + o.size <= size and 0 <= o.y and o.y + o.size <= size
            assert o.size >= 7
            phrase = it.spec.objects[o.phrase]
            assert o.shape == phrase.shape and (phrase.color is None or o.color == phrase.color)
        for a, b in itertools.combinations(objs, 2):
            sep = max(b.x - (a.x + a.size), a.x - (b.x + b.size), b.y - (a.y + a.size), a.y - (b.y + b.size))
            assert sep >= 2
        if it.spec.relation:
            assert relation_holds(objs[0].center, objs[1].center, it.spec.relation, RELATION_MARGIN * size)


def test_render_is_rgb_seeded_and_draws_the_palette():
    spec = parse_prompt("two yellow squares and a red circle")
    img = render(spec, 32, seed=5)
    assert img.mode == "RGB" and img.size == (32, 32)
    assert np.array_equal(np.asarray(img), np.asarray(render(spec.to_prompt(), 32, seed=5)))
    assert not np.array_equal(np.asarray(img), np.asarray(render(spec, 32, seed=6)))
    arr = np.asarray(render(spec, 64, seed=5)).reshape(-1, 3)
    colours = {tuple(int(v) for v in px) for px in arr}
    assert tuple(COLORS["yellow"]) in colours and tuple(COLORS["red"]) in colours and BACKGROUND in colours
    assert tuple(COLORS["blue"]) not in colours
    with pytest.raises(DomainError, match=">= 16"):
        render(spec, 8)
