"""Field strips show the conditioning deviation tau_cond - tau of policies that set tau_cond (the TPM)."""

import numpy as np
import pytest
import torch
from PIL import Image

import policies
from tpm.comparison.figures import departs_from_synchronous, write_field_heatmap
from tpm.comparison.runner import _save_fields
from tpm.plots import conditioning_shift, field_rows, field_strip
from tpm.sampler import Trajectory, sample
from tpm.tiny import tiny_flux_pipeline


def _trajectory(deviations: list[float], with_mask: bool = False) -> Trajectory:
    k = len(deviations)
    sigmas = torch.linspace(1, 0, k + 1)
    traj = Trajectory(sigmas=sigmas, grid=(2, 3))
    traj.tau = [torch.full((1, 2, 3), float(s)) for s in sigmas]
    traj.tau_cond = [traj.tau[i] + d for i, d in enumerate(deviations)]
    traj.masks = [None] * k
    if with_mask:
        traj.masks[1] = torch.ones(1, 2, 3)
    return traj


def test_rows_hold_the_conditioning_deviation_only_when_a_policy_set_it():
    traj = _trajectory([0.0, -0.1, 0.05])
    rows = field_rows(traj)
    assert list(rows) == ["tau", "tau_cond - tau"]
    for j, want in enumerate([0.0, -0.1, 0.05]):
        np.testing.assert_allclose(rows["tau_cond - tau"][j], np.full((2, 3), want), atol=1e-7)
        np.testing.assert_allclose(rows["tau"][j], np.full((2, 3), float(traj.sigmas[j])))
    assert conditioning_shift(traj) == pytest.approx(0.1)
    plain = field_rows(_trajectory([0.0, 0.0, 0.0], with_mask=True))
    assert list(plain) == ["tau", "mask"]
    assert plain["mask"][0].sum() == 0 and plain["mask"][1].sum() == 6


def test_strips_pick_spread_steps_and_the_png_grows_a_row_for_the_deviation(tmp_path):
    rows = field_rows(_trajectory([0.01 * i for i in range(30)]), max_steps=5)
    assert len(rows["tau"]) == 5
    np.testing.assert_allclose(rows["tau_cond - tau"][-1], np.full((2, 3), 0.29), atol=1e-6)  # last step kept
    with Image.open(field_strip(_trajectory([0.0, 0.0, 0.0]), tmp_path / "sync.png")) as a, \
            Image.open(field_strip(_trajectory([0.0, -0.1, 0.05]), tmp_path / "tpm.png")) as b:
        assert b.size[1] > 1.6 * a.size[1]  # two rows of fields instead of one


def test_a_tpm_action_shows_in_the_strip_and_in_the_comparison_heatmap(tmp_path):
    """constant_deviation is the TPM's action with a fixed r: its update field is the synchronous grid
    (uniform per step), so only tau_cond - tau shows what it did."""
    pipe = tiny_flux_pipeline()
    kw = dict(num_inference_steps=4, height=32, width=32, return_trajectory=True)
    tpm = sample(pipe, ["a red circle"], policy=policies.load("constant_deviation:r=0.3"),
                 generator=torch.Generator().manual_seed(0), **kw).trajectory
    sync = sample(pipe, ["a red circle"], generator=torch.Generator().manual_seed(0), **kw).trajectory
    for t_tpm, t_sync in zip(tpm.tau, sync.tau):
        assert torch.allclose(t_tpm, t_sync)  # same update fields
    rows = field_rows(tpm)
    assert "tau_cond - tau" in rows and "tau_cond - tau" not in field_rows(sync)
    assert np.abs(rows["tau_cond - tau"][0]).max() == 0  # Algorithm 2 keeps the first step's time
    assert all(np.abs(d).min() > 1e-4 for d in rows["tau_cond - tau"][1:])
    # the comparison draws the TPM's fields (its fields are uniform, so "asynchronous" alone would skip it)
    for name, traj in (("tpm", tpm), ("sync", sync)):
        _save_fields(str(tmp_path / f"{name}.safetensors"), traj, 0)
    assert departs_from_synchronous(tpm) and not departs_from_synchronous(sync)
    assert write_field_heatmap(str(tmp_path / "fields_tpm.png"), str(tmp_path / "tpm.safetensors"))
    assert write_field_heatmap(str(tmp_path / "fields_sync.png"), str(tmp_path / "sync.safetensors")) is None
