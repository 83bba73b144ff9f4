"""benchmarks/scaling_memory.py's table: per-GPU memory assembled from weights and measured peaks."""

GiB = 2 ** 30


def test_table_adds_the_parts_and_extrapolates_per_sample(load_benchmark):
    sm = load_benchmark("scaling_memory")
    w = {"flux-dev": {"transformer": 10 * GiB}, "sd35-medium": {"transformer": 2 * GiB},
         "encoders": {"t5_xxl": 4 * GiB, "clip_l": 0, "clip_g": GiB}, "vae": 0}
    roll = [{"model": "flux-dev", "side": 512, "batch": b, "depth": 1, "policy_params": 0,
             "peak_growth_bytes": b * GiB} for b in (1, 2)]
    vae = [{"side": 512, "batch": 1, "peak_growth_bytes": GiB}]
    t = sm.table(w, roll, vae, reward_weights=6 * GiB)
    assert list(t) == ["flux-dev 512"]  # only what was measured
    row = t["flux-dev 512"]["per_gpu_GiB"][4]
    fixed = 20 + 0.5 + 4 + 4  # transformer at 2 bytes, CUDA context, activations 4 x 1, decode 4 x 1
    assert row["cache+server"] == fixed and row["no cache, server"] == fixed + 8
    assert row["cache, rewards on GPU"] == fixed + 6 and row["no cache, rewards on GPU"] == fixed + 14
    assert t["flux-dev 512"]["measured_truncated_depth_GiB"] == {"depth 1, batch 1": 1.0, "depth 1, batch 2": 2.0,
                                                                 "vae batch 1": 1.0}
