"""Shared tiny pipelines and transformer inputs for the core tests (offline, fp32).

Each pipeline is a real diffusers class with random weights (``tpm.tiny``), built once per
session. Tests that modify a pipeline (adapters, processors, schedulers) build their own copy
with :func:`build_pipeline` instead of touching the shared ones.
"""

from __future__ import annotations

import torch

from tpm.tiny import tiny_flux_pipeline, tiny_sd3_pipeline

# name -> builder kwargs; "sd35" has SD3.5's dual attention and qk-norm.
PIPELINES = {
    "flux": (tiny_flux_pipeline, {}),
    "flux_guidance": (tiny_flux_pipeline, {"guidance_embeds": True}),
    "sd3": (tiny_sd3_pipeline, {}),
    "sd35": (tiny_sd3_pipeline, {"dual_attention_layers": (0,), "qk_norm": "rms_norm"}),
}

_CACHE: dict[str, object] = {}


def build_pipeline(name: str):
    """A fresh pipeline (for tests that modify it)."""
    builder, kwargs = PIPELINES[name]
    return builder(**kwargs)


def shared_pipeline(name: str):
    """The session-wide pipeline ``name`` (do not modify it)."""
    if name not in _CACHE:
        _CACHE[name] = build_pipeline(name)
    return _CACHE[name]



class TransformerCase:
    """Random inputs for one transformer, and its stock and per-token forwards side by side.

    Layouts: Flux outputs (B, N, C) tokens; SD3 outputs (B, C, H, W). Fields are (B, h, w).
    ``guidance`` (Flux with a guidance embedding) is given per sample, like the pipeline.
    """

    def __init__(self, name: str, transformer, batch: int = 2, grid: tuple[int, int] = (4, 6),
                 n_txt: int = 5, seed: int = 0):
        self.name, self.tr, self.batch, self.grid, self.n_txt = name, transformer, batch, grid, n_txt
        self.flux = name.startswith("flux")
        cfg = transformer.config
        gen = torch.Generator().manual_seed(seed)
        h, w = grid
        if self.flux:
            from diffusers import FluxPipeline

            self.x = torch.randn(batch, h * w, cfg.in_channels, generator=gen)
            self.img_ids = FluxPipeline._prepare_latent_image_ids(batch, h, w, "cpu", torch.float32)
            self.txt_ids = torch.zeros(n_txt, 3)
            pooled_dim = cfg.pooled_projection_dim
            self.guidance = torch.tensor([3.5, 5.0][:batch]) if cfg.guidance_embeds else None
        else:
            p = cfg.patch_size
            self.x = torch.randn(batch, cfg.in_channels, h * p, w * p, generator=gen)
            pooled_dim = cfg.pooled_projection_dim
        self.ctx = torch.randn(batch, n_txt, cfg.joint_attention_dim, generator=gen)
        self.pooled = torch.randn(batch, pooled_dim, generator=gen)

    def select(self, idx):
        """The same inputs restricted to samples ``idx`` (a list)."""
        other = object.__new__(TransformerCase)
        other.__dict__.update(self.__dict__)
        other.batch = len(idx)
        other.x, other.ctx, other.pooled = self.x[idx], self.ctx[idx], self.pooled[idx]
        if self.flux and self.guidance is not None:
            other.guidance = self.guidance[idx]
        return other

    def stock(self, tau_per_sample: torch.Tensor, x: torch.Tensor | None = None) -> torch.Tensor:
        """The transformer's own forward with one time per sample (tau in [0, 1])."""
        x = self.x if x is None else x
        if self.flux:
            return self.tr(hidden_states=x, timestep=tau_per_sample, guidance=self.guidance,
                           pooled_projections=self.pooled, encoder_hidden_states=self.ctx, txt_ids=self.txt_ids,
                           img_ids=self.img_ids, return_dict=False)[0]
        return self.tr(hidden_states=x, timestep=tau_per_sample * 1000, encoder_hidden_states=self.ctx,
                       pooled_projections=self.pooled, return_dict=False)[0]

    def ours(self, field: torch.Tensor, layers=None, time_resolution=None, x=None, img_ids=None, tokens=None,
             time_levels=None, tile_sizes=None):
        """tpm's per-token forward on a (B, h, w) field; returns (output, maps).
        ``tile_sizes``: the forward's default when ``None``."""
        from tpm.backbones import flux_transformer_forward, sd3_transformer_forward

        x = self.x if x is None else x
        tiles = {} if tile_sizes is None else {"tile_sizes": tile_sizes}
        if self.flux:
            return flux_transformer_forward(
                self.tr, x, field.reshape(field.shape[0], -1), self.ctx, self.pooled,
                self.img_ids if img_ids is None else img_ids, self.txt_ids, guidance=self.guidance,
                attention_layers=layers, grid=self.grid, time_resolution=time_resolution,
                attention_tokens=tokens, time_levels=time_levels, **tiles,
            )
        return sd3_transformer_forward(self.tr, x, field, self.ctx, self.pooled, attention_layers=layers,
                                       time_resolution=time_resolution, attention_tokens=tokens,
                                       time_levels=time_levels, **tiles)

    @property
    def num_layers(self) -> int:
        if self.flux:
            return len(self.tr.transformer_blocks) + len(self.tr.single_transformer_blocks)
        return len(self.tr.transformer_blocks)

    def image_slice(self) -> slice:
        """Image positions in the joint sequence (Flux: text first; SD3: image first)."""
        n = self.grid[0] * self.grid[1]
        return slice(self.n_txt, self.n_txt + n) if self.flux else slice(0, n)

    def text_slice(self) -> slice:
        n = self.grid[0] * self.grid[1]
        return slice(0, self.n_txt) if self.flux else slice(n, n + self.n_txt)


def two_level_field(batch: int, grid: tuple[int, int], levels=((0.8, 0.3), (0.6, 0.15))) -> torch.Tensor:
    """Half the tokens (a checkerboard) at one time, half at another; different per sample."""
    h, w = grid
    board = ((torch.arange(h)[:, None] + torch.arange(w)[None]) % 2).bool()
    out = torch.empty(batch, h, w)
    for b in range(batch):
        hi, lo = levels[b % len(levels)]
        out[b] = torch.where(board, torch.tensor(hi), torch.tensor(lo))
    return out
