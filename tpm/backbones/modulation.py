"""Per-token AdaLN modulation computed once per distinct time.

SD3 and Flux inject time outside attention: ``temb`` (one row per sample) goes through every
block's AdaLN ``linear(silu(temb))`` and the resulting shift/scale/gate broadcast over tokens
(AsynDM §3.1; AsyncPatch App. E: per-token time only changes this broadcast). For a time *field*
we need one modulation row per token. Computing ``linear(silu(.))`` per token costs a D->kD
matmul per token (about +50 % time per block where we measured it), so :class:`TokenTime` keeps a table of the distinct
(sample, time) pairs, runs the AdaLN projections on the table only, and gathers rows per token.

When every sample's field is uniform and its text tokens share that time, the table has exactly
one row per sample and no gather happens: the arithmetic is then the stock forward's.

Text tokens get one time per sample: the mean of that sample's image-token times (for a uniform
field, the field's value).

The table is small for schedules with a few time levels (synchronous, AsynDM, patch policies),
but a learned per-token field can give every token its own time, and then the table has one row
per token. At FLUX.1-dev width a double block's image modulation is a 3072 -> 18432 projection,
about three quarters of the block's image MLP, so 1024 distinct rows cost ~+25 % per step
(``benchmarks/bench_sampler.py --forward``). Projections that only modulate text tokens run on
one row per sample (:meth:`TokenTime.text_table`), and the per-token AdaLN arithmetic is fused
(:func:`modulate_image`, :func:`gated_residual`). Two optional bounds:

- ``levels``: a sample with more than ``levels`` distinct image times has them snapped to
  ``levels`` evenly spaced values between its own smallest and largest time. The table then has
  at most ``levels + 1`` rows per sample and every token is conditioned on a time within
  ``(max - min) / (2 (levels - 1))`` of its own; samples with at most ``levels`` distinct times
  are untouched, so synchronous and few-level fields stay exact. Learned per-token policies ask
  for this by default (``Policy.conditioning_time_levels``).
- ``resolution``: rounds image times to multiples of ``resolution`` (a global grid).

Only the time the network is conditioned on is snapped; the sampler's update uses the exact field.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class TokenTime:
    """Time embeddings for the image tokens (B, N) and the text tokens (one per sample).

    ``table``: (P, D) time(-text) embeddings of the distinct (sample, time) pairs.
    ``img_index``: (B, N) row of ``table`` for each image token, or ``None`` when uniform
    (row b for every token of sample b). ``txt_index``: (B,) row for each sample's text tokens,
    or ``None`` when uniform.
    """

    table: torch.Tensor
    img_index: torch.Tensor | None
    txt_index: torch.Tensor | None

    @property
    def uniform(self) -> bool:
        return self.img_index is None

    @property
    def num_distinct(self) -> int:
        return self.table.shape[0]

    def project(self, linear: nn.Module, silu: nn.Module | None = None) -> torch.Tensor:
        """``linear(silu(table))``: the AdaLN projection, once per distinct row -> (P, kD)."""
        x = self.table if silu is None else silu(self.table)
        return linear(x)

    def image_rows(self, emb: torch.Tensor) -> torch.Tensor:
        """(P, kD) -> (B, N, kD), or (B, 1, kD) when uniform (broadcasts like the stock path)."""
        if self.img_index is None:
            return emb[:, None]
        # F.embedding is an index_select: ~5x faster on CPU than advanced indexing emb[index].
        return F.embedding(self.img_index, emb)

    def image_chunks(self, emb: torch.Tensor, n: int, scales: tuple[int, ...] = ()) -> tuple[torch.Tensor, ...]:
        """``image_rows(emb).chunk(n, -1)``, but each chunk gathered from its own contiguous slice of
        the table: the same values, and contiguous (B, N, D) operands make the elementwise
        modulation that follows about twice as fast on a CPU as strided views of one (B, N, nD).

        Per-token rows of the chunks listed in ``scales`` come as ``1 + scale``, added on the P table
        rows before the gather instead of on B * N tokens after it; :func:`modulate_image` takes
        them so. Uniform rows are returned as they are (the stock arithmetic).
        """
        if self.img_index is None:
            return emb[:, None].chunk(n, dim=-1)
        return tuple(F.embedding(self.img_index, (1 + part if i in scales else part).contiguous())
                     for i, part in enumerate(emb.chunk(n, dim=-1)))

    def text_table(self) -> torch.Tensor:
        """(B, D): the table rows the text tokens use, one per sample (the table itself when uniform).
        Projections that only modulate text tokens run on these B rows, not on all P."""
        return self.table if self.txt_index is None else F.embedding(self.txt_index, self.table)

    def text_rows(self, emb: torch.Tensor) -> torch.Tensor:
        """(P, kD) -> (B, 1, kD): one modulation row per sample for its text tokens."""
        if self.txt_index is None:
            return emb[:, None]
        return F.embedding(self.txt_index, emb)[:, None]


def text_time(tau_img: torch.Tensor) -> torch.Tensor:
    """The time the text tokens are conditioned on: the mean image-token time per sample."""
    return tau_img.float().mean(dim=1).to(tau_img.dtype)


def snap_to_levels(tau_img: torch.Tensor, levels: int) -> torch.Tensor:
    """Per sample: more than ``levels`` distinct times -> ``levels`` evenly spaced values between
    the sample's min and max (nearest); samples with at most ``levels`` distinct times unchanged."""
    if levels < 2:
        raise ValueError(f"time levels must be >= 2, got {levels}")
    many = torch.tensor([torch.unique(row).numel() > levels for row in tau_img], device=tau_img.device)
    if not bool(many.any()):
        return tau_img
    lo = tau_img.amin(dim=1, keepdim=True)
    hi = tau_img.amax(dim=1, keepdim=True)
    step = (hi - lo) / (levels - 1)
    snapped = lo + torch.round((tau_img - lo) / step) * step
    return torch.where(many[:, None], snapped.to(tau_img.dtype), tau_img)


def build_token_time(
    tau_img: torch.Tensor,
    embed: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    resolution: float | None = None,
    shared: bool = False,
    with_text: bool = True,
) -> TokenTime:
    """Build the distinct-time table.

    Args:
        tau_img: (B, N) conditioning time of every image token, in the model's own time units.
        embed: ``embed(times (P,), sample_index (P,)) -> (P, D)``, the model's time(-text)
            embedding for each pair (it reads the sample's pooled text / guidance by index).
        resolution: if given, image times are rounded to multiples of it first.
        shared: the embedding depends on the time only (SD's UNet: no pooled text), so one row
            serves every sample with that time; ``embed`` then gets sample index 0 throughout.
        with_text: add each sample's text time (the model has text tokens that take a time); without
            it ``txt_index`` is ``None`` and :meth:`TokenTime.text_rows` must not be used.

    The ``levels`` bound (:func:`snap_to_levels`) is applied by the forwards before this.
    Rows are sorted by (sample, time), or by time when ``shared``.
    """
    if resolution is not None:
        tau_img = torch.round(tau_img / resolution) * resolution
    bsz, n = tau_img.shape
    first = tau_img[:, :1]
    if bool((tau_img == first).all()):
        # Uniform field: text tokens get the same time, exactly (a float mean could differ by an ulp).
        idx = torch.arange(bsz, device=tau_img.device)
        return TokenTime(embed(first[:, 0], idx), None, None)
    values = torch.cat([tau_img, text_time(tau_img)[:, None]], dim=1) if with_text else tau_img
    if shared:
        times, inverse = torch.unique(values, return_inverse=True)
        table = embed(times, torch.zeros_like(times, dtype=torch.long))
        return TokenTime(table, inverse[:, :n], inverse[:, n] if with_text else None)
    # Exact unique per sample, on the float values. A 1-D unique per row is a sort; one unique over
    # (sample, time) pairs with dim=0 compares rows one by one and was ~30x slower at 10k pairs.
    times, samples, inverse, offset = [], [], [], 0
    for b in range(bsz):
        u, inv = torch.unique(values[b], return_inverse=True)
        times.append(u)
        samples.append(torch.full_like(u, b, dtype=torch.long))
        inverse.append(inv + offset)
        offset += u.numel()
    inverse = torch.stack(inverse)
    table = embed(torch.cat(times), torch.cat(samples))
    return TokenTime(table, inverse[:, :n], inverse[:, n] if with_text else None)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """AdaLN: ``x * (1 + scale) + shift`` with (B, N|1, D) shift/scale."""
    return x * (1 + scale) + shift


# Per-token rows make every elementwise AdaLN operand a (B, N, D) tensor instead of a broadcast
# (B, 1, D) row, so the passes over memory, not the arithmetic, are the cost on a CPU. One fused
# addcmul per modulation / gated residual replaces two or three passes; uniform rows keep the
# stock arithmetic, so synchronous fields stay bit-exact with the pipelines.
def modulate_image(tt: TokenTime, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """:func:`modulate` for image tokens; per-token ``scale`` holds ``1 + scale`` (``image_chunks(scales=)``)."""
    if tt.uniform:
        return modulate(x, shift, scale)
    return torch.addcmul(shift, x, scale)


def gated_residual(tt: TokenTime, x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``x + gate * y`` for image tokens, fused for per-token gates."""
    if tt.uniform:
        return x + gate * y
    return torch.addcmul(x, gate, y)
