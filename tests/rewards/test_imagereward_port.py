"""The ImageReward port: the name mapping, the official computation, and checkpoint loading."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from rewards.base import RewardError
from rewards.imagereward import REWARD_MEAN, REWARD_STD, ImageReward, ImageRewardNet
from rewards.imagereward_mapping import IGNORED, MappingError, convert_state_dict, map_name


def test_mapping_covers_port_one_to_one(tiny_ir_config):
    official = tiny_ir_config.official_shapes()
    port = ImageRewardNet(tiny_ir_config).parameter_shapes()
    mapped = {k: map_name(k) for k in official}
    kept = {k: v for k, v in mapped.items() if v is not None}
    assert sorted(set(kept.values())) == sorted(port)  # every port parameter, each from one key
    assert len(set(kept.values())) == len(kept)
    for k, ours in kept.items():
        assert official[k] == port[ours], (k, ours)
    ignored = sorted(k for k, v in mapped.items() if v is None)
    assert ignored == ["blip.text_encoder.embeddings.position_ids", "blip.text_proj.bias", "blip.text_proj.weight",
                       "blip.vision_proj.bias", "blip.vision_proj.weight"]
    assert len(IGNORED) == 2


def test_mapping_at_release_size():
    """The released sizes: every official parameter maps with the right shape (no weights needed)."""
    from rewards.imagereward import ImageRewardConfig

    cfg = ImageRewardConfig()
    official = cfg.official_shapes()
    with torch.device("meta"):
        port = ImageRewardNet(cfg).parameter_shapes()
    assert len(official) == 24 * 12 + 4 + 2 + 12 * 26 + 4 + 4 + 10 + 1
    fake = {k: torch.empty(v, device="meta") for k, v in official.items()}
    assert sorted(convert_state_dict(fake, port)) == sorted(port)
    assert port["vision.embeddings.position_embedding"] == (1, 197, 1024)
    assert port["text.encoder.layer.0.crossattention.self.key.weight"] == (768, 1024)


def random_official(cfg, seed=0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, shape in cfg.official_shapes().items():
        if k.endswith("position_ids"):
            sd[k] = torch.arange(shape[1])[None]
        elif "norm" in k.lower() and k.endswith("weight"):
            sd[k] = 1 + 0.1 * torch.randn(shape, generator=g)
        else:
            fan_in = shape[-1] if len(shape) == 2 else 8
            sd[k] = torch.randn(shape, generator=g) / math.sqrt(fan_in)
    return sd


def reference_score(sd, cfg, pixels, ids, mask) -> torch.Tensor:
    """ImageReward's forward written from the official architecture, on official parameter names."""
    def ln(x, p, eps):
        return F.layer_norm(x, x.shape[-1:], sd[p + ".weight"], sd[p + ".bias"], eps)

    def lin(x, p):
        return F.linear(x, sd[p + ".weight"], sd[p + ".bias"])

    def attend(q, k, v, heads, bias=None):
        b, n, d = q.shape
        q, k, v = (t.reshape(b, t.shape[1], heads, d // heads).transpose(1, 2) for t in (q, k, v))
        s = q @ k.transpose(-1, -2) / math.sqrt(d // heads)
        if bias is not None:
            s = s + bias
        return (s.softmax(-1) @ v).transpose(1, 2).reshape(b, n, d)

    v = "blip.visual_encoder."
    h = F.conv2d(pixels, sd[v + "patch_embed.proj.weight"], sd[v + "patch_embed.proj.bias"], stride=cfg.patch_size)
    h = h.flatten(2).transpose(1, 2)
    h = torch.cat([sd[v + "cls_token"].expand(len(h), -1, -1), h], 1) + sd[v + "pos_embed"]
    for i in range(cfg.vision_layers):
        b = f"{v}blocks.{i}."
        q, k, val = lin(ln(h, b + "norm1", 1e-6), b + "attn.qkv").chunk(3, dim=-1)
        h = h + lin(attend(q, k, val, cfg.vision_heads), b + "attn.proj")
        h = h + lin(F.gelu(lin(ln(h, b + "norm2", 1e-6), b + "mlp.fc1")), b + "mlp.fc2")
    img = ln(h, v + "norm", 1e-6)

    t = "blip.text_encoder."
    x = sd[t + "embeddings.word_embeddings.weight"][ids] + sd[t + "embeddings.position_embeddings.weight"][
        : ids.shape[1]]
    x = ln(x, t + "embeddings.LayerNorm", 1e-12)
    pad_bias = (1.0 - mask[:, None, None, :].float()) * torch.finfo(torch.float32).min
    for i in range(cfg.text_layers):
        b = f"{t}encoder.layer.{i}."
        for att, bias in (("attention", pad_bias), ("crossattention", None)):
            kv = x if att == "attention" else img
            a = attend(lin(x, f"{b}{att}.self.query"), lin(kv, f"{b}{att}.self.key"),
                       lin(kv, f"{b}{att}.self.value"), cfg.text_heads, bias)
            x = ln(lin(a, f"{b}{att}.output.dense") + x, f"{b}{att}.output.LayerNorm", 1e-12)
        y = lin(F.gelu(lin(x, b + "intermediate.dense")), b + "output.dense")
        x = ln(y + x, b + "output.LayerNorm", 1e-12)
    r = x[:, 0]
    for idx in (0, 2, 4, 6, 7):
        r = lin(r, f"mlp.layers.{idx}")
    return ((r - REWARD_MEAN) / REWARD_STD).squeeze(-1)


def test_port_computes_official_forward(tiny_ir_config, bert_tokenizer, prompts):
    sd = random_official(tiny_ir_config)
    net = ImageRewardNet(tiny_ir_config).eval()
    net.load_official_state_dict(sd)
    x = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    tok = bert_tokenizer(prompts, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
    with torch.no_grad():
        ours = net(x, tok["input_ids"], tok["attention_mask"])
        ref = reference_score(sd, tiny_ir_config, x, tok["input_ids"], tok["attention_mask"])
    assert ref.std() > 1e-2  # the comparison is not between constants
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)


def test_reward_loads_official_checkpoint(tmp_path, tiny_ir_config, bert_tokenizer, images, prompts):
    sd = random_official(tiny_ir_config, seed=3)
    torch.save(sd, tmp_path / "ImageReward.pt")
    loaded = ImageReward(checkpoint=str(tmp_path), config=tiny_ir_config, tokenizer=bert_tokenizer)
    net = ImageRewardNet(tiny_ir_config).eval()
    net.load_official_state_dict(sd)
    ref = ImageReward(model=net, tokenizer=bert_tokenizer)
    torch.testing.assert_close(loaded(images, prompts), ref(images, prompts))


@pytest.mark.parametrize("edit, needle", [
    (lambda sd: sd.pop("blip.visual_encoder.blocks.1.attn.qkv.bias"), "vision.encoder.layers.1.self_attn.qkv.bias"),
    (lambda sd: sd.__setitem__("blip.itm_head.weight", torch.zeros(2, 32)), "blip.itm_head.weight"),
    (lambda sd: sd.__setitem__("mlp.layers.0.weight", torch.zeros(1024, 33)), "mlp.layers.0.weight"),
])
def test_bad_checkpoint_lists_the_problem(tmp_path, tiny_ir_config, bert_tokenizer, images, prompts, edit, needle):
    sd = random_official(tiny_ir_config)
    edit(sd)
    torch.save(sd, tmp_path / "ImageReward.pt")
    reward = ImageReward(checkpoint=str(tmp_path / "ImageReward.pt"), config=tiny_ir_config, tokenizer=bert_tokenizer)
    with pytest.raises(RewardError, match="does not match the port") as err:
        reward(images, prompts)
    assert needle in str(err.value)


def test_unknown_key_is_a_mapping_error():
    with pytest.raises(MappingError, match="blip.text_decoder"):
        map_name("blip.text_decoder.cls.predictions.bias")
