"""UncertaintyPatches (AsyncPatch §5.5): budget, disparity bound, monotonicity, sources, the head."""

from __future__ import annotations

import math

import pytest
import torch

import policies
import tpm
from policies.uncertainty import UncertaintyPatches, certainty, uncertainty_step
from policies.uncertainty_head import (
    UncertaintyHead,
    collect_trajectories,
    error_target,
    fit,
    head_loss,
)
from tpm.policy import PolicyError, State


def _grid(k: int, shift: float) -> torch.Tensor:
    """A shifted flow-matching grid like FlowMatchEulerDiscreteScheduler's, ending at 0."""
    s = torch.linspace(1, 1 / k, k, dtype=torch.float64)
    s = shift * s / (1 + (shift - 1) * s)
    return torch.cat([s, torch.zeros(1, dtype=torch.float64)]).float()


@pytest.mark.parametrize("seed", range(6))
def test_any_uncertainty_ends_at_zero_within_bound_and_never_increases(seed):
    gen = torch.Generator().manual_seed(seed)
    k = int(torch.randint(2, 13, (1,), generator=gen))
    shift = float(torch.rand(1, generator=gen)) * 3 + 1
    sig = _grid(k, shift)
    strength = float(torch.rand(1, generator=gen))
    bound = float(torch.rand(1, generator=gen)) * 0.5
    tau = torch.ones(3, 5, 7)
    for step in range(k):
        # A fresh adversarial map every step: heavy-tailed, with ties.
        log_u = torch.randn(3, 5, 7, generator=gen) * 10
        log_u[0] = 0.0
        nxt = uncertainty_step(tau, certainty(log_u, patch=1 + step % 3), sig, step, strength, bound)
        assert bool((nxt <= tau).all()), "a time increased"
        assert bool((nxt >= 0).all())
        spread = nxt.reshape(3, -1).amax(1) - nxt.reshape(3, -1).amin(1)
        assert bool((spread <= bound + 1e-6).all()), f"spread {spread} above bound {bound}"
        tau = nxt
    assert torch.equal(tau, torch.zeros_like(tau))


def test_constant_uncertainty_is_the_synchronous_grid():
    sig = _grid(6, 3.0)
    tau = torch.ones(2, 3, 3)
    for step in range(6):
        tau = uncertainty_step(tau, certainty(torch.full((2, 3, 3), 1.7)), sig, step, 0.5, 0.3)
        assert torch.allclose(tau, sig[step + 1].expand_as(tau), atol=1e-6)


def test_certain_tokens_run_ahead_by_the_stated_allowance():
    # K = 4 linear grid, strength 0.5, c = +-1. Positions (k + 1) +- 0.5 * min(k + 1, K - k - 1):
    # step 0: 1.5 / 0.5 -> times 0.625 / 0.875; step 1: 3 / 1 -> 0.25 / 0.75; step 2: 3.5 / 2.5 ->
    # 0.125 / 0.375; step 3: 0.
    sig = torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0])
    cert = torch.tensor([[[1.0, -1.0]]])
    tau = torch.ones(1, 1, 2)
    for step, expected in enumerate([[0.625, 0.875], [0.25, 0.75], [0.125, 0.375], [0.0, 0.0]]):
        tau = uncertainty_step(tau, cert, sig, step, 0.5, 1.0)
        assert torch.allclose(tau, torch.tensor([[expected]])), (step, tau)
    # With a 0.1 bound the certain token is held back to 0.875 - 0.1.
    nxt = uncertainty_step(torch.ones(1, 1, 2), cert, sig, 0, 0.5, 0.1)
    assert torch.allclose(nxt, torch.tensor([[[0.775, 0.875]]]))
    # A token that was ahead and turns uncertain waits instead of going back.
    nxt = uncertainty_step(torch.tensor([[[0.625, 0.875]]]), -cert, sig, 1, 0.5, 1.0)
    assert torch.allclose(nxt, torch.tensor([[[0.625, 0.25]]]))


def test_certainty_is_a_clipped_zscore_of_negative_log_uncertainty():
    log_u = torch.tensor([[[0.0, 2.0], [4.0, 6.0]]])  # mean 3, std sqrt(5)
    c = certainty(log_u)
    expected = ((3 - log_u) / math.sqrt(5)).clamp(-1, 1)
    assert torch.allclose(c, expected)
    assert torch.equal(certainty(torch.full((1, 2, 2), 3.0)), torch.zeros(1, 2, 2))
    # patch pooling: 2x2 patches share one value
    c2 = certainty(torch.arange(16.0).reshape(1, 4, 4), patch=2)
    assert torch.equal(c2[0, :2, :2], c2[0, :1, :1].expand(2, 2))


def test_training_free_source_by_hand():
    pol = UncertaintyPatches(strength=0.5, max_disparity=1.0)
    b, grid = 1, (1, 2)
    sig = torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0])
    mem: dict = {}
    x0s = [torch.zeros(1, 2, 3), torch.tensor([[[0.0] * 3, [2.0] * 3]])]
    tau = torch.ones(b, *grid)
    for step, x0 in enumerate([None, *x0s]):
        st = State(step=step, num_steps=4, sigmas=sig, tau=tau, latents=torch.zeros(1, 2, 3), grid=grid,
                   prompts=["p"], x0=x0, velocity=None if x0 is None else torch.zeros(1, 2, 3), memory=mem)
        log_u = pol.log_uncertainty(st)
        if step < 2:
            assert log_u is None
        tau = pol.act(st).tau_next
    # At step 2: change^2 = [0, 4], both calls 0.25 apart in time -> u = [0, 64] (+eps).
    assert torch.allclose(log_u, torch.log(torch.tensor([[[1e-12, 64.0]]])), atol=1e-4)


def test_policy_end_to_end_fields(flux_pipe):
    pol = policies.load("uncertainty", max_disparity=0.15)
    out = tpm.sample(flux_pipe, ["a red circle", "two blue squares"], policy=pol, num_inference_steps=6,
                     height=16, width=16, generator=torch.Generator().manual_seed(0), output_type="latent",
                     return_trajectory=True)
    taus = out.trajectory.tau
    assert torch.equal(taus[-1], torch.zeros_like(taus[-1]))
    for a, b in zip(taus[:-1], taus[1:]):
        assert bool((b <= a).all())
        assert float((b.flatten(1).amax(1) - b.flatten(1).amin(1)).max()) <= 0.15 + 1e-6
    # The map had data from step 2 on: the field is no longer uniform there.
    assert float(taus[3].std()) > 0


def test_head_trains_and_round_trips(flux_pipe, tmp_path):
    data = collect_trajectories(flux_pipe, ["a red circle", "a blue square"], 5, height=16, width=16,
                                generator=torch.Generator().manual_seed(0))
    assert data["x0"].shape == (2 * 4, 64, 4) and data["target"].shape == (8, 8, 8)
    torch.manual_seed(0)
    head = UncertaintyHead(token_channels=4, hidden=16, backbone="FluxPipeline")
    losses = fit(head, data, steps=60, lr=1e-2, batch_size=8)
    assert sum(losses[-10:]) / 10 < 0.5 * losses[0]
    # Better than the best constant map: it learned where the error is, not only its level.
    best_constant = float(((data["target"] - data["target"].mean()) ** 2).mean())
    with torch.no_grad():
        assert float(head_loss(head, data)) < 0.5 * best_constant
    # The target is what the docstring says: log mean squared error against the final latents.
    final = torch.zeros(1, 4, 2)
    x0 = torch.tensor([[[1.0, 1.0], [0.0, 2.0], [0.0, 0.0], [3.0, 1.0]]])
    assert torch.allclose(error_target(x0, final, (2, 2)),
                          torch.log(torch.tensor([[[1.0, 2.0], [0.0, 5.0]]]) + 1e-6))
    # Saved and loaded like a policy: the head alone and the policy that holds it.
    head.save_pretrained(tmp_path / "head")
    pol = UncertaintyPatches.with_head(tmp_path / "head")
    pol.save_pretrained(tmp_path / "policy")
    again = policies.load(str(tmp_path / "policy"))
    assert isinstance(again, UncertaintyPatches) and again.config.source == "head"
    kw = dict(num_inference_steps=4, height=16, width=16, output_type="latent", return_trajectory=True)
    a = tpm.sample(flux_pipe, ["a red circle"], policy=pol, generator=torch.Generator().manual_seed(1), **kw)
    b = tpm.sample(flux_pipe, ["a red circle"], policy=again, generator=torch.Generator().manual_seed(1), **kw)
    assert all(torch.equal(x, y) for x, y in zip(a.trajectory.tau, b.trajectory.tau))
    assert float(a.trajectory.tau[2].std()) > 0  # the head shaped the field


def test_head_for_another_backbone_is_refused(flux_pipe, tmp_path):
    other = UncertaintyHead(token_channels=64, backbone="StableDiffusion3Pipeline")
    pol = UncertaintyPatches.with_head(other)
    with pytest.raises(PolicyError, match="64 channels.*StableDiffusion3Pipeline"):
        tpm.sample(flux_pipe, ["a red circle"], policy=pol, num_inference_steps=3, height=16, width=16,
                   output_type="latent")
    # A saved policy whose weights were swapped for another backbone's head.
    pol.save_pretrained(tmp_path / "p")
    small = UncertaintyPatches.with_head(UncertaintyHead(token_channels=4))
    small.save_pretrained(tmp_path / "q")
    (tmp_path / "p" / "model.safetensors").write_bytes((tmp_path / "q" / "model.safetensors").read_bytes())
    with pytest.raises(PolicyError, match="another configuration or backbone"):
        policies.load(str(tmp_path / "p"))
    with pytest.raises(PolicyError, match="uncertainty head directory .* does not exist"):
        UncertaintyHead.from_pretrained(tmp_path / "missing")


def test_bad_options():
    with pytest.raises(PolicyError, match="strength"):
        UncertaintyPatches(strength=1.5)
    with pytest.raises(PolicyError, match="with_head"):
        UncertaintyPatches(source="head")
    with pytest.raises(PolicyError, match="unknown uncertainty source"):
        UncertaintyPatches(source="entropy")


@pytest.mark.slow
def test_recipe_writes_a_loadable_head(tmp_path):
    import json
    import sys

    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parents[2] / "recipes"))
    import train_uncertainty

    report = train_uncertainty.main(["--model", "tiny:flux", "--output-dir", str(tmp_path), "--num-prompts", "2",
                                     "--val-prompts", "2", "--num-steps", "3", "--resolution", "16",
                                     "--train-steps", "5", "--rollout-batch", "2"])
    assert json.loads((tmp_path / "report.json").read_text())["val_loss"] == report["val_loss"]
    assert (tmp_path / "uncertainty_maps.png").is_file()
    head = UncertaintyHead.from_pretrained(tmp_path / "head")
    assert head.config.token_channels == 4 and head.config.backbone == "FluxPipeline"
