"""Tiny testbed backbones: ordinary diffusers ``FluxPipeline`` / ``StableDiffusion3Pipeline`` objects
assembled from config-built parts, and the loader of the shipped checkpoints.

Parts (all real library classes, only the sizes are small; built with the part builders of
:mod:`tpm.tiny`, which the random test pipelines use too):
- tokenizer: a word-level ``tokenizers`` model over the domain ``VOCAB`` plus ``<pad>``, ``<eos>``,
  ``<unk>``, wrapped in ``transformers.PreTrainedTokenizerFast``; ``<eos>`` is appended to every
  prompt so CLIP's pooled output (taken at the first ``<eos>``) sees the whole prompt.
- text encoders: ``CLIPTextModel`` / ``CLIPTextModelWithProjection`` and ``T5EncoderModel`` from
  config (no dropout), trained jointly with the transformer by ``recipes/train_testbed.py``.
- VAE: a small ``AutoencoderKL`` trained on rendered domain images (``tpm.testbed.train``).
- transformer: ``FluxTransformer2DModel`` / ``SD3Transformer2DModel`` with a few narrow layers.
- scheduler: ``FlowMatchEulerDiscreteScheduler`` with shift 1 (the images are tiny).

Pipelines cannot store call defaults (resolution, ``max_sequence_length``), so each checkpoint
folder also holds ``testbed.json`` (a :class:`TestbedModelConfig` and sampling defaults).
:func:`load_pipeline` and :func:`build_pipeline` return the testbed subclasses of
:mod:`tpm.testbed.pipelines` (``TestbedFluxPipeline`` is a ``FluxPipeline``), whose plain
``pipe(prompt)`` uses those defaults; they are also on ``pipe.tpm_defaults``, which ``tpm.sample``
and the backbone adapters read, and :func:`call_kwargs` returns them as ``pipe(...)`` keyword
arguments (what a plain diffusers pipeline loaded from the folder needs).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from tpm.backbones import BACKBONES as _ADAPTERS

__all__ = [
    "CHECKPOINT_DIR",
    "SHIPPED",
    "TestbedModelConfig",
    "build_pipeline",
    "build_tokenizer",
    "build_vae",
    "call_kwargs",
    "finish_testbed_pipeline",
    "load_pipeline",
    "save_pipeline",
]

CHECKPOINT_DIR = Path(__file__).parent / "checkpoints"
#: shipped checkpoint name -> what it is (recipe commands are in the README)
SHIPPED: dict[str, str] = {
    "flux": "FluxPipeline trained with synchronous (logit-normal) times",
    "sd3": "StableDiffusion3Pipeline trained with synchronous (logit-normal) times",
    "flux-asyncpatch": "FluxPipeline trained with the AsyncPatch controlled per-token sampler",
    "unet": "StableDiffusionPipeline (UNet, DDIM, v-prediction) trained by recipes/train_testbed_unet.py",
    "spatial": "FluxPipeline on the spatial testbed: 64 px, 64 tokens, up to four objects of two sizes on backgrounds "
               "with content; trained with synchronous and per-token (AsyncPatch controlled) times",
}
SPECIAL_TOKENS = ("<pad>", "<eos>", "<unk>")  # ids 0, 1, 2 (CLIP's legacy pooling path is id 2 == eos)
BACKBONES = tuple(_ADAPTERS)  # the pipeline families tpm.backbones supports


@dataclass
class TestbedModelConfig:
    """Sizes of one tiny testbed pipeline; saved in ``testbed.json`` beside the pipeline."""

    backbone: str = "flux"  # "flux" (FluxPipeline) or "sd3" (StableDiffusion3Pipeline)
    domain: str = "shapes"  # the scenes it was trained on: "shapes" (plain, <= 5 shapes) or "spatial"
    resolution: int = 32  # image side in pixels that training and default sampling use
    vae_channels: tuple[int, ...] = (16, 32, 32)  # AutoencoderKL block widths; 2**(len-1) is the VAE factor
    latent_channels: int = 8  # VAE latent channels (Flux packs 2x2 of them into one token)
    text_dim: int = 32  # CLIP hidden size (and projection size for SD3's two CLIPs)
    t5_dim: int = 64  # T5 d_model; must be >= 2 * text_dim for SD3 (its CLIP embeds are padded to it)
    text_layers: int = 2  # layers of every text encoder
    max_sequence_length: int = 10  # tokens per prompt for every tokenizer (prompts are short)
    num_heads: int = 4  # transformer attention heads
    head_dim: int = 32  # transformer head dim; Flux rotary axes split it as (d/4, 3d/8, 3d/8)
    num_layers: int = 2  # Flux double-stream blocks / SD3 joint blocks
    num_single_layers: int = 2  # Flux single-stream blocks (ignored for SD3)
    num_inference_steps: int = 20  # default sampling steps
    guidance_scale: float = 1.0  # default CFG scale (SD3 guidance_scale, Flux true_cfg_scale)
    extra: dict[str, Any] = field(default_factory=dict)  # provenance (training command, times)

    def __post_init__(self):
        if self.backbone not in BACKBONES:
            raise ValueError(f"backbone must be one of {BACKBONES}, got {self.backbone!r}")
        self.vae_channels = tuple(self.vae_channels)
        if self.resolution % self.token_size:
            raise ValueError(
                f"resolution {self.resolution} must be divisible by the token size {self.token_size} "
                "(VAE factor x 2); change resolution or vae_channels"
            )
        if self.backbone == "sd3" and self.t5_dim < 2 * self.text_dim:
            raise ValueError("sd3 needs t5_dim >= 2 * text_dim (CLIP embeddings are padded to T5 width)")
        if self.head_dim % 16:
            raise ValueError("head_dim must be a multiple of 16 (Flux splits it into even rotary axes d/4, 3d/8, 3d/8)")

    @property
    def vae_factor(self) -> int:
        return 2 ** (len(self.vae_channels) - 1)

    @property
    def token_size(self) -> int:
        return self.vae_factor * 2

    @property
    def defaults(self) -> dict[str, Any]:
        """``pipe.tpm_defaults``: call defaults a diffusers pipeline cannot store."""
        from tpm.testbed.pipelines import call_defaults

        return call_defaults(asdict(self))

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> TestbedModelConfig:
        data = json.loads(text)
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def _vocab() -> list[str]:
    from tpm.testbed.grammar import VOCAB  # the domain module owns the grammar

    return list(VOCAB)


def build_tokenizer(vocab: list[str] | None = None, max_length: int = 16):
    """Word-level fast tokenizer over ``vocab`` (default: the domain VOCAB); appends ``<eos>``."""
    from tpm.tiny import word_tokenizer

    return word_tokenizer(vocab if vocab is not None else _vocab(), max_length, specials=SPECIAL_TOKENS,
                          eos_token="<eos>", bos_token=None, sort_words=False, split_punctuation=False,
                          pair_template=True)


def _clip(cfg: TestbedModelConfig, vocab_size: int, projection: bool):
    from tpm.tiny import clip_text_encoder

    return clip_text_encoder(vocab_size, cfg.text_dim, layers=cfg.text_layers, heads=4,
                             max_length=cfg.max_sequence_length, projection=projection, pad_token_id=0,
                             bos_token_id=1, eos_token_id=1, attention_dropout=0.0, dropout=0.0)


def _t5(cfg: TestbedModelConfig, vocab_size: int):
    from tpm.tiny import t5_encoder

    return t5_encoder(vocab_size, cfg.t5_dim, d_kv=cfg.t5_dim // 4, layers=cfg.text_layers, heads=4, eos_token_id=1,
                      relative_attention_num_buckets=8, relative_attention_max_distance=cfg.max_sequence_length)


def build_vae(cfg: TestbedModelConfig):
    """A small ``AutoencoderKL`` (untrained; ``tpm.testbed.train.train_vae`` fits it)."""
    from tpm.tiny import autoencoder

    return autoencoder(cfg.vae_channels, cfg.latent_channels, sample_size=cfg.resolution,
                       norm_groups=min(8, cfg.vae_channels[0]), scaling_factor=1.0, shift_factor=0.0,
                       mid_block_add_attention=False)


def _transformer(cfg: TestbedModelConfig):
    from tpm.tiny import flux_transformer, sd3_transformer

    if cfg.backbone == "flux":
        d = cfg.head_dim
        return flux_transformer(latent_channels=cfg.latent_channels, layers=cfg.num_layers,
                                single_layers=cfg.num_single_layers, heads=cfg.num_heads, head_dim=d,
                                text_dim=cfg.t5_dim, pooled_dim=cfg.text_dim, rope_axes=(d // 4, 3 * d // 8, 3 * d // 8))
    latent = cfg.resolution // cfg.vae_factor
    return sd3_transformer(sample_size=latent, latent_channels=cfg.latent_channels, layers=cfg.num_layers,
                           heads=cfg.num_heads, head_dim=cfg.head_dim, text_dim=cfg.t5_dim, pooled_dim=2 * cfg.text_dim,
                           pos_embed_max_size=latent // 2)


def build_pipeline(cfg: TestbedModelConfig, *, vae=None, vocab: list[str] | None = None, seed: int = 0):
    """Assemble an untrained testbed pipeline of ``cfg.backbone``; every part in eval mode.

    ``vae``: a trained ``AutoencoderKL`` to reuse (its factor must match ``cfg.vae_channels``).
    """
    from diffusers import FlowMatchEulerDiscreteScheduler

    from tpm.tiny import assemble_pipeline

    torch.manual_seed(seed)
    tok = build_tokenizer(vocab, cfg.max_sequence_length)
    n_vocab = len(tok)
    vae = vae if vae is not None else build_vae(cfg)
    if 2 ** (len(vae.config.block_out_channels) - 1) != cfg.vae_factor:
        raise ValueError("the given VAE's downsampling factor does not match cfg.vae_channels")
    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False)
    # Built in this order (one seed for all): the text encoders, then the transformer.
    if cfg.backbone == "flux":
        encoders = [_clip(cfg, n_vocab, projection=False), _t5(cfg, n_vocab)]
    else:
        encoders = [_clip(cfg, n_vocab, projection=True), _clip(cfg, n_vocab, projection=True), _t5(cfg, n_vocab)]
    from tpm.testbed.pipelines import testbed_class

    pipe = assemble_pipeline(cfg.backbone, scheduler=sched, vae=vae, transformer=_transformer(cfg),
                             text_encoders=encoders, tokenizers=[tok] * len(encoders))
    pipe = testbed_class(type(pipe))(**pipe.components)  # same parts; plain calls use cfg's defaults
    finish_testbed_pipeline(pipe, cfg)
    return pipe


def finish_testbed_pipeline(pipe, cfg: TestbedModelConfig) -> None:
    """Eval mode, no progress bar, ``pipe.tpm_defaults`` and ``pipe.tpm_testbed_config`` from ``cfg``."""
    from tpm.tiny import finish_pipeline

    finish_pipeline(pipe, cfg.defaults)
    pipe.default_sample_size = cfg.resolution // cfg.vae_factor  # makes height=None mean cfg.resolution
    pipe.tpm_testbed_config = cfg
    pipe.tpm_domain = cfg.domain


def save_pipeline(pipe, path: str | Path, cfg: TestbedModelConfig, dtype: torch.dtype = torch.float16) -> None:
    """``pipe.save_pretrained(path)`` in ``dtype`` (fp16 keeps the shipped files small) + ``testbed.json``."""
    path = Path(path)
    orig = {n: c.dtype for n, c in pipe.components.items() if isinstance(c, torch.nn.Module)}
    pipe.to(dtype)
    try:
        pipe.save_pretrained(path, safe_serialization=True)
    finally:
        for name, dt in orig.items():
            pipe.components[name].to(dt)
    (path / "testbed.json").write_text(cfg.to_json())


def load_pipeline(
    name_or_path: str | Path, *, device: str | torch.device | None = None, dtype: torch.dtype = torch.float32
):
    """Load a testbed pipeline, offline: a shipped name (``"flux"``, ``"sd3"``, ``"flux-asyncpatch"``,
    from ``tpm/testbed/checkpoints/<name>/``) or a folder written by :func:`save_pipeline`.

    Returns a ``TestbedFluxPipeline`` / ``TestbedSD3Pipeline`` (:mod:`tpm.testbed.pipelines`: a
    ``FluxPipeline`` / ``StableDiffusion3Pipeline`` whose plain call uses ``testbed.json``'s
    resolution, text length, steps and CFG), in ``dtype``, eval mode, with ``pipe.tpm_defaults`` set.
    """
    from tpm.testbed.pipelines import testbed_class

    path = Path(name_or_path)
    if not path.is_dir():
        if str(name_or_path) not in SHIPPED:
            raise ValueError(
                f"Unknown testbed pipeline {str(name_or_path)!r}: pass one of {sorted(SHIPPED)} "
                "or a folder written by tpm.testbed.save_pipeline"
            )
        path = CHECKPOINT_DIR / str(name_or_path)
        if not (path / "model_index.json").is_file():
            raise FileNotFoundError(
                f"Shipped checkpoint {name_or_path!r} is missing at {path}; regenerate it with "
                "recipes/train_testbed.py (see the README, 'Testbed checkpoints')"
            )
    if not (path / "testbed.json").is_file():
        raise FileNotFoundError(f"{path} has no testbed.json; it was not written by tpm.testbed.save_pipeline")
    cfg = TestbedModelConfig.from_json((path / "testbed.json").read_text())
    cls = testbed_class(_ADAPTERS[cfg.backbone].pipeline_class())
    pipe = cls.from_pretrained(path, torch_dtype=dtype, local_files_only=True)  # reads testbed.json too
    if device is not None:
        pipe.to(device)
    finish_testbed_pipeline(pipe, cfg)
    return pipe


def call_kwargs(pipe, **overrides) -> dict[str, Any]:
    """Keyword arguments for ``pipe(...)`` / ``tpm.sample`` from ``pipe.tpm_defaults``, with the default
    CFG strength passed as the pipeline takes it (:meth:`tpm.backbones.Backbone.sample_kwargs`),
    updated with ``overrides``."""
    from tpm.testbed.pipelines import call_kwargs as _call_kwargs

    return _call_kwargs(pipe, **overrides)
