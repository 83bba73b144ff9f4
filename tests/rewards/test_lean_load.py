"""Loading at about 1x the weights (rewards.lean_load): the same model as the copying loaders, less memory."""

from __future__ import annotations

import pytest
import torch

from rewards import load
from rewards.base import RewardError
from rewards.imagereward import ImageRewardNet
from rewards.lean_load import empty_model


def _copying_open_clip(name: str, state: dict) -> torch.nn.Module:
    """The loader before lean_load: a random-weight model, then a copying load_state_dict."""
    import open_clip

    model = open_clip.create_model(name, pretrained=None)
    model.load_state_dict(state)
    return model.eval()


def _same_model(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k
    buffers_a, buffers_b = dict(a.named_buffers()), dict(b.named_buffers())  # non-persistent ones too
    assert buffers_a.keys() == buffers_b.keys()
    for k in buffers_a:
        assert not buffers_a[k].is_meta and torch.equal(buffers_a[k], buffers_b[k]), k


@pytest.mark.parametrize("fmt", ["safetensors", "pt"])
def test_clipscore_file_equals_copying_loader(tmp_path, fmt, tiny_open_clip, tiny_open_clip_name,
                                              open_clip_tokenizer, images, prompts):
    state = tiny_open_clip.state_dict()
    path = tmp_path / f"open_clip_model.{fmt}"
    if fmt == "safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, path)
    else:
        torch.save(state, path)
    lean = load("clipscore", model_name=tiny_open_clip_name, pretrained=str(path), tokenizer=open_clip_tokenizer)
    old = load("clipscore", model_name=tiny_open_clip_name, tokenizer=open_clip_tokenizer,
               model=_copying_open_clip(tiny_open_clip_name, state))
    assert torch.equal(lean(images, prompts), old(images, prompts))
    _same_model(lean.model, old.model)
    assert lean.model.visual.preprocess_cfg == old.model.visual.preprocess_cfg


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_hpsv2_equals_copying_loader(tmp_path, dtype, tiny_open_clip, tiny_open_clip_name, open_clip_tokenizer,
                                     images, prompts):
    """An fp16 checkpoint (as distributed compressed) ends in the reward's float32, as the copy did."""
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tiny_open_clip.state_dict().items()}
    torch.save({"state_dict": state}, tmp_path / "HPS_v2.1_compressed.pt")
    lean = load("hpsv2", checkpoint=str(tmp_path), model_name=tiny_open_clip_name, tokenizer=open_clip_tokenizer)
    old = load("hpsv2", model_name=tiny_open_clip_name, tokenizer=open_clip_tokenizer,
               model=_copying_open_clip(tiny_open_clip_name, state))
    assert torch.equal(lean(images, prompts), old(images, prompts))
    _same_model(lean.model, old.model)
    assert all(p.dtype == torch.float32 for p in lean.model.parameters())


def test_imagereward_equals_copying_loader(tmp_path, tiny_ir_config, bert_tokenizer, images, prompts):
    g = torch.Generator().manual_seed(5)
    official = {k: torch.arange(shape[1])[None] if k.endswith("position_ids") else torch.randn(shape, generator=g)
                for k, shape in tiny_ir_config.official_shapes().items()}
    torch.save(official, tmp_path / "ImageReward.pt")
    lean = load("imagereward", checkpoint=str(tmp_path), config=tiny_ir_config, tokenizer=bert_tokenizer)
    net = ImageRewardNet(tiny_ir_config)
    net.load_official_state_dict(official)
    old = load("imagereward", model=net.eval(), tokenizer=bert_tokenizer)
    assert torch.equal(lean(images, prompts), old(images, prompts))
    _same_model(lean.model, old.model)


def test_empty_model_keeps_buffers_and_allocates_no_parameters():
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(4, 4)
            self.register_buffer("mask", torch.ones(3), persistent=False)

    with empty_model():
        net = Net().to("meta")  # a builder that moves everything to meta (open_clip's create_model does)
    assert net.lin.weight.is_meta and not net.mask.is_meta and torch.equal(net.mask, torch.ones(3))


def test_checkpoint_without_a_tensor_is_one_clear_error(tmp_path, tiny_open_clip, tiny_open_clip_name,
                                                         open_clip_tokenizer, images, prompts):
    state = dict(tiny_open_clip.state_dict())
    del state["text_projection"]
    torch.save(state, tmp_path / "ckpt.pt")
    with pytest.raises(RewardError, match="clipscore"):
        load("clipscore", model_name=tiny_open_clip_name, pretrained=str(tmp_path / "ckpt.pt"),
             tokenizer=open_clip_tokenizer)(images, prompts)


@pytest.mark.slow
def test_loading_holds_about_one_copy_of_the_weights(tmp_path, load_benchmark):
    """Peak RSS growth while loading, in fresh processes, at a size where the weights dominate
    (~200 MB open_clip, ~60 MB ImageReward). The copying route is measured too, so the bound bites."""
    bench = load_benchmark("reward_memory")
    res = {(r["reward"], r["route"]): r for r in
           bench.run(["hpsv2", "imagereward"], ["legacy", "lean"], str(tmp_path), "mid")}
    for name in ("hpsv2", "imagereward"):
        assert res[name, "lean"]["scores_finite"]
        assert res[name, "lean"]["load_growth_over_weights"] <= 1.3, res[name, "lean"]
        assert res[name, "legacy"]["load_growth_over_weights"] >= 1.8, res[name, "legacy"]
