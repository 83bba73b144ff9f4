"""What every backbone adapter offers the sampler.

An adapter wraps an ordinary diffusers pipeline and reuses its parts: the pipeline's own
``encode_prompt``, ``prepare_latents``, scheduler set-up and VAE decode, and the transformer's
own submodules for a forward pass that takes a per-token time field. Nothing is copied, so LoRA
adapters, attention processors and offloading hooks keep working.

Layouts: "native" latents are what the pipeline's denoising loop holds (Flux: packed tokens
(B, N, 4C); SD3: (B, C, H/8, W/8)); "VAE latents" are what the VAE gives, (B, C, H/8, W/8),
normalised by the VAE's scaling and shift; "tokens" are (B, N, C_tok) in row-major grid order.
Fields are (B, h, w) on the token grid; ``tau`` is in [0, 1], 1 = noise.

Everything pipeline-specific lives in the adapters: which pipeline class they take
(:meth:`Backbone.accepts`), the widths a policy network needs (``token_dim``, ``text_dim``,
``pooled_dim``), how latents are packed and images encoded / decoded, and how a CFG strength is
passed to the pipeline (:meth:`Backbone.sample_kwargs`).
"""

from __future__ import annotations

import abc
import inspect
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch


class BackboneError(ValueError):
    """A user-facing problem with a pipeline or its arguments."""


@dataclass
class Conditioning:
    """Prompt embeddings and guidance settings for one batch (built by :meth:`Backbone.encode`)."""

    prompts: list[str]
    embeds: torch.Tensor
    pooled: torch.Tensor
    guidance_scale: float
    do_cfg: bool
    negative_embeds: torch.Tensor | None = None
    negative_pooled: torch.Tensor | None = None
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def batch_size(self) -> int:
        return self.embeds.shape[0]


@dataclass
class Prediction:
    velocity: torch.Tensor  # native layout, guided
    attention: torch.Tensor | None = None  # (B, n_text, h, w) text->image maps of the conditional branch


class Backbone(abc.ABC):
    """Adapter base class; one subclass per pipeline family."""

    #: name of the diffusers pipeline class this adapter accepts (subclasses of it too)
    pipeline_class_name: ClassVar[str] = ""
    #: True when the model itself is a flow-matching model (its time is tpm's ``tau``); False for
    #: discrete-time models seen through a map to ``tau`` (the UNet adapters)
    native_flow: ClassVar[bool] = True
    #: whether :meth:`update` is the per-token Euler step (False for per-pixel DDPM)
    euler_update: bool = True

    def __init__(self, pipe, time_resolution: float | None = None, time_levels: int | None = None):
        self.pipe = pipe
        self.transformer = pipe.transformer
        # Bounds on the distinct conditioning times per call (tpm.backbones.modulation).
        self.time_resolution = time_resolution
        self.time_levels = time_levels

    @classmethod
    def pipeline_class(cls) -> type:
        """The diffusers pipeline class (imported on use: ``import tpm`` stays light)."""
        import diffusers

        return getattr(diffusers, cls.pipeline_class_name)

    @classmethod
    def accepts(cls, pipe) -> bool:
        """Whether ``pipe`` is a pipeline this adapter wraps."""
        return isinstance(pipe, cls.pipeline_class())

    # ---- defaults -------------------------------------------------------------------------
    def call_default(self, name: str):
        """The default of ``pipe.__call__``'s argument ``name``, or the pipeline's ``tpm_defaults``.

        Pipelines built for the testbed carry a ``tpm_defaults`` dict (e.g. a short
        ``max_sequence_length``) because diffusers pipelines cannot store call defaults.
        """
        extra = getattr(self.pipe, "tpm_defaults", None) or {}
        if name in extra:
            return extra[name]
        param = inspect.signature(self.pipe.__call__).parameters.get(name)
        return None if param is None else param.default

    def default_guidance_scale(self) -> float:
        """The CFG strength a call without one uses: ``tpm_defaults["guidance_scale"]``, else the
        default of the pipeline argument that carries CFG (see :meth:`sample_kwargs`)."""
        extra = getattr(self.pipe, "tpm_defaults", None) or {}
        if "guidance_scale" in extra:
            return float(extra["guidance_scale"])
        return float(self.call_default(self._cfg_argument()))

    def _cfg_argument(self) -> str:
        """The ``pipe(...)`` argument that carries the CFG strength."""
        return "guidance_scale"

    def sample_kwargs(self, scale: float | None = None) -> dict[str, Any]:
        """Keyword arguments for ``tpm.sample`` (and ``pipe(...)``) that apply CFG strength ``scale``
        the way this pipeline takes it; ``None`` = :meth:`default_guidance_scale`.

        The one place that knows how CFG is passed: SD3 takes ``guidance_scale`` (true CFG
        against its negative prompt); Flux takes ``guidance_scale`` into its guidance embedding
        when the transformer has one (FLUX.1-dev), otherwise true CFG as ``true_cfg_scale`` with
        an empty negative prompt (the testbed models).
        """
        return {"guidance_scale": self.default_guidance_scale() if scale is None else float(scale)}

    def evaluations_per_call(self, cond: Conditioning) -> int:
        """Denoiser evaluations per image in one :meth:`predict` (CFG adds the negative branch)."""
        return 2 if cond.do_cfg else 1

    @property
    def device(self) -> torch.device:
        return self.pipe._execution_device

    @property
    def dtype(self) -> torch.dtype:
        return self.transformer.dtype

    # ---- geometry -------------------------------------------------------------------------
    @property
    @abc.abstractmethod
    def token_size(self) -> int:
        """Image pixels per token side (VAE factor x patch size)."""

    def resolve_size(self, height: int | None, width: int | None) -> tuple[int, int]:
        h = height or self.call_default("height") or self.default_size()
        w = width or self.call_default("width") or self.default_size()
        ts = self.token_size
        if h % ts or w % ts:
            raise BackboneError(
                f"height and width must be divisible by {ts} for {type(self.pipe).__name__} "
                f"(VAE factor x patch size); got {h}x{w}"
            )
        return h, w

    @abc.abstractmethod
    def default_size(self) -> int: ...

    def grid(self, height: int, width: int) -> tuple[int, int]:
        return height // self.token_size, width // self.token_size

    @abc.abstractmethod
    def to_tokens(self, latents: torch.Tensor) -> torch.Tensor:
        """Native latents -> (B, N, C_tok), tokens in row-major grid order."""

    @abc.abstractmethod
    def from_tokens(self, tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """Inverse of :meth:`to_tokens`."""

    @abc.abstractmethod
    def expand_field(self, field: torch.Tensor) -> torch.Tensor:
        """(B, h, w) field -> a tensor that broadcasts against native latents."""

    # ---- widths (what a policy network built for this backbone needs) ----------------------
    @property
    @abc.abstractmethod
    def token_dim(self) -> int:
        """C_tok: channels per latent token (the last dimension of :meth:`to_tokens`)."""

    @property
    def text_dim(self) -> int:
        """Width of the prompt embeddings the transformer takes (``Conditioning.embeds``)."""
        return int(self.transformer.config.joint_attention_dim)

    @property
    def pooled_dim(self) -> int:
        """Width of the pooled prompt embedding (``Conditioning.pooled``)."""
        return int(self.transformer.config.pooled_projection_dim)

    # ---- pixels <-> latents ---------------------------------------------------------------
    def pack_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """VAE latents (B, C, H/f, W/f) -> native latents (identity unless the pipeline packs)."""
        return latents

    def unpack_latents(self, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """Inverse of :meth:`pack_latents` for images of ``height`` x ``width`` pixels."""
        return latents

    def _vae_normalisation(self) -> tuple[float, float]:
        """(scaling_factor, shift_factor) of the VAE: native = (z - shift) * scale."""
        cfg = self.pipe.vae.config
        return cfg.scaling_factor, getattr(cfg, "shift_factor", None) or 0.0

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) pixels in [-1, 1] -> native latents: the VAE posterior mean, normalised
        as the pipeline's decode expects in reverse, and packed."""
        vae = self.pipe.vae
        z = vae.encode(images.to(vae.device, vae.dtype)).latent_dist.mode()
        scale, shift = self._vae_normalisation()
        return self.pack_latents((z - shift) * scale)

    def decode_images(self, latents: torch.Tensor, height: int, width: int, output_type: str = "pil"):
        """Native latents -> images as the pipeline returns them (``output_type`` "pil", "np",
        "pt"; "latent" returns the latents unchanged)."""
        if output_type == "latent":
            return latents
        vae = self.pipe.vae
        scale, shift = self._vae_normalisation()
        lat = (self.unpack_latents(latents, height, width) / scale) + shift
        image = vae.decode(lat.to(vae.dtype), return_dict=False)[0]
        return self.pipe.image_processor.postprocess(image, output_type=output_type)

    # ---- pipeline steps -------------------------------------------------------------------
    @abc.abstractmethod
    def encode(self, prompts: list[str], guidance_scale: float, negative_prompt: list[str] | None = None,
               max_sequence_length: int | None = None, **kwargs) -> Conditioning: ...

    @abc.abstractmethod
    def prepare_latents(self, batch_size: int, height: int, width: int, generator=None,
                        latents: torch.Tensor | None = None) -> torch.Tensor: ...

    def set_timesteps(self, num_inference_steps: int, latents: torch.Tensor, sigmas=None):
        """Run the scheduler set-up the pipeline runs; return (sigmas (K+1,), timesteps (K,))."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        sched = self.pipe.scheduler
        if not isinstance(sched, FlowMatchEulerDiscreteScheduler):
            raise BackboneError(
                f"tpm samples with flow-matching Euler per token; the pipeline's scheduler is "
                f"{type(sched).__name__}. Use FlowMatchEulerDiscreteScheduler "
                "(`pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)`)"
            )
        if sched.config.get("stochastic_sampling", False):
            raise BackboneError("stochastic_sampling=True schedulers are not supported by tpm.sample")
        if num_inference_steps < 1:
            raise BackboneError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
        timesteps = self._set_timesteps(num_inference_steps, latents, sigmas)
        return sched.sigmas.to(torch.float32), timesteps

    def start(self, latents: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
        """The pipeline's initial latents -> the sampler's latents (identity for flow models)."""
        return latents

    def finish(self, latents: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
        """The sampler's final latents at field ``tau`` -> what the pipeline decodes (identity for flow models)."""
        return latents

    def update(self, latents: torch.Tensor, tau: torch.Tensor, tau_cond: torch.Tensor, action,
               v: torch.Tensor) -> torch.Tensor:
        """One step of every token from ``tau`` to ``action.tau_next``: ``x + step_scale * (tau_next -
        tau) * v``, in float32 and cast back like ``FlowMatchEulerDiscreteScheduler.step`` (so the
        synchronous run is bit-exact, in bf16 too). ``tau_cond`` is the time the model was told."""
        delta = action.tau_next - tau
        if action.step_scale is not None:
            scale = action.step_scale
            delta = delta * (scale.view(-1, 1, 1) if scale.ndim == 1 else scale)
        dt = self.expand_field(delta).to(torch.float32)
        # dt * v in v's dtype, as the scheduler's 0-dim dt * model_output is.
        return (latents.to(torch.float32) + dt.to(v.dtype) * v).to(v.dtype)

    @abc.abstractmethod
    def _set_timesteps(self, num_inference_steps: int, latents: torch.Tensor, sigmas) -> torch.Tensor: ...

    @abc.abstractmethod
    def predict(self, latents: torch.Tensor, tau: torch.Tensor, cond: Conditioning,
                attention_layers: list[int] | None = None,
                attention_tokens: list[list[int]] | None = None) -> Prediction:
        """Guided velocity at a per-token time field ``tau`` (B, h, w).

        ``attention_layers``: layers whose text->image maps are returned (averaged);
        ``attention_tokens``: per sample, the text positions whose maps are needed (``None``:
        all); a backbone may leave the others zero in ``Prediction.attention``.
        """

    @property
    @abc.abstractmethod
    def num_attention_layers(self) -> int:
        """How many joint-attention layers can be captured (indices 0..n-1)."""

    def default_attention_layers(self) -> list[int]:
        """Layers whose text->image maps AsynDM's masks average when the policy names none.

        For the joint-attention DiTs, the last layer: on the testbed Flux its Eq. 7 masks overlapped
        the rendered object boxes best (``benchmarks/attention_layers.py``, val prompts), and one
        layer costs least to capture.
        """
        return [self.num_attention_layers - 1]

    # ---- text ------------------------------------------------------------------------------
    @abc.abstractmethod
    def text_words(self, prompts: list[str], max_sequence_length: int) -> list[list[int]]:
        """For each prompt, the whitespace-word index of every text position of the joint
        sequence (-1 for special/padding tokens)."""


def cfg_mix(uncond: torch.Tensor, text: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance as every pipeline computes it: ``uncond + scale * (text - uncond)``."""
    return uncond + scale * (text - uncond)


def guided(out: torch.Tensor, maps: torch.Tensor | None, scale: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A doubled batch (unconditional half first, as the pipelines stack it) mixed by :func:`cfg_mix`,
    and the attention maps of the text half."""
    uncond, text = out.chunk(2)
    return cfg_mix(uncond, text, scale), (None if maps is None else maps.chunk(2)[1])


def word_index_of_tokens(tokenizer, prompt: str, length: int) -> list[int]:
    """Map each token position of ``tokenizer(prompt, padding="max_length")`` to a word index.

    Words are whitespace-separated and lower-cased; punctuation stuck to a word belongs to it.
    Fast tokenizers give character offsets; for slow ones we tokenize word by word and match.
    """
    words = prompt.split()
    starts, pos = [], 0
    for w in words:
        pos = prompt.index(w, pos)
        starts.append((pos, pos + len(w)))
        pos += len(w)
    result = [-1] * length
    try:
        enc = tokenizer(prompt, padding="max_length", max_length=length, truncation=True,
                        return_offsets_mapping=True)
        offsets = enc["offset_mapping"]
        ids = enc["input_ids"]
        special = set(getattr(tokenizer, "all_special_ids", []))
        for i, ((a, b), tid) in enumerate(zip(offsets, ids)):
            if i >= length or tid in special or b <= a:
                continue
            for wi, (ws, we) in enumerate(starts):
                if a < we and b > ws:
                    result[i] = wi
                    break
        return result
    except (NotImplementedError, TypeError, KeyError, ValueError):
        pass
    # Slow tokenizer: find each word's token ids as a subsequence of the prompt's ids.
    ids = tokenizer(prompt, padding="max_length", max_length=length, truncation=True)["input_ids"]
    cursor = 0
    for wi, w in enumerate(words):
        wid = tokenizer(w, add_special_tokens=False)["input_ids"]
        if not wid:
            continue
        for s in range(cursor, len(ids) - len(wid) + 1):
            if ids[s:s + len(wid)] == wid:
                for j in range(s, s + len(wid)):
                    result[j] = wi
                cursor = s + len(wid)
                break
    return result
