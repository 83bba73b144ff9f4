"""Each scorer's input tensor equals the official preprocessing, and HPSv2 scores equal the hpsv2
package's scoring code on an official-format checkpoint.

The official paths take PIL (8-bit) images. We compare on the same image: a uint8 PIL image through
our API (``to_pixels`` -> the scorer's ``preprocess``) against the official transform of that PIL
image; and a float tensor through our API against the official transform of its 8-bit rounding (what
``PIL.Image.fromarray`` of the rounded tensor gives; the official code cannot take the float image
itself). Sizes are non-square and differ from the model's, so resize, crop and pad all act, upwards
and downwards. Tolerance 1e-5: both sides run the same resampling kernels on the same 8-bit input.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from rewards.base import to_pixels, to_uint8
from rewards.clip_score import OPENAI_MEAN, OPENAI_STD, CLIPScore
from rewards.hpsv2 import HPSv2
from rewards.imagereward import ImageReward, ImageRewardConfig, ImageRewardNet
from rewards.pickscore import PickScore

SIZES = [(37, 53), (300, 200), (53, 37), (224, 300)]  # (H, W): up- and downsampling, portrait and landscape
ATOL = 1e-5

# Tiny open_clip at the real input size 224 (the preprocessing does not depend on the model's width).
TINY_224 = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 224, "layers": 2, "width": 32, "head_width": 16, "patch_size": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}
TINY_224_NAME = "tpm-test-tiny-clip-224"


def pil_image(h: int, w: int, seed: int) -> Image.Image:
    # Smooth plus noise: noise makes bicubic overshoot, the smooth part makes crops differ by position.
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = 127 + 100 * np.sin(xx[..., None] / 7.0 + np.arange(3)) * np.cos(yy[..., None] / 5.0)
    arr = np.clip(base + rng.normal(0, 40, (h, w, 3)), 0, 255).astype(np.uint8)
    return Image.fromarray(arr)


def float_image(h: int, w: int, seed: int) -> torch.Tensor:
    return torch.rand(1, 3, h, w, generator=torch.Generator().manual_seed(seed))


def pil_of(x: torch.Tensor) -> Image.Image:
    """The 8-bit PIL image a user would hand the official code for float pixels ``x`` (1, 3, H, W)."""
    return Image.fromarray(to_uint8(x)[0].permute(1, 2, 0).numpy())


def check_against(ours, official) -> None:
    """``ours(pixels)`` vs ``official(pil)`` on uint8 PIL images and on float tensors of every size."""
    for i, (h, w) in enumerate(SIZES):
        pil = pil_image(h, w, seed=i)
        got = ours(to_pixels([pil]))
        want = official(pil)[None]
        assert got.shape == want.shape, (h, w)
        torch.testing.assert_close(got, want, rtol=0, atol=ATOL, msg=f"uint8 PIL image {h}x{w}")
        x = float_image(h, w, seed=100 + i)
        torch.testing.assert_close(ours(x), official(pil_of(x))[None], rtol=0, atol=ATOL,
                                   msg=f"float tensor {h}x{w}")
    # A batch is preprocessed as its images one by one.
    xs = torch.rand(3, 3, 41, 67, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(ours(xs), torch.cat([ours(xs[i:i + 1]) for i in range(3)]), rtol=0, atol=0)


@pytest.fixture(scope="module")
def tiny_224_name(tmp_path_factory) -> str:
    import open_clip

    folder = tmp_path_factory.mktemp("open_clip_224")
    (folder / f"{TINY_224_NAME}.json").write_text(json.dumps(TINY_224))
    open_clip.add_model_config(folder)
    return TINY_224_NAME


# -- open_clip ------------------------------------------------------------------------------------
@pytest.mark.parametrize("mean_std", [None, ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))])
def test_clipscore_input_is_open_clip_eval_transform(tiny_224_name, open_clip_tokenizer, mean_std):
    import open_clip

    mean, std = mean_std or (None, None)
    model, _, official = open_clip.create_model_and_transforms(tiny_224_name, pretrained=None,
                                                               image_mean=mean, image_std=std)
    reward = CLIPScore(model=model, tokenizer=open_clip_tokenizer)
    reward._ensure_loaded()
    check_against(reward.preprocess, official)


# -- HPSv2 (the hpsv2 package, installed as `hpsv2x`: the `hpsv2` extra) ---------------------------
@pytest.fixture(scope="module")
def hps_fork(tiny_224_name, tmp_path_factory):
    """The hpsv2 package's open_clip fork, knowing the tiny architecture too."""
    pytest.importorskip("hpsv2", reason="the hpsv2 package (pip install 'tpm[hpsv2]', i.e. hpsv2x)")
    from hpsv2.src import open_clip as fork

    folder = tmp_path_factory.mktemp("hps_fork_cfg")
    (folder / f"{TINY_224_NAME}.json").write_text(json.dumps(TINY_224))
    fork.add_model_config(folder)
    return fork


def test_hpsv2_input_is_hpsv2_eval_transform(hps_fork, tiny_224_name, open_clip_tokenizer):
    import open_clip

    # What hpsv2.img_score builds: create_model_and_transforms(..., light_augmentation=True)'s preprocess_val.
    _, _, official = hps_fork.create_model_and_transforms(tiny_224_name, None, precision="fp32", device="cpu",
                                                         light_augmentation=True, output_dict=True)
    reward = HPSv2(model=open_clip.create_model(tiny_224_name), tokenizer=open_clip_tokenizer)
    reward._ensure_loaded()
    check_against(reward.preprocess, official)


def test_hpsv2_scores_equal_hpsv2_package(hps_fork, tiny_224_name, tmp_path, monkeypatch):
    """A tiny random model in the official checkpoint format ({'state_dict': ...} of the package's own
    model), scored by ``hpsv2.img_score.score`` and by ours from the same file."""
    import hpsv2.img_score as official

    torch.manual_seed(0)
    fork_model, _, _ = hps_fork.create_model_and_transforms(tiny_224_name, None, precision="fp32", device="cpu")
    with torch.no_grad():  # spread the random model's scores so the comparison bites
        fork_model.visual.proj.normal_(0, 1.0)
        fork_model.text_projection.normal_(0, 1.0)
    path = tmp_path / "HPS_v2.1_compressed.pt"
    torch.save({"state_dict": fork_model.state_dict()}, path)

    # The package's scoring code, with its hard-coded ViT-H-14 + hub weights swapped for the tiny
    # architecture (the HPS checkpoint then overwrites every weight, as it does for the real model).
    build = hps_fork.create_model_and_transforms
    monkeypatch.setattr(official, "create_model_and_transforms",
                        lambda name, pretrained, **kw: build(tiny_224_name, None, **kw))
    monkeypatch.setattr(official, "get_tokenizer", lambda name: hps_fork.get_tokenizer(tiny_224_name))
    monkeypatch.setattr(official, "device", "cpu")
    monkeypatch.setattr(official, "model_dict", {})

    images = [pil_image(h, w, seed=i) for i, (h, w) in enumerate(SIZES)]
    ours = HPSv2(hps_version="v2.1", checkpoint=str(tmp_path), model_name=tiny_224_name)
    for prompt in ["a photo of a cat", "two red cars on the grass"]:
        want = torch.tensor(np.array(official.score(images, prompt, cp=str(path)), dtype=np.float32))
        got = torch.cat([ours([im], prompt) for im in images])  # our API takes one size per batch
        torch.testing.assert_close(got, want, rtol=0, atol=ATOL)
        assert want.max() - want.min() > 1000 * ATOL  # the images' scores differ far beyond the tolerance
    # Float tensors: the package scores their 8-bit PIL image.
    x = float_image(53, 37, seed=5)
    want = official.score([pil_of(x)], "a dog", cp=str(path))[0]
    torch.testing.assert_close(ours(x, "a dog"), torch.tensor([float(want)]), rtol=0, atol=ATOL)


# -- ImageReward ----------------------------------------------------------------------------------
def imagereward_official_transform(n_px: int):
    """ImageReward's own preprocessing, ``ImageReward/ImageReward.py::_transform`` of the image-reward
    1.5 package (read from its source: the package cannot be imported with transformers 5)."""
    from torchvision.transforms import CenterCrop, Compose, InterpolationMode, Normalize, Resize, ToTensor

    return Compose([
        Resize(n_px, interpolation=InterpolationMode.BICUBIC),
        CenterCrop(n_px),
        lambda image: image.convert("RGB"),
        ToTensor(),
        Normalize((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
    ])


def test_imagereward_input_is_blip_transform(bert_tokenizer):
    # The release's 224 input, with a tiny width (the transform only depends on the image size).
    cfg = ImageRewardConfig(vision_width=32, vision_layers=1, vision_heads=2, image_size=224, patch_size=32,
                            text_width=32, text_layers=1, text_heads=2, text_intermediate=64,
                            vocab_size=len(bert_tokenizer), max_positions=40)
    reward = ImageReward(model=ImageRewardNet(cfg), tokenizer=bert_tokenizer)
    reward._ensure_loaded()
    check_against(reward.preprocess, imagereward_official_transform(224))


# -- PickScore --------------------------------------------------------------------------------------
# preprocessor_config.json of laion/CLIP-ViT-H-14-laion2B-s32B-b79K, the processor PickScore's
# reference code loads with AutoProcessor (legacy int sizes, as in the hub file).
PICKSCORE_PROCESSOR = {
    "crop_size": 224, "do_center_crop": True, "do_normalize": True, "do_resize": True,
    "feature_extractor_type": "CLIPFeatureExtractor", "image_mean": list(OPENAI_MEAN), "image_std": list(OPENAI_STD),
    "resample": 3, "size": 224,
}


@pytest.fixture
def pickscore_processor_dir(tmp_path, clip_tokenizer, tiny_hf_clip):
    """A folder laid out like the hub repo: model config.json, tokenizer, preprocessor_config.json."""
    folder = tmp_path / "processor"
    clip_tokenizer.save_pretrained(folder)
    tiny_hf_clip.config.save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps(PICKSCORE_PROCESSOR))
    return folder


def test_pickscore_input_is_clip_processor(pickscore_processor_dir, tiny_hf_clip):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(pickscore_processor_dir)  # as PickScore's reference code does
    reward = PickScore(model=tiny_hf_clip, processor_id=str(pickscore_processor_dir))
    reward._ensure_loaded()
    assert (reward.resize_size, reward.crop_size) == (224, 224)

    def official(pil):
        return processor(images=pil, return_tensors="pt")["pixel_values"][0]

    check_against(reward.preprocess, official)


def test_pickscore_follows_injected_pil_processor(tiny_hf_clip, clip_tokenizer):
    """transformers' PIL-backend CLIP processor (the resampling of transformers 4's CLIPImageProcessor)
    differs from the torchvision one by a grey level or two; the scorer uses whichever it is given."""
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    ip = CLIPImageProcessorPil(**{k: v for k, v in PICKSCORE_PROCESSOR.items() if k != "feature_extractor_type"})
    reward = PickScore(model=tiny_hf_clip, tokenizer=clip_tokenizer, image_processor=ip)
    reward._ensure_loaded()
    check_against(reward.preprocess, lambda pil: torch.as_tensor(ip(images=pil, return_tensors="pt")["pixel_values"][0]))
