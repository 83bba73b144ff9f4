"""``UNet2DConditionModel`` with a per-pixel timestep, and its cross-attention maps.

The stock UNet takes one timestep per sample: ``emb = time_embedding(time_proj(t))`` (+ SDXL's
``add_embedding`` of pooled text and size ids), and every ``ResnetBlock2D`` adds
``time_emb_proj(act(emb))`` as a (B, C, 1, 1) bias before its second norm. For a time *field*
(AsynDM §3) each ResNet block needs a (B, C, h_l, w_l) map at its own resolution:

1. the field of timesteps is resized to every UNet level (area average: a level-l pixel covers
   a block of latent pixels and takes their mean timestep), and the conditioning timesteps are
   rounded to whole training timesteps (``time_grid=1``). The UNet was trained on integer
   timesteps only, and the sinusoidal embedding's fastest channel turns by one radian per
   timestep, so a fractional timestep is off the training distribution in those channels; and
   averaging makes hundreds of distinct fractional values at the coarse levels (AsynDM at 64x64:
   ~520 per sample), whose per-block projections would cost a few percent of the UNet, against
   ~190 after rounding. Only the conditioning is rounded; the sampler's update uses the exact field;
2. the embedding (and each block's ``time_emb_proj``) is computed once per distinct timestep of
   all levels (:func:`tpm.backbones.modulation.build_token_time`; per distinct (sample, timestep)
   pair for SDXL, whose embedding adds the sample's pooled text) and gathered per pixel;
3. the UNet's own ``forward`` runs unchanged, with two hooks per ResNet block: the block's
   ``time_emb_proj`` output is replaced by zeros and the per-pixel map is added to the input of
   its ``norm2``, which is where the stock block adds the bias. Every other module (attention
   processors, LoRA layers, ``added_cond_kwargs``) is the model's own.

When every sample's field is uniform no hook is installed: it is the stock forward.

Cross-attention maps (AsynDM Eq. 7, App. B.3): ``softmax(Q K^T / sqrt(d))`` of the ``attn2``
(text) layers, read on the side by a pre-hook from the layer's own inputs and projections and
averaged over heads; the attention output itself is the processor's. AsynDM uses the layers at
1/4 of the latent resolution, averages them and upsamples the result to the latent grid; we do
the same (bilinear), and use every ``attn2`` layer when a UNet has none at that resolution.

Written by hand: diffusers' UNet has no per-pixel time and its processors return no maps.
"""

from __future__ import annotations

from contextlib import ExitStack

import torch
import torch.nn.functional as F

from tpm.backbones.modulation import build_token_time, snap_to_levels

SUPPORTED_ADDITION = (None, "text_time")


def resnet_blocks(unet) -> list:
    """Every ``ResnetBlock2D`` of the UNet that takes a time embedding, in module order."""
    from diffusers.models.resnet import ResnetBlock2D

    return [m for m in unet.modules() if isinstance(m, ResnetBlock2D) and m.time_emb_proj is not None]


def cross_attention_layers(unet) -> list[tuple[str, torch.nn.Module, int]]:
    """(name, module, downsampling factor) of every ``attn2`` layer, in module order."""
    n_down = len(unet.down_blocks)
    out = []
    for name, mod in unet.named_modules():
        if not name.endswith(".attn2") or not getattr(mod, "is_cross_attention", False):
            continue
        parts = name.split(".")
        if parts[0] == "down_blocks":
            level = int(parts[1])
        elif parts[0] == "up_blocks":
            level = len(unet.up_blocks) - 1 - int(parts[1])
        else:  # mid block: the coarsest level
            level = n_down - 1
        out.append((name, mod, 2 ** level))
    return out


def asyndm_layers(unet) -> list[tuple[str, torch.nn.Module, int]]:
    """The capturable layers: those at 1/4 of the latent resolution (AsynDM App. B.3), else all."""
    layers = cross_attention_layers(unet)
    quarter = [item for item in layers if item[2] == 4]
    return quarter or layers


def check_unet(unet) -> None:
    """Raise ``ValueError`` for UNet features the per-pixel forward does not handle."""
    cfg = unet.config
    if cfg.get("addition_embed_type") not in SUPPORTED_ADDITION:
        raise ValueError(f"UNet addition_embed_type {cfg.get('addition_embed_type')!r} is not supported "
                         "(SD: none, SDXL: 'text_time')")
    if unet.class_embedding is not None or cfg.get("time_cond_proj_dim") is not None:
        raise ValueError("UNets with class embeddings or timestep_cond (LCM) are not supported per pixel")
    bad = [m for m in resnet_blocks(unet) if m.time_embedding_norm != "default"]
    if bad:
        raise ValueError(f"ResNet blocks with time_embedding_norm={bad[0].time_embedding_norm!r} are not supported")


def level_sizes(unet, height: int, width: int) -> list[tuple[int, int]]:
    """(h, w) at every UNet level (each downsampler halves, rounding up)."""
    sizes = [(height, width)]
    for _ in range(len(unet.down_blocks) - 1):
        h, w = sizes[-1]
        sizes.append(((h + 1) // 2, (w + 1) // 2))
    return sizes


class _CaptureMaps:
    """Pre-hooks on ``attn2`` layers that accumulate head-averaged text->image probabilities."""

    def __init__(self, layers, grid: tuple[int, int], sizes: list[tuple[int, int]]):
        self.layers, self.grid = layers, grid
        self.by_tokens = {h * w: (h, w) for h, w in sizes}
        self.sum: torch.Tensor | None = None
        self.count = 0

    def hook(self, attn, args, kwargs):
        x = args[0] if args else kwargs["hidden_states"]
        ctx = kwargs.get("encoder_hidden_states")
        if ctx is None:
            return None
        if attn.norm_cross is not None:
            ctx = attn.norm_encoder_hidden_states(ctx)
        b, n, _ = x.shape
        q, k = attn.to_q(x), attn.to_k(ctx)
        d = q.shape[-1] // attn.heads
        q = q.view(b, n, attn.heads, d).transpose(1, 2).float()
        k = k.view(b, -1, attn.heads, d).transpose(1, 2).float()
        if attn.norm_q is not None:
            q, k = attn.norm_q(q), attn.norm_k(k)
        probs = torch.softmax(torch.matmul(q, k.transpose(-1, -2)) * attn.scale, dim=-1).mean(dim=1)
        h, w = self.by_tokens[n]
        maps = probs.transpose(1, 2).reshape(b, -1, h, w)
        if (h, w) != tuple(self.grid):
            maps = F.interpolate(maps, size=self.grid, mode="bilinear", align_corners=False)
        self.sum = maps if self.sum is None else self.sum + maps
        self.count += 1
        return None

    def result(self) -> torch.Tensor | None:
        return None if self.sum is None else self.sum / self.count


def _time_table(unet, t_img: torch.Tensor, sample: torch.Tensor, encoder_hidden_states, added_cond_kwargs):
    """Distinct-time embedding table for the flattened per-level timesteps ``t_img`` (B, N_all)."""
    aug = None
    if unet.config.get("addition_embed_type") == "text_time":
        aug = unet.get_aug_embed(emb=sample.new_zeros(1), encoder_hidden_states=encoder_hidden_states,
                                 added_cond_kwargs=added_cond_kwargs)

    def embed(times, idx):
        emb = unet.time_embedding(unet.time_proj(times).to(dtype=sample.dtype), None)
        if aug is not None:
            emb = emb + aug[idx].to(emb.dtype)
        if unet.time_embed_act is not None:
            emb = unet.time_embed_act(emb)
        return emb

    return build_token_time(t_img, embed, shared=aug is None, with_text=False)


def unet_forward(
    unet,
    sample: torch.Tensor,
    timesteps: torch.Tensor,
    encoder_hidden_states: torch.Tensor,
    added_cond_kwargs: dict | None = None,
    capture: bool = False,
    layers: list[int] | None = None,
    per_pixel: bool | None = None,
    time_grid: float | None = 1.0,
    time_levels: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The UNet's output at a per-pixel timestep field ``timesteps`` (B, h, w), float.

    Equals ``unet(sample, t, encoder_hidden_states, added_cond_kwargs=...)`` when each sample's
    field is uniform. With ``capture`` it also returns the cross-attention maps (B, n_text, h, w)
    averaged over the selected capturable layers (indices into :func:`asyndm_layers`; ``None`` = all).
    ``per_pixel`` forces (True) or skips (False) the per-pixel path; ``None`` picks it for
    non-uniform fields only. On the per-pixel path the timesteps of all levels are rounded to
    multiples of ``time_grid`` (``None``: exact; module docstring, step 1) and, with
    ``time_levels``, a sample with more distinct timesteps is snapped to that many
    (:func:`tpm.backbones.modulation.snap_to_levels`).
    """
    b, _, height, width = sample.shape
    flat = timesteps.reshape(b, -1)
    uniform = bool((flat == flat[:, :1]).all()) if per_pixel is None else not per_pixel
    sizes = level_sizes(unet, height, width)
    with ExitStack() as stack:
        maps = None
        if capture:
            chosen = asyndm_layers(unet)
            if layers is not None:
                chosen = [chosen[i] for i in layers]
            maps = _CaptureMaps(chosen, (height, width), sizes)
            for _, mod, _ in chosen:
                stack.callback(mod.register_forward_pre_hook(maps.hook, with_kwargs=True).remove)
        if uniform:
            t_arg = flat[:, 0].to(torch.float32)
        else:
            t_arg = flat.mean(dim=1).to(torch.float32)  # ignored: every block's bias is replaced
            _install_time_maps(stack, unet, timesteps, sizes, sample, encoder_hidden_states, added_cond_kwargs,
                               time_grid, time_levels)
        out = unet(sample, t_arg, encoder_hidden_states=encoder_hidden_states, added_cond_kwargs=added_cond_kwargs,
                   return_dict=False)[0]
    return out, (maps.result() if maps is not None else None)


def _install_time_maps(stack: ExitStack, unet, timesteps, sizes, sample, encoder_hidden_states, added_cond_kwargs,
                       time_grid: float | None = 1.0, time_levels: int | None = None):
    """Per-pixel time biases for every ResNet block (module docstring, steps 1-3)."""
    b = timesteps.shape[0]
    field = timesteps.to(torch.float64)[:, None]
    levels = [F.adaptive_avg_pool2d(field, size)[:, 0] if size != tuple(field.shape[-2:]) else field[:, 0]
              for size in sizes]
    flat = torch.cat([lv.reshape(b, -1) for lv in levels], dim=1)
    if time_grid is not None:
        flat = torch.round(flat / time_grid) * time_grid
    flat = flat.to(torch.float32)
    if time_levels is not None:
        flat = snap_to_levels(flat, time_levels)
    tt = _time_table(unet, flat, sample, encoder_hidden_states, added_cond_kwargs)
    img_index = tt.img_index
    if img_index is None:  # uniform per sample (only when forced): row b for every pixel of sample b
        img_index = torch.arange(b, device=flat.device)[:, None].expand_as(flat)
    offsets = [0]
    for h, w in sizes:
        offsets.append(offsets[-1] + h * w)
    index = {size: img_index[:, offsets[i]:offsets[i + 1]].reshape(-1).contiguous() for i, size in enumerate(sizes)}
    for block in resnet_blocks(unet):
        emb = tt.table if block.skip_time_act else block.nonlinearity(tt.table)
        rows = block.time_emb_proj(emb)  # (P, C): once per distinct time, before the hooks exist
        rows_t = rows.t().contiguous()  # (C, P) for the channel-major gather

        def add_bias(_mod, args, rows=rows, rows_t=rows_t):
            x = args[0]
            bsz, c, h, w = x.shape
            idx = index.get((h, w))
            if idx is None:
                raise RuntimeError(f"no time map for UNet features of size {(h, w)}")
            if idx.numel() >= rows.shape[0]:
                # Gather channel-major: (C, B*h*w) is written contiguously, and the add then reads
                # it in x's own layout; about twice as fast on a CPU as a (B, h, w, C) gather + permute.
                bias = rows_t.index_select(1, idx).view(c, bsz, h, w).transpose(0, 1)
            else:  # fewer pixels than table rows: transposing the gather costs less than the table
                bias = F.embedding(idx.view(bsz, h, w), rows).permute(0, 3, 1, 2)
            return (x + bias.to(x.dtype),)

        stack.callback(block.time_emb_proj.register_forward_hook(lambda _m, _a, out: torch.zeros_like(out)).remove)
        stack.callback(block.norm2.register_forward_pre_hook(add_bias).remove)


__all__ = ["asyndm_layers", "check_unet", "cross_attention_layers", "level_sizes", "resnet_blocks", "unet_forward"]
