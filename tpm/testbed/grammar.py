"""The testbed's prompt grammar: shapes, colours, counts, relations, and scene specs.

A scene is at most two *object phrases* joined by "and" or by a spatial relation. Each phrase is
an article or a number, an optional colour and a shape ("a red circle", "three green triangles",
"a square"). Prompts are short and drawn from a small vocabulary (:data:`VOCAB`) so that a
word-level tokenizer covers them exactly.

Categories, in increasing difficulty (GenEval's task split, adapted to this domain):

- ``single``   -- one coloured object: "a red circle";
- ``two``      -- two different shapes, colours left open: "a circle and a square";
- ``count``    -- 2-4 objects of one kind, optionally with one object of another colour:
  "three green triangles", "two yellow squares and a red circle";
- ``relation`` -- two coloured objects and where one is relative to the other:
  "a red circle left of a blue square";
- ``binding``  -- two coloured objects whose colours must not swap: "a red circle and a blue square".

Every two-type prompt uses two different colours, so an object is always identified by its
(colour, shape) pair. Written by hand: no library provides this toy grammar.
"""

from __future__ import annotations

from dataclasses import dataclass

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
PLURALS: dict[str, str] = {s: s + "s" for s in SHAPES}

# Fixed RGB values far apart from each other and from the background (min pairwise distance
# ~130 in 0-255 units), so that blurry, colour-shifted generated images still classify.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (30, 70, 220),
    "yellow": (235, 205, 30),
    "purple": (170, 50, 190),
    "cyan": (20, 210, 230),
}
BACKGROUND: tuple[int, int, int] = (240, 240, 240)

NUMBERS: dict[str, int] = {"two": 2, "three": 3, "four": 4}
COUNT_WORDS: dict[int, str] = {v: k for k, v in NUMBERS.items()}
MAX_COUNT = 4
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
CATEGORIES: tuple[str, ...] = ("single", "two", "count", "relation", "binding")

ARTICLE = "a"  # no colour or shape starts with a vowel, so "an" never occurs
CONJUNCTION = "and"
_RELATION_WORDS = {"left": "left of", "right": "right of", "above": "above", "below": "below"}

VOCAB: list[str] = sorted(
    {ARTICLE, CONJUNCTION, "of", *SHAPES, *PLURALS.values(), *COLORS, *NUMBERS, *_RELATION_WORDS}
)


class DomainError(ValueError):
    """A prompt or scene outside the testbed's grammar; the message says what is wrong."""


@dataclass(frozen=True)
class ObjectSpec:
    """``count`` objects of one ``shape``; ``color`` None means "any colour"."""

    shape: str
    color: str | None = None
    count: int = 1

    def __post_init__(self) -> None:
        if self.shape not in SHAPES:
            raise DomainError(f"unknown shape {self.shape!r}; the testbed knows {list(SHAPES)}")
        if self.color is not None and self.color not in COLORS:
            raise DomainError(f"unknown colour {self.color!r}; the testbed knows {list(COLORS)}")
        if not 1 <= self.count <= MAX_COUNT:
            raise DomainError(f"count must be in 1..{MAX_COUNT}, got {self.count}")

    def to_phrase(self) -> str:
        words = [ARTICLE if self.count == 1 else COUNT_WORDS[self.count]]
        if self.color is not None:
            words.append(self.color)
        words.append(self.shape if self.count == 1 else PLURALS[self.shape])
        return " ".join(words)


@dataclass(frozen=True)
class SceneSpec:
    """One or two object phrases; ``relation`` (e.g. "left of") places objects[0] relative to objects[1]."""

    objects: tuple[ObjectSpec, ...]
    relation: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "objects", tuple(self.objects))
        if not 1 <= len(self.objects) <= 2:
            raise DomainError(f"a testbed scene has one or two object phrases, got {len(self.objects)}")
        if self.relation is not None:
            if self.relation not in RELATIONS:
                raise DomainError(f"unknown relation {self.relation!r}; the testbed knows {list(RELATIONS)}")
            if len(self.objects) != 2 or any(o.count != 1 for o in self.objects):
                raise DomainError("a relation joins exactly two single objects, e.g. 'a red circle left of a blue square'")
        if len(self.objects) == 2:
            a, b = self.objects
            if (a.shape, a.color) == (b.shape, b.color):
                raise DomainError(
                    f"both phrases name the same object {a.to_phrase()!r}; state a count instead, "
                    f"e.g. {ObjectSpec(a.shape, a.color, min(a.count + b.count, MAX_COUNT)).to_phrase()!r}"
                )
            if (a.color is None) != (b.color is None) or (a.color is None and a.shape == b.shape):
                raise DomainError(
                    "two object phrases either both name a colour or name two different shapes without colours"
                )
            if a.color is not None and a.color == b.color:
                raise DomainError(f"the two objects must have different colours, both are {a.color!r}")

    def to_prompt(self) -> str:
        first = self.objects[0].to_phrase()
        if len(self.objects) == 1:
            return first
        joiner = self.relation if self.relation is not None else CONJUNCTION
        return f"{first} {joiner} {self.objects[1].to_phrase()}"

    @property
    def category(self) -> str | None:
        """The category this scene belongs to, or None for grammatical scenes outside all five."""
        objs = self.objects
        if self.relation is not None:
            return "relation" if all(o.color is not None for o in objs) else None
        if objs[0].count >= 2:
            ok = objs[0].color is not None and (len(objs) == 1 or objs[1].count == 1)
            return "count" if ok else None
        if len(objs) == 1:
            return "single" if objs[0].color is not None else None
        if objs[1].count != 1:
            return None
        return "two" if objs[0].color is None else "binding"

    @property
    def n_drawn(self) -> int:
        """How many shapes an image of this scene contains."""
        return sum(o.count for o in self.objects)


def parse_prompt(prompt: str) -> SceneSpec:
    """Parse a prompt of the testbed grammar into a :class:`SceneSpec`.

    Raises :class:`DomainError` naming the first word the grammar does not know, or saying which
    grammatical rule is broken; never returns an empty or partial scene.
    """
    if not isinstance(prompt, str):
        raise DomainError(f"a prompt must be a string, got {type(prompt).__name__}")
    words = prompt.lower().split()
    if not words:
        raise DomainError("empty prompt; try e.g. 'a red circle'")
    known = set(VOCAB)
    for w in words:
        if w not in known:
            raise DomainError(
                f"unknown word {w!r} in prompt {prompt!r}; the testbed grammar knows only: {', '.join(VOCAB)}"
            )
    pos = 0

    def phrase() -> ObjectSpec:
        nonlocal pos
        if pos >= len(words):
            raise DomainError(f"prompt {prompt!r} ends where an object phrase ('a red circle') is expected")
        head = words[pos]
        if head == ARTICLE:
            count = 1
        elif head in NUMBERS:
            count = NUMBERS[head]
        else:
            raise DomainError(f"expected 'a' or a number before an object in {prompt!r}, found {head!r}")
        pos += 1
        color = None
        if pos < len(words) and words[pos] in COLORS:
            color = words[pos]
            pos += 1
        if pos >= len(words):
            raise DomainError(f"prompt {prompt!r} ends before the shape of its object")
        noun = words[pos]
        pos += 1
        if count == 1 and noun in SHAPES:
            return ObjectSpec(noun, color, 1)
        if count > 1 and noun in PLURALS.values():
            return ObjectSpec(noun[:-1], color, count)
        want = "a singular shape after 'a'" if count == 1 else f"a plural shape after {head!r}"
        raise DomainError(f"expected {want} in {prompt!r}, found {noun!r}")

    objects = [phrase()]
    relation = None
    if pos < len(words):
        w = words[pos]
        pos += 1
        if w == CONJUNCTION:
            pass
        elif w in _RELATION_WORDS:
            relation = _RELATION_WORDS[w]
            if relation.endswith(" of"):
                if pos >= len(words) or words[pos] != "of":
                    raise DomainError(f"write {relation!r} in {prompt!r}")
                pos += 1
        else:
            raise DomainError(f"expected 'and' or a relation after the first object in {prompt!r}, found {w!r}")
        objects.append(phrase())
    if pos < len(words):
        raise DomainError(f"unexpected {' '.join(words[pos:])!r} at the end of {prompt!r}; at most two objects")
    return SceneSpec(tuple(objects), relation)


def as_spec(prompt: str | SceneSpec) -> SceneSpec:
    return prompt if isinstance(prompt, SceneSpec) else parse_prompt(prompt)
