"""Where AsynDM's slower schedule applies: prompt-related masks (AsynDM §4, Eq. 7).

Sources, chosen by ``Concave(mask=...)``:

- ``"cross_attention"``: for each object token o of the prompt, the pixels where its
  text->image attention map exceeds the map's mean, OR-ed over objects (Eq. 7), recomputed every
  step from the previous step's maps (Algorithm 1; all ones before the first map exists);
- ``"fixed"``: the same rule on the maps averaged over a synchronous run from the same noise
  (AsynDM Table 2, "fixed mask");
- ``"user"``: a mask the user supplies (distortion repair, editing: AsynDM §6);
- ``"all"``: every token (DM_concave).

Object tokens. The official code tags object words by hand; we find them from the prompt with
a small rule, so users need not: the prompt's words minus function words (articles,
prepositions, conjunctions, pronouns, auxiliaries), numbers and count words, colours and common
adjectives, spatial words, and verb forms ending in -ing / -ed (AsynDM's prompts are "a(n)
[animal] [activity]"). What is left are the nouns. ``objects=[...]`` overrides the rule. We do
not use a POS tagger because none ships with its model on PyPI for offline use.
"""

from __future__ import annotations

import re

import torch

FUNCTION_WORDS = set(
    """a an the and or but nor of on in at to from by with without into onto over under near
    beside behind between among through across around against along toward towards for as is
    are was were be been being has have had do does did this that these those it its they them
    their he she his her him we our you your i my me some any each every all both no not very
    while there here then than so too also just which who whom whose what where when how
    one two three four five six seven eight nine ten many several few more most another other
    left right above below top bottom front back next side middle center centre up down inside
    outside beneath upon
    red green blue yellow purple orange white black cyan pink brown gray grey golden silver
    small big large tiny huge tall short long little old young new beautiful cute happy sad
    """.split()
)


def find_objects(prompt: str) -> list[str]:
    """Object words of a prompt by the rule in the module docstring (lower-case, in order)."""
    words = [w for w in re.findall(r"[a-zA-Z][a-zA-Z'-]*", prompt.lower())]
    objs = [
        w for w in words
        if w not in FUNCTION_WORDS and not w.endswith(("ing", "ed", "ly")) and len(w) > 1
    ]
    if not objs:  # a prompt of only function words: use every content-looking word
        objs = [w for w in words if w not in FUNCTION_WORDS] or words
    seen, out = set(), []
    for w in objs:
        if w not in seen:
            seen.add(w)
            out.append(w)
    return out


def _norm_word(w: str) -> str:
    return re.sub(r"[^a-z0-9'-]", "", w.lower())


def object_positions(prompt: str, text_words: list[int], objects: list[str] | None = None) -> list[int]:
    """Text positions (indices into the joint text sequence) whose word is an object word.

    ``text_words`` gives, per text position, the index of the prompt's whitespace word it belongs
    to (-1 for special tokens and padding), as the backbone adapter reports it.
    """
    targets = {_norm_word(o) for o in (objects if objects is not None else find_objects(prompt))}
    words = [_norm_word(w) for w in prompt.split()]
    return [pos for pos, wi in enumerate(text_words) if 0 <= wi < len(words) and words[wi] in targets]


def attention_mask(attention: torch.Tensor, positions: list[list[int]]) -> torch.Tensor:
    """AsynDM Eq. 7: OR over object tokens o of 1[A^o > mean(A^o)].

    Args:
        attention: (B, n_text, h, w) text->image maps.
        positions: per sample, the object token positions.
    Returns: (B, h, w) bool. A sample with no object token gets an all-False mask.
    """
    b, _, h, w = attention.shape
    out = torch.zeros(b, h, w, dtype=torch.bool, device=attention.device)
    for i, pos in enumerate(positions):
        if not pos:
            continue
        maps = attention[i, pos]  # (n_obj, h, w)
        mean = maps.mean(dim=(-2, -1), keepdim=True)
        out[i] = (maps > mean).any(dim=0)
    return out


def check_user_mask(mask: torch.Tensor, batch: int, grid: tuple[int, int]) -> torch.Tensor:
    """A user mask as (B, h, w) bool; (h, w) masks are shared by the batch."""
    m = torch.as_tensor(mask)
    if m.ndim == 2:
        m = m[None].expand(batch, *m.shape)
    if m.ndim != 3 or tuple(m.shape[1:]) != tuple(grid) or m.shape[0] != batch:
        raise ValueError(
            f"user mask has shape {tuple(torch.as_tensor(mask).shape)}; it must be the token grid {tuple(grid)} "
            f"or ({batch}, {grid[0]}, {grid[1]}) (use policies.masks.mask_from_image to resize an image mask)"
        )
    return m > 0.5 if m.dtype != torch.bool else m


def mask_from_image(path_or_image, grid: tuple[int, int], threshold: float = 0.5) -> torch.Tensor:
    """Load a black/white mask image and resize it to the token grid: (h, w) bool (white = masked)."""
    from PIL import Image

    img = Image.open(path_or_image) if not isinstance(path_or_image, Image.Image) else path_or_image
    img = img.convert("L").resize((grid[1], grid[0]), Image.BOX)
    arr = torch.tensor(list(img.getdata()), dtype=torch.float32).view(grid[0], grid[1]) / 255.0
    return arr > threshold
