"""The comparison engine on a tiny random Flux: same noise, reproducibility, resume, checkpoints, errors."""

import csv
import os

import numpy as np
import pytest
from PIL import Image

import policies
import tpm
from tpm.app.cli import compare
from tpm.comparison import CompareError, RunSpec, run, write_outputs
from tpm.tiny import tiny_flux_pipeline

PROMPTS = ["a red circle", "a blue square left of a green triangle", "two yellow circles"]


@pytest.fixture(scope="module")
def pipe():
    return tiny_flux_pipeline()


def brightness(images, prompts):
    return [float(np.asarray(im, dtype=np.float64).mean() / 255) for im in images]


def spec(**kw):
    base = dict(prompts=PROMPTS, seeds=[0, 5], steps=[3], height=32, width=32, batch_prompts=2, model="tiny")
    return RunSpec(**{**base, **kw})


def read_csv(path, drop=("time_s",)):
    with open(path) as f:
        return [{k: v for k, v in r.items() if k not in drop} for r in csv.DictReader(f)]


def pixels(out, row):
    return np.asarray(Image.open(os.path.join(out, row["image"])))


def test_same_noise_for_every_policy_and_same_images_across_runs(pipe, tmp_path):
    pol = {"a": policies.load("synchronous"), "b": policies.load("synchronous"), "c": policies.load("dm_concave")}
    s = spec()
    rows1 = run(pipe, pol, {"brightness": brightness}, s, tmp_path / "r1", progress=False)
    rows2 = run(pipe, pol, {"brightness": brightness}, s, tmp_path / "r2", progress=False)
    assert len(rows1) == 3 * len(PROMPTS) * 2
    for r1, r2 in zip(rows1, rows2):
        assert np.array_equal(pixels(tmp_path / "r1", r1), pixels(tmp_path / "r2", r2))
        assert r1["brightness"] == r2["brightness"]
    # The same policy under two labels sees the same noise, so its paired differences are exactly 0,
    # and each image equals a lone tpm.sample call from the protocol's noise of its (prompt, seed) pair.
    res = write_outputs(str(tmp_path / "r1"), rows1, s, list(pol), num_resamples=200)
    b = next(x for x in res.summary if x.policy == "b")
    assert (b.diffs["brightness"].low, b.diffs["brightness"].high) == (0.0, 0.0)
    c = next(x for x in res.summary if x.policy == "c")
    assert c.diffs["brightness"].high - c.diffs["brightness"].low > 0
    import torch

    from tpm.comparison.protocol import noise_seed

    lone = tpm.sample(pipe, PROMPTS[1], num_inference_steps=3, height=32, width=32,
                      generator=torch.Generator().manual_seed(noise_seed(5, 1))).images[0]
    row = next(r for r in rows1 if (r["policy"], r["prompt_index"], r["seed"]) == ("a", 1, 5))
    diff = np.abs(np.asarray(lone, dtype=int) - pixels(tmp_path / "r1", row).astype(int))
    assert diff.max() <= 1  # batched vs alone: float rounding may move a pixel by one level
    assert os.path.exists(res.files["grid"]) and "fields_a" not in res.files
    # The grid: a row per policy, a column per prompt with the prompt's text above it (wrapped to the column).
    grid = np.asarray(Image.open(res.files["grid"]).convert("L"))
    label_h = grid.shape[0] - 3 * 96
    assert label_h >= 2 * 11  # the longest prompt takes more than one line over a 96-pixel column
    assert all((col < 128).any() for col in np.array_split(grid[:label_h, -3 * 96:], 3, axis=1))


def test_noise_is_drawn_per_prompt_unless_common_noise_is_asked_for(pipe, tmp_path):
    """Two prompts under one seed start from different noises; with common_noise from the same one. The
    prompts are equal here, so equal noise means equal images."""
    pol = {"sync": policies.load("synchronous")}
    same = [PROMPTS[0], PROMPTS[0]]
    drawn = run(pipe, pol, {"brightness": brightness}, spec(prompts=same, seeds=[3]), tmp_path / "d", progress=False)
    common = run(pipe, pol, {"brightness": brightness}, spec(prompts=same, seeds=[3], common_noise=True),
                 tmp_path / "c", progress=False)
    assert not np.array_equal(pixels(tmp_path / "d", drawn[0]), pixels(tmp_path / "d", drawn[1]))
    assert np.array_equal(pixels(tmp_path / "c", common[0]), pixels(tmp_path / "c", common[1]))
    # A cache made under one noise protocol is not reused under the other.
    with pytest.raises(CompareError, match="noise"):
        run(pipe, pol, {"brightness": brightness}, spec(prompts=same, seeds=[3]), tmp_path / "c", progress=False)


def test_resume_after_interruption_gives_the_same_results(pipe, tmp_path):
    pol = {"synchronous": policies.load("synchronous"), "asyndm": policies.load("asyndm")}
    s = spec(steps=[3, 2])
    full = tmp_path / "full"
    rows = run(pipe, pol, {"brightness": brightness}, s, full, progress=False)
    write_outputs(str(full), rows, s, list(pol), num_resamples=200)

    calls = {"n": 0}

    def failing(images, prompts):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return brightness(images, prompts)

    part = tmp_path / "part"
    with pytest.raises(KeyboardInterrupt):
        run(pipe, pol, {"brightness": failing}, s, part, progress=False)
    sampled = []

    def counting_sample(*args, **kw):
        sampled.append(args[1])
        return tpm.sample(*args, **kw)

    rows2 = run(pipe, pol, {"brightness": brightness}, s, part, progress=False, sample_fn=counting_sample)
    res2 = write_outputs(str(part), rows2, s, list(pol), num_resamples=200)
    units = 2 * 2 * 2  # step counts x policies x prompt chunks
    assert len(sampled) == units - 2  # the two finished units were not redone
    assert read_csv(full / "results.csv") == read_csv(part / "results.csv")
    assert res2.files["reward_vs_steps"].endswith(".png") and "fields_asyndm" in res2.files
    # A finished comparison reruns without sampling anything.
    sampled.clear()
    run(pipe, pol, {"brightness": brightness}, s, part, progress=False, sample_fn=counting_sample)
    assert sampled == []


def test_nfe_counts_denoiser_calls(pipe, tmp_path):
    pol = {"sync": policies.load("synchronous"), "fixed": policies.load("asyndm:fixed")}
    rows = run(pipe, pol, {"brightness": brightness}, spec(prompts=PROMPTS[:1], seeds=[0]), tmp_path,
               progress=False)
    assert {r["policy"]: r["nfe"] for r in rows} == {"sync": 3, "fixed": 6}  # fixed masks need a reference run


def test_checkpoint_directory_is_a_policy(pipe, tmp_path):
    ckpt = tmp_path / "trained_tpm"
    policies.TPM.for_pipeline(pipe).save_pretrained(ckpt)
    assert (ckpt / "config.json").exists()
    res = compare(["synchronous", str(ckpt)], "testbed:val", model=pipe, out=tmp_path / "o", num_prompts=2,
                  seeds=1, steps=2, height=32, width=32, num_resamples=200, progress=False)
    assert {r["policy"] for r in res.rows} == {"synchronous", str(ckpt)}
    assert {"verifier", "verifier_all_correct"} <= set(res.rows[0])
    assert all(0 <= r["verifier"] <= 1 for r in res.rows)
    # Changing the checkpoint must not reuse the cached images.
    import torch

    p = policies.load(str(ckpt))
    with torch.no_grad():
        next(p.parameters()).add_(1.0)
    p.save_pretrained(ckpt)
    with pytest.raises(CompareError, match="different settings.*policies"):
        compare(["synchronous", str(ckpt)], "testbed:val", model=pipe, out=tmp_path / "o", num_prompts=2,
                seeds=1, steps=2, height=32, width=32, progress=False)


def test_bad_input_is_reported(pipe, tmp_path):
    kw = dict(model=pipe, out=tmp_path / "o", num_prompts=2, seeds=1, height=32, width=32, progress=False)
    with pytest.raises(CompareError, match="valid names: .*asyndm.*synchronous"):
        compare(["synchronous", "asyndn"], "testbed:val", steps=2, **kw)
    with pytest.raises(CompareError, match="step count must be an integer >= 1, got 0"):
        compare(["synchronous"], "testbed:val", steps=[2, 0], **kw)
    with pytest.raises(CompareError, match="give rewards"):
        compare(["synchronous"], "animal-activity", steps=2, **kw)
    from tpm.app.cli import main

    with pytest.raises(SystemExit, match="unknown testbed split 'testbed:vall'.*testbed:val"):
        main(["compare", "--prompts", "testbed:vall", "--model", "tiny:flux"])
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(SystemExit, match="is empty"):
        main(["compare", "--prompts", str(empty), "--rewards", "testbed", "--model", "tiny:flux"])
    with pytest.raises(SystemExit, match="step count must be an integer >= 1, got 0"):
        main(["compare", "--steps", "0", "--model", "tiny:flux", "--num-prompts", "1", "--seeds", "1",
              "--out", str(tmp_path / "cli")])
