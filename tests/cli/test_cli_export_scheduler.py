"""`tpm export-scheduler` end to end on tiny random pipelines, and the exported folder in `tpm compare`."""

import json
import os

import numpy as np
import pytest

import policies
import tpm
from tpm.app.cli import main
from tpm.schedulers import FlowMatchTableScheduler, from_pretrained
from tpm.tiny import tiny_flux_pipeline


def brightness(images, prompts):
    return [float(np.asarray(im, dtype=np.float64).mean() / 255) for im in images]


def test_export_writes_a_scheduler_folder_with_a_card(tmp_path, capsys):
    out = tmp_path / "sched"
    assert main(["export-scheduler", "constant_deviation:r=0.3", "--model", "tiny:flux", "--steps", "3",
                 "--out", str(out)]) == 0
    assert sorted(os.listdir(out)) == ["README.md", "scheduler_config.json"]
    printed = json.loads(capsys.readouterr().out)
    assert printed["scheduler"] == "FlowMatchTableScheduler" and printed["method"].startswith("exact")
    sched = from_pretrained(out)
    assert isinstance(sched, FlowMatchTableScheduler) and len(sched.config.timesteps) == 3
    card = (out / "README.md").read_text()
    assert "constant_deviation:r=0.3" in card and "exact" in card and "| 2 |" in card


def test_state_dependent_policy_needs_prompts_then_is_distilled_with_heldout_numbers(tmp_path, capsys):
    pipe = tiny_flux_pipeline()
    tpm_dir = tmp_path / "tpm_policy"
    policies.TPM.for_pipeline(pipe, width=16, layers=1, heads=2, image_grid=2, init_scale=3.0).save_pretrained(tpm_dir)
    with pytest.raises(SystemExit, match="state-dependent"):
        main(["export-scheduler", str(tpm_dir), "--model", "tiny:flux", "--steps", "3", "--out", str(tmp_path / "x")])
    train, test = tmp_path / "train.txt", tmp_path / "test.txt"
    train.write_text("a red circle\na blue square\ntwo green triangles\na cat\n")
    test.write_text("a dog\nthree yellow circles\n")
    out = tmp_path / "distilled"
    assert main(["export-scheduler", str(tpm_dir), "--model", "tiny:flux", "--steps", "3", "--out", str(out),
                 "--prompts", str(train), "--test-prompts", str(test), "--seeds", "2"]) == 0
    captured = capsys.readouterr()
    assert "held out (2 prompts x 2 seeds)" in captured.err
    info = from_pretrained(out).config.export_info
    assert info["method"].startswith("distilled") and info["heldout"]["prompts"] == 2
    card = (out / "README.md").read_text()
    assert "Held-out cost of the distillation" in card


def test_per_token_policy_is_refused(tmp_path):
    with pytest.raises(SystemExit, match="per-token field"):
        main(["export-scheduler", "asyndm", "--model", "tiny:flux", "--steps", "3", "--out", str(tmp_path / "a")])


def test_compare_runs_an_exported_scheduler_folder_next_to_its_policy(tmp_path):
    out = tmp_path / "sched"
    main(["export-scheduler", "shifted_grid:shift=2.5", "--model", "tiny:flux", "--steps", "3", "--out", str(out)])
    res = tpm.compare([str(out), "shifted_grid:shift=2.5", "synchronous"], ["a red circle", "a blue square"],
                      rewards={"brightness": brightness}, model="tiny:flux", out=tmp_path / "cmp", seeds=2, steps=3,
                      height=32, width=32, num_resamples=200, progress=False)
    by = {r.policy: r for r in res.summary}
    same = by["shifted_grid:shift=2.5"].diffs["brightness"]
    assert (same.low, same.high) == (0.0, 0.0)  # the folder replays its source policy: identical images
    other = by["synchronous"].diffs["brightness"]
    assert other.high - other.low > 0
