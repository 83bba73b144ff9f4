"""``policies.compose``: update field from one policy, told time from another, a known region held under both."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch

import policies
import tpm
from policies.shifted import shift_time
from policies.spatial import inpaint_policy
from tpm.policy import Action, Policy, PolicyError
from tpm.schedulers import to_scheduler
from tpm.tiny import tiny_flux_pipeline

SIZE = 16  # tiny Flux: 2 px per token -> an 8 x 8 token grid
K = 4


@pytest.fixture(scope="module")
def pipe():
    return tiny_flux_pipeline(scheduler_kwargs={"shift": 1.8})


def _learned_field(pipe, seed=0):
    """A field policy with per-token offsets and told-time shifts, random heads (far from synchronous)."""
    pol = policies.FieldPolicy.for_pipeline(pipe, image_size=(SIZE, SIZE), patch=1, token_offsets=True,
                                            learn_cond=True, width=16, layers=1, heads=2, max_disparity=0.5)
    gen = torch.Generator().manual_seed(seed)
    for head in (pol.net.grid_head, pol.net.token_head):
        head.weight.data = torch.randn(head.weight.shape, generator=gen)
        head.bias.data = torch.randn(head.bias.shape, generator=gen)
    return pol.eval()


def _inpaint(pipe):
    gen = torch.Generator().manual_seed(0)
    img = torch.rand(3, SIZE, SIZE, generator=gen)
    mask = torch.zeros(SIZE, SIZE)
    mask[:, SIZE // 2:] = 1  # generate the right half
    return inpaint_policy(pipe, img, mask)


def _run(pipe, policy, **kw):
    return tpm.sample(pipe, ["a red circle", "a blue square"], policy=policy, num_inference_steps=K, height=SIZE,
                      width=SIZE, generator=torch.Generator().manual_seed(0), output_type="latent",
                      return_trajectory=True, **kw)


def test_inpainting_under_a_learned_field_policy(pipe):
    inpaint = _inpaint(pipe)
    field = _learned_field(pipe)
    out = _run(pipe, policies.compose(update=field, known=inpaint))
    traj = out.trajectory
    known = inpaint.known.expand(2, 8, 8)
    # known latents bit-exact at the end, and at every step
    tok = inpaint.image_latents.expand(2, -1, -1)
    flat = known.reshape(2, -1)
    assert torch.equal(out.images[flat], tok[flat])
    for lat in traj.latents:
        assert torch.equal(lat[flat], tok[flat])
    # times never rise, all tokens end at 0, the known ones sit (and are told) 0 throughout
    for a, b in zip(traj.tau[:-1], traj.tau[1:]):
        assert bool((b <= a).all())
    assert bool((traj.tau[-1] == 0).all())
    for tau, cond in zip(traj.tau, traj.tau_cond):
        assert bool((tau[known] == 0).all()) and bool((cond[known] == 0).all())
    # the learned policy really acts per token on the free region, and tells other times than its own
    free = ~known
    spread = max(float(t[free].max() - t[free].min()) for t in traj.tau[1:-1])
    assert spread > 1e-3
    assert max(float((c - t)[free].abs().max()) for c, t in zip(traj.tau_cond, traj.tau)) > 1e-3
    # and the generated region differs from plain inpainting's
    plain = _run(pipe, inpaint).images
    assert float((plain - out.images)[~flat].abs().max()) > 1e-3


def test_update_and_told_time_from_two_policies_by_hand(pipe):
    r = 0.3
    comp = policies.compose(update=policies.load("shifted_grid:shift=2.0"),
                            condition=policies.load(f"constant_deviation:r={r}"))
    traj = _run(pipe, comp).trajectory
    sig = traj.sigmas.double()
    grid = [float(sig[0])] + [float(shift_time(sig[k], 2.0)) for k in range(1, K + 1)]
    for k in range(K + 1):
        np.testing.assert_allclose(traj.tau[k].double().numpy(), grid[k], atol=1e-6)
    # AsyncDiff Eq. 6 with r fixed, on the *shifted* grid the update policy made
    want = [grid[0]] + [grid[k - 1] + (0.5 + r) * (grid[k] - grid[k - 1]) for k in range(1, K)]
    for k in range(K):
        np.testing.assert_allclose(traj.tau_cond[k].double().numpy(), want[k], atol=1e-6)


def test_state_free_composition_exports_as_a_scheduler(pipe):
    comp = policies.compose(update=policies.load("dm_concave:weight=0.6"),
                            condition=policies.load("constant_deviation:r=0.2"))
    sched = to_scheduler(pipe, comp, K, height=SIZE, width=SIZE)
    ref = _run(pipe, comp).images
    old = pipe.scheduler
    pipe.scheduler = sched
    try:
        out = pipe(["a red circle", "a blue square"], num_inference_steps=K, height=SIZE, width=SIZE,
                   generator=torch.Generator().manual_seed(0), output_type="latent", max_sequence_length=16).images
    finally:
        pipe.scheduler = old
    assert float((out - ref).abs().max()) <= 1e-5


@dataclass
class _NoConfig:
    pass


class _Rising(Policy):
    config_class = _NoConfig

    def act(self, state):
        nxt = state.sigmas[state.step + 1].expand_as(state.tau).clone()
        if state.step == 1:
            nxt = torch.minimum(state.tau + 0.01, torch.ones_like(state.tau))
        return Action(tau_next=nxt)


class _NotEnding(Policy):
    config_class = _NoConfig

    def act(self, state):
        return Action(tau_next=(state.tau * 0.5))


def test_constraints_are_checked(pipe):
    with pytest.raises(PolicyError, match="never rise"):
        _run(pipe, policies.compose(update=_Rising()))
    with pytest.raises(PolicyError, match="every token must end"):
        _run(pipe, policies.compose(update=_NotEnding()))
    with pytest.raises(PolicyError, match="known region"):
        policies.compose(update=policies.load("synchronous"), known=policies.load("synchronous"))


def test_save_load_round_trip(pipe, tmp_path):
    comp = policies.compose(update=_learned_field(pipe), condition=policies.load("constant_deviation:r=0.4"),
                            known=_inpaint(pipe))
    comp.save_pretrained(tmp_path)
    loaded = policies.load(str(tmp_path))
    assert isinstance(loaded, policies.Compose)
    a, b = _run(pipe, comp), _run(pipe, loaded)
    assert torch.equal(a.images, b.images)
