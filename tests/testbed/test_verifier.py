"""The testbed verifier: exact on rendered scenes, lower on degraded ones, clear on bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

from tpm.testbed import (
    BACKGROUND,
    CATEGORIES,
    COLORS,
    DomainError,
    Verifier,
    parse_prompt,
    render,
    sample_prompts,
)


def canvas(size: int) -> np.ndarray:
    return np.tile(np.array(BACKGROUND, np.uint8), (size, size, 1))


def scenes(n_per_category: int, seed: int):
    items = []
    for k, c in enumerate(CATEGORIES):
        items += sample_prompts(n_per_category, category=c, seed=seed + k)
    return items


@pytest.fixture(scope="module")
def verifier() -> Verifier:
    return Verifier()


# -- hand-drawn images (independent of the renderer) -----------------------------------------------
def test_hand_drawn_shapes_are_detected(verifier):
    img = canvas(64)
    yy, xx = np.mgrid[0:64, 0:64] + 0.5
    img[8:24, 40:56] = COLORS["blue"]  # square, centre (48, 16)
    img[(xx - 16) ** 2 + (yy - 16) ** 2 <= 8**2] = COLORS["red"]  # disk, centre (16, 16)
    tri = (yy >= 38) & (yy <= 58) & (np.abs(xx - 32) <= (yy - 38) / 2)  # apex up, base 20 wide
    img[tri] = COLORS["green"]
    dets = {d.color: d for d in verifier.detect(img)}
    assert set(dets) == {"blue", "red", "green"}
    assert dets["blue"].shape == "square" and dets["blue"].area == 256
    assert dets["blue"].center == pytest.approx((48 / 64, 16 / 64))
    assert dets["red"].shape == "circle" and dets["red"].center == pytest.approx((16 / 64, 16 / 64), abs=1e-6)
    assert dets["green"].shape == "triangle"
    assert dets["green"].center[1] > 48 / 64  # a triangle's mass sits below its box centre
    res = verifier.verify(img, "a red circle left of a blue square")
    assert res.all_correct and res.score == 1.0
    assert verifier.verify(img, "a red circle above a green triangle").all_correct
    assert not verifier.verify(img, "a red circle below a green triangle").all_correct


def test_blank_image_scores_zero(verifier):
    res = verifier.verify(canvas(32), "two yellow squares and a red circle")
    assert res.detections == [] and res.score == 0.0 and not res.all_correct
    assert set(res.checks) == {"obj0:present", "obj0:color", "obj0:count", "obj1:present", "obj1:color"}


def test_specks_are_ignored(verifier):
    img = np.asarray(render("a red circle", 64, seed=0)).copy()
    rng = np.random.default_rng(0)
    for k, c in enumerate(COLORS.values()):  # 2x2 specks, below the minimum object area
        y, x = 2 + 10 * k, 2 + int(rng.integers(0, 4))
        img[y:y + 2, x:x + 2] = c
    res = verifier.verify(img, "a red circle")
    assert res.all_correct and len(res.detections) == 1


# -- accuracy on the renderer's own images ---------------------------------------------------------
@pytest.mark.parametrize("size", [32, 64])
def test_all_correct_on_rendered_scenes(verifier, size):
    items = scenes(40, seed=100 + size)
    ok = {c: [] for c in CATEGORIES}
    for i, it in enumerate(items):
        ok[it.category].append(verifier.verify(render(it.spec, size, seed=i), it.prompt).all_correct)
    rate = {c: float(np.mean(v)) for c, v in ok.items()}
    assert float(np.mean([x for v in ok.values() for x in v])) >= 0.99, rate
    assert min(rate.values()) >= 0.95, rate


def test_each_check_tracks_its_constraint(verifier):
    # one constraint broken at a time; the others keep passing
    img = render("a red circle left of a blue square", 64, seed=1)
    res = verifier.verify(img, "a red circle right of a blue square")
    assert [k for k, v in res.checks.items() if not v] == ["relation"] and res.score == pytest.approx(4 / 5)
    img = render("three red circles", 64, seed=2)
    for wrong in ("two red circles", "four red circles"):
        res = verifier.verify(img, wrong)
        assert [k for k, v in res.checks.items() if not v] == ["obj0:count"]
    res = verifier.verify(render("a blue circle and a red square", 64, seed=3), "a red circle and a blue square")
    assert res.checks == {"obj0:present": True, "obj0:color": False, "obj1:present": True, "obj1:color": False}
    assert res.score == 0.5
    res = verifier.verify(render("a red square", 32, seed=4), "a red circle")
    assert res.checks == {"obj0:present": False, "obj0:color": False}


# -- degraded images -------------------------------------------------------------------------------
def _mean_score(verifier, imgs, items) -> float:
    return float(np.mean([verifier.verify(im, it.prompt).score for im, it in zip(imgs, items)]))


@pytest.mark.parametrize("size", [32, 64])
def test_degradations_lower_the_score(verifier, size):
    items = scenes(6, seed=7)
    clean = [render(it.spec, size, seed=i) for i, it in enumerate(items)]
    rng = np.random.default_rng(0)

    def noisy(im, sigma):
        arr = np.asarray(im, np.float32) + rng.normal(0, sigma, (size, size, 3))
        return np.clip(arr, 0, 255).astype(np.uint8)

    s_clean = _mean_score(verifier, clean, items)
    s_noise_mild = _mean_score(verifier, [noisy(im, 10) for im in clean], items)
    s_noise = _mean_score(verifier, [noisy(im, 60) for im in clean], items)
    s_blur = _mean_score(verifier, [im.filter(ImageFilter.GaussianBlur(3 * size / 64)) for im in clean], items)
    assert s_clean == 1.0
    assert s_noise_mild >= 0.95  # mild noise, as from a decoder, is tolerated
    assert s_noise < s_noise_mild - 0.2
    assert s_blur < s_clean - 0.1


@pytest.mark.parametrize("size", [32, 64])
def test_wrong_colour_swap_fails_the_colour_check(verifier, size):
    for i, (c, other) in enumerate([("red", "blue"), ("green", "yellow"), ("purple", "cyan")]):
        prompt = f"a {c} triangle"
        arr = np.asarray(render(prompt, size, seed=i)).copy()
        assert verifier.verify(arr, prompt).all_correct
        # recolour every pixel of the object, keeping its anti-aliased mix with the background
        bg = np.array(BACKGROUND, np.float32)
        d = np.array(COLORS[c], np.float32) - bg
        alpha = np.clip(((arr - bg) @ d) / (d @ d), 0, 1)[..., None]
        swapped = (bg + alpha * (np.array(COLORS[other], np.float32) - bg)).round().astype(np.uint8)
        res = verifier.verify(swapped, prompt)
        assert res.checks == {"obj0:present": True, "obj0:color": False} and res.score == 0.5
        assert verifier.verify(swapped, f"a {other} triangle").all_correct


def test_background_drift_is_tolerated(verifier):
    arr = np.asarray(render("two green circles and a yellow triangle", 64, seed=9)).astype(np.int16)
    drifted = np.clip(arr + np.array([-14, -8, -3]), 0, 255).astype(np.uint8)
    assert verifier.verify(drifted, "two green circles and a yellow triangle").all_correct


# -- input forms and bad input ---------------------------------------------------------------------
def test_input_forms_agree():
    img = render("a cyan square below a purple circle", 64, seed=3)
    arr = np.array(img)
    t = torch.from_numpy(arr).permute(2, 0, 1).float() / 255
    v = Verifier()
    results = [v.verify(x, "a cyan square below a purple circle") for x in (img, arr, arr / 255.0, t)]
    assert all(r.all_correct for r in results)
    assert len({tuple(r.detections) for r in results}) == 1
    batch = v.verify_batch(t[None].repeat(2, 1, 1, 1), ["a cyan square below a purple circle", "a red triangle"])
    assert batch[0].all_correct and batch[1].score == 0.0
    # a large image checked at a fixed working size
    big = render("three blue triangles", 128, seed=0)
    assert Verifier(size=32).verify(big, "three blue triangles").all_correct


def test_prompt_outside_the_grammar_is_an_error_not_a_zero(verifier):
    img = render("a red circle", 32)
    with pytest.raises(DomainError, match="unknown word 'dog'"):
        verifier.verify(img, "a red dog")
    with pytest.raises(DomainError, match="unknown word 'photo'"):
        verifier.verify_batch([img, img], ["a red circle", "a photo of a red circle"])
    with pytest.raises(DomainError, match="2 images but 1 prompts"):
        verifier.verify_batch([img, img], ["a red circle"])
    with pytest.raises(DomainError, match=">= 16 px"):
        verifier.verify(np.zeros((8, 8, 3), np.uint8), "a red circle")
    with pytest.raises(DomainError, match=r"\(H, W, 3\)"):
        verifier.verify(np.zeros((32, 32), np.uint8), "a red circle")


def test_spec_and_prompt_are_interchangeable(verifier):
    img = Image.fromarray(np.asarray(render("a yellow square and a blue triangle", 32, seed=0)))
    spec = parse_prompt("a yellow square and a blue triangle")
    assert verifier.verify(img, spec).checks == verifier.verify(img, spec.to_prompt()).checks
