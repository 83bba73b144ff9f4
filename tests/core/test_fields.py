"""Time fields and the synchronous grid (tpm.fields)."""

from __future__ import annotations

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from tpm.fields import check_field, grid_position, grid_time, synchronous_next, uniform_field
from tpm.policy import State


def _sigmas(steps: int, shift: float = 3.0) -> torch.Tensor:
    sched = FlowMatchEulerDiscreteScheduler(shift=shift)
    sched.set_timesteps(steps)
    return sched.sigmas.float()


@pytest.mark.parametrize("steps", [1, 4, 7])
def test_integer_positions_give_the_grid_exactly(steps):
    sigmas = _sigmas(steps)
    assert sigmas[0] == 1.0 and sigmas[-1] == 0.0 and len(sigmas) == steps + 1
    pos = torch.arange(steps + 1, dtype=torch.float32)
    assert torch.equal(grid_time(sigmas, pos), sigmas)
    # any shape of positions
    pos2 = pos.repeat(2, 3, 1)
    assert torch.equal(grid_time(sigmas, pos2), sigmas.repeat(2, 3, 1))


def test_linear_between_grid_points():
    sigmas = _sigmas(5)
    for k in range(5):
        for frac in (0.25, 0.5, 0.9):
            want = sigmas[k] + frac * (sigmas[k + 1] - sigmas[k])
            got = grid_time(sigmas, torch.tensor(k + frac))
            assert torch.allclose(got, want, atol=1e-7)
    # positions outside [0, K] are clamped to the ends
    assert grid_time(sigmas, torch.tensor(-1.5)) == sigmas[0]
    assert grid_time(sigmas, torch.tensor(9.0)) == 0.0


def test_hand_computed_grid():
    sigmas = torch.tensor([1.0, 0.6, 0.2, 0.0])
    got = grid_time(sigmas, torch.tensor([0.5, 1.5, 2.75, 3.0]))
    assert torch.allclose(got, torch.tensor([0.8, 0.4, 0.05, 0.0]))
    assert torch.allclose(grid_position(sigmas, torch.tensor([0.8, 0.4, 0.05, 1.0, 0.0])).float(),
                          torch.tensor([0.5, 1.5, 2.75, 0.0, 3.0]))


@pytest.mark.parametrize("steps", [1, 3, 10])
def test_grid_position_inverts_grid_time(steps):
    sigmas = _sigmas(steps)
    pos = torch.rand(4, 5, generator=torch.Generator().manual_seed(0)) * steps
    back = grid_position(sigmas, grid_time(sigmas, pos))
    assert torch.allclose(back.float(), pos, atol=1e-4)
    # and the grid itself maps to integer positions
    assert torch.allclose(grid_position(sigmas, sigmas).float(), torch.arange(steps + 1.0), atol=1e-6)
    # the other direction: time -> position -> time
    tau = torch.rand(20, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(grid_time(sigmas, grid_position(sigmas, tau).float()), tau, atol=1e-5)


def test_uniform_field_and_synchronous_next():
    f = uniform_field(0.3, 2, (3, 4))
    assert f.shape == (2, 3, 4) and torch.all(f == torch.tensor(0.3))
    f[0, 0, 0] = 1.0  # a real tensor, not a broadcast view
    assert f[1, 0, 0] == torch.tensor(0.3)
    sigmas = _sigmas(4)
    tau = uniform_field(sigmas[1], 2, (3, 4))
    st = State(step=1, num_steps=4, sigmas=sigmas, tau=tau, latents=torch.zeros(2, 12, 4), grid=(3, 4),
               prompts=["a", "b"])
    nxt = synchronous_next(st)
    assert nxt.shape == (2, 3, 4) and torch.all(nxt == sigmas[2])
    assert st.batch_size == 2


def test_check_field_errors():
    good = torch.full((2, 3, 4), 0.5)
    check_field(good, 2, (3, 4))
    with pytest.raises(ValueError, match=r"tau_next must have shape \(2, 3, 4\), got \(2, 4, 3\)"):
        check_field(good.transpose(1, 2), 2, (3, 4), name="tau_next")
    with pytest.raises(ValueError, match="shape"):
        check_field(good, 3, (3, 4))
    for bad in (-0.01, 1.01, float("nan")):
        f = good.clone()
        f[1, 2, 3] = bad
        with pytest.raises(ValueError, match=r"\[0, 1\]"):
            check_field(f, 2, (3, 4))
    check_field(torch.zeros(2, 3, 4), 2, (3, 4))  # the bounds themselves are valid
    check_field(torch.ones(2, 3, 4), 2, (3, 4))
