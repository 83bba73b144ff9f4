"""Flux (``FluxPipeline`` / ``FluxTransformer2DModel``) with a per-token time field.

Joint attention orders tokens text-then-image, with rotary embeddings, dual-stream blocks
followed by single-stream blocks over the concatenation. Time enters through ``temb`` =
time(-guidance)-text embedding, and every block's AdaLN modulation; :mod:`.modulation` makes it
per token. Text tokens are conditioned on the mean image time of their sample.

Guidance follows the pipeline: the guidance embedding when the transformer has one (FLUX.1-dev),
and "true" CFG (a second pass with the negative prompt) when ``true_cfg_scale > 1`` and a
negative prompt is given, exactly as ``FluxPipeline.__call__`` does.

Capturable attention layers are numbered over dual-stream blocks first, then single-stream ones.
"""

from __future__ import annotations

import numpy as np
import torch

from tpm.backbones.attention import AttentionRecorder, attention_with_text_probs
from tpm.backbones.base import Backbone, Conditioning, Prediction, cfg_mix, word_index_of_tokens
from tpm.backbones.modulation import (
    TILE_SIZES,
    TokenTime,
    build_token_time,
    gated_residual,
    modulate,
    modulate_image,
    snap_to_levels,
)


def _flux_qkv(attn, x, ctx=None):
    """Projections as FluxAttnProcessor computes them, returned as (B, H, L, d), text first."""
    if getattr(attn, "fused_projections", False):
        q, k, v = attn.to_qkv(x).chunk(3, dim=-1)
    else:
        q, k, v = attn.to_q(x), attn.to_k(x), attn.to_v(x)
    q = attn.norm_q(q.unflatten(-1, (-1, attn.head_dim)))
    k = attn.norm_k(k.unflatten(-1, (-1, attn.head_dim)))
    v = v.unflatten(-1, (-1, attn.head_dim))
    if ctx is not None:
        if getattr(attn, "fused_projections", False) and hasattr(attn, "to_added_qkv"):
            cq, ck, cv = attn.to_added_qkv(ctx).chunk(3, dim=-1)
        else:
            cq, ck, cv = attn.add_q_proj(ctx), attn.add_k_proj(ctx), attn.add_v_proj(ctx)
        cq = attn.norm_added_q(cq.unflatten(-1, (-1, attn.head_dim)))
        ck = attn.norm_added_k(ck.unflatten(-1, (-1, attn.head_dim)))
        cv = cv.unflatten(-1, (-1, attn.head_dim))
        q, k, v = torch.cat([cq, q], 1), torch.cat([ck, k], 1), torch.cat([cv, v], 1)
    return q, k, v


def _flux_attention_captured(attn, x, ctx, rotary, n_txt: int, recorder: AttentionRecorder):
    """The Flux joint attention with text->image probabilities recorded (our own processor)."""
    from diffusers.models.embeddings import apply_rotary_emb

    q, k, v = _flux_qkv(attn, x, ctx)
    if rotary is not None:
        q = apply_rotary_emb(q, rotary, sequence_dim=1)
        k = apply_rotary_emb(k, rotary, sequence_dim=1)
    out, probs = attention_with_text_probs(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
        img=slice(n_txt, None), txt=slice(0, n_txt), tokens=recorder.index(q.device),
    )
    recorder.add(probs)
    out = out.transpose(1, 2).flatten(2, 3).to(q.dtype)
    if ctx is None:
        return out
    c_out, out = out.split_with_sizes([n_txt, out.shape[1] - n_txt], dim=1)
    out = attn.to_out[1](attn.to_out[0](out.contiguous()))
    return out, attn.to_add_out(c_out.contiguous())


def _stock_processor(attn) -> bool:
    """True when the layer runs diffusers' default Flux processor, whose maths we mirror."""
    from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

    return type(attn.processor) is FluxAttnProcessor


def _capture(attn, x, ctx, rotary, n_txt: int, rec: AttentionRecorder):
    """Attention of a captured layer. With the stock processor, one pass gives output and maps;
    with a custom processor, the processor computes the output and we compute the maps from the
    layer's own projections on the side (costs a second attention for that layer)."""
    if _stock_processor(attn):
        return _flux_attention_captured(attn, x, ctx, rotary, n_txt, rec)
    _flux_attention_captured(attn, x, ctx, rotary, n_txt, rec)
    if ctx is None:
        return attn(hidden_states=x, image_rotary_emb=rotary)
    outs = attn(hidden_states=x, encoder_hidden_states=ctx, image_rotary_emb=rotary)
    return outs[0], outs[1]


def _dual_block(block, x, ctx, tt: TokenTime, rotary, layer: int, rec: AttentionRecorder):
    """FluxTransformerBlock.forward with per-token modulation for the image stream."""
    e = tt.image_chunks(tt.project(block.norm1.linear, block.norm1.silu), 6, scales=(1, 4))
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = e
    c = block.norm1_context.linear(block.norm1_context.silu(tt.text_table()))[:, None]  # text rows only
    c_shift_msa, c_scale_msa, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = c.chunk(6, dim=-1)
    nx = modulate_image(tt, block.norm1.norm(x), shift_msa, scale_msa)
    nctx = modulate(block.norm1_context.norm(ctx), c_shift_msa, c_scale_msa)
    if rec.wants(layer):
        attn_out, ctx_attn_out = _capture(block.attn, nx, nctx, rotary, ctx.shape[1], rec)
    else:
        outs = block.attn(hidden_states=nx, encoder_hidden_states=nctx, image_rotary_emb=rotary)
        attn_out, ctx_attn_out = outs[0], outs[1]
    x = gated_residual(tt, x, gate_msa, attn_out)
    x = gated_residual(tt, x, gate_mlp, block.ff(modulate_image(tt, block.norm2(x), shift_mlp, scale_mlp)))
    ctx = ctx + c_gate_msa * ctx_attn_out
    ctx = ctx + c_gate_mlp * block.ff_context(modulate(block.norm2_context(ctx), c_shift_mlp, c_scale_mlp))
    if ctx.dtype == torch.float16:
        ctx = ctx.clip(-65504, 65504)
    return x, ctx


def _single_block(block, x, ctx, tt: TokenTime, rotary, layer: int, rec: AttentionRecorder):
    """FluxSingleTransformerBlock.forward with per-token modulation (text rows first)."""
    n_txt = ctx.shape[1]
    emb = tt.project(block.norm.linear, block.norm.silu)
    e_img, e_txt = tt.image_chunks(emb, 3, scales=(1,)), tt.text_rows(emb)
    h = torch.cat([ctx, x], dim=1)
    normed = block.norm.norm(h)
    if tt.uniform:  # identical rows: broadcast like the stock block
        shift, scale, gate = e_txt.chunk(3, dim=-1)
        nh = modulate(normed, shift, scale)
    else:
        # Text rows broadcast over the text part, per-token rows over the image part: modulating the
        # two parts apart avoids materialising (B, L, D) text+image copies of shift, scale and gate.
        (t_shift, t_scale, t_gate), (i_shift, i_scale, i_gate) = e_txt.chunk(3, dim=-1), e_img
        if torch.is_grad_enabled():  # out= has no autograd
            nh = torch.cat([modulate(normed[:, :n_txt], t_shift, t_scale),
                            modulate_image(tt, normed[:, n_txt:], i_shift, i_scale)], dim=1)
        else:  # both parts written into one buffer, no torch.cat copy; the text part's arithmetic is stock
            nh = torch.empty_like(normed)
            torch.mul(normed[:, :n_txt], 1 + t_scale, out=nh[:, :n_txt]).add_(t_shift)
            modulate_image(tt, normed[:, n_txt:], i_shift, i_scale, out=nh[:, n_txt:])
    mlp = block.act_mlp(block.proj_mlp(nh))
    if rec.wants(layer):
        attn_out = _capture(block.attn, nh, None, rotary, n_txt, rec)
    else:
        attn_out = block.attn(hidden_states=nh, image_rotary_emb=rotary)
    out = block.proj_out(torch.cat([attn_out, mlp], dim=2))
    if tt.uniform:
        h = h + gate * out
    elif torch.is_grad_enabled():
        h = torch.cat([h[:, :n_txt] + t_gate * out[:, :n_txt],
                       gated_residual(tt, h[:, n_txt:], i_gate, out[:, n_txt:])], dim=1)
    else:
        res = torch.empty_like(h)
        torch.add(h[:, :n_txt], t_gate * out[:, :n_txt], out=res[:, :n_txt])
        gated_residual(tt, h[:, n_txt:], i_gate, out[:, n_txt:], out=res[:, n_txt:])
        h = res
    if h.dtype == torch.float16:
        h = h.clip(-65504, 65504)
    return h[:, n_txt:], h[:, :n_txt]


def flux_transformer_forward(
    transformer,
    hidden_states: torch.Tensor,
    tau: torch.Tensor,
    encoder_hidden_states: torch.Tensor,
    pooled_projections: torch.Tensor,
    img_ids: torch.Tensor,
    txt_ids: torch.Tensor,
    guidance: torch.Tensor | None = None,
    attention_layers: list[int] | None = None,
    grid: tuple[int, int] | None = None,
    time_resolution: float | None = None,
    attention_tokens: list[list[int]] | None = None,
    time_levels: int | None = None,
    tile_sizes: tuple[int, ...] = TILE_SIZES,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``FluxTransformer2DModel.forward`` with a per-token time ``tau`` (B, N) in [0, 1].

    Equals the stock forward (given ``timestep = tau``) when every sample's field is uniform.
    Returns the model output (B, N, C) and, if layers were requested, the text->image maps
    (B, n_text, h, w) averaged over heads and the requested layers; with ``attention_tokens``
    (text positions per sample) only those positions are computed, the others are zero.
    ``tile_sizes``: see :meth:`TokenTime.in_tiles` (``()`` keeps the per-token gathers).
    """
    tr = transformer
    x = tr.x_embedder(hidden_states)
    t = tau.to(x.dtype) * 1000
    g = None if guidance is None else guidance.to(x.dtype) * 1000

    def embed(times, idx):
        if g is None:
            return tr.time_text_embed(times, pooled_projections[idx])
        return tr.time_text_embed(times, g[idx], pooled_projections[idx])

    if time_levels is not None:
        t = snap_to_levels(t, time_levels)
    tt = build_token_time(t, embed, None if time_resolution is None else time_resolution * 1000).in_tiles(tile_sizes)
    if tt.order is not None:  # image tokens permuted into tiles; their rotary ids travel with them
        x, img_ids = x[:, tt.order], img_ids[tt.order]
    ctx = tr.context_embedder(encoder_hidden_states)
    rotary = tr.pos_embed(torch.cat((txt_ids, img_ids), dim=0))
    rec = AttentionRecorder(attention_layers, attention_tokens)
    n_dual = len(tr.transformer_blocks)
    for i, block in enumerate(tr.transformer_blocks):
        x, ctx = _dual_block(block, x, ctx, tt, rotary, i, rec)
    for i, block in enumerate(tr.single_transformer_blocks):
        x, ctx = _single_block(block, x, ctx, tt, rotary, n_dual + i, rec)
    # norm_out is AdaLayerNormContinuous: chunk order (scale, shift).
    no = tr.norm_out
    scale, shift = tt.image_chunks(no.linear(no.silu(tt.table).to(x.dtype)), 2, scales=(0,))
    x = modulate_image(tt, no.norm(x), shift, scale)
    out = tt.restore_order(tr.proj_out(x))
    return out, (rec.result(grid, encoder_hidden_states.shape[1], tt.order) if grid is not None else None)


class FluxBackbone(Backbone):
    """Adapter for ``diffusers.FluxPipeline``."""

    pipeline_class_name = "FluxPipeline"

    @property
    def token_size(self) -> int:
        return self.pipe.vae_scale_factor * 2

    def default_size(self) -> int:
        return self.pipe.default_sample_size * self.pipe.vae_scale_factor

    @property
    def num_attention_layers(self) -> int:
        return len(self.transformer.transformer_blocks) + len(self.transformer.single_transformer_blocks)

    def to_tokens(self, latents):
        return latents

    def from_tokens(self, tokens, grid):
        return tokens

    def expand_field(self, field):
        return field.reshape(field.shape[0], -1, 1)

    @property
    def token_dim(self) -> int:
        return int(self.transformer.config.in_channels)  # packed 2x2 latents, patch size 1

    def pack_latents(self, latents):
        b, c, h, w = latents.shape
        return self.pipe._pack_latents(latents, b, c, h, w)

    def unpack_latents(self, latents, height, width):
        return self.pipe._unpack_latents(latents, height, width, self.pipe.vae_scale_factor)

    def _cfg_argument(self) -> str:
        return "guidance_scale" if self.transformer.config.guidance_embeds else "true_cfg_scale"

    def sample_kwargs(self, scale=None):
        scale = self.default_guidance_scale() if scale is None else float(scale)
        if self.transformer.config.guidance_embeds:
            return {"guidance_scale": scale}
        # No guidance embedding: CFG is FluxPipeline's "true CFG", which needs a negative prompt.
        return {"true_cfg_scale": scale, **({"negative_prompt": ""} if scale > 1 else {})}

    def encode(self, prompts, guidance_scale, negative_prompt=None, max_sequence_length=None,
               true_cfg_scale: float = 1.0, **kwargs) -> Conditioning:
        msl = max_sequence_length or self.call_default("max_sequence_length")
        embeds, pooled, text_ids = self.pipe.encode_prompt(
            prompt=prompts, prompt_2=None, device=self.device, num_images_per_prompt=1, max_sequence_length=msl
        )
        cond = Conditioning(prompts=list(prompts), embeds=embeds, pooled=pooled, guidance_scale=guidance_scale,
                            do_cfg=False, extras={"text_ids": text_ids, "max_sequence_length": msl})
        if true_cfg_scale > 1 and negative_prompt is not None:
            n_embeds, n_pooled, n_ids = self.pipe.encode_prompt(
                prompt=negative_prompt, prompt_2=None, device=self.device, num_images_per_prompt=1,
                max_sequence_length=msl,
            )
            cond.do_cfg = True
            cond.negative_embeds, cond.negative_pooled = n_embeds, n_pooled
            cond.extras.update(negative_text_ids=n_ids, true_cfg_scale=true_cfg_scale)
        if self.transformer.config.guidance_embeds:
            g = torch.full([1], guidance_scale, device=self.device, dtype=torch.float32)
            cond.extras["guidance"] = g.expand(embeds.shape[0])
        return cond

    def prepare_latents(self, batch_size, height, width, generator=None, latents=None):
        channels = self.transformer.config.in_channels // 4
        lat, _ = self.pipe.prepare_latents(
            batch_size, channels, height, width, self.dtype, self.device, generator, latents
        )
        return lat

    def _set_timesteps(self, num_inference_steps, latents, sigmas):
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift, retrieve_timesteps

        sched = self.pipe.scheduler
        if sigmas is None:
            sigmas = np.linspace(1.0, 1 / num_inference_steps, num_inference_steps)
        if sched.config.get("use_flow_sigmas", False):
            sigmas = None
        mu = calculate_shift(
            latents.shape[1],
            sched.config.get("base_image_seq_len", 256),
            sched.config.get("max_image_seq_len", 4096),
            sched.config.get("base_shift", 0.5),
            sched.config.get("max_shift", 1.15),
        )
        timesteps, _ = retrieve_timesteps(sched, num_inference_steps, self.device, sigmas=sigmas, mu=mu)
        return timesteps

    def _forward(self, latents, tau_tokens, embeds, pooled, text_ids, guidance, layers, grid, tokens=None):
        # Position ids of the packed image tokens, as FluxPipeline.prepare_latents makes them.
        img_ids = self.pipe._prepare_latent_image_ids(latents.shape[0], grid[0], grid[1], latents.device,
                                                      latents.dtype)
        return flux_transformer_forward(
            self.transformer, latents, tau_tokens, embeds, pooled, img_ids, text_ids,
            guidance=guidance, attention_layers=layers, grid=grid, time_resolution=self.time_resolution,
            attention_tokens=tokens, time_levels=self.time_levels,
        )

    def predict(self, latents, tau, cond, attention_layers=None, attention_tokens=None) -> Prediction:
        grid = tuple(tau.shape[1:])
        tau_tokens = tau.reshape(tau.shape[0], -1)
        guidance = cond.extras.get("guidance")
        v, attn = self._forward(latents, tau_tokens, cond.embeds, cond.pooled, cond.extras["text_ids"],
                                guidance, attention_layers, grid, attention_tokens)
        if cond.do_cfg:
            v_neg, _ = self._forward(latents, tau_tokens, cond.negative_embeds, cond.negative_pooled,
                                     cond.extras["negative_text_ids"], guidance, None, grid)
            v = cfg_mix(v_neg, v, cond.extras["true_cfg_scale"])
        return Prediction(v, attn)

    def text_words(self, prompts, max_sequence_length):
        # The joint text sequence is the T5 sequence (tokenizer_2).
        return [word_index_of_tokens(self.pipe.tokenizer_2, p, max_sequence_length) for p in prompts]
