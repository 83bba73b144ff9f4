"""PickScore (Pick-a-Pic) through transformers' ``CLIPModel``.

PickScore is a CLIP-H fine-tuned on human preferences; the paper defines the score of an image for
a prompt as the learned temperature times the cosine of the normalised embeddings,
``exp(logit_scale) * <E_txt(prompt), E_img(x)>`` (a softmax over images of these scores gives
preference probabilities; we return the raw score). Defaults are the public checkpoint
``yuvalkirstain/PickScore_v1`` with the processor of ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``;
both accept a local folder. ``model=`` / ``tokenizer=`` inject a config-built model (tests).

Image preprocessing is the processor's own: transformers' ``CLIPImageProcessor`` (the one
``AutoProcessor`` returns for the processor id) applied to the 8-bit images, which is what
``processor(images=pil_images)`` in PickScore's reference code computes. With an injected model and no
processor, a ``CLIPImageProcessor`` is built from the model's image size and the CLIP constants.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from rewards.base import RewardModel, hub_error, register_reward, to_uint8
from rewards.clip_score import OPENAI_MEAN, OPENAI_STD


def _features(out) -> torch.Tensor:
    # transformers 5 returns a model output whose pooler_output is the projected embedding.
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def _side(size, key: str) -> int | None:
    """An image processor size entry (a dict, a SizeDict or an int) -> int."""
    if size is None or isinstance(size, int):
        return size
    value = size.get(key) if hasattr(size, "get") else getattr(size, key, None)
    return int(value) if value is not None else None


@register_reward("pickscore")
class PickScore(RewardModel):
    """PickScore ``exp(logit_scale) * cos(E_img(x), E_txt(prompt))``.

    ``model_id``: hub id or local folder of the CLIPModel; ``processor_id``: of its processor;
    ``model`` / ``tokenizer`` (a transformers tokenizer) / ``image_processor``: use these instead of
    loading; ``image_size`` / ``mean`` / ``std``: override the preprocessing; ``max_length``: prompt tokens.
    """

    def __init__(self, model_id: str = "yuvalkirstain/PickScore_v1",
                 processor_id: str = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K", *,
                 model: torch.nn.Module | None = None, tokenizer: Callable | None = None,
                 image_processor: Callable | None = None, image_size: int | None = None, mean: Sequence[float] | None = None,
                 std: Sequence[float] | None = None, max_length: int = 77, **kwargs):
        super().__init__(**kwargs)
        self.model_id = model_id
        self.processor_id = processor_id
        self.model = model
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.image_size = image_size
        self.resize_size: int | None = None
        self.crop_size: int | None = None
        self.mean = tuple(mean) if mean is not None else None
        self.std = tuple(std) if std is not None else None
        self.max_length = max_length

    def _load(self) -> None:
        if self.model is None:
            from transformers import CLIPModel

            try:
                self.model = CLIPModel.from_pretrained(self.model_id)
            except (OSError, ValueError) as e:
                raise hub_error("pickscore", self.model_id, "model_id", e) from None
        if self.tokenizer is None:
            from transformers import AutoProcessor

            try:
                processor = AutoProcessor.from_pretrained(self.processor_id)
            except (OSError, ValueError) as e:
                raise hub_error("pickscore", self.processor_id, "processor_id", e) from None
            self.tokenizer = self.tokenizer or processor.tokenizer
            self.image_processor = self.image_processor or processor.image_processor
        if self.image_processor is None:  # injected model and tokenizer: CLIP's processor at the model's size
            from transformers import CLIPImageProcessor

            side = int(self.model.config.vision_config.image_size)
            self.image_processor = CLIPImageProcessor(
                size={"shortest_edge": side}, crop_size={"height": side, "width": side},
                image_mean=list(OPENAI_MEAN), image_std=list(OPENAI_STD))
        ip = self.image_processor
        if self.image_size or self.mean or self.std:  # overrides: the same processor class, changed config
            cfg = ip.to_dict()
            cfg.pop("image_processor_type", None)
            if self.image_size:
                cfg.update(size={"shortest_edge": self.image_size},
                           crop_size={"height": self.image_size, "width": self.image_size})
            cfg.update(image_mean=list(self.mean or ip.image_mean), image_std=list(self.std or ip.image_std))
            ip = self.image_processor = type(ip)(**cfg)
        self.crop_size = _side(ip.crop_size, "height")
        self.resize_size = _side(ip.size, "shortest_edge") or self.crop_size
        self.mean, self.std = tuple(ip.image_mean), tuple(ip.image_std)
        self.model = self.model.to(device=self.device, dtype=self.dtype).eval()

    def preprocess(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels (n, 3, H, W) in [0, 1] -> the processor's ``pixel_values`` for the 8-bit images."""
        return self.image_processor(images=list(to_uint8(pixels)), return_tensors="pt")["pixel_values"]

    def _score(self, pixels: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        x = self.to_model(self.preprocess(pixels))
        tok = self.tokenizer(prompts, padding=True, truncation=True, max_length=self.max_length,
                             return_tensors="pt").to(self.device)
        img = F.normalize(_features(self.model.get_image_features(pixel_values=x)).float(), dim=-1)
        txt = F.normalize(_features(self.model.get_text_features(input_ids=tok["input_ids"],
                                                                 attention_mask=tok["attention_mask"])).float(),
                          dim=-1)
        return self.model.logit_scale.float().exp() * (img * txt).sum(-1)
