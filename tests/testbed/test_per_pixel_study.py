"""benchmarks/per_pixel_study.py on a few spatial-testbed prompts: its paired differences are the
per-prompt means' differences, and every row is scored on the same prompts and noises."""

import numpy as np


def test_pairs_and_against_are_differences_of_the_saved_per_prompt_means(load_benchmark):
    study = load_benchmark("per_pixel_study")
    r = study.main(["--prompts", "testbed:spatial-val", "--num-prompts", "6", "--steps", "2",
                    "--noise-sets", "0", "--threads", "1", "--policies", "shifted_grid:shift=3.0;asyndm",
                    "--against", "shifted_grid:shift=3.0", "--pairs", "asyndm-synchronous"])
    per = {k: np.array(v) for k, v in r["per_prompt_mean"]["2"].items()}
    assert set(per) == {"synchronous", "shifted_grid:shift=3.0", "asyndm"} and all(len(v) == 6 for v in per.values())
    rows = r["steps"]["2"]
    est, lo, hi = rows["asyndm"]["mean_minus"]["shifted_grid:shift=3.0"]
    assert abs(est - float((per["asyndm"] - per["shifted_grid:shift=3.0"]).mean())) < 1e-3 and lo <= est <= hi
    # the pair against synchronous is the same comparison as the row's own difference to synchronous
    assert r["pairs"]["2"]["asyndm - synchronous"]["mean"] == rows["asyndm"]["mean_minus_synchronous"]
    assert abs(rows["synchronous"]["mean"] - float(per["synchronous"].mean())) < 1e-3
    assert "shifted_grid:shift=3.0" not in rows["shifted_grid:shift=3.0"]["mean_minus"]
