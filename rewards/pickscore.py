"""PickScore (Pick-a-Pic) through transformers' ``CLIPModel``.

PickScore is a CLIP-H fine-tuned on human preferences; the paper defines the score of an image for
a prompt as the learned temperature times the cosine of the normalised embeddings,
``exp(logit_scale) * <E_txt(prompt), E_img(x)>`` (a softmax over images of these scores gives
preference probabilities; we return the raw score). Defaults are the public checkpoint
``yuvalkirstain/PickScore_v1`` with the processor of ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``;
both accept a local folder. ``model=`` / ``tokenizer=`` inject a config-built model (tests).

Image preprocessing is the CLIP image processor's (resize shortest edge, centre crop, normalise
with its mean/std), read from the processor's configuration and applied on tensors so batching is
exact.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from rewards.base import RewardModel, hub_error, normalize, register_reward, resize_center_crop
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
    ``model`` / ``tokenizer`` (a transformers tokenizer): use these instead of loading;
    ``image_size`` / ``mean`` / ``std``: override the preprocessing; ``max_length``: prompt tokens.
    """

    def __init__(self, model_id: str = "yuvalkirstain/PickScore_v1",
                 processor_id: str = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K", *,
                 model: torch.nn.Module | None = None, tokenizer: Callable | None = None,
                 image_size: int | None = None, mean: Sequence[float] | None = None,
                 std: Sequence[float] | None = None, max_length: int = 77, **kwargs):
        super().__init__(**kwargs)
        self.model_id = model_id
        self.processor_id = processor_id
        self.model = model
        self.tokenizer = tokenizer
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
            self.tokenizer = processor.tokenizer
            ip = processor.image_processor
            self.crop_size = self.image_size or _side(ip.crop_size, "height")
            self.resize_size = self.image_size or _side(ip.size, "shortest_edge") or self.crop_size
            self.mean = self.mean or tuple(ip.image_mean)
            self.std = self.std or tuple(ip.image_std)
        if self.crop_size is None:
            self.crop_size = self.resize_size = self.image_size or int(self.model.config.vision_config.image_size)
        self.mean = self.mean or OPENAI_MEAN
        self.std = self.std or OPENAI_STD
        self.model = self.model.to(device=self.device, dtype=self.dtype).eval()

    def _score(self, pixels: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        x = resize_center_crop(pixels, self.resize_size, self.crop_size)
        x = self.to_model(normalize(x, self.mean, self.std))
        tok = self.tokenizer(prompts, padding=True, truncation=True, max_length=self.max_length,
                             return_tensors="pt").to(self.device)
        img = F.normalize(_features(self.model.get_image_features(pixel_values=x)).float(), dim=-1)
        txt = F.normalize(_features(self.model.get_text_features(input_ids=tok["input_ids"],
                                                                 attention_mask=tok["attention_mask"])).float(),
                          dim=-1)
        return self.model.logit_scale.float().exp() * (img * txt).sum(-1)
