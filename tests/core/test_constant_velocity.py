"""Closed form: a constant-velocity model is integrated exactly under any field.

With ``v = c`` the per-token Euler step ``x_{k+1} = x_k + (tau_next - tau_k) * c`` telescopes to
``x_k = x_0 + (tau_k - tau_0) * c`` per token, whatever path each token takes and whatever
conditioning field the model is queried at. The backbones are the real adapters with their
``predict`` replaced by the constant, so their layouts (packed Flux tokens, SD3 patches) are
exercised.
"""

from __future__ import annotations

import pytest
import torch

import tpm
from tpm.backbones import Conditioning, FluxBackbone, Prediction, get_backbone
from tpm.policy import Action, Policy
from tpm.sampler import denoise

from .helpers import shared_pipeline


class ScheduledFields(Policy):
    """Test policy: replays given per-token schedules and records the states it is shown."""

    config_class = dict

    def __init__(self, schedule: torch.Tensor, cond: torch.Tensor | None = None,
                 scales: torch.Tensor | None = None):
        super().__init__(config={})
        # (K+1, B, h, w), (K, B, h, w), (K, B) or (K, B, h, w)
        self.schedule, self.cond, self.scales = schedule, cond, scales
        self.states = []

    def act(self, state):
        self.states.append(state)
        k = state.step
        return Action(tau_next=self.schedule[k + 1].clone(),
                      tau_cond=None if self.cond is None else self.cond[k].clone(),
                      step_scale=None if self.scales is None else self.scales[k].clone())


def random_schedule(kind: str, steps: int, batch: int, grid: tuple[int, int], gen) -> torch.Tensor:
    """(K+1, B, h, w) fields from 1 to 0: monotone per token, or arbitrary in between."""
    shape = (steps, batch, *grid)
    if kind == "monotone":
        inc = torch.rand(shape, generator=gen) + 0.05
        done = inc.cumsum(0) / inc.sum(0, keepdim=True)
        sched = torch.cat([torch.ones(1, batch, *grid), 1 - done])
    else:
        sched = torch.cat([torch.ones(1, batch, *grid), torch.rand(shape, generator=gen)])
    sched[-1] = 0.0
    return sched


def _constant(backbone, c):
    def predict(latents, tau, cond, attention_layers=None):
        return Prediction(c.expand_as(latents).clone(), None)

    return predict


def _dummy_cond(batch: int) -> Conditioning:
    return Conditioning(prompts=["a"] * batch, embeds=torch.zeros(batch, 1, 1), pooled=torch.zeros(batch, 1),
                        guidance_scale=1.0, do_cfg=False)


@pytest.mark.parametrize("steps", [1, 5])
@pytest.mark.parametrize("kind", ["monotone", "arbitrary"])
@pytest.mark.parametrize("cond_kind", ["tau_k", "random"])
@pytest.mark.parametrize("name", ["flux", "sd3"])
def test_constant_velocity_is_integrated_exactly(name, kind, cond_kind, steps):
    gen = torch.Generator().manual_seed(7)
    backbone = get_backbone(shared_pipeline(name))
    batch, height, width = 2, 32, 48
    grid = backbone.grid(height, width)
    x0 = backbone.prepare_latents(batch, height, width, gen)
    c = torch.randn(x0.shape, generator=gen)
    backbone.predict = _constant(backbone, c)  # instance attribute: the shared pipeline is untouched
    schedule = random_schedule(kind, steps, batch, grid, gen)
    cond = None if cond_kind == "tau_k" else torch.rand(steps, batch, *grid, generator=gen)
    policy = ScheduledFields(schedule, cond)
    sigmas = torch.linspace(1.0, 0.0, steps + 1)
    x_final, traj = denoise(backbone, x0.clone(), _dummy_cond(batch), sigmas, policy, {}, grid, None, None,
                            record=True)

    n = grid[0] * grid[1]
    x0_tok, c_tok = backbone.to_tokens(x0), backbone.to_tokens(c)
    assert x0_tok.shape[:2] == (batch, n)

    def expected(tau):  # x_0 + (tau - tau_0) * c per token, tau_0 = 1
        return x0_tok + (tau.reshape(batch, n, 1) - 1.0) * c_tok

    assert torch.allclose(backbone.to_tokens(x_final), x0_tok - c_tok, atol=1e-5)
    assert len(traj.tau) == steps + 1 and len(traj.latents) == steps + 1
    assert len(traj.tau_cond) == steps and len(traj.actions) == steps and traj.num_steps == steps
    assert torch.all(traj.tau[0] == sigmas[0]) and torch.all(traj.tau[-1] == 0)
    for k in range(steps + 1):
        assert torch.equal(traj.tau[k], schedule[k])
        assert torch.allclose(traj.latents[k], expected(schedule[k]), atol=1e-5)
    for k in range(steps):
        want_cond = schedule[k] if cond is None else cond[k]
        assert torch.equal(traj.tau_cond[k], want_cond)

    # the states the policy saw: x_k, tau_k, and the previous step's velocity / x0 estimate
    assert len(policy.states) == steps
    for k, st in enumerate(policy.states):
        assert st.step == k and st.num_steps == steps and st.grid == grid
        assert torch.allclose(st.latents, expected(schedule[k]), atol=1e-5)
        if k == 0:
            assert st.velocity is None and st.x0 is None
            continue
        assert torch.allclose(st.velocity, c_tok)
        prev_cond = traj.tau_cond[k - 1].reshape(batch, n, 1)
        assert torch.allclose(st.x0, expected(schedule[k - 1]) - prev_cond * c_tok, atol=1e-5)


@pytest.mark.parametrize("per_token", [False, True])
@pytest.mark.parametrize("name", ["flux", "sd3"])
def test_step_scale_scales_each_update(name, per_token):
    """``Action.step_scale`` s_k: x_{k+1} = x_k + s_k (tau_{k+1} - tau_k) c, time bookkeeping unchanged."""
    gen = torch.Generator().manual_seed(11)
    backbone = get_backbone(shared_pipeline(name))
    batch, steps = 2, 3
    grid = backbone.grid(32, 32)
    x0 = backbone.prepare_latents(batch, 32, 32, gen)
    c = torch.randn(x0.shape, generator=gen)
    backbone.predict = _constant(backbone, c)
    schedule = random_schedule("monotone", steps, batch, grid, gen)
    shape = (steps, batch, *grid) if per_token else (steps, batch)
    scales = 0.5 + torch.rand(shape, generator=gen)
    policy = ScheduledFields(schedule, scales=scales)
    x_final, traj = denoise(backbone, x0.clone(), _dummy_cond(batch), torch.linspace(1, 0, steps + 1), policy, {},
                            grid, None, None, record=True)
    s = scales if per_token else scales[:, :, None, None].expand(steps, batch, *grid)
    moved = (s * (schedule[1:] - schedule[:-1])).sum(0)  # (B, h, w)
    n = grid[0] * grid[1]
    want = backbone.to_tokens(x0) + moved.reshape(batch, n, 1) * backbone.to_tokens(c)
    assert torch.allclose(backbone.to_tokens(x_final), want, atol=1e-5)
    assert all(torch.equal(traj.tau[k], schedule[k]) for k in range(steps + 1))


@pytest.mark.parametrize("name", ["flux", "sd3"])
def test_token_order_is_row_major(name):
    """Token n of ``to_tokens`` is grid cell (n // w, n % w), the order fields are flattened in."""
    backbone = get_backbone(shared_pipeline(name))
    height, width = 32, 48
    h, w = backbone.grid(height, width)
    field = torch.arange(h * w, dtype=torch.float32).reshape(1, h, w)
    x = backbone.prepare_latents(1, height, width, torch.Generator().manual_seed(0))
    lifted = torch.zeros_like(x) + backbone.expand_field(field)  # every channel of a token = its index
    tokens = backbone.to_tokens(lifted)
    assert torch.equal(tokens, torch.arange(h * w, dtype=torch.float32)[None, :, None].expand_as(tokens))
    assert torch.equal(backbone.from_tokens(backbone.to_tokens(x), (h, w)), x)


def test_sample_end_to_end_with_constant_velocity(flux_pipe, monkeypatch):
    """Through ``tpm.sample`` (prompt encoding, scheduler, decode=latent) with a random field policy."""
    gen = torch.Generator().manual_seed(3)
    backbone = get_backbone(flux_pipe)
    x0 = backbone.prepare_latents(2, 32, 32, torch.Generator().manual_seed(0))
    c = torch.randn(x0.shape, generator=gen)
    monkeypatch.setattr(FluxBackbone, "predict", lambda self, latents, tau, cond, attention_layers=None:
                        Prediction(c.clone(), None))
    steps = 4
    schedule = random_schedule("arbitrary", steps, 2, backbone.grid(32, 32), gen)
    out = tpm.sample(flux_pipe, ["a red circle", "a cat"], policy=ScheduledFields(schedule), latents=x0.clone(),
                     num_inference_steps=steps, height=32, width=32, output_type="latent", return_trajectory=True)
    assert torch.allclose(out.images, x0 - c, atol=1e-5)
    assert torch.all(out.trajectory.tau[0] == out.trajectory.sigmas[0]) and out.trajectory.sigmas[0] == 1.0
    assert out.trajectory.sigmas[-1] == 0.0 and len(out.trajectory.sigmas) == steps + 1
