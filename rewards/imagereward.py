"""ImageReward (Xu et al., 2023) ported onto current transformers classes.

Route chosen: a port, not a separate process. The ``image-reward`` package cannot be imported with
transformers 5 (it imports ``apply_chunking_to_forward`` from ``transformers.modeling_utils`` and
needs ``clip`` / ``pkg_resources``), and pinning an old transformers breaks the diffusers and datasets
versions we require. The model itself is small and standard: BLIP's ViT-L/16 image encoder, BLIP's "med" BERT
whose layers cross-attend to the image tokens, and a 5-layer linear MLP on the [CLS] feature, the
output normalised by fixed mean/std constants. transformers already has both encoders with the
same computation: ``BlipVisionModel`` (timm-style fused qkv, pre-norm blocks, final LayerNorm) and
``BlipTextModel`` (BERT layers with cross-attention, built when ``is_decoder`` is set in its config
and run bidirectionally with ``is_decoder=False``). So the port is those two classes plus the MLP,
with the official checkpoint renamed through a checked mapping (``rewards.imagereward_mapping``):
every official key must be mapped or explicitly ignored and every shape must match, otherwise
loading fails with a list of the problems. This keeps ImageReward in the project's own dependency
set and process, batched, on any device/dtype; the remote reward (``rewards.remote``) remains the
route for scorers that truly need another environment.

Scoring follows the official ``ImageReward.score``: prompt tokenised by BLIP's BERT tokenizer
(bert-base-uncased plus BLIP's ``[DEC]`` / ``[ENC]`` tokens) padded to 35 tokens, image through the
official transform (``ImageReward._transform(224)``: PIL bicubic resize of the short side, centre crop,
to tensor, CLIP normalisation; applied to the 8-bit image with torchvision as the package does), text
features cross-attending to all image tokens, reward = (MLP(h_CLS) - 0.16717) / 1.03334.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from torch import nn

from rewards.base import (
    RewardError,
    RewardModel,
    clip_eval_transform,
    hub_error,
    per_image,
    register_reward,
    resolve_file,
)
from rewards.clip_score import OPENAI_MEAN, OPENAI_STD
from rewards.imagereward_mapping import MLP_SIZES, MappingError, convert_state_dict
from rewards.lean_load import check_loaded, empty_model

REWARD_MEAN = 0.16717362830052426  # constants of the official release (score normalisation)
REWARD_STD = 1.0333394966054072
MAX_TOKENS = 35


@dataclass
class ImageRewardConfig:
    """Sizes of the port; defaults are the released ImageReward-v1.0 (ViT-L/16 at 224, BERT-base)."""

    vision_width: int = 1024
    vision_layers: int = 24
    vision_heads: int = 16
    image_size: int = 224
    patch_size: int = 16
    text_width: int = 768
    text_layers: int = 12
    text_heads: int = 12
    text_intermediate: int = 3072
    vocab_size: int = 30524  # bert-base-uncased + [DEC] + [ENC]
    max_positions: int = 512

    def vision_config(self):
        from transformers import BlipVisionConfig

        return BlipVisionConfig(
            hidden_size=self.vision_width, intermediate_size=4 * self.vision_width,
            num_hidden_layers=self.vision_layers, num_attention_heads=self.vision_heads,
            image_size=self.image_size, patch_size=self.patch_size, hidden_act="gelu", layer_norm_eps=1e-6,
            attention_dropout=0.0,
        )

    def text_config(self):
        from transformers import BlipTextConfig

        return BlipTextConfig(
            vocab_size=self.vocab_size, hidden_size=self.text_width, encoder_hidden_size=self.vision_width,
            intermediate_size=self.text_intermediate, num_hidden_layers=self.text_layers,
            num_attention_heads=self.text_heads, max_position_embeddings=self.max_positions,
            hidden_act="gelu", layer_norm_eps=1e-12, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
            is_decoder=True,  # builds the cross-attention blocks; forward runs bidirectionally
            pad_token_id=0, bos_token_id=self.vocab_size - 2,  # [DEC], as BLIP appends it after the BERT vocab
            sep_token_id=102 if self.vocab_size > 102 else None,
        )

    def official_shapes(self) -> dict[str, tuple[int, ...]]:
        from rewards.imagereward_mapping import official_shapes

        return official_shapes(vision_width=self.vision_width, vision_layers=self.vision_layers,
                               image_size=self.image_size, patch_size=self.patch_size,
                               text_width=self.text_width, text_layers=self.text_layers,
                               text_intermediate=self.text_intermediate, vocab_size=self.vocab_size,
                               max_positions=self.max_positions)


class ImageRewardNet(nn.Module):
    """BLIP ViT + cross-attending BERT + MLP head; ``forward`` returns normalised rewards (n,)."""

    def __init__(self, config: ImageRewardConfig):
        super().__init__()
        from transformers import BlipTextModel, BlipVisionModel

        self.config = config
        self.vision = BlipVisionModel(config.vision_config())
        self.text = BlipTextModel(config.text_config(), add_pooling_layer=False)
        sizes = (config.text_width, *MLP_SIZES)
        # Same layout as the official head (dropouts at 1, 3, 5; no nonlinearity) so indices map 1:1.
        self.mlp = nn.Module()
        self.mlp.layers = nn.Sequential(
            nn.Linear(sizes[0], sizes[1]), nn.Dropout(0.2), nn.Linear(sizes[1], sizes[2]), nn.Dropout(0.2),
            nn.Linear(sizes[2], sizes[3]), nn.Dropout(0.1), nn.Linear(sizes[3], sizes[4]),
            nn.Linear(sizes[4], sizes[5]),
        )

    def parameter_shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: tuple(v.shape) for k, v in self.state_dict().items()}

    def load_official_state_dict(self, official: dict[str, torch.Tensor], assign: bool = False) -> None:
        """Load an official ``ImageReward.pt`` state dict through the checked name mapping; ``assign``:
        the checkpoint's tensors become the parameters (for a model built by ``rewards.lean_load.empty_model``)."""
        ours = convert_state_dict(official, self.parameter_shapes())
        self.load_state_dict(ours, strict=True, assign=assign)

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor,
                attention_mask: torch.Tensor) -> torch.Tensor:
        image_tokens = self.vision(pixel_values=pixel_values).last_hidden_state
        h = self.text(input_ids=input_ids, attention_mask=attention_mask, encoder_hidden_states=image_tokens,
                      is_decoder=False).last_hidden_state[:, 0]
        r = self.mlp.layers(h)
        return ((r.float() - REWARD_MEAN) / REWARD_STD).squeeze(-1)


def blip_tokenizer(source: str = "bert-base-uncased"):
    """BLIP's tokenizer: a BERT uncased tokenizer with ``[DEC]`` (bos) and ``[ENC]`` appended."""
    from transformers import BertTokenizer

    try:
        tok = BertTokenizer.from_pretrained(source)
    except (OSError, ValueError) as e:
        raise hub_error("imagereward", source, "tokenizer_id", e) from None
    tok.add_special_tokens({"bos_token": "[DEC]"})
    tok.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    return tok


@register_reward("imagereward")
class ImageReward(RewardModel):
    """ImageReward-v1.0 score of each image for its prompt (higher is better).

    ``checkpoint``: local ``ImageReward.pt``, a folder holding it, or a hub repo id (default
    ``THUDM/ImageReward``); ``tokenizer_id``: BERT tokenizer source (hub id or folder);
    ``model`` / ``tokenizer``: inject a config-built :class:`ImageRewardNet` and tokenizer (tests).
    """

    def __init__(self, checkpoint: str = "THUDM/ImageReward", tokenizer_id: str = "bert-base-uncased", *,
                 model: ImageRewardNet | None = None, tokenizer: Callable | None = None,
                 config: ImageRewardConfig | dict | None = None, **kwargs):
        super().__init__(**kwargs)
        self.checkpoint = checkpoint
        self.tokenizer_id = tokenizer_id
        self.model = model
        self.tokenizer = tokenizer
        self.config = ImageRewardConfig(**config) if isinstance(config, dict) else (config or ImageRewardConfig())

    def _load(self) -> None:
        if self.model is None:
            path = resolve_file(self.checkpoint, "ImageReward.pt", "imagereward", "checkpoint")
            try:
                state = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as e:
                raise RewardError(f"imagereward: could not read checkpoint {path!r} ({type(e).__name__}: {e}); "
                                  "download ImageReward.pt again from hub repo THUDM/ImageReward") from None
            with empty_model():  # no random weights: the checkpoint's tensors become the model's
                model = ImageRewardNet(self.config)
            try:
                model.load_official_state_dict(state, assign=True)
            except MappingError as e:
                raise RewardError(f"imagereward: {path!r}: {e}\nconfig used: {asdict(self.config)}") from None
            del state
            check_loaded(model, "imagereward", path)
            self.model = model
        if self.tokenizer is None:
            self.tokenizer = blip_tokenizer(self.tokenizer_id)
        self.model = self.model.to(device=self.device, dtype=self.dtype).eval()
        self.image_size = self.model.config.image_size
        self.transform = clip_eval_transform(self.image_size, OPENAI_MEAN, OPENAI_STD)

    def preprocess(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels (n, 3, H, W) in [0, 1] -> the model's input, as ImageReward's transform makes it."""
        return per_image(pixels, self.transform)

    def _score(self, pixels: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        x = self.to_model(self.preprocess(pixels))
        tok = self.tokenizer(prompts, padding="max_length", truncation=True, max_length=MAX_TOKENS,
                             return_tensors="pt").to(self.device)
        return self.model(x, tok["input_ids"], tok["attention_mask"])
