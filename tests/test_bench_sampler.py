"""benchmarks/bench_sampler.py's timing loop: interleaved rounds in rotated order, paired ratios."""

from types import SimpleNamespace


def test_rounds_rotate_so_every_variant_runs_at_every_position(load_benchmark):
    bench = load_benchmark("bench_sampler")
    calls = []
    variants = {k: (lambda k=k: calls.append(k)) for k in ("pipe", "synchronous", "asyndm")}
    times = bench.interleaved_times(variants, SimpleNamespace(device="cpu", clock="wall", repeats=6))
    assert {k: len(v) for k, v in times.items()} == {"pipe": 6, "synchronous": 6, "asyndm": 6}
    rounds = [calls[i:i + 3] for i in range(0, 18, 3)]
    assert all(sorted(r) == sorted(variants) for r in rounds)  # each round runs every variant once
    for pos in range(3):  # over 6 rounds, each variant comes at each position twice
        assert sorted(r[pos] for r in rounds) == sorted(list(variants) * 2)


def test_paired_ratios_pair_rounds(load_benchmark):
    bench = load_benchmark("bench_sampler")
    out = bench.paired_ratios({"pipe": [1.0, 2.0, 4.0], "asyndm": [1.1, 2.0, 4.8]}, "pipe")
    assert out == {"asyndm/pipe": {"median": 1.1, "min": 1.0, "max": 1.2}}


def test_modulation_cost_variants_compute_the_same_modulation(load_benchmark):
    """The timed per-token variants (gather, one op per group, tiles) do the same arithmetic."""
    import torch

    fns = load_benchmark("modulation_cost").variants(2, 50, 8, groups=4, tiles=(4, 3))
    ref = fns["gather"]()
    assert torch.allclose(fns["runs"](), ref, atol=1e-6)
    for name in ("tiles_4", "tiles_3"):  # tiles come permuted: whole tiles first, then the leftovers
        assert torch.allclose(fns[name](), ref[:, fns[name].order], atol=1e-6), name
    assert fns["stock"]().shape == ref.shape


def test_forward_replay_runs_every_variant(tmp_path, load_benchmark):
    out = tmp_path / "replay.json"
    res = load_benchmark("forward_replay").main(["--tokens", "256x16", "--steps", "2", "--rounds", "1",
                                                "--out", str(out)])
    assert set(res["ratio_to_stock"]) == {"uniform", "per_token_gather", "tiles", "tiles_no_maps"}
    assert res["calls"] == 2 and all(v["mean"] > 0 for v in res["ratio_to_stock"].values())
    assert out.read_text().strip().startswith("{")


def test_pool_runs_pools_per_round_ratios(tmp_path, load_benchmark):
    import json

    bench = load_benchmark("bench_sampler")
    paths = []
    for i, (pipe, row) in enumerate([([1.0, 2.0], [1.1, 2.2]), ([4.0], [4.4])]):
        cfg = {"image_tokens": 16, "text_tokens": 4, "all_s": {"pipe": pipe, "asyndm": row}}
        paths.append(str(tmp_path / f"run{i}.json"))
        with open(paths[-1], "w") as f:
            json.dump({"configs": [cfg]}, f)
    res = bench.main(["--pool", *paths], quiet=True)["configs"]["16x4"]["asyndm/pipe"]
    assert res["rounds"] == 3 and res["mean"] == 1.1 and res["ci95"] == [1.1, 1.1]
