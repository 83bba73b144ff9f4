"""AsynDM concave schedules against hand computations (AsynDM §3.2, Prop. 1, App. B.1)."""

import math

import pytest
import torch

import policies
from policies.concave import (
    CLOSED_FORM_SHIFTS,
    SCHEDULES,
    Concave,
    concave_next,
    linear_next,
    reweighted,
    shift_solve,
)
from tpm.policy import PolicyError, State


def test_schedules_hand_values():
    u = torch.tensor([0.0, 0.25, 0.5, 1.0], dtype=torch.float64)
    assert torch.allclose(SCHEDULES["quadratic"](u), torch.tensor([1.0, 0.9375, 0.75, 0.0], dtype=torch.float64))
    # min(1 - u/2, 3/2 - 3u/2): 1, 0.875, 0.75, 0
    assert torch.allclose(SCHEDULES["piecewise_linear"](u), torch.tensor([1.0, 0.875, 0.75, 0.0], dtype=torch.float64))
    e = math.e
    expected = torch.tensor([(e - math.exp(x)) / (e - 1) for x in u.tolist()], dtype=torch.float64)
    assert torch.allclose(SCHEDULES["exponential"](u), expected)
    # reweighting: w f + (1 - w) g at u = 0.5, w = 0.4: 0.4 * 0.75 + 0.6 * 0.5
    assert reweighted("quadratic", 0.4)(torch.tensor(0.5, dtype=torch.float64)).item() == pytest.approx(0.6)


def test_shift_matches_quadratic_closed_form():
    # For f(i) = T - i^2 / T: f(i0 - a) - f(T - a) = (T - i0)(T + i0 - 2a) / T = t0
    #   => a = (T + i0 - t0 T / (T - i0)) / 2   (normalised: T = 1)
    f = SCHEDULES["quadratic"]
    u0 = torch.tensor(0.3, dtype=torch.float64)
    for s0 in [0.7, 0.8, 0.9, 0.91]:  # inside [1 - u0, f(u0)] = [0.7, 0.91]
        a = shift_solve(f, u0, torch.tensor([s0], dtype=torch.float64))
        closed = (1 + 0.3 - s0 / 0.7) / 2
        assert a.item() == pytest.approx(closed, abs=1e-12)
        # the shifted curve passes through (u0, s0) and reaches 0 at u = 1
        b = -f(1 - a)
        assert (f(u0 - a) + b).item() == pytest.approx(s0, abs=1e-12)


def test_concave_next_hand_values():
    f = SCHEDULES["quadratic"]
    k = 10
    # a token that was always masked sits on f itself: t = K - i^2 / K
    t = torch.tensor([10.0], dtype=torch.float64)
    for i in range(k):
        t = concave_next(f, i, k, t)
        assert t.item() == pytest.approx(k - (i + 1) ** 2 / k, abs=1e-9)
    # linear: from (i, t) straight to (K, 0)
    assert linear_next(2, 10, torch.tensor([8.0])).item() == pytest.approx(7.0)
    assert linear_next(2, 10, torch.tensor([9.0])).item() == pytest.approx(9.0 * 7 / 8)


def _run(policy, masks, k=8, grid=(3, 4), sigmas=None):
    sig = sigmas if sigmas is not None else torch.linspace(1, 0, k + 1)
    tau = torch.ones(2, *grid)
    mem = {}
    fields = [tau]
    for i in range(k):
        policy.config.mask = "user"
        policy.user_mask = masks[i].float()
        st = State(step=i, num_steps=k, sigmas=sig, tau=tau, latents=torch.zeros(2, 12, 1), grid=grid,
                   prompts=["a", "b"], memory=mem)
        tau = policy.act(st).tau_next
        fields.append(tau)
    return fields


@pytest.mark.parametrize("schedule", sorted(SCHEDULES))
@pytest.mark.parametrize("weight", [1.0, 0.5])
def test_random_mask_histories_end_at_zero_monotone_and_bounded(schedule, weight):
    torch.manual_seed(0)
    k = 8
    masks = [torch.rand(2, 3, 4) > 0.5 for _ in range(k)]
    pol = Concave(schedule=schedule, weight=weight, user_mask=torch.zeros(3, 4))
    # a shifted grid (like SD3's shift=3) to check the time mapping, not just linspace
    lin = torch.linspace(1, 1 / k, k)
    sig = torch.cat([3 * lin / (1 + 2 * lin), torch.zeros(1)])
    fields = _run(pol, masks, k=k, sigmas=sig)
    assert torch.equal(fields[-1], torch.zeros_like(fields[-1]))  # every token lands on 0
    for a, b in zip(fields, fields[1:]):
        assert bool((b <= a + 1e-7).all())  # fields never increase
    # disparity bound in schedule units: w * max_u (f(u) - (1 - u)), mapped through the grid
    f = SCHEDULES[schedule]
    u = torch.linspace(0, 1, 10001, dtype=torch.float64)
    gap = weight * float((f(u) - (1 - u)).max())
    from tpm.fields import grid_position

    for i, fld in enumerate(fields):
        pos = grid_position(sig, fld)  # K - t
        t = k - pos
        assert float(t.max() - (k - i)) <= gap * k + 1e-6
        assert float((k - i) - t.min()) <= 1e-6  # nobody runs ahead of the linear schedule


def test_all_mask_and_empty_mask():
    k, grid = 5, (2, 2)
    sig = torch.linspace(1, 0, k + 1)
    # empty mask: exactly the synchronous grid
    fields = _run(Concave(user_mask=torch.zeros(*grid)), [torch.zeros(2, *grid, dtype=torch.bool)] * k, k, grid, sig)
    for i, fld in enumerate(fields):
        assert torch.equal(fld, torch.full_like(fld, float(sig[i])))
    # all tokens: f(i) = K - i^2 / K on the grid, i.e. tau = 1 - (i / K)^2 for a linear grid
    fields = _run(Concave(user_mask=torch.ones(*grid)), [torch.ones(2, *grid, dtype=torch.bool)] * k, k, grid, sig)
    for i, fld in enumerate(fields):
        assert torch.allclose(fld, torch.full_like(fld, 1 - (i / k) ** 2), atol=1e-6)


def test_round_trip_and_load_names(tmp_path):
    pol = policies.load("asyndm:exponential", weight=0.6, objects=["shark"])
    pol.save_pretrained(tmp_path / "p")
    back = policies.load(str(tmp_path / "p"))
    assert isinstance(back, Concave) and back.config == pol.config
    um = torch.rand(4, 4) > 0.5
    pu = Concave(user_mask=um)
    pu.save_pretrained(tmp_path / "u")
    bu = policies.load(str(tmp_path / "u"))
    assert torch.equal(bu.user_mask.bool(), um)
    assert policies.load("dm_concave").config.mask == "all"
    assert policies.load("asyndm:fixed").config.mask == "fixed"


def test_bad_input():
    with pytest.raises(PolicyError, match="valid names"):
        policies.load("asyndmm")
    with pytest.raises(PolicyError, match="no variant"):
        policies.load("asyndm:cubic")
    with pytest.raises(PolicyError, match="schedule"):
        Concave(schedule="cubic")
    with pytest.raises(PolicyError, match="weight"):
        Concave(weight=1.5)
    pol = Concave(user_mask=torch.ones(3, 3))
    st = State(step=0, num_steps=4, sigmas=torch.linspace(1, 0, 5), tau=torch.ones(1, 4, 4),
               latents=torch.zeros(1, 16, 1), grid=(4, 4), prompts=["x"])
    with pytest.raises(ValueError, match="token grid"):
        pol.act(st)


@pytest.mark.parametrize("schedule", sorted(CLOSED_FORM_SHIFTS))
@pytest.mark.parametrize("weight", [1.0, 0.3])
def test_closed_form_shift_equals_bisection(schedule, weight):
    f = reweighted(schedule, weight)
    for u0 in [0.1, 0.4, 0.75]:
        lo, hi = 1 - u0, float(f(torch.tensor(u0, dtype=torch.float64)))
        s0 = torch.linspace(lo, hi, 7, dtype=torch.float64)
        a_bis = shift_solve(f, torch.tensor(u0, dtype=torch.float64), s0)
        a_cf = CLOSED_FORM_SHIFTS[schedule](u0, s0, weight).clamp(0, u0)
        assert torch.allclose(a_bis, a_cf, atol=1e-9)
        # and the next point agrees (K = 20, so step = 20 * u0 is an integer for these u0)
        k, step = 20, round(20 * u0)
        t = s0 * k
        by_bisection = concave_next(f, step, k, t)
        by_closed_form = concave_next(f, step, k, t, CLOSED_FORM_SHIFTS[schedule], weight)
        assert torch.allclose(by_bisection, by_closed_form, atol=1e-7)


class _AllTokenMaps:
    """Mixin: ask for every text token's map (the behaviour before object-token capture)."""

    def attention_tokens(self, prompts, text_words):
        return None


@pytest.mark.parametrize("name", ["flux", "sd3"])
@pytest.mark.parametrize("layers", [None, [1]])
@torch.no_grad()
def test_object_token_maps_leave_asyndm_fields_unchanged(name, layers):
    """On the trained testbed, AsynDM with maps for the object words only gives the same fields,
    masks and images as with maps for every text token, for the same captured layers."""
    import tpm
    from tpm.testbed.models import call_kwargs, load_pipeline

    pipe = load_pipeline(name)
    prompts = ["a red circle left of a blue square", "two green triangles above a yellow star"]
    kwargs = dict(call_kwargs(pipe, num_inference_steps=6), output_type="latent", return_trajectory=True)
    opts = {} if layers is None else {"attention_layers": layers}
    fast = policies.load("asyndm", **opts)
    full_cls = type("AllTokens", (_AllTokenMaps, type(fast)), {})
    full = full_cls(config=fast.config)
    runs = [tpm.sample(pipe, prompts, policy=p, generator=torch.Generator().manual_seed(3), **kwargs)
            for p in (fast, full)]
    a, b = runs[0].trajectory, runs[1].trajectory
    assert any(not bool(m.all()) for m in a.masks[1:])  # the masks do select part of the image
    for x, y in zip(a.tau, b.tau):
        assert torch.equal(x, y)
    for x, y in zip(a.masks, b.masks):
        assert torch.equal(x, y)
    assert torch.allclose(runs[0].images, runs[1].images, atol=1e-5)
    # the fast run computed maps at the object positions only
    pos = fast.attention_tokens(prompts, a.text_words)
    for i, p in enumerate(pos):
        others = [j for j in range(a.attention[0].shape[1]) if j not in p]
        assert float(a.attention[0][i, others].abs().max()) == 0.0
        assert torch.allclose(a.attention[0][i, p], b.attention[0][i, p], atol=1e-6)


def test_default_attention_layers_come_from_the_backbone():
    """None = the backbone's default: a DiT's last layer (benchmarks/attention_layers.py), every
    1/4-resolution cross-attention layer of a UNet (AsynDM App. B.3); "all" and lists as given."""
    from tpm.backbones import get_backbone
    from tpm.tiny import tiny_flux_pipeline, tiny_sd_pipeline

    flux = get_backbone(tiny_flux_pipeline(num_layers=2, num_single_layers=2))
    assert flux.num_attention_layers == 4
    assert policies.load("asyndm").attention_layers_for(flux) == [3]
    assert policies.load("asyndm", attention_layers="all").attention_layers_for(flux) == [0, 1, 2, 3]
    assert policies.load("asyndm", attention_layers=[0, 2]).attention_layers_for(flux) == [0, 2]
    assert policies.load("dm_concave").attention_layers_for(flux) is None  # no maps needed
    unet = get_backbone(tiny_sd_pipeline())
    assert policies.load("asyndm").attention_layers_for(unet) == list(range(unet.num_attention_layers))
    with pytest.raises(PolicyError, match='"all"'):
        policies.load("asyndm", attention_layers="some")


def test_delay_slows_only_the_chosen_object():
    """Per-object order: only the named object's tokens follow the concave schedule."""
    prompt = "a red circle left of a blue square"  # words: a red circle left of a blue square
    text_words = [0, 1, 2, 3, 4, 5, 6, 7, -1]  # one text position per word, then padding
    circle, square = 2, 7
    att = torch.zeros(1, 9, 4, 4)
    att[0, circle, :, :1] = 1.0  # the circle's map: column 0 (4 tokens)
    att[0, square, :2, 2:] = 1.0  # the square's map: a 2 x 2 block (4 tokens)
    att[0, square, 2:, 3] = 1.0  # ... and 2 more: 6 tokens, the larger object
    st = State(step=1, num_steps=4, sigmas=torch.linspace(1, 0, 5), tau=torch.full((1, 4, 4), 0.75),
               latents=torch.zeros(1, 16, 1), grid=(4, 4), prompts=[prompt], attention=att,
               text_words=[text_words])
    want = {"first": att[0, circle] > 0, "last": att[0, square] > 0, "smaller": att[0, circle] > 0,
            None: (att[0, circle] > 0) | (att[0, square] > 0)}
    for delay, mask in want.items():
        st.memory = {}
        got = Concave(delay=delay).current_mask(st)
        assert torch.equal(got[0], mask), delay
    assert policies.load("asyndm:delay=last").config.delay == "last"
    with pytest.raises(PolicyError, match="unknown delay"):
        Concave(delay="middle")
    with pytest.raises(PolicyError, match="cross_attention"):
        Concave(mask="all", delay="last")
