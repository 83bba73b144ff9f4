"""GRPO must find an optimum known by construction (the analytic backbone in ``analytic.py``).

For each trainable policy the reward pays for one target image; the backbone makes the image a
known function of the action, so the optimal deterministic action is known: r* for the TPM, the
target time field for the field policy. Training must bring the deterministic action close to it,
and the same training with the reward's sign flipped (advantages of the wrong sign) must move it
further away than it started.
"""

from __future__ import annotations

import pytest
import torch

import policies
import tpm
from tpm.grpo import GRPOConfig, GRPOTrainer

from .analytic import TEXT_DIM, AnalyticBackbone

PROMPTS = ["a", "bb", "ccc", "dddd"]
GRID = (4, 4)


def _train(backbone, policy, reward, tmp_path, iterations, lr):
    cfg = GRPOConfig(output_dir=str(tmp_path), max_iterations=iterations, group_size=8, batch_size=32,
                     rollout_batch_size=32, minibatch_size=32, num_inference_steps=2, learning_rate=lr,
                     eval_prompts=0, save_every=0, progress=False, seed=0)
    GRPOTrainer(cfg, policy, backbone, reward, PROMPTS).train()
    return policy


def _images(backbone, policy):
    policy.eval()
    return tpm.sample(backbone, PROMPTS, policy=policy, num_inference_steps=2, output_type="pt").images


# ---- TPM: the image is 1 - 0.25 / tau_c with tau_c = 0.75 - r / 2 (Eq. 6 at k = 1 of K = 2) -------------
R_STAR = 0.75
TPM_TARGET = 1 - 0.25 / (0.75 - R_STAR / 2)


def _tpm(seed=0):
    torch.manual_seed(seed)
    return policies.TPM(token_dim=4, text_dim=TEXT_DIM, pooled_dim=TEXT_DIM, width=16, heads=2, layers=1,
                        image_grid=4, text_tokens=1, readout_tokens=1)


def _tpm_r(backbone, policy) -> torch.Tensor:
    out = tpm.sample(backbone, PROMPTS, policy=policy.eval(), num_inference_steps=2, output_type="pt",
                     return_trajectory=True)
    return out.trajectory.actions[1].extras["action:r"]


def tpm_reward(images, prompts):
    return -(images - TPM_TARGET).pow(2).flatten(1).mean(1)


def test_analytic_backbone_maps_r_to_the_image():
    backbone = AnalyticBackbone(GRID)
    policy = _tpm()
    r = _tpm_r(backbone, policy)
    img = _images(backbone, policy)
    assert torch.allclose(img, (1 - 0.25 / (0.75 - r / 2)).view(-1, 1, 1, 1).expand_as(img), atol=1e-5)


@pytest.mark.parametrize("sign", [1, -1])
def test_grpo_moves_the_tpm_to_the_known_optimum(tmp_path, sign):
    backbone = AnalyticBackbone(GRID)
    policy = _tpm()
    start = (_tpm_r(backbone, policy) - R_STAR).abs().mean()
    _train(backbone, policy, lambda im, p: sign * tpm_reward(im, p), tmp_path, iterations=60, lr=3e-3)
    end = (_tpm_r(backbone, policy) - R_STAR).abs().mean()
    if sign > 0:
        assert end < 0.25 * start, f"GRPO did not approach r* = {R_STAR}: |r - r*| {float(start):.3f} -> {float(end):.3f}"
    else:
        assert end > start + 0.05, f"a wrong-signed advantage did not push r away: {float(start):.3f} -> {float(end):.3f}"


# ---- field policy: after K = 2 steps the image is the time field chosen at the first step -------------
# Each part has its own known optimum: the grid move must bring every token to 0.7; the per-token
# offsets (around the synchronous 0.5, within max_disparity 0.2) must draw a checkerboard of 0.42 / 0.58.
CHECKER = ((torch.arange(GRID[0])[:, None] + torch.arange(GRID[1])[None, :]) % 2).float()
TARGETS = {"grid": torch.full(GRID, 0.7), "offset": 0.5 + 0.16 * (CHECKER - 0.5)}


def _field(part: str, seed=0):
    torch.manual_seed(seed)
    # deterministic="mean": GRPO maximises the reward expected under the draws, whose optimum is the
    # draws' mean; a Beta's mode lies further out when the optimum is near a bound.
    return policies.FieldPolicy(token_dim=4, text_dim=TEXT_DIM, pooled_dim=TEXT_DIM, grid=list(GRID), width=32,
                                heads=2, layers=1, text_tokens=1, learn_cond=False, learn_grid=part == "grid",
                                token_offsets=part == "offset", max_disparity=0.2, deterministic="mean")


def test_analytic_backbone_returns_the_first_time_field():
    backbone = AnalyticBackbone(GRID)
    policy = _field("offset")
    with policy.exploring():
        out = tpm.sample(backbone, PROMPTS, policy=policy, num_inference_steps=2, output_type="pt",
                         return_trajectory=True)
    tau1 = out.trajectory.tau[1]
    assert not torch.allclose(tau1, torch.full_like(tau1, 0.5))  # the draws moved the field
    assert torch.allclose(out.images, tau1[:, None].expand_as(out.images), atol=1e-5)


@pytest.mark.parametrize("sign", [1, -1])
@pytest.mark.parametrize("part", ["grid", "offset"])
def test_grpo_moves_the_field_policy_to_the_target_field(tmp_path, part, sign):
    backbone = AnalyticBackbone(GRID)
    policy = _field(part)
    target = TARGETS[part]

    def reward(images, prompts):
        return -sign * (images - target[None, None]).pow(2).flatten(1).mean(1)

    start = (_images(backbone, policy)[:, 0] - target).abs().mean()
    _train(backbone, policy, reward, tmp_path, iterations=80, lr=1e-2)
    end = (_images(backbone, policy)[:, 0] - target).abs().mean()
    if sign > 0:
        assert end < 0.3 * start, f"GRPO did not approach the target field: mean |tau - target| {start:.3f} -> {end:.3f}"
    else:
        # Pushing a checkerboard the other way is slow (per-token credit from one reward per image); the
        # uniform part moves fast. Either way the error must grow, never shrink.
        assert end > start + (0.03 if part == "grid" else 0.005), \
            f"a wrong-signed advantage did not push the field away: {start:.3f} -> {end:.3f}"
