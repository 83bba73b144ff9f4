"""benchmarks/gpu_check.py's CPU dry run: every section's code path runs at tiny sizes."""

import pytest


@pytest.mark.slow
def test_dry_run_every_section_passes(tmp_path, load_benchmark):
    import json

    out = tmp_path / "check.json"
    res = load_benchmark("gpu_check").main(["--dry-run", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(res))
    for name in ("cuda_tests", "equivalence_bf16", "sampler_4096", "grpo_sd35_medium"):
        assert res[name]["status"] == "ok", (name, res[name])
    assert "collected" in res["cuda_tests"]["summary"] or "selected" in res["cuda_tests"]["summary"]
    for name, eq in res["equivalence_bf16"]["cases"].items():
        assert eq["relative"] < 0.05, name  # bfloat16 on both sides; the same arithmetic up to op order
    ratios = res["sampler_4096"]["configs"][0]["ratio"]
    assert set(ratios) == {"synchronous/pipe", "asyndm/pipe", "dm_concave/pipe", "field/pipe"}
    grpo = res["grpo_sd35_medium"]
    assert grpo["iteration_s"] > 0 and grpo["rollout_s"] > 0 and grpo["peak_memory_GiB"] is None


def test_unknown_section_is_one_clear_error(load_benchmark):
    with pytest.raises(SystemExit, match="unknown sections"):
        load_benchmark("gpu_check").main(["--dry-run", "--sections", "nope"])
