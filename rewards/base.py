"""The reward contract and registry.

A reward model maps a batch of images and their prompts to one float score per image:
``scores = reward(images, prompts)``. Images are PIL images or float tensors in [0, 1]
((N, 3, H, W) or a list of (3, H, W)). Scores come back as a float32 CPU tensor of shape (N,).
Heavy models load lazily on first call, on the device and dtype given at construction, and
score in internal batches of ``batch_size``. Names map to classes in an explicit registry:
``rewards.load("hpsv2", **options)``. :func:`load` is the one way a reward is built from a string,
``name[:key=value...]`` or ``package.module:Name[:key=value...]``, the same on every command line
and in YAML.

Also here: preprocessing shared by the scorers (8-bit images through the official transforms:
``to_pil_images``, ``per_image``, ``clip_eval_transform``; ``normalize``) and weight resolution
(``resolve_file``, ``hub_error``) that turns every missing-file case into one :class:`RewardError`
naming the file and what to do.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Sequence
from typing import ClassVar

import numpy as np
import torch
from PIL import Image

_REWARDS: dict[str, type[RewardModel]] = {}

ImageBatch = torch.Tensor | Sequence[Image.Image] | Sequence[torch.Tensor]


class RewardError(ValueError):
    """A user-facing problem with a reward: bad input, missing weights, NaN score."""


def register_reward(name: str):
    def deco(cls: type[RewardModel]) -> type[RewardModel]:
        if name in _REWARDS and _REWARDS[name] is not cls:
            raise RewardError(f"reward name {name!r} is registered twice")
        cls.name = name
        _REWARDS[name] = cls
        return cls

    return deco


def registered_rewards() -> dict[str, type[RewardModel]]:
    return dict(_REWARDS)


def parse_reward_spec(spec: str) -> tuple[str, dict]:
    """``name[:key=value...]`` or ``package.module:Name[:key=value...]`` -> (name or import path, options).

    Values read as int / float / bool when they look so; a value may be a URL with a port
    (``vlm_judge:url=http://127.0.0.1:8000/v1``). A first word after an unregistered name is the
    import path's attribute."""
    from tpm.loading import LoadError, parse_spec

    try:
        name, words, options = parse_spec(spec)
    except LoadError as e:
        raise RewardError(str(e)) from None
    if name not in _REWARDS and (str(spec).startswith(f"{name}::") or str(spec) == f"{name}:"):
        raise RewardError(f"reward import path {spec!r} must read package.module:Name")
    if words and name not in _REWARDS:  # an import path, package.module:Name
        name, words = f"{name}:{words[0]}", words[1:]
    if words:
        raise RewardError(f"reward option {words[0]!r} in {spec!r} must be key=value")
    return name, options


def load(spec: str, **options) -> RewardModel:
    """Build a reward from its spec (:func:`parse_reward_spec`; nothing is loaded yet): a registered name,
    or an import path ``package.module:Name`` (:func:`load_by_path`), with the spec's options and
    ``options`` on top."""
    name, named = parse_reward_spec(spec)
    options = {**named, **options}
    if ":" in name:
        return load_by_path(name, **options)
    if name not in _REWARDS:
        raise RewardError(f"unknown reward {name!r}; known rewards: {sorted(_REWARDS)}, or an import path "
                          "package.module:Name")
    return _REWARDS[name](**options)


def load_by_path(path: str, **options) -> RewardModel:
    """A reward defined outside this package, named ``package.module:Name`` (``Name`` may be dotted).

    ``Name`` is a :class:`RewardModel` subclass (built with ``options``), an instance of one, a function
    ``(images, prompts, **options) -> scores`` that takes pixels (N, 3, H, W) in [0, 1], or a reward
    function written for trl's ``GRPOTrainer``, ``f(prompts, completions, **kwargs) -> list[float]``
    (told apart by its first two parameter names), whose completions are the images as PIL images.
    """
    import importlib
    import inspect

    module, _, attr = path.partition(":")
    if not module or not attr:
        raise RewardError(f"reward import path {path!r} must read package.module:Name")
    try:
        obj = importlib.import_module(module)
    except ImportError as e:
        raise RewardError(f"reward {path!r}: cannot import module {module!r} ({e}); install it or put its folder "
                          "on PYTHONPATH") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise RewardError(f"reward {path!r}: module {module!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if inspect.isclass(obj) and issubclass(obj, RewardModel):
        try:
            reward = obj(**options)
        except TypeError as e:
            raise RewardError(f"reward {path!r}: bad options {sorted(options)} ({e})") from None
    elif isinstance(obj, RewardModel):
        if options:
            raise RewardError(f"reward {path!r} is an instance, it takes no options (got {sorted(options)})")
        reward = obj
    elif inspect.isfunction(obj) or (callable(obj) and not inspect.isclass(obj) and not inspect.ismodule(obj)):
        reward = (TrlFunctionReward if TrlFunctionReward.accepts(obj) else FunctionReward)(obj, **options)
    else:
        raise RewardError(f"reward {path!r} is a {type(obj).__name__}, not a reward: give a rewards.RewardModel "
                          "subclass or instance, or a function (images, prompts) -> scores")
    if not reward.name:
        reward.name = path
    return reward


def to_pixels(images: ImageBatch) -> torch.Tensor:
    """Images -> float32 tensor (N, 3, H, W) in [0, 1]. All images must share one size."""
    if isinstance(images, torch.Tensor):
        t = images
        if t.ndim == 3:
            t = t[None]
        if t.ndim != 4 or t.shape[1] != 3:
            raise RewardError(f"image tensor must be (N, 3, H, W), got {tuple(images.shape)}")
        return t.detach().float().cpu().clamp(0, 1)
    out = []
    for i, im in enumerate(images):
        if isinstance(im, Image.Image):
            arr = np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0
            out.append(torch.from_numpy(arr).permute(2, 0, 1))
        elif isinstance(im, torch.Tensor) and im.ndim == 3 and im.shape[0] == 3:
            out.append(im.detach().float().cpu().clamp(0, 1))
        else:
            raise RewardError(f"image {i} is {type(im).__name__}; expected a PIL image or a (3, H, W) tensor")
    if not out:
        return torch.zeros(0, 3, 1, 1)
    sizes = {tuple(t.shape) for t in out}
    if len(sizes) > 1:
        raise RewardError(f"images have different sizes {sorted(sizes)}; resize them to one size first")
    return torch.stack(out)


class RewardModel(abc.ABC):
    """Base class: subclasses implement :meth:`_load` and :meth:`_score`."""

    name: ClassVar[str] = ""
    # Scores are higher-is-better for every registered reward.

    def __init__(self, device: str | torch.device = "cpu", dtype: torch.dtype | str = torch.float32,
                 batch_size: int = 16):
        self.device = torch.device(device)
        self.dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
        if batch_size < 1:
            raise RewardError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size = batch_size
        self._loaded = False

    def check(self) -> None:
        """A cheap check, at the start of a training run and before its model loads, that this reward can
        score (a remote reward's server answers); raises :class:`RewardError` saying what to do. Loads
        nothing heavy: the default does nothing."""
        return None

    def _ensure_loaded(self) -> None:
        if not self._loaded:
            self._load()
            self._loaded = True

    @abc.abstractmethod
    def _load(self) -> None:
        """Load weights (once). Raise :class:`RewardError` naming the file if it is missing."""

    @abc.abstractmethod
    def _score(self, pixels: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """Score one internal batch: pixels (n, 3, H, W) float32 in [0, 1] on CPU -> (n,)."""

    @torch.no_grad()
    def __call__(self, images: ImageBatch, prompts: Sequence[str] | str) -> torch.Tensor:
        scores = self.raw_scores(images, prompts)
        check_finite(scores, self.name)
        return scores

    @torch.no_grad()
    def raw_scores(self, images: ImageBatch, prompts: Sequence[str] | str) -> torch.Tensor:
        """Like calling the reward, but non-finite scores are returned instead of raising.

        The remote server uses this so that the client, which sees the whole batch, reports a NaN
        with its index in the caller's batch rather than in one of the server's chunks.
        """
        if isinstance(prompts, str):
            prompts = [prompts]
        prompts = list(prompts)
        pixels = to_pixels(images)
        if pixels.shape[0] != len(prompts):
            raise RewardError(
                f"{self.name}: got {pixels.shape[0]} images but {len(prompts)} prompts; "
                "pass one prompt per image"
            )
        if not prompts:
            return torch.zeros(0)
        self._ensure_loaded()
        scores = []
        for s in range(0, len(prompts), self.batch_size):
            out = self._score(pixels[s:s + self.batch_size], prompts[s:s + self.batch_size])
            out = out.detach().float().cpu().reshape(-1)
            if out.numel() != len(prompts[s:s + self.batch_size]):
                raise RewardError(
                    f"reward {self.name!r} returned {out.numel()} scores for a batch of "
                    f"{len(prompts[s:s + self.batch_size])} images; its _score must return one per image"
                )
            scores.append(out)
        return torch.cat(scores)

    def to_model(self, x: torch.Tensor) -> torch.Tensor:
        """Move a float input to the reward's device and dtype."""
        return x.to(device=self.device, dtype=self.dtype)


class FunctionReward(RewardModel):
    """A plain function ``fn(pixels, prompts, **options) -> scores`` behind the reward contract."""

    def __init__(self, fn, device: str | torch.device = "cpu", batch_size: int = 16, **options):
        super().__init__(device=device, batch_size=batch_size)
        self.fn = fn
        self.options = options
        self.name = f"{getattr(fn, '__module__', '?')}:{getattr(fn, '__qualname__', type(fn).__name__)}"

    def _load(self) -> None:
        pass

    def _score(self, pixels: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        out = self.fn(pixels, prompts, **self.options)
        try:
            return torch.as_tensor(out, dtype=torch.float32)
        except (TypeError, ValueError, RuntimeError):
            raise RewardError(f"reward {self.name!r} returned {type(out).__name__}, not one score per image") from None


class TrlFunctionReward(FunctionReward):
    """A reward function written for trl's ``GRPOTrainer``: ``fn(prompts, completions, **kwargs) -> list[float]``,
    called with the images as PIL images (8-bit) for completions and ``options`` as keyword arguments."""

    TRL_PARAMETERS = ("prompts", "completions")

    @classmethod
    def accepts(cls, fn) -> bool:
        import inspect

        try:
            params = list(inspect.signature(fn).parameters)
        except (TypeError, ValueError):  # builtins without a signature: not written for trl
            return False
        return tuple(params[:2]) == cls.TRL_PARAMETERS

    def _score(self, pixels: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        out = self.fn(prompts=list(prompts), completions=to_pil_images(pixels), **self.options)
        try:  # trl's None (no score for this sample) becomes NaN: the trainer skips such a batch
            return torch.tensor([math.nan if s is None else float(s) for s in out], dtype=torch.float32)
        except (TypeError, ValueError):
            raise RewardError(f"reward {self.name!r} returned {type(out).__name__}, not a list of floats") from None


def check_finite(scores: torch.Tensor, name: str) -> None:
    bad = (~torch.isfinite(scores)).nonzero().flatten().tolist()
    if bad:
        raise RewardError(
            f"reward {name!r} returned non-finite scores for images {bad} "
            f"(values {[float(scores[i]) for i in bad][:8]}); check those images and prompts"
        )



# ---------------------------------------------------------------------------------------------
# Shared helpers for scorers: the official preprocessing on 8-bit images, and weight resolution
# with one clear error when a file is missing.
#
# Every official scorer takes PIL images, i.e. 8-bit pixels, and resamples them with PIL (open_clip,
# ImageReward), with torchvision on uint8 tensors (transformers' CLIP processor) or on the 8-bit
# image converted to float (HPSv2). PIL's bicubic (a = -0.5, 8-bit intermediate rounding between its
# two passes) differs from torch's float bicubic by up to 30/255 on upsampling, so no float kernel
# reproduces it; we round to 8 bits once and then run the official transform itself on each image,
# which makes every scorer's input tensor the official one for the same 8-bit image (tests check this
# at 1e-5) and keeps a batch scored exactly as its images one by one.


def to_uint8(pixels: torch.Tensor) -> torch.Tensor:
    """Float pixels in [0, 1] -> uint8 in [0, 255], rounded as ``PIL.Image.fromarray`` input would be."""
    return (pixels.clamp(0, 1) * 255).round().to(torch.uint8)


def to_pil_images(pixels: torch.Tensor) -> list[Image.Image]:
    """(N, 3, H, W) float pixels in [0, 1] -> N RGB PIL images (8-bit)."""
    arr = to_uint8(pixels.cpu()).permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(np.ascontiguousarray(a)) for a in arr]


def per_image(pixels: torch.Tensor, transform) -> torch.Tensor:
    """Apply a PIL-image transform (an official preprocessing callable) to each image and stack."""
    return torch.stack([transform(im) for im in to_pil_images(pixels)])


def clip_eval_transform(size: int, mean: Sequence[float], std: Sequence[float]):
    """The CLIP eval transform on PIL images: bicubic resize of the short side to ``size``, central
    ``size`` square, to tensor, per-channel normalisation (OpenAI CLIP's and ImageReward's definition)."""
    from torchvision import transforms as T

    return T.Compose([
        T.Resize(size, interpolation=T.InterpolationMode.BICUBIC),
        T.CenterCrop(size),
        T.ToTensor(),
        T.Normalize(mean, std),
    ])


def normalize(pixels: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Per-channel ``(x - mean) / std`` for (N, 3, H, W)."""
    m = torch.as_tensor(mean, dtype=pixels.dtype, device=pixels.device).view(1, -1, 1, 1)
    s = torch.as_tensor(std, dtype=pixels.dtype, device=pixels.device).view(1, -1, 1, 1)
    return (pixels - m) / s


def resolve_file(source: str, filename: str, what: str, option: str) -> str:
    """Find ``filename`` for reward ``what``: a file path, a folder holding it, or a hub repo id.

    Hub downloads go through ``huggingface_hub.hf_hub_download`` and so honour HF_HOME,
    HF_HUB_CACHE and HF_HUB_OFFLINE. Any failure becomes one :class:`RewardError` naming the file,
    the repo and the option that takes a local path.
    """
    import os

    if os.path.isfile(source):
        return source
    if os.path.isdir(source):
        path = os.path.join(source, filename)
        if os.path.isfile(path):
            return path
        raise RewardError(
            f"{what}: {filename!r} is not in folder {source!r}; put the file there or pass its path as "
            f"{option}=/path/to/{filename}"
        )
    looks_like_path = source.startswith((".", "/", "~")) or source.endswith((".pt", ".pth", ".bin", ".safetensors"))
    if looks_like_path or source.count("/") != 1:
        raise RewardError(
            f"{what}: weights file {source!r} does not exist; pass {option}= a local path to {filename} "
            "or a hub repo id that holds it"
        )
    try:
        from huggingface_hub import hf_hub_download

        return hf_hub_download(source, filename)
    except Exception as e:  # every hub failure (offline, missing repo/file, network) means the same to the user
        raise RewardError(
            f"{what}: could not find {filename!r} of hub repo {source!r} in the local cache and could not "
            f"download it ({type(e).__name__}). Download it where the hub is reachable "
            f"(`hf download {source} {filename}`, cache under $HF_HOME) or pass the local file as "
            f"{option}=/path/to/{filename}"
        ) from None


def hub_error(what: str, source: str, option: str, err: Exception) -> RewardError:
    """The one error for a model that ``from_pretrained`` could not find (local folder or hub id)."""
    return RewardError(
        f"{what}: could not load {source!r} ({type(err).__name__}: {str(err).splitlines()[0][:200]}). "
        f"Pass {option}= a local folder saved with save_pretrained, or download the hub id where the hub is "
        f"reachable (`hf download {source}`, cache under $HF_HOME); HF_HUB_OFFLINE=1 uses the cache only"
    )
