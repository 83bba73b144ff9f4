"""Small pipelines of the real diffusers classes, built from config, offline.

The part builders here (word-level tokenizer, CLIP / T5 text encoders, ``AutoencoderKL``, Flux /
SD3 transformers, and :func:`assemble_pipeline`) are the one place that builds such pipelines:
the random tiny pipelines below (tests, benchmarks, ``tiny:flux`` / ``tiny:sd3``, and users checking a
policy's plumbing without weights) and the embedded testbed's models
(:func:`tpm.testbed.models.build_pipeline`, which then trains them) both use them.

Tokenizers are word-level ``tokenizers`` models wrapped in ``PreTrainedTokenizerFast``, since no
CLIP BPE or T5 SentencePiece file can be downloaded here. Components are put in eval mode:
config-built models start in train mode and T5's dropout would make two calls differ.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

# Enough words for every prompt in the tests and benchmarks.
WORDS = (
    "a an the and of on in with left right above below next to two three four one "
    "red green blue yellow purple orange white black cyan pink small big "
    "circle circles square squares triangle triangles shark sharks bike bikes riding "
    "dog dogs cat cats horse bird eating playing running sitting car tree house "
    "photo picture astronaut moon city street beach"
).split()


# ---- parts ------------------------------------------------------------------------------------------
def word_tokenizer(words=WORDS, max_length: int = 77, eos: bool = True, *,
                   specials: Sequence[str] = ("<pad>", "<unk>", "</s>", "<s>"), eos_token: str = "</s>",
                   bos_token: str | None = "<s>", sort_words: bool = True, split_punctuation: bool = True,
                   pair_template: bool = False):
    """A word-level fast tokenizer (lower-cased); ``eos`` appends ``eos_token`` to every text.

    Ids: ``specials`` first (``specials[0]`` pads, the one containing "unk" stands for unknown
    words), then ``words`` (sorted, or in the given order without duplicates).
    """
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    words = sorted(set(words)) if sort_words else list(dict.fromkeys(words))
    vocab = {w: i for i, w in enumerate([*specials, *(w for w in words if w not in specials)])}
    unk = next(s for s in specials if "unk" in s)
    tok = Tokenizer(WordLevel(vocab=vocab, unk_token=unk))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = (pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
                         if split_punctuation else pre_tokenizers.Whitespace())
    if eos:
        pair = {"pair": f"$A {eos_token} $B {eos_token}"} if pair_template else {}
        tok.post_processor = processors.TemplateProcessing(single=f"$A {eos_token}", **pair,
                                                           special_tokens=[(eos_token, vocab[eos_token])])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=specials[0], unk_token=unk, eos_token=eos_token,
        **({"bos_token": bos_token} if bos_token else {}), model_max_length=max_length, padding_side="right",
    )


def clip_text_encoder(vocab_size: int, hidden: int, *, layers: int, heads: int, max_length: int,
                      projection: bool = False, seed: int | None = None, **config):
    """``CLIPTextModel`` (``CLIPTextModelWithProjection`` if ``projection``, SD3's) from config;
    ``config`` adds ``CLIPTextConfig`` fields (token ids, activation)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    if seed is not None:
        torch.manual_seed(seed)
    cfg = CLIPTextConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                         projection_dim=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                         max_position_embeddings=max_length, **config)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg).eval()


def t5_encoder(vocab_size: int, d_model: int, *, d_kv: int, layers: int, heads: int = 4,
               seed: int | None = None, **config):
    """``T5EncoderModel`` from config, without dropout; ``config`` adds ``T5Config`` fields."""
    from transformers import T5Config, T5EncoderModel

    if seed is not None:
        torch.manual_seed(seed)
    cfg = T5Config(vocab_size=vocab_size, d_model=d_model, d_kv=d_kv, d_ff=2 * d_model, num_layers=layers,
                   num_heads=heads, dropout_rate=0.0, pad_token_id=0, decoder_start_token_id=0, **config)
    return T5EncoderModel(cfg).eval()


def autoencoder(blocks: Sequence[int], latent_channels: int, *, sample_size: int, norm_groups: int,
                seed: int | None = None, **config):
    """``AutoencoderKL`` with one layer per block (it downsamples by ``2 ** (len(blocks) - 1)``);
    ``config`` adds fields (scaling / shift factors, quant convs, mid-block attention)."""
    from diffusers import AutoencoderKL

    if seed is not None:
        torch.manual_seed(seed)
    n = len(blocks)
    return AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n, block_out_channels=tuple(blocks), layers_per_block=1,
        latent_channels=latent_channels, norm_num_groups=norm_groups, sample_size=sample_size, **config,
    ).eval()


def flux_transformer(*, latent_channels: int, layers: int, single_layers: int, heads: int, head_dim: int,
                     text_dim: int, pooled_dim: int, rope_axes: Sequence[int], guidance_embeds: bool = False,
                     seed: int | None = None):
    """``FluxTransformer2DModel`` over packed 2x2 latents (patch size 1)."""
    from diffusers import FluxTransformer2DModel

    if seed is not None:
        torch.manual_seed(seed)
    return FluxTransformer2DModel(
        patch_size=1, in_channels=4 * latent_channels, num_layers=layers, num_single_layers=single_layers,
        attention_head_dim=head_dim, num_attention_heads=heads, joint_attention_dim=text_dim,
        pooled_projection_dim=pooled_dim, guidance_embeds=guidance_embeds, axes_dims_rope=tuple(rope_axes),
    ).eval()


def sd3_transformer(*, sample_size: int, latent_channels: int, layers: int, heads: int, head_dim: int,
                    text_dim: int, pooled_dim: int, seed: int | None = None, **config):
    """``SD3Transformer2DModel`` with patch size 2; ``config`` adds SD3.5's dual attention / qk-norm."""
    from diffusers import SD3Transformer2DModel

    if seed is not None:
        torch.manual_seed(seed)
    return SD3Transformer2DModel(
        sample_size=sample_size, patch_size=2, in_channels=latent_channels, num_layers=layers,
        attention_head_dim=head_dim, num_attention_heads=heads, caption_projection_dim=heads * head_dim,
        joint_attention_dim=text_dim, pooled_projection_dim=pooled_dim, out_channels=latent_channels, **config,
    ).eval()


def finish_pipeline(pipe, defaults: dict | None = None):
    """Every module in eval mode, no progress bar, and ``pipe.tpm_defaults`` (call defaults a
    diffusers pipeline cannot store, read by ``tpm.sample``)."""
    for comp in pipe.components.values():
        if isinstance(comp, torch.nn.Module):
            comp.eval()
    pipe.set_progress_bar_config(disable=True)
    pipe.tpm_defaults = dict(defaults or {})
    return pipe


def assemble_pipeline(backbone: str, *, scheduler, vae, transformer, text_encoders: Sequence, tokenizers: Sequence,
                      defaults: dict | None = None):
    """The ``backbone`` family's pipeline class (``"flux"``: two text encoders, ``"sd3"``: three)
    from its parts, finished by :func:`finish_pipeline`."""
    from tpm.backbones import BACKBONES

    if backbone not in BACKBONES:
        raise ValueError(f"backbone must be one of {sorted(BACKBONES)}, got {backbone!r}")
    parts = {"scheduler": scheduler, "vae": vae, "transformer": transformer}
    for i, (enc, tok) in enumerate(zip(text_encoders, tokenizers, strict=True)):
        suffix = "" if i == 0 else f"_{i + 1}"
        parts[f"text_encoder{suffix}"], parts[f"tokenizer{suffix}"] = enc, tok
    return finish_pipeline(BACKBONES[backbone].pipeline_class()(**parts), defaults)


# ---- random tiny pipelines ---------------------------------------------------------------------
def _tiny_vae(latent_channels: int, blocks: tuple[int, ...], seed: int):
    return autoencoder(blocks, latent_channels, sample_size=32, norm_groups=1, seed=seed, use_quant_conv=False,
                       use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5035)


def _tiny_clip(text_dim: int, vocab: int, projection: bool, seed: int):
    return clip_text_encoder(vocab, text_dim, layers=2, heads=2, max_length=16, projection=projection, seed=seed,
                             bos_token_id=3, eos_token_id=2, pad_token_id=0, hidden_act="gelu")


def _tiny_t5(text_dim: int, vocab: int, seed: int):
    return t5_encoder(vocab, text_dim, d_kv=8, layers=2, heads=4, seed=seed, eos_token_id=2)


def tiny_flux_pipeline(
    num_layers: int = 1,
    num_single_layers: int = 1,
    heads: int = 2,
    head_dim: int = 16,
    guidance_embeds: bool = False,
    text_dim: int = 32,
    vae_blocks: tuple[int, ...] = (4,),
    latent_channels: int = 1,
    max_sequence_length: int = 16,
    seed: int = 0,
    scheduler_kwargs: dict | None = None,
):
    """A random ``FluxPipeline`` (diffusers' own fast-test sizes by default)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    tok = word_tokenizer(max_length=16)
    tok2 = word_tokenizer(max_length=max_sequence_length)
    vocab = len(tok)
    rope = head_dim // 4
    transformer = flux_transformer(latent_channels=latent_channels, layers=num_layers, single_layers=num_single_layers,
                                   heads=heads, head_dim=head_dim, text_dim=text_dim, pooled_dim=text_dim,
                                   rope_axes=(rope, rope, head_dim - 2 * rope), guidance_embeds=guidance_embeds,
                                   seed=seed)
    return assemble_pipeline(
        "flux", scheduler=FlowMatchEulerDiscreteScheduler(**(scheduler_kwargs or {})),
        vae=_tiny_vae(latent_channels, vae_blocks, seed + 1), transformer=transformer,
        text_encoders=[_tiny_clip(text_dim, vocab, False, seed + 2), _tiny_t5(text_dim, vocab, seed + 3)],
        tokenizers=[tok, tok2], defaults={"max_sequence_length": max_sequence_length},
    )


def tiny_sd3_pipeline(
    num_layers: int = 2,
    heads: int = 2,
    head_dim: int = 8,
    dual_attention_layers: tuple[int, ...] = (),
    qk_norm: str | None = None,
    text_dim: int = 32,
    vae_blocks: tuple[int, ...] = (4,),
    latent_channels: int = 4,
    sample_size: int = 32,
    max_sequence_length: int = 16,
    with_t5: bool = True,
    seed: int = 0,
    scheduler_kwargs: dict | None = None,
):
    """A random ``StableDiffusion3Pipeline``; SD3.5 features via ``dual_attention_layers``/``qk_norm``."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    tok = word_tokenizer(max_length=16)
    tok3 = word_tokenizer(max_length=max_sequence_length)
    vocab = len(tok)
    transformer = sd3_transformer(sample_size=sample_size, latent_channels=latent_channels, layers=num_layers,
                                  heads=heads, head_dim=head_dim, text_dim=text_dim, pooled_dim=2 * text_dim,
                                  seed=seed, dual_attention_layers=dual_attention_layers, qk_norm=qk_norm)
    return assemble_pipeline(
        "sd3", scheduler=FlowMatchEulerDiscreteScheduler(**(scheduler_kwargs or {"shift": 3.0})),
        vae=_tiny_vae(latent_channels, vae_blocks, seed + 1), transformer=transformer,
        text_encoders=[_tiny_clip(text_dim, vocab, True, seed + 2), _tiny_clip(text_dim, vocab, True, seed + 3),
                       _tiny_t5(text_dim, vocab, seed + 4) if with_t5 else None],
        tokenizers=[tok, word_tokenizer(max_length=16), tok3 if with_t5 else None],
        defaults={"max_sequence_length": max_sequence_length},
    )


# ---- UNet pipelines (SD 1.x / 2.x, SDXL) ---------------------------------------------------------
#: the noise schedule SD 1.x / 2.x and SDXL were trained with (their scheduler configs)
SD_SCHEDULE = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
               "beta_schedule": "scaled_linear", "steps_offset": 1}


def sd_scheduler(name: str = "ddim", prediction_type: str = "epsilon", **config):
    """A scheduler of the SD family by short name: "ddim" (SD's DDIM config: ``set_alpha_to_one=False``,
    no clipping), "euler" (SDXL's default), "ddpm", "pndm" (SD 1.5's default), "dpm" (multistep)."""
    import diffusers

    classes = {"ddim": "DDIMScheduler", "euler": "EulerDiscreteScheduler", "ddpm": "DDPMScheduler",
               "pndm": "PNDMScheduler", "dpm": "DPMSolverMultistepScheduler"}
    base = dict(SD_SCHEDULE)
    if name in ("ddim", "ddpm"):
        base.update(clip_sample=False)
    if name == "ddim":
        base.update(set_alpha_to_one=False)
    if name == "pndm":
        base.update(skip_prk_steps=True, set_alpha_to_one=False)
    cls = getattr(diffusers, classes[name])
    return cls(**{**base, "prediction_type": prediction_type, **config})


def unet(*, blocks: Sequence[int], cross_attention: Sequence[bool], in_channels: int, sample_size: int,
         cross_attention_dim: int, heads: int | Sequence[int] = 2, layers_per_block: int = 1, norm_groups: int = 2,
         seed: int | None = None, **config):
    """``UNet2DConditionModel`` with one level per entry of ``blocks`` (``cross_attention[i]``: whether
    level i has cross-attention); ``config`` adds fields (SDXL's ``addition_embed_type="text_time"``)."""
    from diffusers import UNet2DConditionModel

    if seed is not None:
        torch.manual_seed(seed)
    down = tuple("CrossAttnDownBlock2D" if c else "DownBlock2D" for c in cross_attention)
    up = tuple("CrossAttnUpBlock2D" if c else "UpBlock2D" for c in reversed(cross_attention))
    return UNet2DConditionModel(
        sample_size=sample_size, in_channels=in_channels, out_channels=in_channels, down_block_types=down,
        up_block_types=up, block_out_channels=tuple(blocks), layers_per_block=layers_per_block,
        cross_attention_dim=cross_attention_dim, attention_head_dim=heads, norm_num_groups=norm_groups, **config,
    ).eval()


def tiny_sd_pipeline(prediction_type: str = "epsilon", scheduler: str = "ddim", blocks: tuple[int, ...] = (8, 16, 16),
                     cross_attention: tuple[bool, ...] = (False, True, True), layers_per_block: int = 1,
                     heads: int = 2, text_dim: int = 32, latent_channels: int = 4, sample_size: int = 16,
                     seed: int = 0):
    """A random ``StableDiffusionPipeline`` (by default three levels, cross-attention on the two
    coarser ones, 16x16 latents of 32x32 images; SD's own layout is four levels, cross-attention on
    the first three, two layers per block)."""
    from diffusers import StableDiffusionPipeline

    tok = word_tokenizer(max_length=16)
    den = unet(blocks=blocks, cross_attention=cross_attention, in_channels=latent_channels, heads=heads,
               layers_per_block=layers_per_block, sample_size=sample_size, cross_attention_dim=text_dim, seed=seed)
    pipe = StableDiffusionPipeline(
        vae=_tiny_vae(latent_channels, (4, 8), seed + 1), text_encoder=_tiny_clip(text_dim, len(tok), False, seed + 2),
        tokenizer=tok, unet=den, scheduler=sd_scheduler(scheduler, prediction_type), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)
    pipe.vae.register_to_config(shift_factor=None, scaling_factor=0.18215)
    return finish_pipeline(pipe)


def tiny_sdxl_pipeline(prediction_type: str = "epsilon", scheduler: str = "euler", blocks: tuple[int, ...] = (8, 16),
                       text_dim: int = 32, latent_channels: int = 4, sample_size: int = 16, time_dim: int = 8,
                       seed: int = 0):
    """A random ``StableDiffusionXLPipeline`` (two CLIP encoders, ``text_time`` added embeddings;
    diffusers' fast-test layout)."""
    from diffusers import StableDiffusionXLPipeline

    tok = word_tokenizer(max_length=16)
    den = unet(blocks=blocks, cross_attention=(False, True), in_channels=latent_channels, sample_size=sample_size,
               cross_attention_dim=2 * text_dim, seed=seed, use_linear_projection=True,
               addition_embed_type="text_time", addition_time_embed_dim=time_dim,
               projection_class_embeddings_input_dim=6 * time_dim + text_dim, transformer_layers_per_block=(1, 2))
    pipe = StableDiffusionXLPipeline(
        vae=_tiny_vae(latent_channels, (4, 8), seed + 1), text_encoder=_tiny_clip(text_dim, len(tok), False, seed + 2),
        text_encoder_2=_tiny_clip(text_dim, len(tok), True, seed + 3), tokenizer=tok,
        tokenizer_2=word_tokenizer(max_length=16), unet=den, scheduler=sd_scheduler(scheduler, prediction_type))
    pipe.vae.register_to_config(shift_factor=None, scaling_factor=0.13025)
    return finish_pipeline(pipe)


def compare_to_pipeline(pipe, prompts: Sequence[str], steps: int = 4, guidance: float = 3.0, seed: int = 0) -> dict:
    """Max abs differences between synchronous ``tpm.sample`` and ``pipe(...)`` from the same generator:
    ``image`` (decoded, in [0, 1]) and ``latent_rel`` (final latents, relative to their largest value)."""
    import numpy as np

    from tpm.sampler import sample

    kw = {"num_inference_steps": steps, "guidance_scale": guidance}
    out = {}
    for kind in ("np", "latent"):
        ref = pipe(list(prompts), generator=torch.Generator().manual_seed(seed), output_type=kind, **kw).images
        ours = sample(pipe, list(prompts), generator=torch.Generator().manual_seed(seed), output_type=kind, **kw).images
        if kind == "np":
            out["image"] = float(np.abs(ref - ours).max())
        else:
            out["latent_rel"] = float((ref - ours).abs().max() / ref.abs().max())
    return out
