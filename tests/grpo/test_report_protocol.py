"""A training run's held-out report and ``tpm compare`` follow one evaluation protocol: the command the
report prints reproduces its table; the report draws its prompts and writes the training curve."""

from __future__ import annotations

import json
import re
import shlex

import numpy as np
import pytest
from PIL import Image

from tpm.app.cli import main as cli_main
from tpm.app.train import main as train_main
from tpm.loading import load_prompts

SMALL = """
policy: field
policy_options: {width: 16, heads: 2, layers: 1, text_tokens: 2, patch: 4, token_offsets: false}
warm_start: {policy: shifted_grid, shift: 2.0}
warm_start_prompts: 4
warm_start_iterations: 5
baselines: {"shifted grid": {policy: shifted_grid, shift: 2.0}}
reference_steps: 4
grpo:
  group_size: 2
  batch_size: 4
  rollout_batch_size: 2
  minibatch_size: 2
  num_inference_steps: 3
  eval_prompts: 3
  eval_noise_sets: 2
  keep_best: false
  progress: false
"""

# Sharpness x 100: it moves with the schedule on this untrained model by about 0.02 (mean brightness barely does).
SHARPNESS = """
def sharpness(images, prompts):
    return 100 * (images[:, :, 1:] - images[:, :, :-1]).abs().mean(dim=(1, 2, 3))
"""

ROW = re.compile(r"^\| `([^`]+)` \| ([+-]?\d+\.\d+) \[([+-]?\d+\.\d+), ([+-]?\d+\.\d+)\]")


def summary_tables(text: str) -> tuple[dict, dict]:
    """(means, differences) of a one-step-count summary.md: label -> [estimate, low, high]."""
    means, diffs, target = {}, {}, None
    for line in text.splitlines():
        if line.startswith("| policy |"):
            target = means if target is None else diffs
        m = ROW.match(line)
        if m and target is not None:
            target[m.group(1)] = [float(x) for x in m.groups()[1:]]
    return means, diffs


@pytest.fixture(scope="module")
def trained(tmp_path_factory, testbed_flux):
    """A tiny field-policy run (1 iteration) with a continuous reward, and its folder."""
    work = tmp_path_factory.mktemp("run")
    (work / "sharpmod.py").write_text(SHARPNESS)
    (work / "c.yaml").write_text(SMALL)
    mp = pytest.MonkeyPatch()
    mp.syspath_prepend(str(work))
    mp.chdir(work)
    train_main(["--config", "c.yaml", "--model", str(testbed_flux), "--output-dir", "run", "--max-iterations", "2",
                "--eval-every", "1", "--rewards", "sharpmod:sharpness", "--report-to", "none"])
    yield work
    mp.undo()


def test_the_printed_compare_command_reproduces_the_report(trained, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(trained))
    monkeypatch.chdir(trained)
    report = json.loads((trained / "run" / "report.json").read_text())
    command = report["compare_command"]
    assert command in (trained / "run" / "report.md").read_text()
    argv = shlex.split(command)
    assert argv[:2] == ["tpm", "compare"] and "--first-prompts" in argv  # 3 of the val prompts, not a subset
    cli_main(argv[1:])
    means, diffs = summary_tables((trained / "run" / "compare" / "summary.md").read_text())
    metric = "sharpmod:sharpness"
    assert set(means) == set(report["compare_labels"])
    for spec, label in report["compare_labels"].items():
        row = report["rows"][label]
        assert means[spec][0] == pytest.approx(row["mean"][metric], abs=1e-4), spec
        if row["minus_synchronous"]:
            assert diffs[spec] == pytest.approx(row["minus_synchronous"][metric], abs=1e-4), spec
    # The rows differ from each other, so equal numbers are not a coincidence of a flat reward.
    assert len({round(v[0], 4) for v in means.values()}) >= 3


def test_the_report_shows_its_prompts_and_the_training_curve(trained):
    run = trained / "run"
    report = json.loads((run / "report.json").read_text())
    prompts = load_prompts("testbed:val")[:3]
    assert report["grid_prompts"] == prompts
    grid = np.asarray(Image.open(run / "report.png").convert("L"))
    label_band = grid[:11]  # the first line of text above the images
    columns = np.array_split(label_band[:, -3 * 96:], 3, axis=1)
    assert all((col < 128).any() for col in columns)  # a prompt is written above every column
    assert (run / "training_curve.png").is_file()
    state = json.loads((run / "run.json").read_text())
    assert [e["iteration"] for e in state["evaluations"]] == [0, 1, 2]
    lo_mean_hi = state["evaluations"][0]["sharpmod:sharpness"]
    assert lo_mean_hi[1] <= lo_mean_hi[0] <= lo_mean_hi[2]
