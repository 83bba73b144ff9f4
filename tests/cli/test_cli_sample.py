"""`tpm sample` end to end on a tiny random pipeline (no downloads)."""

import os

import pytest
from PIL import Image

from tpm.app.cli import main


def test_sample_writes_images_and_field_strips(tmp_path):
    out = tmp_path / "s"
    rc = main(["sample", "--model", "tiny:flux", "--policy", "asyndm", "--prompt", "a shark riding a bike",
               "--prompt", "two red circles", "--steps", "3", "--height", "32", "--width", "32",
               "--save-fields", "--out", str(out)])
    assert rc == 0
    files = sorted(os.listdir(out))
    assert files == ["000_seed0.png", "000_seed0_fields.png", "001_seed0.png", "001_seed0_fields.png"]
    assert Image.open(out / "000_seed0.png").size == (32, 32)
    assert Image.open(out / "000_seed0_fields.png").size[0] > 100


def test_unknown_policy_lists_valid_names(tmp_path):
    with pytest.raises(SystemExit, match="valid names.*asyndm"):
        main(["sample", "--model", "tiny:flux", "--policy", "nope", "--prompt", "a dog", "--out", str(tmp_path)])


def test_bad_size_is_one_clear_error(tmp_path):
    with pytest.raises(SystemExit, match="divisible by"):
        main(["sample", "--model", "tiny:flux", "--prompt", "a dog", "--height", "33", "--width", "32",
              "--steps", "1", "--out", str(tmp_path)])
