"""Bootstrap intervals against exact bootstrap distributions worked out by hand."""

import numpy as np
import pytest

from tpm.comparison.stats import bootstrap_mean, paired_bootstrap


def test_paired_bootstrap_matches_hand_enumeration():
    # Differences a - b = [0, 0, 3]. A resample of 3 draws k threes, k ~ Binomial(3, 1/3), mean = k:
    # P(0) = 8/27 = .296, P(1) = 12/27, P(2) = 6/27, P(3) = 1/27 = .037. The 2.5 % quantile is 0 and,
    # since P(mean <= 2) = 26/27 = .963 < .975, the 97.5 % quantile is 3.
    a = np.array([5.0, 1.0, 7.0])
    b = np.array([5.0, 1.0, 4.0])
    iv = paired_bootstrap(a, b, num_resamples=20_000, seed=0)
    assert iv.estimate == pytest.approx(1.0)
    assert (iv.low, iv.high) == (0.0, 3.0)
    # At 90 %: P(mean <= 2) = .963 >= .95, so the 95 % quantile drops to 2.
    iv90 = paired_bootstrap(a, b, num_resamples=20_000, level=0.90, seed=0)
    assert (iv90.low, iv90.high) == (0.0, 2.0)


def test_pairing_removes_shared_variance():
    rng = np.random.default_rng(1)
    prompt_effect = rng.normal(0, 10, size=200)  # large, shared by both policies
    a, b = prompt_effect + 0.5, prompt_effect
    iv = paired_bootstrap(a, b, seed=0)
    assert (iv.estimate, iv.low, iv.high) == pytest.approx((0.5, 0.5, 0.5))
    # Unpaired, the same data give intervals of width ~ 4 * 10 / sqrt(200) each.
    ma, mb = bootstrap_mean(a, seed=0), bootstrap_mean(b, seed=0)
    assert ma.high - ma.low > 2 and mb.high - mb.low > 2


def test_cluster_bootstrap_resamples_prompts_not_images():
    # Two prompts with three seeds each; differences 0 on prompt 0 and 2 on prompt 1.
    d = np.array([0, 0, 0, 2, 2, 2.0])
    groups = [0, 0, 0, 1, 1, 1]
    # Resampling 2 prompts: means 0, 1, 2 with probabilities 1/4, 1/2, 1/4 -> interval [0, 2].
    iv = paired_bootstrap(d, np.zeros(6), groups, num_resamples=20_000, seed=0)
    assert (iv.estimate, iv.low, iv.high) == (1.0, 0.0, 2.0)
    assert iv.n == 2
    # Treating the 6 images as independent: P(all six zeros) = 1/64 < 2.5 %, so the interval is narrower.
    iv_images = paired_bootstrap(d, np.zeros(6), num_resamples=20_000, seed=0)
    assert iv_images.low > 0 and iv_images.high < 2 and iv_images.n == 6


def test_seeded_and_checked():
    x = np.arange(10.0)
    assert bootstrap_mean(x, seed=3) == bootstrap_mean(x, seed=3)
    assert bootstrap_mean([4.0]).low == bootstrap_mean([4.0]).high == 4.0
    with pytest.raises(ValueError, match="equal lengths"):
        paired_bootstrap([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="NaN"):
        bootstrap_mean([1.0, float("nan")])
    with pytest.raises(ValueError, match="no values"):
        bootstrap_mean([])
    with pytest.raises(ValueError, match="one group per value"):
        bootstrap_mean([1.0, 2.0], groups=[0])
