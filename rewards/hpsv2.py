"""HPSv2 / HPSv2.1 (human preference score) on the real open_clip package.

HPSv2 is a fine-tune of open_clip's ViT-H-14; its score is the cosine between the normalised image
and prompt embeddings (what ``hpsv2.score`` returns as the diagonal of ``image @ text.T``).

Why not call the ``hpsv2`` package (installable as ``hpsv2x``, the ``hpsv2`` extra): ``hpsv2.score``
builds the model with hub-downloaded laion weights before loading the HPS checkpoint, re-reads the
checkpoint on every call and scores one image with one prompt at a time; and its 1.2.0 release under
the ``hpsv2`` name cannot be imported (its open_clip fork lacks the BPE vocabulary). The fork's model is
architecturally open_clip's ViT-H-14, so we build that with the real open_clip once, load the
official checkpoint (``HPS_v2_compressed.pt`` / ``HPS_v2.1_compressed.pt`` from hub repo
``xswu/HPSv2``, weights under key ``state_dict``) with ``torch.load(weights_only=True)`` and score
in batches; tests check scores against ``hpsv2``'s own scoring code on a checkpoint in this format.

Preprocessing is the package's eval transform (``image_transform(..., resize_longest_max=True)``):
the 8-bit image to float, torchvision bicubic antialiased resize of the longer side to 224 (on the
float tensor, unclamped, as the package does), zero padding to a centred square, CLIP normalisation.
We do the same steps on the batch tensor (same kernels, so a batch equals its images one by one).
"""

from __future__ import annotations

import torch

from rewards.base import RewardError, normalize, register_reward, resolve_file, to_uint8
from rewards.clip_score import OPENAI_MEAN, OPENAI_STD, OpenCLIPReward, empty_open_clip
from rewards.lean_load import check_loaded

HPS_FILES = {"v2.0": "HPS_v2_compressed.pt", "v2.1": "HPS_v2.1_compressed.pt"}
HPS_REPO = "xswu/HPSv2"


def resize_longest_pad(pixels: torch.Tensor, size: int, fill: float = 0.0) -> torch.Tensor:
    """Resize so the longer side is ``size`` (bicubic, antialiased), then pad to a centred square.

    The HPSv2 package's ``ResizeMaxSize``: new sides ``round(side * size / longest)``, padding
    ``pad // 2`` before and the rest after, no clamping of the bicubic overshoot. (The package skips the
    padding when the longer side already equals ``size``, which leaves a non-square input its ViT
    rejects; we pad then too.)
    """
    from torchvision.transforms.v2 import functional as TF

    h, w = pixels.shape[-2:]
    scale = size / max(h, w)
    nh, nw = h, w
    if scale != 1.0:
        nh, nw = round(h * scale), round(w * scale)
        pixels = TF.resize(pixels, [nh, nw], interpolation=TF.InterpolationMode.BICUBIC, antialias=True)
    ph, pw = size - nh, size - nw
    if ph or pw:
        pixels = torch.nn.functional.pad(pixels, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2), value=fill)
    return pixels


@register_reward("hpsv2")
class HPSv2(OpenCLIPReward):
    """HPSv2 score ``cos(E_img(x), E_txt(prompt))`` with the HPS fine-tuned ViT-H-14.

    ``hps_version``: "v2.0" or "v2.1"; ``checkpoint``: a local ``.pt`` file, a folder holding it, or a
    hub repo id (default ``xswu/HPSv2``). ``model=`` injects an open_clip model (tests).
    """

    what = "hpsv2"

    def __init__(self, hps_version: str = "v2.1", checkpoint: str = HPS_REPO, model_name: str = "ViT-H-14",
                 **kwargs):
        if hps_version not in HPS_FILES:
            raise RewardError(f"hpsv2: hps_version must be one of {sorted(HPS_FILES)}, got {hps_version!r}")
        super().__init__(model_name, **kwargs)
        self.hps_version = hps_version
        self.checkpoint = checkpoint

    def _build_model(self) -> torch.nn.Module:
        filename = HPS_FILES[self.hps_version]
        path = resolve_file(self.checkpoint, filename, "hpsv2", "checkpoint")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise RewardError(f"hpsv2: could not read checkpoint {path!r} ({type(e).__name__}: {e}); "
                              f"download {filename} again from hub repo {HPS_REPO}") from None
        state = state.get("state_dict", state) if isinstance(state, dict) else state
        # The fork saved weights of a DataParallel model in some releases.
        state = {k.removeprefix("module."): v for k, v in state.items()}
        model = empty_open_clip(self.model_name)  # no random weights: the checkpoint's tensors become the model's
        try:
            missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
        except RuntimeError as e:  # shape mismatches
            raise RewardError(f"hpsv2: checkpoint {path!r} does not fit open_clip {self.model_name!r}: "
                              f"{str(e)[:300]}; is it an HPSv2 checkpoint?") from None
        if missing or unexpected:
            raise RewardError(
                f"hpsv2: checkpoint {path!r} does not fit open_clip {self.model_name!r}: missing "
                f"{list(missing)[:5]}, unexpected {list(unexpected)[:5]}; is it an HPSv2 checkpoint?"
            )
        check_loaded(model, "hpsv2", path)
        return model

    def preprocess(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels (n, 3, H, W) in [0, 1] -> the model's input, as the hpsv2 package's eval transform makes it
        from the 8-bit image (its mean/std are OpenAI CLIP's unless overridden)."""
        x = to_uint8(pixels).float() / 255
        return normalize(resize_longest_pad(x, self.image_size), self._mean or OPENAI_MEAN, self._std or OPENAI_STD)

    def _score(self, pixels: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        img, txt = self.embed(pixels, prompts)
        return (img * txt).sum(-1)
