"""One AdaLN modulation ``x * (1 + scale) + shift`` over image tokens, four ways; prints JSON.

The per-token forwards (``tpm.backbones.modulation``) modulate every image token with its own
time's row. This measures one such modulation at (B, N, D) with G groups of tokens sharing a
row in every sample (tokens already permuted so that groups are contiguous):

- ``stock``: one row per sample, broadcast (what the stock forward does);
- ``gather``: per-token rows gathered from the table, one ``addcmul`` (the plain per-token path);
- ``runs``: one ``addcmul`` per group, its row broadcast over the group;
- ``tiles_T``: groups cut into tiles of T tokens, one ``addcmul`` over all whole tiles (a row per
  tile, broadcast over its T tokens) and one gathered ``addcmul`` for the leftover tokens (the
  default path for few-level fields, :meth:`TokenTime.in_tiles`).

Milliseconds per modulation, process CPU time, one thread, median of ``--repeats`` blocks.

    python benchmarks/modulation_cost.py --shapes 2x1024x256,1x1024x3072 --groups 8,40,100
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F


def per_call_ms(fn, calls: int, repeats: int) -> float:
    fn()
    blocks = []
    for _ in range(repeats):
        start = time.process_time()
        for _ in range(calls):
            fn()
        blocks.append((time.process_time() - start) / calls * 1e3)
    return round(statistics.median(blocks), 3)


def variants(b: int, n: int, d: int, groups: int, tiles: tuple[int, ...], seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(b, n, d, generator=gen)
    shift_tab, scale_tab = torch.randn(groups * b, d, generator=gen), torch.randn(groups * b, d, generator=gen)
    # G contiguous groups of near-equal size; group g of sample s uses table row g * b + s
    sizes = [n // groups + (g < n % groups) for g in range(groups)]
    group = torch.repeat_interleave(torch.arange(groups), torch.tensor(sizes))
    index = group[None] * b + torch.arange(b)[:, None]  # (B, N)
    row_shift, row_scale = torch.randn(b, 1, d, generator=gen), torch.randn(b, 1, d, generator=gen)
    bounds = torch.cumsum(torch.tensor([0, *sizes]), 0).tolist()
    group_rows = torch.arange(groups)[:, None] * b + torch.arange(b)[None]  # (G, B)

    def runs():
        out = torch.empty_like(x)
        sh, sc = F.embedding(group_rows, shift_tab)[:, :, None], F.embedding(group_rows, 1 + scale_tab)[:, :, None]
        for g in range(groups):
            a, e = bounds[g], bounds[g + 1]
            torch.addcmul(sh[g], x[:, a:e], sc[g], out=out[:, a:e])
        return out

    def tiled(t: int):
        whole = [s // t * t for s in sizes]
        order = torch.cat([torch.arange(bounds[g], bounds[g] + whole[g]) for g in range(groups)]
                          + [torch.arange(bounds[g] + whole[g], bounds[g + 1]) for g in range(groups)])
        idx, xp = index[:, order], x[:, order]  # the forward permutes once per call, not per modulation
        m = sum(whole)
        j = m // t
        tile_idx, rest_idx = idx[:, :m:t], idx[:, m:]

        def run():
            out = torch.empty_like(xp)
            torch.addcmul(F.embedding(tile_idx, shift_tab)[:, :, None], xp[:, :m].unflatten(1, (j, t)),
                          F.embedding(tile_idx, 1 + scale_tab)[:, :, None], out=out[:, :m].unflatten(1, (j, t)))
            torch.addcmul(F.embedding(rest_idx, shift_tab), xp[:, m:], F.embedding(rest_idx, 1 + scale_tab),
                          out=out[:, m:])
            return out
        run.order = order  # output tokens come in this order
        return run

    out = {"stock": lambda: x * (1 + row_scale) + row_shift,
           # the table gather happens once per chunk and forward; its cost is part of the path
           "gather": lambda: torch.addcmul(F.embedding(index, shift_tab), x, F.embedding(index, 1 + scale_tab)),
           "runs": runs}
    out.update({f"tiles_{t}": tiled(t) for t in tiles})
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", default="2x1024x256,1x1024x3072", help="BxNxD list")
    ap.add_argument("--groups", default="8,40,100")
    ap.add_argument("--tiles", default="16,8,4")
    ap.add_argument("--calls", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    tiles = tuple(int(t) for t in args.tiles.split(","))
    rows = []
    for shape in args.shapes.split(","):
        b, n, d = (int(v) for v in shape.split("x"))
        for g in (int(v) for v in args.groups.split(",")):
            ms = {k: per_call_ms(fn, args.calls, args.repeats) for k, fn in variants(b, n, d, g, tiles).items()}
            rows.append({"shape": [b, n, d], "groups": g, "ms": ms})
    result = {"benchmark": "modulation_cost", "torch": torch.__version__, "rows": rows}
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
