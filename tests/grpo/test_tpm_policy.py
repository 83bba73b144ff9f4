"""AsyncDiff's TPM and velocity-scale policies: closed forms, the sampler mapping, replay, save/load."""

from __future__ import annotations

import json
import math

import pytest
import torch

import policies
import tpm
from policies.tpm import deviation_factor, phi, pseudo_timestep
from tpm.distributions import beta_log_prob, beta_mode
from tpm.policy import PolicyError

from .conftest import small_tpm

STEPS = 4


def test_phi_hand_values():
    x = torch.tensor([-2.0, -1.0, 0.0, 0.5, 1.0, 2.0])
    expected = torch.tensor([1 + math.exp(-2), 1 + math.exp(-1), 2.0, 2 + 0.5 + 0.125, 3.5, 6.0])
    assert torch.allclose(phi(x), expected)
    assert bool((phi(torch.tensor([-50.0, -5.0])) > 1).all())


def test_beta_mode_hand_values():
    a = torch.tensor([2.0, 3.0, 5.0, 2.0])
    b = torch.tensor([2.0, 2.0, 3.0, 5.0])
    assert torch.allclose(beta_mode(a, b), torch.tensor([0.5, 2 / 3, 4 / 6, 1 / 5]))


def test_log_prob_matches_torch_beta():
    g = torch.Generator().manual_seed(0)
    a = 1 + 4 * torch.rand(64, generator=g)
    b = 1 + 4 * torch.rand(64, generator=g)
    r = torch.rand(64, generator=g).clamp(1e-3, 1 - 1e-3)
    ref = torch.distributions.Beta(a.double(), b.double()).log_prob(r.double()).float()
    assert torch.allclose(beta_log_prob(a, b, r), ref, atol=1e-5)


def test_deviation_scale_and_lifted_bound():
    r = torch.tensor([0.0, 0.5, 0.75, 1.0])
    assert torch.allclose(deviation_factor(r), torch.tensor([0.5, 1.0, 1.25, 1.5]))  # Eq. 10: 0.5 + r
    assert torch.allclose(deviation_factor(r, gamma=2.0), torch.tensor([0.0, 1.0, 1.5, 2.0]))  # Eq. 12
    assert torch.allclose(deviation_factor(r, lifted_bound=True), 2 * r)  # Eq. 13: 2r


def test_pseudo_timestep_eq6_and_cap():
    prev = torch.full((2, 1, 1), 0.8)
    tau = torch.full((2, 1, 1), 0.6)
    out = pseudo_timestep(prev, tau, torch.tensor([1.5, 0.5]), sigma_min=1e-3)
    assert torch.allclose(out.flatten(), torch.tensor([0.5, 0.7]))
    capped = pseudo_timestep(torch.full((1, 1, 1), 0.2), torch.full((1, 1, 1), 0.05), torch.tensor([2.0]), 1e-3)
    assert float(capped) == pytest.approx(1e-3)


def _run(pipe, policy, explore=True, seed=0):
    with policy.exploring(explore):
        torch.manual_seed(seed)
        return tpm.sample(pipe, ["a red circle", "two blue squares"], policy=policy, num_inference_steps=STEPS,
                          height=32, width=32, output_type="pt", return_trajectory=True,
                          generator=torch.Generator().manual_seed(seed))


def test_tpm_follows_algorithm_2_on_the_grid(flux_pipe):
    policy = small_tpm(flux_pipe)
    traj = _run(flux_pipe, policy).trajectory
    s = traj.sigmas
    assert traj.actions[0].log_prob is None and torch.equal(traj.tau_cond[0], torch.ones_like(traj.tau_cond[0]))
    for k in range(1, STEPS):
        a = traj.actions[k]
        r = a.extras["action:r"]
        want = (s[k - 1] + (0.5 + r) * (s[k] - s[k - 1])).clamp(min=1e-3)
        assert torch.allclose(traj.tau_cond[k], want.view(-1, 1, 1).expand_as(traj.tau_cond[k]), atol=1e-6)
        assert torch.allclose(traj.tau[k + 1], s[k + 1].expand_as(traj.tau[k + 1]))  # tau_next: the grid
        assert a.log_prob.shape == (2,)


def test_log_prob_recomputed_from_extras(flux_pipe):
    policy = small_tpm(flux_pipe)
    traj = _run(flux_pipe, policy).trajectory
    for a in traj.actions[1:]:
        assert torch.allclose(policy.log_prob(a.extras), a.log_prob, atol=1e-5)


def test_deterministic_mode_and_synchronous_start(flux_pipe):
    policy = small_tpm(flux_pipe)
    torch.nn.init.zeros_(policy.net.head[-1].weight)  # alpha = beta = phi(0) = 2 -> mode 0.5 -> synchronous
    out = _run(flux_pipe, policy, explore=False)
    for a in out.trajectory.actions[1:]:
        assert torch.equal(a.extras["action:r"], torch.full((2,), 0.5))
    sync = tpm.sample(flux_pipe, ["a red circle", "two blue squares"], num_inference_steps=STEPS, height=32, width=32,
                      output_type="pt", generator=torch.Generator().manual_seed(0))
    assert torch.allclose(out.images, sync.images, atol=1e-5)


def test_deterministic_mean_option(flux_pipe):
    policy = small_tpm(flux_pipe, init_scale=1.0, deterministic="mean")
    out = _run(flux_pipe, policy, explore=False)
    for a in out.trajectory.actions[1:]:
        inputs = {k: v for k, v in a.extras.items() if not k.startswith("action:")}
        alpha, beta = policy.net(inputs)
        mean, mode = alpha / (alpha + beta), beta_mode(alpha, beta)
        assert torch.allclose(a.extras["action:r"], mean) and not torch.allclose(a.extras["action:r"], mode)
    with pytest.raises(PolicyError, match="deterministic"):
        small_tpm(flux_pipe, deterministic="median")


def test_save_load_roundtrip_and_wrong_width(flux_pipe, tmp_path):
    policy = small_tpm(flux_pipe)
    policy.save_pretrained(tmp_path / "p")
    loaded = policies.load(str(tmp_path / "p"))
    assert isinstance(loaded, policies.TPM) and not loaded.explore
    a = _run(flux_pipe, policy, explore=False).images
    b = _run(flux_pipe, loaded, explore=False).images
    assert torch.equal(a, b)
    cfg = json.loads((tmp_path / "p" / "config.json").read_text())
    cfg["token_dim"] = 16  # as if made for another backbone
    (tmp_path / "p" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(PolicyError, match="another configuration or backbone"):
        policies.load(str(tmp_path / "p"))


def test_policy_for_other_backbone_fails_clearly(flux_pipe):
    policy = small_tpm(flux_pipe, token_dim=16)
    with pytest.raises(PolicyError, match="16-channel tokens"):
        _run(flux_pipe, policy)


def test_velocity_scale_scales_the_step(flux_pipe):
    policy = small_tpm(flux_pipe, cls=policies.VelocityScale)
    traj = _run(flux_pipe, policy).trajectory
    assert len(traj.actions) == STEPS
    for k, a in enumerate(traj.actions):
        assert torch.allclose(a.step_scale, 0.5 + a.extras["action:r"])  # Eq. 20
        assert torch.equal(traj.tau_cond[k], traj.tau[k])  # the denoiser sees the latent's own time
        assert torch.allclose(policy.log_prob(a.extras), a.log_prob, atol=1e-5)


def test_presets_registered(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # from the repo root, "tpm" would name the package folder, not the preset
    assert {"tpm", "velocity_scale"} <= set(policies.available())
    assert isinstance(policies.load("tpm", token_dim=4, text_dim=8, pooled_dim=8, width=16, heads=2), policies.TPM)
    with pytest.raises(PolicyError, match="divisible by heads"):
        policies.TPM(width=30, heads=4)
