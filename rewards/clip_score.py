"""CLIP score through open_clip: cosine similarity of image and prompt embeddings.

AsynDM (Metrics, CLIPScore) and AsyncDiff (Eq. 16, the CLIP term) both use the plain cosine between
the normalised CLIP image and text embeddings; AsynDM uses ViT-H-14, our default. ``scale``
multiplies the cosine (``scale=100`` gives the "x100" convention some papers report).

The model is any open_clip model name with any checkpoint open_clip accepts for ``pretrained``:
a pretrained tag (downloaded through the hub cache), an ``hf-hub:`` id or a local file. Tests inject
a model built from config with ``model=`` (plus ``tokenizer=``).

Preprocessing is open_clip's own eval transform (``open_clip.image_transform`` with the model's
preprocess configuration: resize mode, interpolation, size, mean/std), applied to each image as an
8-bit PIL image, exactly as ``open_clip.create_model_and_transforms`` preprocesses for evaluation.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from rewards.base import RewardError, RewardModel, per_image, register_reward
from rewards.lean_load import assigning, check_loaded, empty_model

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


class OpenCLIPReward(RewardModel):
    """Shared machinery for open_clip-based scorers (CLIP score, HPSv2): load, preprocess, embed.

    ``model``: an open_clip model (``encode_image`` / ``encode_text``) to use instead of loading one;
    ``tokenizer``: the matching tokenizer (defaults to ``open_clip.get_tokenizer(model_name)``);
    ``image_size`` / ``mean`` / ``std``: override the model's preprocessing configuration.
    """

    what = "open_clip reward"

    def __init__(self, model_name: str = "ViT-H-14", *, model: torch.nn.Module | None = None,
                 tokenizer: Callable[[list[str]], torch.Tensor] | None = None, image_size: int | None = None,
                 mean: Sequence[float] | None = None, std: Sequence[float] | None = None, **kwargs):
        super().__init__(**kwargs)
        self.model_name = model_name
        self.model = model
        self.tokenizer = tokenizer
        self._image_size = image_size
        self._mean = tuple(mean) if mean is not None else None
        self._std = tuple(std) if std is not None else None

    # -- loading ---------------------------------------------------------------------------------
    def _build_model(self) -> torch.nn.Module:
        raise NotImplementedError

    def _load(self) -> None:
        import open_clip

        if self.model is None:
            self.model = self._build_model()
        if self.tokenizer is None:
            self.tokenizer = open_clip.get_tokenizer(self.model_name)
        self.model = self.model.to(device=self.device, dtype=self.dtype).eval()
        cfg = dict(getattr(self.model.visual, "preprocess_cfg", None) or {})
        size = self._image_size or cfg.get("size") or self.model.visual.image_size
        self.image_size = int(size[0] if isinstance(size, (tuple, list)) else size)
        self.mean = self._mean or tuple(cfg.get("mean", OPENAI_MEAN))
        self.std = self._std or tuple(cfg.get("std", OPENAI_STD))
        self.transform = open_clip.image_transform(
            self._image_size or cfg.get("size") or self.image_size, is_train=False, mean=self.mean, std=self.std,
            resize_mode=cfg.get("resize_mode"), interpolation=cfg.get("interpolation"),
            fill_color=cfg.get("fill_color", 0))

    # -- scoring -----------------------------------------------------------------------------------
    def preprocess(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels (n, 3, H, W) in [0, 1] -> the model's input, as open_clip's eval transform makes it."""
        return per_image(pixels, self.transform)

    def embed(self, pixels: torch.Tensor, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised float32 image and text embeddings, (n, d) each."""
        x = self.to_model(self.preprocess(pixels))
        tokens = self.tokenizer(prompts).to(self.device)
        img = self.model.encode_image(x).float()
        txt = self.model.encode_text(tokens).float()
        return F.normalize(img, dim=-1), F.normalize(txt, dim=-1)


class _DropRandomInitNotice(logging.Filter):
    # open_clip logs "initialized randomly" for a model built without weights; ours get theirs next.
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("No pretrained weights loaded")


def empty_open_clip(model_name: str, **create_kwargs) -> torch.nn.Module:
    """open_clip model ``model_name`` with parameters on the meta device (see ``rewards.lean_load``)."""
    import open_clip

    notice = _DropRandomInitNotice()
    logging.getLogger().addFilter(notice)
    try:
        with empty_model():
            # pretrained_text=False: a hub text tower would otherwise fetch its base weights.
            return open_clip.create_model(model_name, pretrained=None, device="meta", pretrained_text=False,
                                          **create_kwargs)
    finally:
        logging.getLogger().removeFilter(notice)


def load_open_clip(model_name: str, checkpoint: str, mean: Sequence[float] | None = None,
                   std: Sequence[float] | None = None) -> torch.nn.Module:
    """``open_clip.create_model(model_name, pretrained=checkpoint)`` (a local file, with ``mean`` / ``std``
    overriding the preprocessing) at about 1x the weights: open_clip's own checkpoint reading and
    key conversions, but assigning the tensors to an empty model instead of copying them."""
    import open_clip

    force = {k: tuple(v) for k, v in (("mean", mean), ("std", std)) if v is not None}
    model = empty_open_clip(model_name, force_preprocess_cfg=force)
    with assigning(model):
        open_clip.load_checkpoint(model, checkpoint, strict=True)
    check_loaded(model, "clipscore", checkpoint)
    return model


@register_reward("clipscore")
class CLIPScore(OpenCLIPReward):
    """CLIP score: ``scale * cos(E_img(x), E_txt(prompt))``.

    ``pretrained``: an open_clip pretrained tag for ``model_name``, an ``hf-hub:org/name`` id or a
    local checkpoint file; downloads go through the hub cache (HF_HOME, HF_HUB_OFFLINE).
    """

    what = "clipscore"

    def __init__(self, model_name: str = "ViT-H-14", pretrained: str = "laion2b_s32b_b79k", scale: float = 1.0,
                 **kwargs):
        super().__init__(model_name, **kwargs)
        self.pretrained = pretrained
        self.scale = float(scale)

    def _build_model(self) -> torch.nn.Module:
        import open_clip

        source, extra = self.pretrained, {}
        if not os.path.isfile(source) and not source.startswith("hf-hub:"):
            # Resolve a pretrained tag to a file first, so a missing download fails before a large
            # model is built, with the hub repo named.
            cfg = open_clip.get_pretrained_cfg(self.model_name, source)
            if not cfg:
                tags = open_clip.list_pretrained_tags_by_model(self.model_name)
                raise RewardError(
                    f"clipscore: pretrained={source!r} is neither an existing file nor a pretrained tag of "
                    f"{self.model_name!r} (tags: {tags}); pass a local checkpoint file or one of the tags"
                )
            try:
                source = open_clip.download_pretrained(cfg)
            except Exception as e:
                where = cfg.get("hf_hub") or cfg.get("url")
                raise RewardError(
                    f"clipscore: the weights of {self.model_name!r}/{source!r} (hub repo {where!r}, file "
                    f"open_clip_model.safetensors or open_clip_pytorch_model.bin) are not in the local cache and "
                    f"could not be downloaded ({type(e).__name__}). Download them where the hub is reachable "
                    f"(`hf download {str(where).rstrip('/')}`, cache under $HF_HOME) or pass pretrained= a local "
                    "checkpoint file"
                ) from None
            extra = {k: cfg[k] for k in ("mean", "std") if k in cfg}
        try:
            if os.path.isfile(source):
                return load_open_clip(self.model_name, source, mean=extra.get("mean"), std=extra.get("std"))
            model, _, _ = open_clip.create_model_and_transforms(
                self.model_name, pretrained=source, image_mean=extra.get("mean"), image_std=extra.get("std"))
        except RewardError:
            raise
        except Exception as e:  # open_clip raises RuntimeError/OSError/hub errors alike
            raise RewardError(
                f"clipscore: could not load open_clip model {self.model_name!r} with pretrained="
                f"{self.pretrained!r} ({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}). "
                "Pass pretrained= a local checkpoint file for this model, or a pretrained tag whose weights "
                "are in the hub cache under $HF_HOME"
            ) from None
        return model

    def _score(self, pixels: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        img, txt = self.embed(pixels, prompts)
        return self.scale * (img * txt).sum(-1)
