"""SD3 / SD3.5 (``StableDiffusion3Pipeline`` / ``SD3Transformer2DModel``) with a per-token time field.

Joint attention orders tokens image-then-text. Time enters through ``temb`` = time-text
embedding and each block's AdaLN: ``AdaLayerNormZero`` (6 chunks), SD3.5's dual-attention
``SD35AdaLayerNormZeroX`` (9 chunks: a second shift/scale/gate for the image-only ``attn2``),
and, in the last block, ``AdaLayerNormContinuous`` for the text stream (scale, shift). qk-norm
lives inside the attention modules and is applied as their processors apply it. Text tokens are
conditioned on the mean image time of their sample.

Guidance is SD3's true classifier-free guidance: a batch of [negative, positive] and
``uncond + g * (text - uncond)``, as ``StableDiffusion3Pipeline.__call__`` does. The text->image
maps are read from the positive half. Capturable layers are the joint blocks, in order.
Not supported here: skip-layer guidance and ControlNet residuals.
"""

from __future__ import annotations

import torch

from tpm.backbones.attention import AttentionRecorder, attention_with_text_probs
from tpm.backbones.base import Backbone, Conditioning, Prediction, guided, word_index_of_tokens
from tpm.backbones.modulation import (
    TILE_SIZES,
    TokenTime,
    build_token_time,
    gated_residual,
    modulate,
    modulate_image,
    snap_to_levels,
)


def _heads(x, attn):
    b = x.shape[0]
    return x.view(b, -1, attn.heads, x.shape[-1] // attn.heads).transpose(1, 2)


def _sd3_attention_captured(attn, x, ctx, rec: AttentionRecorder):
    """Joint attention as JointAttnProcessor2_0 computes it, with text probabilities recorded."""
    n_img = x.shape[1]
    q, k, v = _heads(attn.to_q(x), attn), _heads(attn.to_k(x), attn), _heads(attn.to_v(x), attn)
    if attn.norm_q is not None:
        q = attn.norm_q(q)
    if attn.norm_k is not None:
        k = attn.norm_k(k)
    cq, ck, cv = _heads(attn.add_q_proj(ctx), attn), _heads(attn.add_k_proj(ctx), attn), _heads(attn.add_v_proj(ctx), attn)
    if attn.norm_added_q is not None:
        cq = attn.norm_added_q(cq)
    if attn.norm_added_k is not None:
        ck = attn.norm_added_k(ck)
    q, k, v = torch.cat([q, cq], 2), torch.cat([k, ck], 2), torch.cat([v, cv], 2)
    out, probs = attention_with_text_probs(q, k, v, img=slice(0, n_img), txt=slice(n_img, None),
                                           tokens=rec.index(q.device))
    rec.add(probs)
    out = out.transpose(1, 2).reshape(x.shape[0], -1, attn.heads * q.shape[-1]).to(q.dtype)
    out, c_out = out[:, :n_img], out[:, n_img:]
    if not attn.context_pre_only:
        c_out = attn.to_add_out(c_out)
    out = attn.to_out[1](attn.to_out[0](out))
    return out, c_out


def _stock_processor(attn) -> bool:
    """True when the layer runs diffusers' default joint processor, whose maths we mirror."""
    from diffusers.models.attention_processor import JointAttnProcessor2_0

    return type(attn.processor) is JointAttnProcessor2_0


def _joint_block(block, x, ctx, tt: TokenTime, layer: int, rec: AttentionRecorder):
    """JointTransformerBlock.forward with per-token modulation of the image stream."""
    e = tt.project(block.norm1.linear, block.norm1.silu)
    normed = block.norm1.norm(x)
    if block.use_dual_attention:
        (shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp,
         shift_msa2, scale_msa2, gate_msa2) = tt.image_chunks(e, 9, scales=(1, 4, 7))
        nx2 = modulate_image(tt, normed, shift_msa2, scale_msa2)
    else:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = tt.image_chunks(e, 6, scales=(1, 4))
    nx = modulate_image(tt, normed, shift_msa, scale_msa)

    nc = block.norm1_context
    if block.context_pre_only:  # AdaLayerNormContinuous: (scale, shift), silu cast to x dtype
        c = nc.linear(nc.silu(tt.text_table()).to(ctx.dtype))[:, None]  # text rows only
        c_scale, c_shift = c.chunk(2, dim=-1)
        nctx = modulate(nc.norm(ctx), c_shift, c_scale)
    else:
        c = nc.linear(nc.silu(tt.text_table()))[:, None]
        c_shift_msa, c_scale_msa, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = c.chunk(6, dim=-1)
        nctx = modulate(nc.norm(ctx), c_shift_msa, c_scale_msa)

    if rec.wants(layer) and _stock_processor(block.attn):
        attn_out, ctx_attn_out = _sd3_attention_captured(block.attn, nx, nctx, rec)
    elif rec.wants(layer):  # custom processor: it computes the output, we read the maps on the side
        _sd3_attention_captured(block.attn, nx, nctx, rec)
        attn_out, ctx_attn_out = block.attn(hidden_states=nx, encoder_hidden_states=nctx)
    else:
        attn_out, ctx_attn_out = block.attn(hidden_states=nx, encoder_hidden_states=nctx)
    x = gated_residual(tt, x, gate_msa, attn_out)
    if block.use_dual_attention:
        x = gated_residual(tt, x, gate_msa2, block.attn2(hidden_states=nx2))
    x = gated_residual(tt, x, gate_mlp, block.ff(modulate_image(tt, block.norm2(x), shift_mlp, scale_mlp)))
    if block.context_pre_only:
        return x, None
    ctx = ctx + c_gate_msa * ctx_attn_out
    ctx = ctx + c_gate_mlp * block.ff_context(modulate(block.norm2_context(ctx), c_shift_mlp, c_scale_mlp))
    return x, ctx


def sd3_transformer_forward(
    transformer,
    hidden_states: torch.Tensor,
    tau: torch.Tensor,
    encoder_hidden_states: torch.Tensor,
    pooled_projections: torch.Tensor,
    attention_layers: list[int] | None = None,
    time_resolution: float | None = None,
    attention_tokens: list[list[int]] | None = None,
    time_levels: int | None = None,
    tile_sizes: tuple[int, ...] = TILE_SIZES,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``SD3Transformer2DModel.forward`` with a per-token time ``tau`` (B, h, w) in [0, 1].

    Equals the stock forward (given ``timestep = 1000 * tau``) when every sample's field is
    uniform. Returns the output (B, C, H, W) and the text->image maps (B, n_text, h, w) of the
    requested layers (``None`` if none); with ``attention_tokens`` (text positions per sample) only
    those positions are computed, the others are zero. ``tile_sizes``: see
    :meth:`TokenTime.in_tiles` (``()`` keeps the per-token gathers).
    """
    tr = transformer
    height, width = hidden_states.shape[-2:]
    p = tr.config.patch_size
    grid = (height // p, width // p)
    x = tr.pos_embed(hidden_states).contiguous()
    t = tau.reshape(tau.shape[0], -1) * 1000

    def embed(times, idx):
        return tr.time_text_embed(times, pooled_projections[idx])

    if time_levels is not None:
        t = snap_to_levels(t, time_levels)
    tt = build_token_time(t, embed, None if time_resolution is None else time_resolution * 1000).in_tiles(tile_sizes)
    if tt.order is not None:  # image tokens permuted into tiles (position embedding already added)
        x = x[:, tt.order]
    ctx = tr.context_embedder(encoder_hidden_states)
    rec = AttentionRecorder(attention_layers, attention_tokens)
    for i, block in enumerate(tr.transformer_blocks):
        x, ctx = _joint_block(block, x, ctx, tt, i, rec)
    no = tr.norm_out
    scale, shift = tt.image_chunks(no.linear(no.silu(tt.table).to(x.dtype)), 2, scales=(0,))
    x = tt.restore_order(tr.proj_out(modulate_image(tt, no.norm(x), shift, scale)))
    c = tr.out_channels
    x = x.reshape(x.shape[0], grid[0], grid[1], p, p, c)
    out = torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], c, grid[0] * p, grid[1] * p)
    return out, rec.result(grid, encoder_hidden_states.shape[1], tt.order)


class SD3Backbone(Backbone):
    """Adapter for ``diffusers.StableDiffusion3Pipeline`` (SD3 and SD3.5)."""

    pipeline_class_name = "StableDiffusion3Pipeline"

    @property
    def patch_size(self) -> int:
        return self.transformer.config.patch_size

    @property
    def token_size(self) -> int:
        return self.pipe.vae_scale_factor * self.patch_size

    def default_size(self) -> int:
        return self.pipe.default_sample_size * self.pipe.vae_scale_factor

    @property
    def num_attention_layers(self) -> int:
        return len(self.transformer.transformer_blocks)

    def to_tokens(self, latents):
        b, c, hh, ww = latents.shape
        p = self.patch_size
        x = latents.reshape(b, c, hh // p, p, ww // p, p).permute(0, 2, 4, 1, 3, 5)
        return x.reshape(b, (hh // p) * (ww // p), c * p * p)

    def from_tokens(self, tokens, grid):
        b, n, cpp = tokens.shape
        p = self.patch_size
        c = cpp // (p * p)
        x = tokens.reshape(b, grid[0], grid[1], c, p, p).permute(0, 3, 1, 4, 2, 5)
        return x.reshape(b, c, grid[0] * p, grid[1] * p)

    def expand_field(self, field):
        p = self.patch_size
        return field.repeat_interleave(p, dim=1).repeat_interleave(p, dim=2)[:, None]

    @property
    def token_dim(self) -> int:
        return int(self.transformer.config.in_channels) * self.patch_size ** 2

    def encode(self, prompts, guidance_scale, negative_prompt=None, max_sequence_length=None, **kwargs):
        msl = max_sequence_length or self.call_default("max_sequence_length")
        do_cfg = guidance_scale > 1
        embeds, n_embeds, pooled, n_pooled = self.pipe.encode_prompt(
            prompt=prompts, prompt_2=None, prompt_3=None, negative_prompt=negative_prompt,
            do_classifier_free_guidance=do_cfg, device=self.device, num_images_per_prompt=1,
            max_sequence_length=msl,
        )
        return Conditioning(prompts=list(prompts), embeds=embeds, pooled=pooled, guidance_scale=guidance_scale,
                            do_cfg=do_cfg, negative_embeds=n_embeds, negative_pooled=n_pooled,
                            extras={"max_sequence_length": msl})

    def prepare_latents(self, batch_size, height, width, generator=None, latents=None):
        return self.pipe.prepare_latents(
            batch_size, self.transformer.config.in_channels, height, width, self.dtype, self.device,
            generator, latents,
        )

    def _set_timesteps(self, num_inference_steps, latents, sigmas):
        from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import (
            calculate_shift,
            retrieve_timesteps,
        )

        sched = self.pipe.scheduler
        kwargs = {}
        if sched.config.get("use_dynamic_shifting", None):
            seq = (latents.shape[-2] // self.patch_size) * (latents.shape[-1] // self.patch_size)
            kwargs["mu"] = calculate_shift(
                seq,
                sched.config.get("base_image_seq_len", 256),
                sched.config.get("max_image_seq_len", 4096),
                sched.config.get("base_shift", 0.5),
                sched.config.get("max_shift", 1.16),
            )
        timesteps, _ = retrieve_timesteps(sched, num_inference_steps, self.device, sigmas=sigmas, **kwargs)
        return timesteps

    def predict(self, latents, tau, cond, attention_layers=None, attention_tokens=None) -> Prediction:
        tokens = attention_tokens
        if cond.do_cfg:
            if tokens is not None:  # the batch is (unconditional, conditional); only the latter's maps are used
                tokens = list(tokens) + list(tokens)
            x_in = torch.cat([latents, latents])
            t_in = torch.cat([tau, tau])
            embeds = torch.cat([cond.negative_embeds, cond.embeds])
            pooled = torch.cat([cond.negative_pooled, cond.pooled])
        else:
            x_in, t_in, embeds, pooled = latents, tau, cond.embeds, cond.pooled
        v, attn = sd3_transformer_forward(self.transformer, x_in, t_in, embeds, pooled,
                                          attention_layers=attention_layers, time_resolution=self.time_resolution,
                                          attention_tokens=tokens, time_levels=self.time_levels)
        if cond.do_cfg:
            v, attn = guided(v, attn, cond.guidance_scale)
        return Prediction(v, attn)

    def text_words(self, prompts, max_sequence_length):
        # Joint text sequence: 77 CLIP positions (CLIP-L and CLIP-G side by side in channels,
        # same tokenizer positions) followed by the T5 positions.
        pipe = self.pipe
        clip_len = pipe.tokenizer_max_length
        out = []
        for p in prompts:
            words = word_index_of_tokens(pipe.tokenizer, p, clip_len)
            if pipe.tokenizer_3 is not None:
                words += word_index_of_tokens(pipe.tokenizer_3, p, max_sequence_length)
            else:
                words += [-1] * max_sequence_length  # zeros stand in for T5 when it is absent
            out.append(words)
        return out
