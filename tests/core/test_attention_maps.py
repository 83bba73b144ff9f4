"""Text->image maps from joint attention (tpm.backbones.attention), against brute force.

The reference materialises the full joint softmax from the q and k that the model's own
attention processors hand to ``scaled_dot_product_attention`` (recorded by wrapping that
function during a stock forward), so it shares no code with the captured path.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F

import tpm
from tpm.backbones import get_backbone
from tpm.backbones.attention import AttentionRecorder, attention_with_text_probs, brute_force_text_probs
from tpm.fields import synchronous_next
from tpm.policy import Action, Policy
from tpm.tiny import tiny_sd3_pipeline

from .helpers import TransformerCase, shared_pipeline, two_level_field

# ---- the kernel routes on random tensors ------------------------------------------------


@pytest.mark.parametrize("method", ["lse", "onehot", "auto"])
@pytest.mark.parametrize("layout", ["text-first", "image-first"])
def test_text_probs_equal_brute_force(method, layout):
    gen = torch.Generator().manual_seed(0)
    b, h, n_img, n_txt, d = 2, 3, 15, 5, 8
    q, k, v = (torch.randn(b, h, n_img + n_txt, d, generator=gen) * 2 for _ in range(3))
    if layout == "text-first":
        img, txt = slice(n_txt, None), slice(0, n_txt)
    else:
        img, txt = slice(0, n_img), slice(n_img, None)
    out, probs = attention_with_text_probs(q, k, v, img, txt, method=method)
    assert probs.shape == (b, n_img, n_txt) and probs.dtype == torch.float32
    assert torch.allclose(probs, brute_force_text_probs(q, k, img, txt), atol=1e-5)
    assert torch.allclose(out, F.scaled_dot_product_attention(q, k, v), atol=1e-5)
    # joint softmax: the text keys hold part of each row's mass, not all of it
    total = probs.sum(-1)
    assert bool((total > 0).all()) and bool((total < 1).all())


@pytest.mark.parametrize("method", ["lse", "onehot"])
def test_selected_text_probs_equal_brute_force_columns(method):
    """Only some text tokens per sample (different counts, one sample with none): the columns
    of the brute-force joint softmax at those positions, and the attention output unchanged."""
    gen = torch.Generator().manual_seed(1)
    b, h, n_img, n_txt, d = 3, 2, 12, 7, 8
    q, k, v = (torch.randn(b, h, n_txt + n_img, d, generator=gen) * 2 for _ in range(3))
    img, txt = slice(n_txt, None), slice(0, n_txt)
    rec = AttentionRecorder([0], tokens=[[4, 1], [6], []])
    index = rec.index(q.device)
    assert index.tolist() == [[4, 1], [6, 6], [0, 0]]  # padded with the first position (or 0)
    out, probs = attention_with_text_probs(q, k, v, img, txt, method=method, tokens=index)
    full = brute_force_text_probs(q, k, img, txt)
    assert probs.shape == (b, n_img, 2)
    assert torch.allclose(probs[0], full[0][:, [4, 1]], atol=1e-5)
    assert torch.allclose(probs[1, :, 0], full[1][:, 6], atol=1e-5)
    assert torch.allclose(out, F.scaled_dot_product_attention(q, k, v), atol=1e-5)
    rec.add(probs)
    maps = rec.result((3, 4), n_text=n_txt)
    assert maps.shape == (b, n_txt, 3, 4)
    ref = full.transpose(1, 2).reshape(b, n_txt, 3, 4)
    assert torch.allclose(maps[0, [1, 4]], ref[0, [1, 4]], atol=1e-5)
    assert torch.allclose(maps[1, 6], ref[1, 6], atol=1e-5)
    kept = torch.zeros(b, n_txt, dtype=torch.bool)
    kept[0, [1, 4]] = kept[1, 6] = True
    assert bool((maps[~kept] == 0).all())  # positions nobody asked for are zero


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_kernel_route_equals_brute_force(dtype):
    """On CUDA the maps come from the efficient-attention kernel's log-sum-exp."""
    gen = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(2, 4, 40, 64, generator=gen).to("cuda", dtype) for _ in range(3))
    img, txt = slice(8, None), slice(0, 8)
    tokens = torch.tensor([[1, 5], [7, 7]], device="cuda")
    out, probs = attention_with_text_probs(q, k, v, img, txt, method="lse", tokens=tokens)
    full = brute_force_text_probs(q.float(), k.float(), img, txt)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert torch.allclose(probs[0], full[0][:, [1, 5]], atol=tol)
    assert torch.allclose(probs[1, :, 0], full[1][:, 7], atol=tol)
    assert torch.allclose(out.float(), F.scaled_dot_product_attention(q, k, v).float(), atol=tol)


def test_brute_force_reference_is_a_joint_softmax():
    """Hand check of the reference on one head: P[i, j] = exp(q_i.k_j s) / sum_l exp(q_i.k_l s)."""
    q = torch.tensor([[[[1.0, 0.0], [0.0, 2.0]]]])
    k = torch.tensor([[[[1.0, 1.0], [0.0, 1.0]]]])
    s = 2 ** -0.5
    probs = brute_force_text_probs(q, k, img=slice(0, 1), txt=slice(1, 2))
    expected = torch.exp(torch.tensor(0.0)) / (torch.exp(torch.tensor(s)) + torch.exp(torch.tensor(0.0)))
    assert torch.allclose(probs[0, 0, 0], expected)


def test_unavailable_lse_route_raises():
    q = torch.randn(1, 1, 4, 2, dtype=torch.complex64)
    with pytest.raises(RuntimeError, match="log-sum-exp"):
        attention_with_text_probs(q, q, q, slice(0, 2), slice(2, 4), method="lse")


def test_recorder_averages_layers():
    rec = AttentionRecorder([1, 3])
    assert rec.wants(1) and not rec.wants(0) and rec.result((1, 2)) is None
    a, c = torch.rand(2, 2, 3), torch.rand(2, 2, 3)
    rec.add(a)
    rec.add(c)
    out = rec.result((1, 2))
    assert out.shape == (2, 3, 1, 2)
    assert torch.allclose(out.reshape(2, 3, 2), ((a + c) / 2).transpose(1, 2))


# ---- on the tiny transformers -------------------------------------------------------------


@contextlib.contextmanager
def record_joint_qk(transformer):
    """Record (layer, q, k) for each joint-attention call, as the stock processors compute them.

    Layers are numbered as tpm numbers them (Flux: dual then single blocks; SD3: joint
    blocks); SD3.5's image-only ``attn2`` calls are skipped.
    """
    modules = [blk.attn for blk in transformer.transformer_blocks]
    modules += [blk.attn for blk in getattr(transformer, "single_transformer_blocks", [])]
    current: list[int | None] = [None]
    records: list[tuple[int, torch.Tensor, torch.Tensor]] = []
    handles = []
    for i, m in enumerate(modules):
        handles.append(m.register_forward_pre_hook(lambda mod, args, i=i: current.__setitem__(0, i)))
        handles.append(m.register_forward_hook(lambda mod, args, out: current.__setitem__(0, None)))
    sdpa = F.scaled_dot_product_attention

    def recording_sdpa(*args, **kwargs):
        # called positionally by some processors and with query=/key= by diffusers' dispatcher
        q = args[0] if len(args) > 0 else kwargs["query"]
        k = args[1] if len(args) > 1 else kwargs["key"]
        if current[0] is not None:
            records.append((current[0], q.detach().clone(), k.detach().clone()))
        return sdpa(*args, **kwargs)

    torch.nn.functional.scaled_dot_product_attention = recording_sdpa
    try:
        yield records
    finally:
        torch.nn.functional.scaled_dot_product_attention = sdpa
        for h in handles:
            h.remove()


def _reference_maps(case: TransformerCase, records, layers) -> torch.Tensor:
    by_layer = {layer: (q, k) for layer, q, k in records}
    assert sorted(by_layer) == list(range(case.num_layers))
    maps = [brute_force_text_probs(*by_layer[i], case.image_slice(), case.text_slice()) for i in layers]
    avg = torch.stack(maps).mean(0)  # (B, N, T)
    return avg.transpose(1, 2).reshape(case.batch, case.n_txt, *case.grid)


@pytest.mark.parametrize("name", ["flux", "sd3", "sd35"])
@torch.no_grad()
def test_forward_maps_equal_brute_force(name):
    case = TransformerCase(name, shared_pipeline(name).transformer)
    tau = torch.tensor([0.8, 0.45])
    uniform = tau[:, None, None].expand(2, *case.grid).clone()
    with record_joint_qk(case.tr) as records:
        ref_out = case.stock(tau)
    plain, none = case.ours(uniform)
    assert none is None
    layer_sets = [[i] for i in range(case.num_layers)] + [list(range(case.num_layers))]
    for layers in layer_sets:
        out, maps = case.ours(uniform, layers=layers)
        assert maps.shape == (2, case.n_txt, *case.grid)
        ref = _reference_maps(case, records, layers)
        assert torch.allclose(maps, ref, atol=1e-5), layers
        total = maps.sum(1)  # over text: the image->text share of a joint softmax row
        assert bool((total > 0).all()) and bool((total < 1).all())
        assert (out - plain).abs().max() <= 1e-5  # capture does not change the velocity
        assert (out - ref_out).abs().max() <= 1e-5

    # a non-uniform field: reference q/k from our own forward with capture off. Tokens stay in raster
    # order (no tiles), so the recorded q/k line up with the grid; the tiled forward's maps are
    # compared with these in test_backbone_forward.
    field = two_level_field(2, case.grid)
    with record_joint_qk(case.tr) as records:
        plain, _ = case.ours(field, tile_sizes=())
    layers = [0, case.num_layers - 1]
    out, maps = case.ours(field, layers=layers, tile_sizes=())
    assert torch.allclose(maps, _reference_maps(case, records, layers), atol=1e-5)
    assert (out - plain).abs().max() <= 1e-5


@pytest.mark.parametrize("name", ["flux", "sd3", "sd35"])
@torch.no_grad()
def test_forward_maps_of_selected_tokens_equal_brute_force(name):
    case = TransformerCase(name, shared_pipeline(name).transformer)
    field = two_level_field(2, case.grid)
    with record_joint_qk(case.tr) as records:  # raster token order (no tiles), as above
        plain, _ = case.ours(field, tile_sizes=())
    layers = [0, case.num_layers - 1]
    last = case.n_txt - 1
    tokens = [[last, 1], [last]]
    out, maps = case.ours(field, layers=layers, tokens=tokens, tile_sizes=())
    ref = _reference_maps(case, records, layers)
    assert maps.shape == ref.shape
    assert torch.allclose(maps[0, [1, last]], ref[0, [1, last]], atol=1e-5)
    assert torch.allclose(maps[1, last], ref[1, last], atol=1e-5)
    others = [i for i in range(case.n_txt) if i not in (1, last)]
    assert float(maps[0, others].abs().max()) == 0.0 and float(maps[1, :last].abs().max()) == 0.0
    assert (out - plain).abs().max() <= 1e-5


@torch.no_grad()
def test_sd3_cfg_maps_come_from_the_positive_branch(sd3_pipe):
    """With CFG the batch is [negative, positive]; the maps are the positive prompts' maps."""
    backbone = get_backbone(sd3_pipe)
    prompts = ["a red circle", "two dogs on the beach"]
    cond = backbone.encode(prompts, 5.0, max_sequence_length=16)
    assert cond.do_cfg
    latents = backbone.prepare_latents(2, 32, 32, torch.Generator().manual_seed(0))
    field = two_level_field(2, backbone.grid(32, 32))
    pred = backbone.predict(latents, field, cond, attention_layers=[1])
    from tpm.backbones import sd3_transformer_forward

    v_pos, maps_pos = sd3_transformer_forward(backbone.transformer, latents, field, cond.embeds, cond.pooled,
                                              attention_layers=[1])
    v_neg, _ = sd3_transformer_forward(backbone.transformer, latents, field, cond.negative_embeds,
                                       cond.negative_pooled)
    assert torch.allclose(pred.attention, maps_pos, atol=1e-6)
    assert torch.allclose(pred.velocity, v_neg + 5.0 * (v_pos - v_neg), atol=1e-5)
    # one map per joint text position, the positions text_words describes (CLIP then T5)
    n_text = len(backbone.text_words(prompts, 16)[0])
    assert n_text == sd3_pipe.tokenizer_max_length + 16
    assert pred.attention.shape == (2, n_text, *backbone.grid(32, 32))


@pytest.mark.parametrize("name", ["flux", "flux_guidance", "sd3", "sd35", "sd3_no_t5"])
@torch.no_grad()
def test_text_words_cover_the_joint_text_sequence(name):
    """One word index per text position of the joint sequence; words of the prompt found in it."""
    pipe = tiny_sd3_pipeline(with_t5=False) if name == "sd3_no_t5" else shared_pipeline(name)
    backbone = get_backbone(pipe)
    prompts = ["a red circle", "two dogs riding a bike"]
    cond = backbone.encode(prompts, 1.0, max_sequence_length=16)
    words = backbone.text_words(prompts, 16)
    assert [len(w) for w in words] == [cond.embeds.shape[1]] * 2
    for prompt, w in zip(prompts, words):
        n_words = len(prompt.split())
        assert set(w) - {-1} == set(range(n_words))  # every word somewhere, nothing else


class CaptureLayers(Policy):
    """Synchronous steps; asks for the maps of given layers and records what it was shown."""

    config_class = dict

    def __init__(self, layers):
        super().__init__(config={})
        self.layers = layers
        self.seen: list[torch.Tensor | None] = []

    def attention_layers(self, num_layers):
        return self.layers

    def act(self, state):
        self.seen.append(None if state.attention is None else state.attention.clone())
        return Action(tau_next=synchronous_next(state))


@pytest.mark.parametrize("name", ["flux", "sd35"])
def test_sampler_hands_previous_maps_to_the_policy(name):
    pipe = shared_pipeline(name)
    prompts = ["a red circle", "two dogs on the beach"]
    kwargs = dict(num_inference_steps=3, guidance_scale=5.0, height=32, width=48, output_type="latent",
                  max_sequence_length=16)
    policy = CaptureLayers([0])
    out = tpm.sample(pipe, prompts, policy=policy, return_trajectory=True,
                     generator=torch.Generator().manual_seed(0), **kwargs)
    plain = tpm.sample(pipe, prompts, generator=torch.Generator().manual_seed(0), **kwargs)
    assert (out.images - plain.images).abs().max() <= 1e-5
    traj = out.trajectory
    backbone = get_backbone(pipe)
    n_text = len(traj.text_words[0])
    assert traj.text_words == backbone.text_words(prompts, 16)
    assert len(traj.attention) == 3
    for a in traj.attention:
        assert a.shape == (2, n_text, *backbone.grid(32, 48))
    # step k sees the maps of step k-1 (AsynDM Algorithm 1), none at k = 0
    assert policy.seen[0] is None
    for k in (1, 2):
        assert torch.equal(policy.seen[k], traj.attention[k - 1])


class WithReference(Policy):
    """Asks for a synchronous reference run in ``begin`` (as AsynDM's fixed mask does), then steps synchronously."""

    config_class = dict

    def __init__(self, layers):
        super().__init__(config={})
        self.layers, self.reference = layers, None

    def begin(self, ctx):
        assert ctx.num_attention_layers > max(self.layers) and ctx.batch_size == 2
        self.reference = ctx.reference_run(self.layers)
        return {}

    def act(self, state):
        return Action(tau_next=synchronous_next(state))


def test_reference_run_is_the_synchronous_run_from_the_same_noise(sd3_pipe):
    prompts = ["a red circle", "two dogs on the beach"]
    kwargs = dict(num_inference_steps=3, guidance_scale=5.0, height=32, width=32, output_type="latent",
                  max_sequence_length=16)
    policy = WithReference([0, 1])
    out = tpm.sample(sd3_pipe, prompts, policy=policy, generator=torch.Generator().manual_seed(0), **kwargs)
    capture = CaptureLayers([0, 1])
    sync = tpm.sample(sd3_pipe, prompts, policy=capture, generator=torch.Generator().manual_seed(0),
                      return_trajectory=True, **kwargs)
    # The reference run leaves the real run untouched. The capturing run computes its attention
    # through the log-sum-exp kernel, the other through the stock one: equal up to float rounding
    # (bitwise on CPU builds where both dispatch to the same kernel, not on every build).
    assert (out.images - sync.images).abs().max() <= 1e-5
    ref, traj = policy.reference, sync.trajectory
    assert ref.num_steps == 3
    for a, b in zip(ref.latents, traj.latents):
        assert torch.equal(a, b)
    for a, b in zip(ref.attention, traj.attention):
        assert torch.allclose(a, b, atol=1e-6)
    assert torch.equal(get_backbone(sd3_pipe).from_tokens(ref.latents[-1], ref.grid), sync.images)
