"""Training-time timestep samplers: shapes, ranges and closed-form mean / spread checks."""

import math

import pytest
import torch

from tpm.testbed.timestep_samplers import (
    TIMESTEP_SAMPLERS,
    controlled,
    controlled_field,
    get_timestep_sampler,
    logit_normal,
    patchwise,
    perlin,
    standardized_pattern,
)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("name", sorted(TIMESTEP_SAMPLERS))
def test_every_sampler_gives_fields_in_unit_interval(name):
    f = get_timestep_sampler(name)(16, 6, 8, generator=gen())
    assert f.shape == (16, 6, 8)
    assert f.min() >= 0 and f.max() <= 1
    assert torch.equal(f, get_timestep_sampler(name)(16, 6, 8, generator=gen()))  # seeded


def test_unknown_sampler_names_the_valid_ones():
    with pytest.raises(ValueError, match="controlled"):
        get_timestep_sampler("uniform")


def test_logit_normal_is_uniform_per_sample_and_has_requested_logit_moments():
    f = logit_normal(20000, 2, 3, mean=0.5, std=0.8, generator=gen())
    assert torch.equal(f, f[:, :1, :1].expand_as(f))
    z = torch.logit(f[:, 0, 0].double())
    # mean and std of 20000 normal draws: standard errors 0.8/sqrt(n) and 0.8/sqrt(2n)
    assert abs(z.mean().item() - 0.5) < 5 * 0.8 / math.sqrt(20000)
    assert abs(z.std().item() - 0.8) < 5 * 0.8 / math.sqrt(40000)


def test_patchwise_is_constant_on_the_patches_of_some_allowed_size():
    f = patchwise(64, 8, 8, patch_sizes=(2, 4), generator=gen(1))
    for field in f:
        ok = []
        for p in (2, 4):
            blocks = field.reshape(8 // p, p, 8 // p, p)
            ok.append(bool((blocks == blocks[:, :1, :, :1]).all()))
        assert any(ok)
    # patch size 1 with a single size: every token independent, so neighbours differ
    f1 = patchwise(4, 8, 8, patch_sizes=(1,), generator=gen(2))
    assert (f1[:, :, 1:] != f1[:, :, :-1]).all()


def test_perlin_spans_the_drawn_interval_and_is_spatially_smooth():
    f = perlin(256, 16, 16, generator=gen(3))
    flat = f.flatten(1)
    lo, hi = flat.min(1).values, flat.max(1).values
    assert (hi > lo).all()
    # smooth: neighbour differences are a small fraction of the field's range, unlike iid noise
    rel = (f[:, :, 1:] - f[:, :, :-1]).abs().mean((1, 2)) / (hi - lo)
    iid = torch.rand(256, 16, 16, generator=gen(4))
    rel_iid = (iid[:, :, 1:] - iid[:, :, :-1]).abs().mean((1, 2))  # E|U - U'| = 1/3 of range 1
    assert rel.mean() < 0.5 * rel_iid.mean()


def test_standardized_pattern_has_zero_mean_and_unit_variance():
    z = standardized_pattern(128, 8, 8, generator=gen(5))
    assert torch.allclose(z.mean((1, 2)), torch.zeros(128), atol=1e-5)
    assert torch.allclose(z.pow(2).mean((1, 2)), torch.ones(128), atol=1e-4)


def test_controlled_field_has_exactly_the_requested_mean_and_spread():
    z = standardized_pattern(64, 8, 8, generator=gen(6))
    mean = torch.linspace(0.3, 0.7, 64)
    spread = torch.full((64,), 0.01)
    f = controlled_field(mean, spread, z)
    assert torch.allclose(f.mean((1, 2)), mean, atol=1e-6)
    assert torch.allclose(f.std((1, 2), unbiased=False), spread, atol=1e-6)


def test_controlled_field_clamps_the_spread_to_stay_in_unit_interval_keeping_the_mean():
    # hand-made pattern: half the tokens +1, half -1 (mean 0, variance 1)
    z = torch.ones(1, 4, 4)
    z[:, :, :2] = -1
    f = controlled_field(torch.tensor([0.2]), torch.tensor([0.5]), z)
    # the largest feasible spread is 0.2: the -1 half sits exactly at 0 (clean), the +1 half at 0.4
    assert torch.allclose(f[0, :, :2], torch.zeros(4, 2))
    assert torch.allclose(f[0, :, 2:], torch.full((4, 2), 0.4))
    assert f.mean().item() == pytest.approx(0.2, abs=1e-7)


def test_controlled_field_with_zero_spread_is_synchronous():
    z = standardized_pattern(8, 4, 4, generator=gen(7))
    mean = torch.rand(8, generator=gen(8))
    f = controlled_field(mean, torch.zeros(8), z)
    assert torch.equal(f, mean[:, None, None].expand(8, 4, 4))


def test_controlled_field_rejects_out_of_range_requests():
    z = torch.zeros(1, 2, 2)
    with pytest.raises(ValueError, match="mean"):
        controlled_field(torch.tensor([1.5]), torch.tensor([0.1]), z)


def test_controlled_sampler_mixes_synchronous_and_heterogeneous_fields():
    f = controlled(2000, 8, 8, p_sync=0.25, max_spread=0.5, generator=gen(9))
    std = f.std((1, 2), unbiased=False)
    frac_sync = (std < 1e-6).float().mean().item()
    assert abs(frac_sync - 0.25) < 5 * math.sqrt(0.25 * 0.75 / 2000)
    assert std.max() <= 0.5 + 1e-6
    assert (controlled(50, 8, 8, p_sync=1.0, generator=gen(10)).std((1, 2)) == 0).all()
