"""The spatial testbed: scenes, backgrounds, splits, the verifier on them, the fidelity score, the recipe."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

from tpm.testbed import CATEGORIES, COLORS, DomainError, Verifier, parse_prompt
from tpm.testbed.background import BACKGROUND_KINDS, MAX_CHROMA, background
from tpm.testbed.fidelity import fidelity
from tpm.testbed.spatial import (
    MAX_OBJECTS,
    RESOLUTION,
    SIZE_CLASSES,
    check_scene,
    render_spatial,
    spatial_layout,
)
from tpm.testbed.splits import composition_key, get_split, sample_prompts, split_of

TOKEN = 8  # the testbed VAE factor 4 x Flux's 2 x 2 packing


@pytest.fixture(scope="module")
def verifier() -> Verifier:
    return Verifier.for_domain("spatial")


# -- grammar and splits --------------------------------------------------------------------------
def test_scenes_of_more_than_four_objects_are_refused_with_one_line():
    with pytest.raises(DomainError, match="at most 4"):
        check_scene("four red circles and a blue square")
    with pytest.raises(DomainError, match="unknown word 'orange'"):
        check_scene("a orange circle")
    assert check_scene("three red circles and a blue square").n_drawn == MAX_OBJECTS


def test_spatial_splits_are_disjoint_by_composition_and_hold_at_most_four_objects():
    keys = {}
    for split in ("train", "val", "test"):
        items = get_split(split, domain="spatial")
        assert items and all(it.spec.n_drawn <= MAX_OBJECTS for it in items)
        assert {it.category for it in items} == set(CATEGORIES)
        # a subset of the 16-token testbed's split: same compositions, fewer objects
        assert {it.prompt for it in items} <= {it.prompt for it in get_split(split)}
        keys[split] = {composition_key(it.spec) for it in items if split_of(it.spec) != "all"}
    assert not keys["train"] & keys["val"] and not keys["train"] & keys["test"] and not keys["val"] & keys["test"]
    # every shapes prompt left out is one with five objects
    left = {it.prompt for it in get_split("train")} - {it.prompt for it in get_split("train", domain="spatial")}
    assert left and all(parse_prompt(p).n_drawn == 5 for p in left)


def test_prompt_sets_and_their_domain_are_named():
    from tpm.loading import load_prompts, testbed_domain

    val = load_prompts("testbed:spatial-val")
    assert val == [it.prompt for it in get_split("val", domain="spatial")]
    assert testbed_domain("testbed:spatial-test") == "spatial" and testbed_domain("testbed:val") == "shapes"
    assert testbed_domain("animal-activity") is None


# -- layout, background, rendering ---------------------------------------------------------------
def test_every_object_covers_two_by_two_tokens_and_both_sizes_occur():
    sides = []
    for i, it in enumerate(sample_prompts(300, split="train", seed=4, domain="spatial")):
        objs = spatial_layout(it.spec, RESOLUTION, seed=i)
        assert len(objs) == it.spec.n_drawn
        for o in objs:
            assert o.size >= 2 * TOKEN and 0 <= o.x and o.x + o.size <= RESOLUTION
            sides.append(o.size / RESOLUTION)
    lo_small, hi_small = SIZE_CLASSES["small"]
    lo_large, hi_large = SIZE_CLASSES["large"]
    sides = np.array(sides)
    assert ((sides >= lo_small) & (sides <= hi_small)).mean() > 0.2
    assert ((sides >= lo_large) & (sides <= hi_large)).mean() > 0.2
    assert spatial_layout("a red circle left of a blue square", seed=3) == spatial_layout(
        "a red circle left of a blue square", seed=3)


@pytest.mark.parametrize("kind", BACKGROUND_KINDS)
def test_backgrounds_have_content_and_stay_far_from_object_colours(kind):
    palette = np.array(list(COLORS.values()), np.float32)
    for seed in range(20):
        bg = background(RESOLUTION, seed=seed, kind=kind)
        chroma = bg.max(2) - bg.min(2)
        assert chroma.max() <= MAX_CHROMA
        assert np.linalg.norm(bg.reshape(-1, 1, 3) - palette[None], axis=2).min() > 90
        assert bg.std(axis=(0, 1)).max() > 2.0  # not a flat colour: gradient, horizon or texture
    plain = np.asarray(render_spatial("a red circle", seed=0), np.float32)
    assert not np.allclose(plain[0, 0], [240, 240, 240], atol=20)  # not the 16-token testbed's grey


# -- the verifier on rendered ground truth -------------------------------------------------------
@pytest.mark.parametrize("kind", BACKGROUND_KINDS)
def test_verifier_is_exact_on_rendered_scenes_of_every_category(verifier, kind):
    from tpm.testbed.spatial import draw_on

    for k, cat in enumerate(CATEGORIES):
        for i, it in enumerate(sample_prompts(25, category=cat, split="val", seed=10 + k, domain="spatial")):
            img = draw_on(background(RESOLUTION, seed=100 * k + i, kind=kind), spatial_layout(it.spec, seed=i))
            res = verifier.verify(img, it.spec)
            assert res.all_correct, (cat, it.prompt, res.checks)


def test_verifier_fails_the_checks_a_wrong_image_breaks(verifier):
    img = render_spatial("a red circle left of a blue square", seed=2)
    assert not verifier.verify(img, "a blue circle left of a red square").all_correct  # binding
    assert not verifier.verify(img, "a red circle right of a blue square").checks["relation"]
    assert not verifier.verify(img, "two red circles and a blue square").checks["obj0:count"]


def test_detection_masks_are_the_drawn_shapes(verifier):
    from tpm.testbed.spatial import draw_on

    objs = spatial_layout("a red circle and a blue square", seed=5)
    img = draw_on(background(RESOLUTION, seed=1), objs)
    dets = {d.color: d for d in verifier.detect(img)}
    for o in objs:
        # ground truth: the shape drawn alone on black, at least half covered
        alone = np.asarray(draw_on(np.zeros((RESOLUTION, RESOLUTION, 3)), [o]), np.float32)
        truth = np.abs(alone - np.array(COLORS[o.color])).sum(2) < 0.5 * np.array(COLORS[o.color]).sum()
        m = dets[o.color].mask
        assert m.shape == truth.shape and (m & truth).sum() / (m | truth).sum() > 0.9


# -- fidelity ------------------------------------------------------------------------------------
def _degrade(img: Image.Image, how: str, seed: int) -> Image.Image:
    arr = np.asarray(img).astype(np.float32)
    if how == "blur":
        return img.filter(ImageFilter.GaussianBlur(1.0))
    if how == "more_blur":
        return img.filter(ImageFilter.GaussianBlur(2.0))
    if how == "colour_shift":
        arr = arr + np.array([25.0, -20.0, 15.0])
    else:  # noise
        arr = arr + np.random.default_rng(seed).normal(0, 8, arr.shape)
    return Image.fromarray(np.clip(arr, 0, 255).round().astype(np.uint8))


def test_fidelity_orders_rendered_images_above_degraded_ones(verifier):
    items = sample_prompts(40, split="val", seed=3, domain="spatial")
    scores = {k: [] for k in ("clean", "blur", "more_blur", "colour_shift", "noise")}
    for i, it in enumerate(items):
        img = render_spatial(it.spec, seed=i)
        scores["clean"].append(fidelity(img, it.spec, verifier).score)
        for how in ("blur", "more_blur", "colour_shift", "noise"):
            scores[how].append(fidelity(_degrade(img, how, i), it.spec, verifier).score)
    s = {k: np.array(v) for k, v in scores.items()}
    assert s["clean"].mean() > 0.9
    for how in ("blur", "colour_shift", "noise"):
        assert (s["clean"] > s[how]).mean() >= 0.9, how  # per image, not only on average
    assert (s["blur"] > s["more_blur"]).mean() >= 0.9


def test_fidelity_counts_a_missing_object_as_zero(verifier):
    img = render_spatial("a red circle", seed=0)
    full = fidelity(img, "a red circle", verifier)
    half = fidelity(img, "a red circle and a blue square", verifier)
    assert half.objects == pytest.approx(full.objects / 2, abs=1e-6)
    assert fidelity(img, "a green triangle", verifier).objects == 0.0


def test_testbed_rewards_are_registered_and_combine():
    import rewards
    from rewards.composite import Composite

    images = [render_spatial("a red circle left of a blue square", seed=i) for i in range(3)]
    prompts = ["a red circle left of a blue square", "a blue circle left of a red square", "a red circle"]
    v = rewards.load("testbed_spatial")(images, prompts)
    assert v.tolist() == pytest.approx([1.0, 0.4, 1.0])  # shapes present, colours and relation wrong: 2 of 5
    f = rewards.load("testbed_fidelity")(images, prompts)
    assert f[0] > 0.9 and f[1] < f[0]
    total = Composite({"testbed_spatial": 1.0, "testbed_fidelity": 1.0})(images, prompts).total
    assert total.shape == (3,) and int(total.argmax()) == 0
    with pytest.raises(rewards.RewardError, match="unknown domain"):
        rewards.load("testbed", domain="cubes")


# -- the recipe ----------------------------------------------------------------------------------
def _recipe_args(out, steps: int, stop: int | None = None) -> list[str]:
    args = ["--domain", "spatial", "--resolution", "64", "--output-dir", str(out), "--num-images", "32",
            "--vae-steps", "2", "--vae-batch-size", "4", "--steps", str(steps), "--batch-size", "4",
            "--head-dim", "16", "--num-heads", "2", "--num-layers", "1", "--num-single-layers", "1",
            "--grid-prompts", "2", "--num-inference-steps", "2", "--timestep-sampler", "controlled",
            "--warmup-steps", "1"]
    return args + (["--stop-step", str(stop)] if stop else [])


@pytest.mark.slow
def test_recipe_resumes_an_interrupted_run_exactly(tmp_path, load_recipe):
    from safetensors.torch import load_file

    train = load_recipe("train_testbed")
    train.main(_recipe_args(tmp_path / "straight", 4))
    train.main(_recipe_args(tmp_path / "split", 4, stop=2))
    state = json.loads((tmp_path / "split" / "state" / "step.json").read_text())
    assert state["step"] == 2
    report = train.main(_recipe_args(tmp_path / "split", 4))
    assert report["steps_done"] == 4 and report["domain"] == "spatial"
    a = load_file(str(tmp_path / "straight" / "pipeline" / "transformer" / "diffusion_pytorch_model.safetensors"))
    b = load_file(str(tmp_path / "split" / "pipeline" / "transformer" / "diffusion_pytorch_model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)
    assert a[k].dtype == torch.float32  # saved in float32: plain loading needs no torch_dtype
    cfg = json.loads((tmp_path / "split" / "pipeline" / "testbed.json").read_text())
    assert cfg["domain"] == "spatial" and cfg["resolution"] == 64


def test_recipe_refuses_a_spatial_run_below_64_pixels(load_recipe):
    train = load_recipe("train_testbed")
    with pytest.raises(SystemExit, match="resolution 64"):
        train.main(["--domain", "spatial", "--resolution", "32"])


# -- plain calls ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_spatial():
    from tpm.testbed.models import TestbedModelConfig, build_pipeline

    cfg = TestbedModelConfig(backbone="flux", domain="spatial", resolution=64, vae_channels=(8, 8, 8), latent_channels=4,
                             head_dim=16, num_heads=2, num_layers=1, num_single_layers=1, text_dim=16, t5_dim=32,
                             text_layers=1, num_inference_steps=2)
    return build_pipeline(cfg)


def test_plain_call_refuses_what_the_spatial_testbed_cannot_draw(tiny_spatial):
    with pytest.raises(ValueError, match="cannot draw 'four red circles and a blue square'.*at most 4"):
        tiny_spatial(["a red circle", "four red circles and a blue square"])
    with pytest.raises(ValueError, match="unknown word 'orange'"):
        tiny_spatial("a orange circle")
    with pytest.raises(ValueError, match="height=60 is not a multiple of the token size 8"):
        tiny_spatial("a red circle", height=60)
    img = tiny_spatial("a red circle", generator=torch.Generator().manual_seed(0)).images[0]
    assert img.size == (64, 64)  # the trained resolution, with no argument


@pytest.mark.slow
def test_spatial_benchmarks_run_end_to_end_on_a_tiny_spatial_pipeline(tmp_path, tiny_spatial, load_benchmark):
    from tpm.testbed.models import save_pipeline

    save_pipeline(tiny_spatial, tmp_path / "pipe", tiny_spatial.tpm_testbed_config, dtype=torch.float32)
    model = str(tmp_path / "pipe")
    bench = load_benchmark("spatial_testbed")
    r = bench.main(["--model", model, "--num-prompts", "6", "--noise-sets", "0", "--steps", "1,2",
                    "--reference-steps", "2", "--compare", "1,2", "--map-prompts", "2", "--grid-prompts", "2",
                    "--colour-seeds", "1", "--batch-size", "6", "--threads", "1", "--out", str(tmp_path / "o")])
    assert set(r["curve"]) == {"1", "2"} and len(r["gain_1_to_2"]["composite"]) == 3
    assert len(r["maps"]["layers"]) == tiny_spatial.transformer.config.num_layers + \
        tiny_spatial.transformer.config.num_single_layers + 1  # every layer, then all together
    assert (tmp_path / "o" / "step_curve.png").is_file() and (tmp_path / "o" / "samples.png").is_file()
    head = load_benchmark("per_pixel_headroom")
    h = head.main(["--model", model, "--num-prompts", "4", "--steps", "1", "--mask-steps", "1", "--batch-size", "4",
                   "--tables", "synchronous,shifted_grid:shift=2.0", "--choose-sets", "0", "--score-sets", "1,2",
                   "--threads", "1"])
    row = h["steps"]["1"]
    assert row["best_table"] in ("synchronous", "shifted_grid:shift=2.0")
    # the mean of per-noise maxima is at least the maximum of per-noise means, which is at least the best table
    hindsight, per_sample = row["per_prompt_hindsight_minus_best_table"], row["per_sample_hindsight_minus_best_table"]
    assert per_sample[0] >= hindsight[0] >= 0
    assert len(row["per_pixel_oracle_minus_synchronous"]) == 3
