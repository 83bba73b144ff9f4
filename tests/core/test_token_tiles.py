"""Few-level time fields in the DiT forwards: image tokens permuted into tiles that share one
modulation row per sample (``TokenTime.in_tiles`` in tpm.backbones.modulation).

- the permutation groups tokens by their rows over the batch, whole tiles first, raster order kept;
- the tile arithmetic equals the per-token gather, with and without autograd;
- Flux, SD3 and SD3.5 forwards in tiles equal the gather path: outputs, object-token maps, gradients.
"""

from __future__ import annotations

import pytest
import torch

from tpm.backbones.modulation import build_token_time

from .helpers import TransformerCase, shared_pipeline

NAMES = ["flux", "flux_guidance", "sd3", "sd35"]
TOL = 1e-5


def _case(name: str) -> TransformerCase:
    return TransformerCase(name, shared_pipeline(name).transformer)


def _diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def _blocks_field(batch: int, grid: tuple[int, int]) -> torch.Tensor:
    """Three time levels in spatial blocks, laid out differently per sample (like AsynDM's masks)."""
    h, w = grid
    out = torch.full((batch, h, w), 0.8)
    for b in range(batch):
        out[b, : h // 2, (b % 2) * (w // 2):][:, : w // 2] = 0.55
        out[b, h // 2 :, w // 3 :] = 0.3 + 0.05 * b
    return out


@pytest.fixture
def tiles_on_small_images(monkeypatch):
    """The test models have 24 image tokens; tiles are off below TILE_MIN_TOKENS by default."""
    import tpm.backbones.modulation as modulation

    monkeypatch.setattr(modulation, "TILE_MIN_TOKENS", 0)


def test_in_tiles_groups_tokens_that_share_a_row_in_every_sample(tiles_on_small_images, monkeypatch):
    import tpm.backbones.modulation as modulation
    from tpm.backbones.modulation import gated_residual, modulate_image

    def embed(times, idx):
        return torch.stack([times, idx.float(), times * 0.01, times * idx], dim=1)

    tau = _blocks_field(2, (4, 6)).reshape(2, -1) * 1000
    tt = build_token_time(tau, embed)
    n = tau.shape[1]
    columns = [tuple(c) for c in tt.img_index.T.tolist()]
    counts = {c: columns.count(c) for c in set(columns)}
    for size in (2, 3, 4):
        rt = tt.in_tiles((size,))
        assert rt.tile == size
        assert torch.equal(torch.sort(rt.order).values, torch.arange(n))
        assert torch.equal(rt.img_index, tt.img_index[:, rt.order])
        tiles, rest = rt.split_tiles(rt.img_index.T[None])  # (1, J, T, B), (1, R, B)
        # every whole tile holds one row per sample: its tile row; each group leaves count % T tokens
        assert bool((tiles[0] == rt.tile_rows.T[:, None, :]).all())
        assert tiles.shape[1] == sum(c // size for c in counts.values())
        assert rest.shape[1] == sum(c % size for c in counts.values())
        whole = rt.order[: tiles.shape[1] * size].view(-1, size)
        assert bool((whole.diff(dim=1) > 0).all())  # raster order inside a tile
    # a uniform field, or every token its own group: nothing changes
    uniform = build_token_time(torch.full((2, n), 300.0), embed)
    assert uniform.in_tiles() is uniform
    distinct = build_token_time(torch.rand(2, n) * 1000, embed)
    assert distinct.in_tiles() is distinct and tt.in_tiles(()) is tt
    with monkeypatch.context() as m:  # small images keep the gather
        m.setattr(modulation, "TILE_MIN_TOKENS", n + 1)
        assert tt.in_tiles() is tt

    # the tile arithmetic equals the per-token gather on the permuted tokens, with and without autograd
    rt = tt.in_tiles((4,))
    assert 0 < rt.split_tiles(rt.img_index.T[None])[1].shape[1]  # both parts are exercised
    x, y = torch.randn(2, n, 2), torch.randn(2, n, 2)
    ref_chunks = tt.image_chunks(tt.table, 2, scales=(1,))
    tile_chunks = rt.image_chunks(rt.table, 2, scales=(1,))
    xp, yp = x[:, rt.order], y[:, rt.order]
    for grad in (False, True):
        with torch.set_grad_enabled(grad):
            ref = modulate_image(tt, x, *ref_chunks)[:, rt.order]
            assert torch.allclose(modulate_image(rt, xp, *tile_chunks), ref, atol=1e-6)
            ref = gated_residual(tt, x, ref_chunks[0], y)[:, rt.order]
            assert torch.allclose(gated_residual(rt, xp, tile_chunks[0], yp), ref, atol=1e-6)
    assert torch.equal(rt.restore_order(xp), x)


@pytest.mark.parametrize("name", NAMES)
@torch.no_grad()
def test_tiled_forward_equals_per_token_forward(name, monkeypatch, tiles_on_small_images):
    """Permuting image tokens into tiles changes nothing but the order of float sums: the output and
    the object-token maps equal the per-token-gather forward's."""
    case = _case(name)
    field = _blocks_field(2, case.grid)
    layers, tokens = [0, case.num_layers - 1], [[1, 3], [2]]
    from tpm.backbones.modulation import TokenTime as TT

    taken, in_tiles = [], TT.in_tiles
    monkeypatch.setattr(TT, "in_tiles", lambda self, sizes: taken.append(in_tiles(self, sizes)) or taken[-1])
    ref, ref_maps = case.ours(field, layers=layers, tokens=tokens, tile_sizes=())
    for sizes in ((2,), (4,), None):  # None: the forward's default sizes
        taken.clear()
        out, maps = case.ours(field, layers=layers, tokens=tokens, tile_sizes=sizes)
        assert taken[0].tile > 0
        assert _diff(out, ref) <= TOL
        assert _diff(maps, ref_maps) <= 1e-6 and float(maps.abs().max()) > 0


@pytest.mark.parametrize("name", ["flux", "sd35"])
def test_tiled_forward_gradients_equal_per_token_forward(name, tiles_on_small_images):
    """With autograd the two parts are concatenated (``out=`` has no autograd); same values and gradients."""
    case = _case(name)
    field = _blocks_field(2, case.grid)
    grads = []
    for sizes in ((2,), ()):
        x = case.x.clone().requires_grad_(True)
        out, _ = case.ours(field, x=x, tile_sizes=sizes)
        out.square().sum().backward()
        grads.append((out.detach(), x.grad))
    assert _diff(grads[0][0], grads[1][0]) <= TOL
    assert _diff(grads[0][1], grads[1][1]) <= 1e-4 * float(grads[1][1].abs().max())
