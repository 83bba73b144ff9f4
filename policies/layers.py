"""Small network pieces shared by the learned policies (the TPM and the field policy), and the
reading of a sampler :class:`~tpm.policy.State` both start their network inputs from.

We write the transformer block by hand because ``nn.TransformerEncoderLayer`` always carries
LayerNorm modules that its fused eval-mode path relies on, and AsyncDiff's TPM has none.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class Block(nn.Module):
    """Pre-activation transformer block: x + attn(n(x)), then x + mlp(n(x)); n is identity unless layer_norm."""

    def __init__(self, width: int, heads: int, mlp_ratio: int, layer_norm: bool):
        super().__init__()
        self.norm1 = nn.LayerNorm(width) if layer_norm else nn.Identity()
        self.attn = nn.MultiheadAttention(width, heads, dropout=0.0, batch_first=True)
        self.norm2 = nn.LayerNorm(width) if layer_norm else nn.Identity()
        self.mlp = nn.Sequential(nn.Linear(width, mlp_ratio * width), nn.GELU(), nn.Linear(mlp_ratio * width, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


def fourier(x: torch.Tensor, n: int = 8) -> torch.Tensor:
    """(B, S) scalars -> (B, S * (2n + 1)) sin/cos features at octave frequencies, plus the raw value."""
    freqs = (2.0 ** torch.arange(n, device=x.device, dtype=x.dtype)) * math.pi
    ang = x[..., None] * freqs
    return torch.cat([x[..., None], ang.sin(), ang.cos()], dim=-1).flatten(1)


def read_state(state, cfg, who: str, build_hint: str) -> tuple[torch.Tensor, ...]:
    """(latents, velocity, x0, prompt embeddings) of ``state``, detached float32; velocity and x0 are zeros
    before the first step. Raises :class:`~tpm.policy.PolicyError` when the prompt embeddings are missing or
    the widths differ from ``cfg``'s (``token_dim``, ``text_dim``, ``pooled_dim``): ``who`` names the
    policy, ``build_hint`` says how to build one for this backbone."""
    from tpm.policy import PolicyError

    if state.text_embeds is None or state.pooled is None:
        raise PolicyError(f"{who} needs the prompt embeddings in State.text_embeds / State.pooled; "
                          "sample with tpm.sample")
    lat = state.latents.detach().float()
    c = lat.shape[-1]
    if c != cfg.token_dim:
        raise PolicyError(f"{who} was built for {cfg.token_dim}-channel tokens but the backbone gives {c}; {build_hint}")
    emb = state.text_embeds.detach().float()
    if emb.shape[-1] != cfg.text_dim or state.pooled.shape[-1] != cfg.pooled_dim:
        raise PolicyError(f"{who} was built for text_dim={cfg.text_dim}, pooled_dim={cfg.pooled_dim} but the "
                          f"pipeline's prompt embeddings are {emb.shape[-1]} / {state.pooled.shape[-1]} wide; "
                          f"{build_hint}")
    zeros = torch.zeros_like(lat)
    vel = zeros if state.velocity is None else state.velocity.detach().float()
    x0 = zeros if state.x0 is None else state.x0.detach().float()
    return lat, vel, x0, emb


def pool_text(embeds: torch.Tensor, tokens: int) -> torch.Tensor:
    """(B, T, D) prompt embedding sequence -> (B, tokens, D) by average pooling along the sequence."""
    return F.adaptive_avg_pool1d(embeds.transpose(1, 2), tokens).transpose(1, 2).contiguous()


def encode_sequence(net: nn.Module, inputs: dict[str, torch.Tensor], image: torch.Tensor) -> torch.Tensor:
    """Run ``net.blocks`` over [read-out tokens, temporal, pooled prompt, prompt tokens, image tokens].

    ``net`` holds the shared embedding layers by name (``readout``, ``temporal_in``, ``pooled_in``,
    ``text_in``, ``text_pos``, ``blocks``); ``image``: (B, n, width) already embedded. Inputs are
    the replay record's "temporal", "pooled" and "text" entries.
    """
    dev, dt = net.readout.device, net.readout.dtype
    bsz = image.shape[0]
    seq = torch.cat([
        net.readout.expand(bsz, -1, -1),
        net.temporal_in(fourier(inputs["temporal"].to(dev, dt)))[:, None],
        net.pooled_in(inputs["pooled"].to(dev, dt))[:, None],
        net.text_in(inputs["text"].to(dev, dt)) + net.text_pos,
        image,
    ], dim=1)
    for block in net.blocks:
        seq = block(seq)
    return seq
