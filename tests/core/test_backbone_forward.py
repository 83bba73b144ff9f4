"""The per-token time forwards of Flux and SD3/SD3.5 (tpm.backbones.flux / .sd3 / .modulation).

- uniform fields reproduce the stock transformer forward;
- non-uniform fields: the distinct-time table equals a brute-force per-token table, samples do
  not leak into each other, and (Flux) permuting tokens with their positions permutes the output;
- the table has one row per distinct (sample, time) pair;
- gradients, LoRA adapters and custom attention processors behave as in the stock forward,
  since the forward reuses the model's own submodules.
"""

from __future__ import annotations

import pytest
import torch

import tpm.backbones.flux as flux_mod
import tpm.backbones.sd3 as sd3_mod
from tpm.backbones.modulation import TokenTime, build_token_time

from .helpers import TransformerCase, build_pipeline, shared_pipeline, two_level_field

NAMES = ["flux", "flux_guidance", "sd3", "sd35"]
TOL = 1e-5


def _case(name: str, fresh: bool = False, **kwargs) -> TransformerCase:
    pipe = build_pipeline(name) if fresh else shared_pipeline(name)
    return TransformerCase(name, pipe.transformer, **kwargs)


def _diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def per_token_time(tau_img: torch.Tensor, embed, resolution=None) -> TokenTime:
    """Reference table: one row per image token and one per sample's text, no de-duplication.

    Text tokens are conditioned on the mean image time of their sample (the documented rule).
    """
    assert resolution is None
    bsz, n = tau_img.shape
    txt = tau_img.float().mean(dim=1).to(tau_img.dtype)
    times = torch.cat([tau_img.reshape(-1), txt])
    sample = torch.cat([torch.arange(bsz).repeat_interleave(n), torch.arange(bsz)])
    return TokenTime(embed(times, sample), torch.arange(bsz * n).view(bsz, n), bsz * n + torch.arange(bsz))


# ---- uniform fields ----------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
@torch.no_grad()
def test_uniform_field_equals_stock_forward(name):
    case = _case(name)
    tau = torch.tensor([0.83, 0.27])
    field = tau[:, None, None].expand(2, *case.grid).clone()
    ref = case.stock(tau)
    out, maps = case.ours(field)
    assert out.shape == ref.shape and maps is None
    assert _diff(out, ref) <= TOL
    # the time matters: another time gives another output
    assert _diff(case.stock(tau.flip(0)), ref) > 1e-3


# ---- non-uniform fields ----------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
@torch.no_grad()
def test_distinct_table_equals_per_token_table(name, monkeypatch):
    case = _case(name)
    fields = {
        "two-level": two_level_field(2, case.grid),
        "random": torch.rand(2, *case.grid),
    }
    module = flux_mod if case.flux else sd3_mod
    calls = []

    def counted(*args, **kwargs):
        calls.append(1)
        return per_token_time(*args, **kwargs)

    for label, field in fields.items():
        out, _ = case.ours(field)
        calls.clear()
        with monkeypatch.context() as m:
            m.setattr(module, "build_token_time", counted)
            ref, _ = case.ours(field)
        assert calls == [1]  # the reference table was the one used
        assert _diff(out, ref) <= TOL, label
        # not trivially equal to a uniform run at the mean time
        mean = field.reshape(2, -1).mean(1)
        assert _diff(out, case.stock(mean)) > 1e-4, label


@pytest.mark.parametrize("name", NAMES)
@torch.no_grad()
def test_samples_do_not_interact(name):
    """Sample 0 uniform, sample 1 not: sample 0 equals the stock forward run on it alone."""
    case = _case(name)
    field = torch.rand(2, *case.grid)
    field[0] = 0.7
    out, _ = case.ours(field)
    alone = case.select([0])
    ref = alone.stock(torch.tensor([0.7]))
    assert _diff(out[:1], ref) <= TOL


@pytest.mark.parametrize("name", ["flux", "flux_guidance"])
@torch.no_grad()
def test_flux_token_permutation_equivariance(name):
    """Flux positions are rotary ids: permuting tokens, their ids and their times permutes the output."""
    case = _case(name)
    field = torch.rand(2, *case.grid)
    n = case.grid[0] * case.grid[1]
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(3))
    out, maps = case.ours(field, layers=[0, case.num_layers - 1])
    pfield = field.reshape(2, -1)[:, perm].reshape(2, *case.grid)
    pout, pmaps = case.ours(pfield, layers=[0, case.num_layers - 1], x=case.x[:, perm],
                            img_ids=case.img_ids[perm])
    assert _diff(pout, out[:, perm]) <= TOL
    flat, pflat = maps.reshape(2, case.n_txt, n), pmaps.reshape(2, case.n_txt, n)
    assert _diff(pflat, flat[..., perm]) <= 1e-6


# ---- the distinct-time table -------------------------------------------------------------


def _pair_count(tau_img: torch.Tensor) -> int:
    pairs = {(b, float(t)) for b in range(tau_img.shape[0]) for t in tau_img[b]}
    means = tau_img.float().mean(dim=1)
    pairs |= {(b, float(means[b])) for b in range(tau_img.shape[0])}
    return len(pairs)


def test_table_rows_are_distinct_sample_time_pairs():
    calls = []

    def embed(times, idx):
        calls.append((times.clone(), idx.clone()))
        return torch.stack([times, idx.float()], dim=1)  # row = (time, sample): checkable

    # sample 0: 250/500/750 in equal parts (text mean 500 shares a row); sample 1: uniform 500
    tau = torch.tensor([[250.0, 500.0, 750.0, 250.0, 500.0, 750.0], [500.0] * 6])
    tt = build_token_time(tau, embed)
    assert tt.num_distinct == _pair_count(tau) == 4
    assert len(calls) == 1 and calls[0][0].shape[0] == 4
    # each token's row holds its own (time, sample)
    rows = tt.image_rows(tt.table)
    assert torch.equal(rows[..., 0], tau)
    assert torch.equal(rows[..., 1], torch.arange(2.0)[:, None].expand(2, 6))
    text = tt.text_rows(tt.table)[:, 0]
    assert torch.equal(text[:, 0], tau.mean(1)) and torch.equal(text[:, 1], torch.arange(2.0))

    # random times: every token distinct -> N per sample + one text row each
    tau = torch.rand(3, 10) * 1000
    tt = build_token_time(tau, embed)
    assert tt.num_distinct == _pair_count(tau) == 33

    # uniform per sample: one row per sample, no gather
    tau = torch.tensor([[300.0] * 4, [700.0] * 4])
    tt = build_token_time(tau, embed)
    assert tt.uniform and tt.num_distinct == 2 and tt.txt_index is None
    # the same time in two samples is two rows (pooled text / guidance differ per sample)
    tau = torch.tensor([[300.0, 700.0], [300.0, 700.0]])
    tt = build_token_time(tau, embed)
    assert tt.num_distinct == _pair_count(tau) == 6  # 2 image times + the text mean 500, per sample


def test_time_resolution_rounds_before_deduplication():
    def embed(times, idx):
        return torch.stack([times, idx.float()], dim=1)

    tau = torch.tensor([[301.0, 298.0, 449.0, 451.0]])
    tt = build_token_time(tau, embed, resolution=100.0)
    # image times round to 300, 300, 400, 500; text: the mean of the rounded times, 375
    assert tt.num_distinct == 4
    assert torch.equal(tt.text_rows(tt.table)[0, 0], torch.tensor([375.0, 0.0]))
    assert torch.equal(tt.image_rows(tt.table)[0, :, 0], torch.tensor([300.0, 300.0, 400.0, 500.0]))


def test_time_levels_snap_only_samples_with_more_distinct_times():
    from tpm.backbones.modulation import snap_to_levels

    tau = torch.tensor([[0.0, 0.1, 0.3, 0.9, 1.0],     # 5 distinct > 3 levels: snapped to {0, .5, 1}
                        [0.2, 0.2, 0.7, 0.7, 0.2],     # 2 distinct: untouched
                        [0.3, 0.31, 0.32, 0.33, 0.3]])  # 4 distinct: levels 0.3, 0.315, 0.33
    out = snap_to_levels(tau, 3)
    assert torch.allclose(out[0], torch.tensor([0.0, 0.0, 0.5, 1.0, 1.0]))
    assert torch.equal(out[1], tau[1])
    assert torch.allclose(out[2], torch.tensor([0.3, 0.315, 0.315, 0.33, 0.3]))
    # every time moves by at most half a level spacing, (max - min) / (2 (levels - 1))
    assert float((out[2] - tau[2]).abs().max()) <= 0.03 / 4 + 1e-7
    with pytest.raises(ValueError, match=">= 2"):
        snap_to_levels(tau, 1)


def test_time_levels_bound_the_table():
    def embed(times, idx):
        return torch.stack([times, idx.float()], dim=1)

    gen = torch.Generator().manual_seed(0)
    tau = torch.rand(2, 100, generator=gen) * 1000  # 100 distinct image times per sample
    assert build_token_time(tau, embed).num_distinct == 2 * 101
    from tpm.backbones.modulation import snap_to_levels

    tt = build_token_time(snap_to_levels(tau, 8), embed)
    assert tt.num_distinct <= 2 * (8 + 1)
    img = tt.image_rows(tt.table)[..., 0]
    spacing = (tau.amax(1) - tau.amin(1)) / 7
    assert bool(((img - tau).abs() <= spacing[:, None] / 2 + 1e-3).all())


@pytest.mark.parametrize("name", ["flux", "sd3"])
@torch.no_grad()
def test_time_levels_in_forward(name):
    """A field with every token at its own time: with as many levels as tokens the forward is
    exact; with 2 levels it equals the forward of the snapped field."""
    case = _case(name)
    n = case.grid[0] * case.grid[1]
    field = torch.linspace(0.2, 0.8, 2 * n).reshape(2, *case.grid)
    exact, _ = case.ours(field)
    same, _ = case.ours(field, time_levels=n)
    assert _diff(same, exact) == 0
    coarse, _ = case.ours(field, time_levels=2)
    lo, hi = field.reshape(2, -1).amin(1), field.reshape(2, -1).amax(1)
    mid = ((lo + hi) / 2)[:, None, None]
    snapped = torch.where(field < mid, lo[:, None, None], hi[:, None, None])
    ref, _ = case.ours(snapped)
    assert _diff(coarse, ref) <= TOL and _diff(coarse, exact) > 0


@pytest.mark.parametrize("name", ["flux_guidance", "sd35"])
@torch.no_grad()
def test_forward_embeds_once_per_distinct_pair(name):
    case = _case(name)
    seen = []
    handle = case.tr.time_text_embed.register_forward_hook(lambda mod, args, out: seen.append(out.shape[0]))
    try:
        field = two_level_field(2, case.grid)
        case.ours(field)
        assert seen == [_pair_count(field.reshape(2, -1) * 1000)] == [6]
        seen.clear()
        case.ours(torch.full((2, *case.grid), 0.5))
        assert seen == [2]
    finally:
        handle.remove()


@pytest.mark.parametrize("name", ["flux", "sd3"])
@torch.no_grad()
def test_time_resolution_in_forward(name):
    """Quantised times: a field within +-0.01 of 0.3 runs as the uniform field 0.3."""
    case = _case(name)
    field = 0.3 + 0.02 * (torch.rand(2, *case.grid) - 0.5)
    out, _ = case.ours(field, time_resolution=0.1)
    assert _diff(out, case.stock(torch.tensor([0.3, 0.3]))) <= TOL
    exact, _ = case.ours(field)
    assert _diff(out, exact) > 0


# ---- gradients, adapters, processors -----------------------------------------------------


@pytest.mark.parametrize("name", ["flux_guidance", "sd35"])
def test_gradients_reach_what_the_stock_forward_reaches(name):
    case = _case(name, fresh=True)
    params = dict(case.tr.named_parameters())
    weight = torch.randn(case.stock(torch.tensor([0.5, 0.5])).shape, generator=torch.Generator().manual_seed(1))

    def grads(loss):
        for p in params.values():
            p.grad = None
        loss.backward()
        return {k: p.grad.clone() for k, p in params.items() if p.grad is not None}

    tau = torch.tensor([0.6, 0.4])
    g_stock = grads((case.stock(tau) * weight).sum())
    assert len(g_stock) > 0
    uniform = tau[:, None, None].expand(2, *case.grid).clone()
    g_uniform = grads((case.ours(uniform)[0] * weight).sum())
    assert set(g_uniform) == set(g_stock)
    for k in g_stock:
        assert torch.allclose(g_uniform[k], g_stock[k], rtol=1e-4, atol=1e-6), k
    g_field = grads((case.ours(two_level_field(2, case.grid))[0] * weight).sum())
    assert set(g_stock) <= set(g_field)
    assert all(torch.isfinite(g).all() for g in g_field.values())
    assert any(g.abs().sum() > 0 for g in g_field.values())


@pytest.mark.parametrize("name", ["flux", "sd35"])
@torch.no_grad()
def test_lora_adapter_is_honoured(name):
    from peft import LoraConfig

    case = _case(name, fresh=True)
    field = two_level_field(2, case.grid)
    tau = torch.tensor([0.9, 0.2])
    uniform = tau[:, None, None].expand(2, *case.grid).clone()
    before_field, _ = case.ours(field)
    before_stock = case.stock(tau)
    torch.manual_seed(5)
    case.tr.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v"],
                                   init_lora_weights=False))
    after_stock = case.stock(tau)
    after_uniform, _ = case.ours(uniform)
    after_field, _ = case.ours(field)
    after_captured, maps = case.ours(field, layers=list(range(case.num_layers)))
    assert _diff(after_stock, before_stock) > 1e-3  # the adapter changes the model
    assert _diff(after_uniform, after_stock) <= TOL
    assert _diff(after_field, before_field) > 1e-3
    assert _diff(after_captured, after_field) <= TOL  # the capture path uses the adapted projections
    case.tr.disable_adapters()
    assert _diff(case.ours(field)[0], before_field) <= TOL


class ScaledProcessor:
    """Wraps a block's processor and scales its outputs (a stand-in for any custom processor)."""

    def __init__(self, inner, factor: float):
        self.inner, self.factor, self.calls = inner, factor, 0

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 image_rotary_emb=None):
        self.calls += 1
        kwargs = {"encoder_hidden_states": encoder_hidden_states, "attention_mask": attention_mask}
        if image_rotary_emb is not None:
            kwargs["image_rotary_emb"] = image_rotary_emb
        out = self.inner(attn, hidden_states, **kwargs)
        if isinstance(out, tuple):
            return tuple(o * self.factor for o in out)
        return out * self.factor


@pytest.mark.parametrize("name", ["flux", "sd3"])
@torch.no_grad()
def test_custom_attention_processor_is_honoured(name):
    case = _case(name, fresh=True)
    tau = torch.tensor([0.7, 0.35])
    uniform = tau[:, None, None].expand(2, *case.grid).clone()
    field = two_level_field(2, case.grid)
    before, _ = case.ours(field)
    block = case.tr.transformer_blocks[0]
    proc = ScaledProcessor(block.attn.processor, 1.7)
    block.attn.set_processor(proc)
    ref = case.stock(tau)
    out, _ = case.ours(uniform)
    assert proc.calls == 2
    assert _diff(out, ref) <= TOL
    after, _ = case.ours(field)
    assert _diff(after, before) > 1e-3


@pytest.mark.parametrize("name", ["flux", "sd3"])
@torch.no_grad()
def test_custom_processor_on_a_captured_layer(name):
    """Capturing maps from a layer must not bypass a custom processor set on that layer."""
    case = _case(name, fresh=True)
    field = two_level_field(2, case.grid)
    block = case.tr.transformer_blocks[0]
    block.attn.set_processor(ScaledProcessor(block.attn.processor, 1.7))
    plain, _ = case.ours(field)
    captured, _ = case.ours(field, layers=[0])
    assert _diff(captured, plain) <= TOL


# (not SD3.5: diffusers' fuse_qkv_projections gives its image-only attn2 a joint processor that fails)
@pytest.mark.parametrize("name", ["flux", "sd3"])
@torch.no_grad()
def test_fused_qkv_projections(name):
    case = _case(name, fresh=True)
    field = two_level_field(2, case.grid)
    before, _ = case.ours(field)
    case.tr.fuse_qkv_projections()
    tau = torch.tensor([0.5, 0.25])
    uniform = tau[:, None, None].expand(2, *case.grid).clone()
    assert _diff(case.ours(uniform)[0], case.stock(tau)) <= TOL
    assert _diff(case.ours(field)[0], before) <= TOL
    assert _diff(case.ours(field, layers=list(range(case.num_layers)))[0], before) <= TOL
