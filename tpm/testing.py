"""Random pipelines of the real diffusers classes, built from config, offline.

Used by the tests and benchmarks (and handy for users checking a policy's plumbing without
weights). Every part is a real diffusers / transformers class with a small config; the
tokenizers are word-level ``tokenizers`` models wrapped in ``PreTrainedTokenizerFast``, since
no CLIP BPE or T5 SentencePiece file can be downloaded here. Components are put in eval mode:
config-built models start in train mode and T5's dropout would make two calls differ.
"""

from __future__ import annotations

import torch

# Enough words for every prompt in the tests and benchmarks.
WORDS = (
    "a an the and of on in with left right above below next to two three four one "
    "red green blue yellow purple orange white black cyan pink small big "
    "circle circles square squares triangle triangles shark sharks bike bikes riding "
    "dog dogs cat cats horse bird eating playing running sitting car tree house "
    "photo picture astronaut moon city street beach"
).split()


def word_tokenizer(words=WORDS, max_length: int = 77, eos: bool = True):
    """A word-level fast tokenizer (lower-cased, whitespace + punctuation split)."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<unk>", "</s>", "<s>"]
    vocab = {w: i for i, w in enumerate(specials + sorted(set(words)))}
    tok = Tokenizer(WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    if eos:
        tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 2)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", eos_token="</s>", bos_token="<s>",
        model_max_length=max_length,
    )


def _clip(hidden: int, vocab: int, projection: int | None, max_len: int, seed: int):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    cfg = CLIPTextConfig(
        bos_token_id=3, eos_token_id=2, pad_token_id=0, hidden_size=hidden, intermediate_size=2 * hidden,
        num_attention_heads=2, num_hidden_layers=2, vocab_size=vocab, max_position_embeddings=max_len,
        projection_dim=projection or hidden, hidden_act="gelu",
    )
    model = CLIPTextModelWithProjection(cfg) if projection else CLIPTextModel(cfg)
    return model.eval()


def _t5(d_model: int, vocab: int, seed: int):
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    cfg = T5Config(d_model=d_model, d_kv=8, d_ff=2 * d_model, num_layers=2, num_heads=4, vocab_size=vocab,
                   decoder_start_token_id=0, pad_token_id=0, eos_token_id=2, dropout_rate=0.0)
    return T5EncoderModel(cfg).eval()


def _vae(latent_channels: int, blocks: tuple[int, ...], seed: int, shift=0.0609, scale=1.5035):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    n = len(blocks)
    return AutoencoderKL(
        sample_size=32, in_channels=3, out_channels=3, block_out_channels=blocks, layers_per_block=1,
        latent_channels=latent_channels, norm_num_groups=1, use_quant_conv=False, use_post_quant_conv=False,
        shift_factor=shift, scaling_factor=scale,
        down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
    ).eval()


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
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    tok = word_tokenizer(max_length=16)
    tok2 = word_tokenizer(max_length=max_sequence_length)
    vocab = len(tok)
    rope = head_dim // 4
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=4 * latent_channels, num_layers=num_layers, num_single_layers=num_single_layers,
        attention_head_dim=head_dim, num_attention_heads=heads, joint_attention_dim=text_dim,
        pooled_projection_dim=text_dim, guidance_embeds=guidance_embeds,
        axes_dims_rope=(rope, rope, head_dim - 2 * rope),
    ).eval()
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**(scheduler_kwargs or {})),
        vae=_vae(latent_channels, vae_blocks, seed + 1),
        text_encoder=_clip(text_dim, vocab, None, 16, seed + 2),
        tokenizer=tok,
        text_encoder_2=_t5(text_dim, vocab, seed + 3),
        tokenizer_2=tok2,
        transformer=transformer,
    )
    pipe.set_progress_bar_config(disable=True)
    pipe.tpm_defaults = {"max_sequence_length": max_sequence_length}
    return pipe


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
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    tok = word_tokenizer(max_length=16)
    tok3 = word_tokenizer(max_length=max_sequence_length)
    vocab = len(tok)
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=sample_size, patch_size=2, in_channels=latent_channels, num_layers=num_layers,
        attention_head_dim=head_dim, num_attention_heads=heads, caption_projection_dim=heads * head_dim,
        joint_attention_dim=text_dim, pooled_projection_dim=2 * text_dim, out_channels=latent_channels,
        dual_attention_layers=dual_attention_layers, qk_norm=qk_norm,
    ).eval()
    pipe = StableDiffusion3Pipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**(scheduler_kwargs or {"shift": 3.0})),
        vae=_vae(latent_channels, vae_blocks, seed + 1),
        text_encoder=_clip(text_dim, vocab, text_dim, 16, seed + 2),
        tokenizer=tok,
        text_encoder_2=_clip(text_dim, vocab, text_dim, 16, seed + 3),
        tokenizer_2=word_tokenizer(max_length=16),
        text_encoder_3=_t5(text_dim, vocab, seed + 4) if with_t5 else None,
        tokenizer_3=tok3 if with_t5 else None,
        transformer=transformer,
    )
    pipe.set_progress_bar_config(disable=True)
    pipe.tpm_defaults = {"max_sequence_length": max_sequence_length}
    return pipe
