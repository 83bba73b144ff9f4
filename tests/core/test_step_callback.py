"""``tpm.sample(..., callback=)``: one :class:`StepOutput` per step, and the trajectory built from them."""

from __future__ import annotations

import pytest
import torch

import policies
import tpm
from tpm.backbones import get_backbone
from tpm.sampler import StepOutput


def _run(pipe, policy=None, steps=3, **kw):
    outs: list[StepOutput] = []
    res = tpm.sample(pipe, ["a red circle", "a blue square"], policy=policy, num_inference_steps=steps, height=32,
                     width=32, generator=torch.Generator().manual_seed(0), output_type="latent",
                     return_trajectory=True, callback=outs.append, **kw)
    return res, outs


@pytest.mark.parametrize("name", ["flux_pipe", "sd3_pipe"])
def test_step_outputs_describe_each_step(name, request):
    pipe = request.getfixturevalue(name)
    bb = get_backbone(pipe)
    res, outs = _run(pipe, policies.load("dm_concave"), steps=3)
    b, (h, w) = 2, bb.grid(32, 32)
    assert [o.step for o in outs] == [0, 1, 2]
    for k, o in enumerate(outs):
        assert o.state.step == k and torch.equal(o.tau, o.action.tau_next)
        assert o.tau_cond.shape == o.tau.shape == (b, h, w)
        assert o.velocity.shape == o.x0.shape == o.latents.shape == (b, h * w, bb.token_dim)
        # x0 is the clean estimate of the latents the backbone was queried at
        want = o.state.latents - o.tau_cond.reshape(b, -1, 1) * o.velocity
        assert torch.allclose(o.x0, want, atol=1e-6)
        if k + 1 < len(outs):  # what step k produced is what step k+1 sees
            nxt = outs[k + 1].state
            assert torch.equal(nxt.latents, o.latents) and torch.equal(nxt.tau, o.tau)
            assert torch.equal(nxt.velocity, o.velocity) and torch.equal(nxt.x0, o.x0)
    assert torch.equal(bb.to_tokens(res.images), outs[-1].latents)
    traj = res.trajectory  # built from the same step outputs
    assert len(traj.tau) == len(traj.latents) == 4 and traj.num_steps == 3
    assert all(torch.equal(traj.tau[k + 1], o.tau) and torch.equal(traj.tau_cond[k], o.tau_cond)
               and torch.equal(traj.latents[k + 1], o.latents) and traj.actions[k] is o.action
               for k, o in enumerate(outs))
    assert torch.equal(traj.tau[0], outs[0].state.tau) and torch.equal(traj.latents[0], outs[0].state.latents)


def test_nfe_counts_guidance_branches_and_reference_runs(flux_pipe, sd3_pipe):
    _, outs = _run(flux_pipe)
    assert [o.nfe for o in outs] == [1, 2, 3]
    _, outs = _run(sd3_pipe, guidance_scale=5.0)  # SD3's CFG: a negative branch per call
    assert [o.nfe for o in outs] == [2, 4, 6]
    _, outs = _run(flux_pipe, policies.load("asyndm:fixed"))  # a synchronous reference run first
    assert [o.nfe for o in outs] == [4, 5, 6]
    pol = policies.spatial.inpaint_policy(flux_pipe, torch.rand(3, 32, 32), torch.ones(32, 32).tril())
    _, outs = _run(flux_pipe, pol, input_guidance=1.0)  # a second call per step
    assert [o.nfe for o in outs] == [2, 4, 6]


def test_callback_without_trajectory_and_synchronous_default(flux_pipe):
    seen = []
    out = tpm.sample(flux_pipe, "a red circle", num_inference_steps=2, height=32, width=32, output_type="latent",
                     callback=lambda o: seen.append(o.step))
    assert out.trajectory is None and seen == [0, 1]
