"""The four scorers on tiny config-built models: contract, batching, determinism, maths, loading."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import rewards
from rewards.base import RewardError, normalize
from rewards.clip_score import OPENAI_MEAN, OPENAI_STD, CLIPScore
from rewards.hpsv2 import HPSv2, resize_longest_pad
from rewards.pickscore import PickScore

SCORERS = ["clipscore", "hpsv2", "pickscore", "imagereward"]


@pytest.fixture
def make(request, tiny_open_clip, open_clip_tokenizer, tiny_hf_clip, clip_tokenizer, tiny_ir_model,
         bert_tokenizer):
    def build(name: str, **kw):
        if name in ("clipscore", "hpsv2"):
            return rewards.load(name, model=tiny_open_clip, tokenizer=open_clip_tokenizer, **kw)
        if name == "pickscore":
            return rewards.load(name, model=tiny_hf_clip, tokenizer=clip_tokenizer, **kw)
        return rewards.load(name, model=tiny_ir_model, tokenizer=bert_tokenizer, **kw)

    return build


@pytest.mark.parametrize("name", SCORERS)
def test_shape_batching_determinism(make, name, images, prompts):
    batched = make(name, batch_size=3)(images, prompts)
    assert batched.shape == (5,) and batched.dtype == torch.float32
    one = make(name, batch_size=1)
    single = torch.cat([one(images[i:i + 1], prompts[i]) for i in range(5)])
    torch.testing.assert_close(batched, single, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(make(name, batch_size=3)(images, prompts), batched, rtol=0, atol=0)
    # Scores depend on both the image and the prompt.
    assert batched.unique().numel() == 5
    assert not torch.equal(make(name)(images, prompts[::-1]), batched)


@pytest.mark.parametrize("name", SCORERS)
def test_pil_input_equals_quantised_tensor(make, name, images, prompts):
    q = (images * 255).round() / 255
    pil = [Image.fromarray((img.permute(1, 2, 0).numpy() * 255).round().astype("uint8")) for img in images]
    reward = make(name)
    torch.testing.assert_close(reward(pil, prompts), reward(q, prompts), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", SCORERS)
def test_device_and_dtype(make, name, images, prompts):
    ref = make(name, device="cpu")(images, prompts)
    reward = make(name, device=torch.device("cpu"), dtype="bfloat16")
    out = reward(images, prompts)
    p = next(reward.model.parameters())
    assert p.dtype == torch.bfloat16 and p.device.type == "cpu"
    assert out.dtype == torch.float32 and out.device.type == "cpu"
    assert torch.corrcoef(torch.stack([out, ref]))[0, 1] > 0.9
    assert (out - ref).abs().max() < 0.1 * ref.abs().max() + 0.05


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", SCORERS)
def test_cuda(make, name, images, prompts):
    ref = make(name)(images, prompts)
    out = make(name, device="cuda")(images, prompts)
    assert out.device.type == "cpu"
    torch.testing.assert_close(out, ref, rtol=1e-3, atol=1e-3)


# -- each score's maths, computed another way -------------------------------------------------------
def eight_bit(x: torch.Tensor) -> torch.Tensor:
    """Scorers see the 8-bit image (as the official code does); at the model's size nothing else changes."""
    return (x * 255).round() / 255


def test_clipscore_is_cosine(tiny_open_clip, open_clip_tokenizer, prompts):
    x = eight_bit(torch.rand(5, 3, 32, 32, generator=torch.Generator().manual_seed(1)))  # model size: no resize
    score = CLIPScore(model=tiny_open_clip, tokenizer=open_clip_tokenizer, scale=100.0)(x, prompts)
    with torch.no_grad():
        img = tiny_open_clip.encode_image(normalize(x, OPENAI_MEAN, OPENAI_STD))
        txt = tiny_open_clip.encode_text(open_clip_tokenizer(prompts))
    torch.testing.assert_close(score, 100 * F.cosine_similarity(img, txt, dim=-1), rtol=1e-5, atol=1e-4)


def test_hpsv2_is_diagonal_of_model_logits(tiny_open_clip, open_clip_tokenizer, prompts):
    x = eight_bit(torch.rand(5, 3, 32, 32, generator=torch.Generator().manual_seed(2)))
    score = HPSv2(model=tiny_open_clip, tokenizer=open_clip_tokenizer)(x, prompts)
    with torch.no_grad():  # open_clip's forward returns normalised features; HPS is their dot product
        img, txt, _ = tiny_open_clip(normalize(x, OPENAI_MEAN, OPENAI_STD), open_clip_tokenizer(prompts))
    torch.testing.assert_close(score, (img @ txt.T).diagonal(), rtol=1e-5, atol=1e-5)


def test_hpsv2_resize_longest_and_pad():
    x = torch.rand(2, 3, 16, 64)
    out = resize_longest_pad(x, 32)
    assert out.shape == (2, 3, 32, 32)
    assert out[:, :, :12].abs().max() == 0 and out[:, :, 20:].abs().max() == 0  # 8 rows kept, centred
    assert out[:, :, 12:20].abs().max() > 0
    sq = torch.rand(2, 3, 32, 32)
    assert torch.equal(resize_longest_pad(sq, 32), sq)
    # Longer side already at size: not resized, still padded to the square the model needs.
    half = resize_longest_pad(x[..., :32], 32)
    assert half.shape == (2, 3, 32, 32) and torch.equal(half[:, :, 8:24], x[..., :32]) and half[:, :, :8].abs().max() == 0


def test_pickscore_is_scaled_logits_diagonal(tiny_hf_clip, clip_tokenizer, prompts):
    with torch.no_grad():
        tiny_hf_clip.logit_scale.fill_(2.0)
    x = eight_bit(torch.rand(5, 3, 32, 32, generator=torch.Generator().manual_seed(3)))
    score = PickScore(model=tiny_hf_clip, tokenizer=clip_tokenizer)(x, prompts)
    tok = clip_tokenizer(prompts, padding=True, return_tensors="pt")
    with torch.no_grad():
        out = tiny_hf_clip(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"],
                           pixel_values=normalize(x, OPENAI_MEAN, OPENAI_STD))
    torch.testing.assert_close(score, out.logits_per_image.diagonal(), rtol=1e-5, atol=1e-4)
    assert torch.isclose(out.logits_per_image.diagonal() / F.cosine_similarity(out.image_embeds, out.text_embeds),
                         torch.tensor(2.0).exp()).all()


# -- loading real weights from files -----------------------------------------------------------------
def test_clipscore_loads_local_checkpoint(tmp_path, tiny_open_clip, tiny_open_clip_name, open_clip_tokenizer,
                                          images, prompts):
    path = tmp_path / "tiny.pt"
    torch.save(tiny_open_clip.state_dict(), path)
    loaded = CLIPScore(model_name=tiny_open_clip_name, pretrained=str(path), tokenizer=open_clip_tokenizer)
    ref = CLIPScore(model=tiny_open_clip, tokenizer=open_clip_tokenizer)
    torch.testing.assert_close(loaded(images, prompts), ref(images, prompts))


@pytest.mark.parametrize("version", ["v2.0", "v2.1"])
def test_hpsv2_loads_checkpoint_from_folder(tmp_path, tiny_open_clip, tiny_open_clip_name, open_clip_tokenizer,
                                            images, prompts, version):
    name = {"v2.0": "HPS_v2_compressed.pt", "v2.1": "HPS_v2.1_compressed.pt"}[version]
    torch.save({"state_dict": tiny_open_clip.state_dict()}, tmp_path / name)
    loaded = HPSv2(hps_version=version, checkpoint=str(tmp_path), model_name=tiny_open_clip_name,
                   tokenizer=open_clip_tokenizer)
    ref = HPSv2(model=tiny_open_clip, tokenizer=open_clip_tokenizer)
    torch.testing.assert_close(loaded(images, prompts), ref(images, prompts))


def test_hpsv2_wrong_checkpoint_is_clear(tmp_path, tiny_open_clip_name, open_clip_tokenizer, images, prompts):
    torch.save({"state_dict": {"visual.proj": torch.zeros(3)}}, tmp_path / "HPS_v2.1_compressed.pt")
    with pytest.raises(RewardError, match="is it an HPSv2 checkpoint"):
        HPSv2(checkpoint=str(tmp_path), model_name=tiny_open_clip_name, tokenizer=open_clip_tokenizer)(
            images, prompts)


def test_pickscore_loads_saved_folder(tmp_path, tiny_hf_clip, clip_tokenizer, images, prompts):
    from transformers import CLIPImageProcessor, CLIPProcessor

    tiny_hf_clip.save_pretrained(tmp_path / "model")
    ip = CLIPImageProcessor(size={"shortest_edge": 36}, crop_size={"height": 32, "width": 32},
                            image_mean=[0.5, 0.4, 0.3], image_std=[0.2, 0.25, 0.3])
    CLIPProcessor(image_processor=ip, tokenizer=clip_tokenizer).save_pretrained(tmp_path / "processor")
    loaded = PickScore(model_id=str(tmp_path / "model"), processor_id=str(tmp_path / "processor"))
    scores = loaded(images, prompts)
    assert (loaded.resize_size, loaded.crop_size, loaded.mean) == (36, 32, (0.5, 0.4, 0.3))
    # Same numbers as the saved processor's own pipeline on the PIL images, run through the saved model.
    pil = [Image.fromarray((im.permute(1, 2, 0).numpy() * 255).round().astype("uint8")) for im in images]
    tok = clip_tokenizer(prompts, padding=True, return_tensors="pt")
    with torch.no_grad():
        out = tiny_hf_clip(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"],
                           pixel_values=ip(pil, return_tensors="pt")["pixel_values"])
    torch.testing.assert_close(loaded(pil, prompts), out.logits_per_image.diagonal(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(scores, out.logits_per_image.diagonal(), rtol=1e-5, atol=1e-5)
    # Overrides of the processor's configuration take effect.
    other = PickScore(model_id=str(tmp_path / "model"), processor_id=str(tmp_path / "processor"), image_size=32,
                      mean=(0.5, 0.5, 0.5))
    other._load()
    assert (other.resize_size, other.crop_size, other.mean, other.std) == (32, 32, (0.5, 0.5, 0.5), (0.2, 0.25, 0.3))
    assert not torch.allclose(other(images, prompts), scores)


# -- missing weights: one clear error ------------------------------------------------------------------
@pytest.mark.parametrize("name, options, needle", [
    ("hpsv2", {"checkpoint": "/nonexistent/HPS_v2.1_compressed.pt"}, "HPS_v2.1_compressed.pt"),
    ("hpsv2", {"checkpoint": "xswu/HPSv2", "hps_version": "v2.0"}, "HPS_v2_compressed.pt"),
    ("imagereward", {"checkpoint": "THUDM/ImageReward"}, "ImageReward.pt"),
    ("imagereward", {"checkpoint": "/nonexistent/dir/"}, "ImageReward.pt"),
    ("pickscore", {"model_id": "yuvalkirstain/PickScore_v1"}, "yuvalkirstain/PickScore_v1"),
    ("pickscore", {"model_id": "/nonexistent/pickscore"}, "/nonexistent/pickscore"),
    ("clipscore", {"pretrained": "/nonexistent/open_clip_model.bin"}, "open_clip_model.bin"),
    ("clipscore", {}, "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"),
])
def test_missing_weights_offline(offline_hub, name, options, needle, images, prompts):
    reward = rewards.load(name, **options)  # building is lazy: nothing is read yet
    with pytest.raises(RewardError) as err:
        reward(images, prompts)
    msg = str(err.value)
    assert needle in msg and name in msg
    assert any(w in msg.lower() for w in ("download", "pass", "put"))  # says what to do


def test_missing_weights_offline_with_hub_id(offline_hub, images, prompts):
    with pytest.raises(RewardError, match=r"xswu/HPSv2.*hf download xswu/HPSv2 HPS_v2.1_compressed.pt"):
        HPSv2()(images, prompts)
