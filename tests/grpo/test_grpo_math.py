"""GRPO maths against hand computations, and the config's checks."""

from __future__ import annotations

import math

import pytest
import torch

from tpm.grpo import (
    GRPOConfig,
    GRPOConfigError,
    group_advantages,
    ppo_clip_loss,
    trajectory_log_prob,
)


def test_group_advantages_hand():
    r = torch.tensor([1.0, 3.0, 10.0, 10.0, 0.0, 6.0])
    adv = group_advantages(r, group_size=2, eps=0.0 + 1e-12)
    # groups (1, 3): mean 2, std 1; (10, 10): std 0 -> 0; (0, 6): mean 3, std 3
    assert torch.allclose(adv, torch.tensor([-1.0, 1.0, 0.0, 0.0, -1.0, 1.0]), atol=1e-6)
    adv = group_advantages(torch.tensor([1.0, 3.0]), group_size=2, eps=1.0)
    assert torch.allclose(adv, torch.tensor([-0.5, 0.5]))
    assert torch.equal(group_advantages(torch.tensor([5.0]), group_size=1), torch.zeros(1))  # a group of one
    with pytest.raises(ValueError, match="groups of 4"):
        group_advantages(torch.zeros(6), group_size=4)


def test_group_advantages_batch_scale_hand():
    r = torch.tensor([1.0, 3.0, 10.0, 10.0, 0.0, 6.0])
    adv = group_advantages(r, group_size=2, eps=1e-12, scale="batch")
    # centred: (-1, 1), (0, 0), (-3, 3); one std over all six: sqrt((1 + 1 + 9 + 9) / 6)
    std = math.sqrt(20 / 6)
    assert torch.allclose(adv, torch.tensor([-1.0, 1.0, 0.0, 0.0, -3.0, 3.0]) / std, atol=1e-6)
    # the group that differs more now weighs more; per-group scaling made them equal
    assert adv[5] / adv[1] == pytest.approx(3.0)
    with pytest.raises(ValueError, match="scale"):
        group_advantages(r, group_size=2, scale="prompt")
    with pytest.raises(GRPOConfigError, match="advantage_scale"):
        GRPOConfig(advantage_scale="prompt")


def test_ppo_clip_loss_hand():
    new = torch.tensor([math.log(1.5), math.log(0.5), math.log(1.1)])
    old = torch.zeros(3)
    adv = torch.tensor([1.0, -1.0, 2.0])
    loss, st = ppo_clip_loss(new, old, adv, clip_eps=0.2)
    # min(1.5, 1.2) = 1.2; min(-0.5, -0.8) = -0.8; min(2.2, 2.2) = 2.2
    assert float(loss) == pytest.approx(-(1.2 - 0.8 + 2.2) / 3, abs=1e-6)
    assert float(st["clip_fraction"]) == pytest.approx(2 / 3)
    assert float(st["ratio/max"]) == pytest.approx(1.5)


def test_ppo_gradient_vanishes_when_clipped():
    new = torch.tensor([math.log(1.5), math.log(1.1)], requires_grad=True)
    loss, _ = ppo_clip_loss(new, torch.zeros(2), torch.tensor([1.0, 1.0]), clip_eps=0.2)
    loss.backward()
    # d/dlogp of -(ratio * A)/2 is -ratio/2 for the unclipped sample, 0 for the clipped one.
    assert torch.allclose(new.grad, torch.tensor([0.0, -1.1 / 2]), atol=1e-6)


def test_per_step_ratio_broadcasts_advantages():
    step = torch.tensor([[0.1, -0.1], [0.0, 0.0]])
    loss, st = ppo_clip_loss(step, torch.zeros(2, 2), torch.tensor([1.0, -2.0]), clip_eps=0.2)
    expected = -(math.exp(0.1) + math.exp(-0.1) - 2 - 2) / 4
    assert float(loss) == pytest.approx(expected, abs=1e-6)
    assert torch.allclose(trajectory_log_prob(step), torch.tensor([0.0, 0.0]))


def test_beta_actions_log_prob_kl_and_activity_hand():
    from scipy import stats

    from tpm.distributions import BetaActions, beta_mode, mode_concentration

    a = {"g": torch.tensor([2.0, 3.0]), "t": torch.tensor([[2.0, 4.0], [1.5, 2.5]])}
    b = {"g": torch.tensor([2.0, 5.0]), "t": torch.tensor([[3.0, 2.0], [1.5, 6.0]])}
    x = {"g": torch.tensor([0.3, 0.6]), "t": torch.tensor([[0.2, 0.9], [0.5, 0.1]])}
    dist = BetaActions(a, b)
    want = [sum(stats.beta.logpdf(float(x[n].reshape(2, -1)[i, j]), float(a[n].reshape(2, -1)[i, j]),
                                  float(b[n].reshape(2, -1)[i, j])) for n in a for j in range(a[n].reshape(2, -1).shape[1]))
            for i in range(2)]
    assert torch.allclose(dist.log_prob(x).double(), torch.tensor(want, dtype=torch.float64), atol=1e-5)
    # a part switched off for a sample adds nothing to its log-probability or KL
    off = BetaActions(a, b, {"t": torch.tensor([1.0, 0.0])})
    only_g = stats.beta.logpdf(0.6, 3.0, 5.0)
    assert float(off.log_prob(x)[1]) == pytest.approx(only_g, abs=1e-5)
    assert torch.allclose(dist.kl(dist), torch.zeros(2), atol=1e-6)
    other = BetaActions({k: v + 1 for k, v in a.items()}, b)
    assert bool((dist.kl(other) > 0).all())
    # mode of Beta(1 + m k, 1 + (1 - m) k) is m; exactly 0.5 for m = 0.5
    al, be = mode_concentration(torch.tensor([0.5, 0.2, 0.9]), 16.0)
    assert float(beta_mode(al, be)[0]) == 0.5
    assert torch.allclose(beta_mode(al, be), torch.tensor([0.5, 0.2, 0.9]), atol=1e-6)


def test_config_rejects_group_not_dividing_batch():
    with pytest.raises(GRPOConfigError, match=r"batch_size \(20\) must be a multiple of group_size \(16\)"):
        GRPOConfig(batch_size=20, group_size=16)
    cfg = GRPOConfig(batch_size=16, group_size=16, minibatch_size=4)
    # minibatches are global: 8 processes of 2 samples each replay their members of each minibatch of 4
    assert cfg.check_processes(8) == 2 and cfg.check_processes(1) == 16
    with pytest.raises(GRPOConfigError, match=r"batch_size \(16\) must be divisible by the number of processes "
                       r"\(3\); set batch_size to a multiple of 48 or launch 2 processes"):
        cfg.check_processes(3)
    with pytest.raises(GRPOConfigError, match="group_size must be at least 2"):
        GRPOConfig(batch_size=4, group_size=1)
    with pytest.raises(GRPOConfigError, match="ratio must be one of"):
        GRPOConfig(ratio="token")
    with pytest.raises(GRPOConfigError, match="exclude each other"):
        GRPOConfig(resume=True, overwrite=True)


def test_learning_rate_schedules():
    from tpm.grpo.trainer import lr_factor

    const = GRPOConfig(max_iterations=10)
    assert [lr_factor(const, i) for i in (0, 5, 10)] == [1.0, 1.0, 1.0]
    cos = GRPOConfig(max_iterations=10, lr_schedule="cosine")
    assert [lr_factor(cos, i) for i in (0, 5, 10)] == pytest.approx([1.0, 0.5, 0.0], abs=1e-12)
    warm = GRPOConfig(max_iterations=10, lr_schedule="cosine", warmup_iterations=3)
    assert lr_factor(warm, 0) == pytest.approx(0.25 * 0.5 * (1 + math.cos(0)))
    with pytest.raises(GRPOConfigError, match="lr_schedule must be one of"):
        GRPOConfig(lr_schedule="linear")
    with pytest.raises(GRPOConfigError, match="group_noise must be one of"):
        GRPOConfig(group_noise="same")


def test_per_sample_generators_make_draws_independent_of_the_batch():
    from tpm.distributions import BetaActions

    alpha = {"r": torch.tensor([[2.0, 3.0], [4.0, 1.5], [6.0, 2.0]])}
    beta = {"r": torch.tensor([[3.0, 2.0], [1.5, 5.0], [2.0, 2.0]])}
    gens = lambda seeds: [torch.Generator().manual_seed(s) for s in seeds]  # noqa: E731
    whole = BetaActions(alpha, beta).sample(gens([1, 2, 3]))["r"]
    part = BetaActions({"r": alpha["r"][1:]}, {"r": beta["r"][1:]}).sample(gens([2, 3]))["r"]
    assert torch.equal(whole[1:], part)
    assert not torch.equal(whole[0], BetaActions(alpha, beta).sample(gens([4, 2, 3]))["r"][0])
    with pytest.raises(ValueError, match="2 generators for a batch of 3"):
        BetaActions(alpha, beta).sample(gens([1, 2]))

