"""James-Stein-shrunk per-prompt baselines (``advantage_baseline: james_stein``) lower the policy gradient's
variance on the analytic backbone of ``test_learning.py``, and GRPO still finds the known optimum with them."""

from __future__ import annotations

import torch

from tpm.grpo import GRPOConfig, GRPOTrainer, group_advantages, rollout, trajectory_log_prob
from tpm.grpo.advantages import shrunk_group_means

from .analytic import AnalyticBackbone
from .test_learning import GRID, R_STAR, _tpm, _tpm_r, tpm_reward

PROMPTS = [c * n for c in "abcdefgh" for n in (1, 2)]  # 16 prompts: the reward does not depend on them
GROUP = 2


def gradients(backbone, policy, draws: int) -> dict[str, torch.Tensor]:
    """Per baseline, (draws, parameters) policy-gradient estimates at the starting policy, each from one batch of
    16 prompts x 2 samples; both baselines see the same rollouts, so their estimates pair up."""
    prompts = [p for p in PROMPTS for _ in range(GROUP)]
    params = [p for p in policy.parameters() if p.requires_grad]
    out: dict[str, list] = {"group": [], "james_stein": []}
    for d in range(draws):
        batch = rollout(backbone, policy, prompts, [0] * len(prompts), num_inference_steps=2, explore=True,
                        action_seeds=[1000 * d + i for i in range(len(prompts))])
        rewards = tpm_reward(batch.images, batch.prompts)
        idx = torch.arange(len(prompts))
        for baseline in out:
            adv = group_advantages(rewards, GROUP, scale="batch", baseline=baseline)
            logp = trajectory_log_prob(policy.log_prob(batch.records(idx)).view(len(prompts), -1))
            grads = torch.autograd.grad(-(adv * logp).mean(), params)
            out[baseline].append(torch.cat([g.reshape(-1) for g in grads]))
    return {k: torch.stack(v) for k, v in out.items()}


def test_shrunk_baselines_lower_the_gradient_variance_and_keep_its_direction():
    """The optimiser (Adam) divides out the gradient's scale, so what a baseline buys is the estimate's variance
    relative to its squared mean (noise-to-signal). A group mean of 2 includes the sample itself, which halves
    the expected gradient with the noise; the shrunk baseline borrows the other prompts' samples instead."""
    backbone = AnalyticBackbone(GRID)
    policy = _tpm()
    g = gradients(backbone, policy, draws=40)
    relative = {k: float(v.var(dim=0).sum() / v.mean(0).pow(2).sum()) for k, v in g.items()}
    assert relative["james_stein"] < 0.85 * relative["group"], relative  # measured: 0.068 against 0.097
    mean_js, mean_group = g["james_stein"].mean(0), g["group"].mean(0)
    cosine = float(mean_js @ mean_group / (mean_js.norm() * mean_group.norm()))
    assert cosine > 0.9, cosine


def test_shrinkage_follows_the_spread_of_the_group_means():
    noise = torch.tensor([[0.0, 1.0], [0.1, 0.9], [0.2, 1.2], [-0.1, 1.1], [0.05, 0.95]])
    shrunk = shrunk_group_means(noise)  # group means alike: pulled all the way to the batch mean
    assert torch.allclose(shrunk, noise.mean().expand(5, 1))
    apart = noise + torch.arange(5.0)[:, None] * 10  # group means far apart: left nearly as they are
    assert torch.allclose(shrunk_group_means(apart), apart.mean(1, keepdim=True), atol=0.01)
    assert torch.equal(shrunk_group_means(noise[:3]), noise[:3].mean(1, keepdim=True))  # m < 4: no shrinkage


def test_grpo_with_shrunk_baselines_still_finds_the_optimum(tmp_path):
    backbone = AnalyticBackbone(GRID)
    policy = _tpm()
    start = (_tpm_r(backbone, policy) - R_STAR).abs().mean()
    cfg = GRPOConfig(output_dir=str(tmp_path), max_iterations=60, group_size=GROUP, batch_size=32,
                     rollout_batch_size=32, minibatch_size=32, num_inference_steps=2, learning_rate=3e-3,
                     eval_prompts=0, save_every=0, progress=False, seed=0, advantage_baseline="james_stein")
    GRPOTrainer(cfg, policy, backbone, tpm_reward, PROMPTS).train()
    end = (_tpm_r(backbone, policy) - R_STAR).abs().mean()
    assert end < 0.25 * start, f"|r - r*| {float(start):.3f} -> {float(end):.3f}"
