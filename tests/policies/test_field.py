"""The learned field policy: its constraints hold for every draw, it starts as the synchronous sampler,
its log-probability and replay are exact, it saves and loads, and bad input fails clearly."""

from __future__ import annotations

import pytest
import torch
from scipy import stats

import policies
import tpm
from policies.field import cond_times, grid_centre, token_targets
from policies.field_imitation import imitate, invert_fields
from tpm.distributions import mode_concentration
from tpm.grpo import rollout
from tpm.policy import PolicyError, State
from tpm.tiny import tiny_flux_pipeline

PROMPTS = ["a red circle", "two blue squares"]


@pytest.fixture(scope="module")
def pipe():
    return tiny_flux_pipeline()


def _field(pipe, seed=0, **options):
    torch.manual_seed(seed)
    opts = {"width": 32, "heads": 2, "layers": 1, "text_tokens": 2, **options}
    return policies.FieldPolicy.for_pipeline(pipe, image_size=(32, 32), **opts)


def _randomise_heads(policy, scale=1.0, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for head in (policy.net.grid_head, policy.net.token_head):
            head.weight.copy_(torch.randn(head.weight.shape, generator=g) * scale)
            head.bias.copy_(torch.randn(head.bias.shape, generator=g) * scale)


def _sample(pipe, policy, steps, seed=0, explore=False, **kw):
    policy.eval()
    if not hasattr(policy, "exploring"):  # a fixed policy
        return tpm.sample(pipe, PROMPTS, policy=policy, num_inference_steps=steps, height=32, width=32,
                          output_type="pt", return_trajectory=True, generator=torch.Generator().manual_seed(seed))
    with policy.exploring(explore):
        return tpm.sample(pipe, PROMPTS, policy=policy, num_inference_steps=steps, height=32, width=32,
                          output_type="pt", return_trajectory=True, generator=torch.Generator().manual_seed(seed), **kw)


def test_initial_deterministic_action_is_synchronous_bit_for_bit(pipe):
    policy = _field(pipe)
    out = _sample(pipe, policy, steps=4)
    sync = tpm.sample(pipe, PROMPTS, num_inference_steps=4, height=32, width=32, output_type="pt",
                      return_trajectory=True, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out.images, sync.images)
    for a, b in zip(out.trajectory.tau, sync.trajectory.tau):
        assert torch.equal(a, b)
    for a, b in zip(out.trajectory.tau_cond, sync.trajectory.tau_cond):
        assert torch.equal(a, b)


@pytest.mark.parametrize("steps", [1, 2, 5])
@pytest.mark.parametrize("delta", [0.05, 0.3, 1.0])
def test_every_sampled_action_keeps_the_constraints(pipe, steps, delta):
    policy = _field(pipe, max_disparity=delta, concentration=2.0, learn_concentration=True)
    _randomise_heads(policy, scale=2.0)
    for draw in range(6):
        traj = _sample(pipe, policy, steps, seed=draw, explore=True).trajectory
        for k in range(steps):
            tau, nxt, cond = traj.tau[k], traj.tau[k + 1], traj.tau_cond[k]
            assert bool((nxt <= tau).all()), "a token's time rose"
            spread = nxt.flatten(1).max(1).values - nxt.flatten(1).min(1).values
            assert bool((spread <= delta + 1e-6).all()), f"disparity {float(spread.max()):.3f} > {delta}"
            assert bool(((nxt >= 0) & (nxt <= 1)).all())
            assert bool(((cond >= policy.config.sigma_min - 1e-7) & (cond <= 1)).all())
        assert bool((traj.tau[-1] == 0).all()), "not every token reached 0"


def test_action_maps_keep_their_bounds_on_random_inputs():
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        delta = float(torch.rand(1, generator=g)) * 0.99 + 0.01
        centre_prev = torch.rand(3, generator=g)
        s_next = centre_prev * torch.rand(3, generator=g)
        s_after = s_next * torch.rand(3, generator=g)
        c = grid_centre(2 * torch.rand(3, generator=g) - 1, centre_prev, s_next, s_after)
        assert bool(((c > s_after - 1e-7) & (c <= centre_prev + 1e-7)).all())
        # tokens sit within delta / 2 below the previous centre (the invariant the policy keeps)
        tau = (centre_prev.view(3, 1, 1) - delta / 2 * torch.rand(3, 4, 4, generator=g)).clamp(min=0)
        tau = torch.maximum(tau, (c.view(3, 1, 1) - delta / 2).clamp(min=0))
        nxt = token_targets(2 * torch.rand(3, 4, 4, generator=g) - 1, c, tau, delta)
        assert bool((nxt <= tau + 1e-7).all()) and bool((nxt >= 0).all())
        spread = nxt.flatten(1).max(1).values - nxt.flatten(1).min(1).values
        assert bool((spread <= delta + 1e-6).all())
        cond = cond_times(2 * torch.rand(3, 4, 4, generator=g) - 1, tau, nxt, 0.5, 1e-3)
        assert bool(((cond >= 1e-3) & (cond <= 1)).all())
    # d = 0 reproduces the anchors exactly
    c = torch.tensor([0.6])
    assert torch.equal(grid_centre(torch.zeros(1), torch.tensor([0.9]), c, torch.tensor([0.3])), c)
    tau = torch.full((1, 2, 2), 0.9)
    assert torch.equal(token_targets(torch.zeros(1, 2, 2), c, tau, 0.2), torch.full((1, 2, 2), 0.6))
    assert torch.equal(cond_times(torch.zeros(1, 2, 2), tau, torch.zeros_like(tau), 0.5, 1e-3), tau)


def test_log_prob_against_a_hand_computation(pipe):
    policy = _field(pipe, concentration=5.0)
    with torch.no_grad():  # constant heads: every Beta's parameters are known in closed form
        policy.net.grid_head.bias.copy_(torch.tensor([0.7, 0.0]))
        policy.net.token_head.bias.copy_(torch.tensor([-0.4, 0.0, 1.1, 0.0]))
    traj = _sample(pipe, policy, steps=3, explore=True).trajectory
    for k, action in enumerate(traj.actions):
        rec = action.extras
        total = torch.zeros(2, dtype=torch.float64)
        parts = {"grid": 0.7, "offset": -0.4, "cond": 1.1}
        for part, logit in parts.items():
            if k == 2 and part != "cond":  # the last step decides only the conditioning shift
                continue
            a, b = mode_concentration(torch.sigmoid(torch.tensor(logit)), 5.0)
            u = rec[f"action:{part}"].double().reshape(2, -1)
            total += torch.tensor(stats.beta.logpdf(u.numpy(), float(a), float(b)).sum(1))
        assert torch.allclose(action.log_prob.double(), total, rtol=1e-5, atol=1e-4)


def test_replayed_log_probs_equal_the_rollouts(pipe):
    policy = _field(pipe)
    _randomise_heads(policy, scale=0.5)
    batch = rollout(pipe, policy, PROMPTS * 2, [1, 2, 3, 4], num_inference_steps=3, height=32, width=32,
                    rollout_batch_size=2)
    assert batch.log_probs.shape == (4, 3)
    idx = torch.tensor([2, 0, 3, 1])
    replay = policy.log_prob(batch.records(idx)).view(4, 3)
    assert torch.allclose(replay, batch.log_probs[idx], rtol=1e-5, atol=1e-4)


def test_save_load_round_trip(pipe, tmp_path):
    policy = _field(pipe, patch=2)
    _randomise_heads(policy, scale=0.5)
    policy.save_pretrained(tmp_path / "f")
    loaded = policies.load(str(tmp_path / "f"))
    assert isinstance(loaded, policies.FieldPolicy) and loaded.config == policy.config
    assert torch.equal(_sample(pipe, policy, 3).images, _sample(pipe, loaded, 3).images)
    out = _sample(pipe, loaded, 3).trajectory
    assert not torch.equal(out.tau[1], torch.full_like(out.tau[1], float(out.sigmas[1])))  # it acts


def test_inverse_of_the_action_maps(pipe):
    policy = _field(pipe)
    g = torch.Generator().manual_seed(3)
    sig = torch.tensor([1.0, 0.7, 0.4, 0.0])
    tau = 0.9 + 0.05 * torch.rand(2, 16, 16, generator=g)
    state = State(step=1, num_steps=3, sigmas=sig, tau=tau, latents=torch.zeros(2, 256, 4), grid=(16, 16),
                  prompts=PROMPTS, memory={"centre": torch.tensor([0.95, 0.95])})
    u = {"grid": torch.tensor([0.3, 0.8]), "offset": 0.2 + 0.6 * torch.rand(2, 256, generator=g),
         "cond": 0.2 + 0.6 * torch.rand(2, 256, generator=g)}
    nxt, cond, _ = policy.fields(state, u)
    back, _ = invert_fields(policy, state, nxt, cond)
    # the centre is not identifiable from a field with offsets, but the fields are: they come back exactly
    nxt2, cond2, _ = policy.fields(state, back)
    assert torch.allclose(nxt2, nxt, atol=1e-5) and torch.allclose(cond2, cond, atol=1e-5)
    inside = (cond < 1).reshape(2, -1)  # where the conditioning time was not capped at 1, d_c itself comes back
    assert torch.allclose(back["cond"][inside], u["cond"][inside], atol=1e-4)


def test_warm_start_imitates_a_fixed_policy(pipe):
    policy = _field(pipe, token_offsets=False, learn_cond=False, width=16)
    source = policies.load("shifted_grid", shift=2.0)
    imitate(policy, pipe, source, ["a red circle", "a blue square", "a green triangle", "two red squares"],
            num_inference_steps=3, iterations=150, learning_rate=3e-3, progress=False, height=32, width=32)
    got = _sample(pipe, policy, 3).trajectory.tau
    want = _sample(pipe, source, 3).trajectory.tau
    for a, b in zip(got, want):
        assert torch.allclose(a, b, atol=0.02)


def test_bad_input_fails_clearly(pipe):
    with pytest.raises(PolicyError, match=r"max_disparity must lie in \(0, 1\]"):
        _field(pipe, max_disparity=1.5)
    with pytest.raises(PolicyError, match=r"max_disparity must lie in \(0, 1\]"):
        _field(pipe, max_disparity=0.0)
    policy = _field(pipe)
    with pytest.raises(PolicyError, match="built for a 16x16 token grid, but this run has 8x8"):
        tpm.sample(pipe, PROMPTS, policy=policy, num_inference_steps=2, height=16, width=16, output_type="pt")
    with pytest.raises(PolicyError, match="imitates a fixed policy"):
        imitate(policy, pipe, _field(pipe), PROMPTS, num_inference_steps=2, iterations=1, progress=False)
    with pytest.raises(PolicyError, match="imitates a fixed policy"):
        imitate(policy, pipe, "asyndm", PROMPTS, num_inference_steps=2, iterations=1, progress=False)
    with pytest.raises(PolicyError, match="grid must be the token grid"):
        policies.FieldPolicy(token_dim=4, text_dim=32, pooled_dim=32)


def test_object_order_input_tells_the_objects_apart(pipe):
    policy = _field(pipe, use_attention=True, object_order=True)
    # joint text positions 0..3 belong to prompt words 0..3 of "red circle blue square"; the two
    # colour+shape pairs attend to the left and the right half of the 16x16 grid
    att = torch.zeros(2, 4, 16, 16)
    att[:, :2, :, :8] = 1.0
    att[:, 2:, :, 8:] = 3.0
    att[:, :, :, :] += 0.01
    state = State(step=0, num_steps=3, sigmas=torch.tensor([1.0, 0.7, 0.4, 0.0]), tau=torch.ones(2, 16, 16),
                  latents=torch.zeros(2, 256, 4), grid=(16, 16), prompts=["red circle blue square", "red circle"],
                  attention=att, text_words=[[0, 1, 2, 3], [0, 1, -1, -1]])
    share = policy._first_object_share(state)
    # object words are the nouns: "circle" (position 1) holds 1.01 of 1.01 + 0.01 ("square", position 3)
    # on the left and 0.01 of 0.01 + 3.01 on the right; sample 1 has one object: nothing to order
    assert torch.allclose(share[0, :, :8], torch.full((16, 8), 1.01 / 1.02))
    assert torch.allclose(share[0, :, 8:], torch.full((16, 8), 0.01 / 3.02))
    assert torch.equal(share[1], torch.zeros(16, 16))
    assert policy.net.token_in.in_features == _field(pipe, use_attention=True).net.token_in.in_features + 1
    with pytest.raises(PolicyError, match="object_order reads the object words' attention"):
        _field(pipe, object_order=True)
