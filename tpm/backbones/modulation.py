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

Fields with few distinct times (AsynDM, patch policies, level-snapped fields) skip most of the
per-token gather (:meth:`TokenTime.in_tiles`): the forward permutes the image tokens once so that tokens sharing a
table row in every sample are contiguous, cut into tiles of T tokens, and modulates all whole tiles
in one op that broadcasts one row per tile over its T tokens, like the stock forward broadcasts one
row per sample; only the few tokens left over per group (fewer than T each) are gathered per token.
The tokens go back in order at the end. Every part of these DiTs is permutation-equivariant over
image tokens once the position ids travel with them (Flux's rotary ids; SD3 adds its position
embedding before the blocks), so the output is the same up to the order of floating-point sums in
attention. Fields in which nearly every token has its own group keep the plain gather.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

#: Tile sizes :meth:`TokenTime.in_tiles` chooses from. ``benchmarks/modulation_cost.py`` times one
#: modulation per route; on a CPU at (B, N, D) = (2, 1024, 256) with 40 groups, tiles of 4-8 took
#: ~0.55 ms, the per-token gather ~0.8 ms, the stock broadcast ~0.57 ms and one op per group ~0.71 ms.
TILE_SIZES = (32, 16, 8, 4, 2)
#: Fewer image tokens than this keep the plain gather: there the traffic saved is a few microseconds
#: against the permutation's dozen small ops, and the 16-token testbed keeps the path it was tuned on.
TILE_MIN_TOKENS = 256


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
    #: (N,) the image-token permutation the forward applies (``None``: tokens in their own order).
    order: torch.Tensor | None = None
    #: Tokens per tile (0: no tiles). The first ``J * tile`` permuted tokens form J whole tiles.
    tile: int = 0
    #: (B, J) the table row of each whole tile, per sample.
    tile_rows: torch.Tensor | None = None

    @property
    def uniform(self) -> bool:
        return self.img_index is None

    def in_tiles(self, sizes: tuple[int, ...] = TILE_SIZES) -> TokenTime:
        """This table with the image tokens permuted into whole tiles that share a row in every sample.

        Tokens are grouped by their tuple of rows over the batch (stably, so raster order within a
        group). Each group gives ``count // T`` whole tiles, which come first, and ``count % T``
        leftover tokens, which come last and keep a per-token index (``img_index`` is permuted to
        match). T is the size in ``sizes`` with the least modulation traffic, leftover tokens +
        tiles; the table is returned unchanged when the field is uniform, when there are fewer than
        :data:`TILE_MIN_TOKENS` image tokens, or when that traffic is over half the per-token
        gather's (nearly every token in its own group).
        """
        if self.uniform or not sizes or self.img_index.shape[1] < TILE_MIN_TOKENS:
            return self
        idx = self.img_index
        n = idx.shape[1]
        key = idx[0]
        for row in idx[1:]:  # re-densify after each sample so the combined key never overflows
            key = torch.unique(key * self.table.shape[0] + row, return_inverse=True)[1]
        _, key, counts = torch.unique(key, return_inverse=True, return_counts=True)

        def traffic(t: int) -> float:
            rest = int((counts % t).sum())
            return rest + (n - rest) / t

        tile = min(sizes, key=traffic)
        if traffic(tile) > n / 2:
            return self
        grouped = torch.argsort(key, stable=True)
        group = key[grouped]
        rank = torch.arange(n, device=idx.device) - (torch.cumsum(counts, 0) - counts)[group]  # within its group
        whole = rank < (counts // tile * tile)[group]
        order = torch.cat([grouped[whole], grouped[~whole]])
        permuted = idx[:, order]
        m = int(whole.sum())
        return TokenTime(self.table, permuted, self.txt_index, order, tile, permuted[:, :m:tile].contiguous())

    def split_tiles(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, N, ...) permuted tokens -> views of the whole tiles (B, J, T, ...) and the rest (B, R, ...)."""
        j = self.tile_rows.shape[1]
        return x[:, : j * self.tile].unflatten(1, (j, self.tile)), x[:, j * self.tile:]

    def restore_order(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """Undo :attr:`order` along ``dim`` (image tokens back in raster order)."""
        if self.order is None:
            return x
        return torch.empty_like(x).index_copy_(dim, self.order, x)

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
        them so. Uniform rows are returned as they are (the stock arithmetic). In tiles
        (:meth:`in_tiles`) each chunk is a pair: (B, J, 1, D) rows of the whole tiles and (B, R, D)
        rows of the leftover tokens.
        """
        if self.img_index is None:
            return emb[:, None].chunk(n, dim=-1)
        parts = [(1 + part if i in scales else part).contiguous() for i, part in enumerate(emb.chunk(n, dim=-1))]
        if not self.tile:
            return tuple(F.embedding(self.img_index, part) for part in parts)
        rest = self.img_index[:, self.tile_rows.shape[1] * self.tile:]
        return tuple((F.embedding(self.tile_rows, part)[:, :, None], F.embedding(rest, part)) for part in parts)

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
# addcmul per modulation / gated residual replaces two or three passes; in tiles, one addcmul
# broadcasts the tile rows over all whole tiles and a second one handles the leftover tokens, both
# writing straight into the output. Uniform rows keep the stock arithmetic, so synchronous fields
# stay bit-exact with the pipelines.
def _in_tiles(tt: TokenTime, like: torch.Tensor, out: torch.Tensor | None, tiles_op: Callable,
              rest_op: Callable) -> torch.Tensor:
    """``tiles_op(o)`` / ``rest_op(o)`` compute the whole tiles / the leftover tokens into ``o``
    (``None``: a new tensor). Without autograd both write into one buffer; with it (``out=`` has no
    autograd) the two parts are concatenated."""
    if torch.is_grad_enabled():
        res = torch.cat([tiles_op(None).flatten(1, 2), rest_op(None)], dim=1)
        return res if out is None else out.copy_(res)
    out = torch.empty_like(like) if out is None else out
    o_tiles, o_rest = tt.split_tiles(out)
    tiles_op(o_tiles)
    rest_op(o_rest)
    return out


def modulate_image(tt: TokenTime, x: torch.Tensor, shift, scale, out: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`modulate` for image tokens; per-token ``scale`` holds ``1 + scale`` (``image_chunks(scales=)``).
    ``out``: write the result there (per-token fields, no autograd)."""
    if tt.uniform:
        return modulate(x, shift, scale)
    if tt.tile:
        (shift_t, shift_r), (scale_t, scale_r), (x_t, x_r) = shift, scale, tt.split_tiles(x)
        return _in_tiles(tt, x, out, lambda o: torch.addcmul(shift_t, x_t, scale_t, out=o),
                         lambda o: torch.addcmul(shift_r, x_r, scale_r, out=o))
    return torch.addcmul(shift, x, scale, out=out)


def gated_residual(tt: TokenTime, x: torch.Tensor, gate, y: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``x + gate * y`` for image tokens, fused for per-token gates; ``out`` as in :func:`modulate_image`."""
    if tt.uniform:
        return x + gate * y
    if tt.tile:
        (gate_t, gate_r), (x_t, x_r), (y_t, y_r) = gate, tt.split_tiles(x), tt.split_tiles(y)
        return _in_tiles(tt, x, out, lambda o: torch.addcmul(x_t, gate_t, y_t, out=o),
                         lambda o: torch.addcmul(x_r, gate_r, y_r, out=o))
    return torch.addcmul(x, gate, y, out=out)
