"""Tiny config-built models and inputs shared by the reward tests (nothing is downloaded)."""

from __future__ import annotations

import json

import pytest
import torch

WORDS = ["a", "an", "the", "photo", "of", "cat", "dog", "red", "blue", "car", "on", "grass", "sky", "two",
         "painting", "house", "tree", "small", "big", "green"]
PROMPTS = ["a photo of a cat", "two red cars", "the blue sky", "a dog on the grass", "a small green house"]


@pytest.fixture
def images() -> torch.Tensor:
    """Five seeded RGB images, non-square so resizing and cropping are exercised."""
    g = torch.Generator().manual_seed(0)
    return torch.rand(5, 3, 40, 48, generator=g)


@pytest.fixture
def prompts() -> list[str]:
    return list(PROMPTS)


# -- open_clip ----------------------------------------------------------------------------------
TINY_OPEN_CLIP = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}
TINY_OPEN_CLIP_NAME = "tpm-test-tiny-clip"


@pytest.fixture(scope="session")
def tiny_open_clip_name(tmp_path_factory) -> str:
    """Register a tiny open_clip architecture under a model name so the by-name loaders can run."""
    import open_clip

    folder = tmp_path_factory.mktemp("open_clip_cfg")
    (folder / f"{TINY_OPEN_CLIP_NAME}.json").write_text(json.dumps(TINY_OPEN_CLIP))
    open_clip.add_model_config(folder)
    return TINY_OPEN_CLIP_NAME


@pytest.fixture
def tiny_open_clip(tiny_open_clip_name):
    import open_clip

    torch.manual_seed(0)
    return open_clip.create_model(tiny_open_clip_name, pretrained=None).eval()


@pytest.fixture(scope="session")
def open_clip_tokenizer():
    import open_clip

    return open_clip.SimpleTokenizer(context_length=77)  # the bundled BPE vocabulary, offline


# -- transformers CLIP ----------------------------------------------------------------------------
def word_tokenizer(specials: dict[str, str], words=WORDS, template: bool = True):
    """A word-level fast tokenizer built offline (ids: specials first, then ``words``)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate([*specials.values(), *words])}
    tk = Tokenizer(models.WordLevel(vocab, unk_token=specials["unk_token"]))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    if template:
        bos, eos = specials["bos_token"], specials["eos_token"]
        tk.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A {eos}", special_tokens=[(bos, vocab[bos]), (eos, vocab[eos])])
    return PreTrainedTokenizerFast(tokenizer_object=tk, **specials)


@pytest.fixture(scope="session")
def clip_tokenizer():
    return word_tokenizer({"pad_token": "<pad>", "bos_token": "<bos>", "eos_token": "<eos>", "unk_token": "<unk>"})


@pytest.fixture
def tiny_hf_clip(clip_tokenizer):
    from transformers import CLIPConfig, CLIPModel

    tok = clip_tokenizer
    cfg = CLIPConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=32, pad_token_id=tok.pad_token_id,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=32, patch_size=8),
        projection_dim=16,
    )
    torch.manual_seed(0)
    return CLIPModel(cfg).eval()


# -- ImageReward port -----------------------------------------------------------------------------
@pytest.fixture(scope="session")
def bert_tokenizer(tmp_path_factory):
    from transformers import BertTokenizer

    path = tmp_path_factory.mktemp("bert") / "vocab.txt"
    path.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    tok = BertTokenizer(str(path))
    tok.add_special_tokens({"bos_token": "[DEC]"})
    tok.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    return tok


@pytest.fixture
def tiny_ir_config(bert_tokenizer):
    from rewards.imagereward import ImageRewardConfig

    return ImageRewardConfig(vision_width=32, vision_layers=2, vision_heads=2, image_size=32, patch_size=8,
                             text_width=32, text_layers=2, text_heads=2, text_intermediate=64,
                             vocab_size=len(bert_tokenizer), max_positions=40)


@pytest.fixture
def tiny_ir_model(tiny_ir_config):
    from rewards.imagereward import ImageRewardNet

    torch.manual_seed(0)
    model = ImageRewardNet(tiny_ir_config).eval()
    # The official head init makes tiny scores nearly constant; spread them so comparisons bite.
    # BERT's 0.02 init also leaves the image almost no say through cross-attention.
    with torch.no_grad():
        for layer in [*model.text.modules(), *model.mlp.layers]:
            if isinstance(layer, torch.nn.Linear):
                layer.weight.normal_(0, 1.0 / layer.in_features**0.5)
                layer.bias.zero_()
    return model


@pytest.fixture
def offline_hub(monkeypatch, tmp_path):
    """An empty hub cache with offline mode on, as on a machine without hub access."""
    import huggingface_hub.constants as c

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "hub"))
    return tmp_path
