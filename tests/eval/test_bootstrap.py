"""Percentile bootstrap: hand-computed cases, seed reproducibility, paired differences, scipy parity."""
from __future__ import annotations

import numpy as np
import pytest

from lmforge.errors import LmforgeError
from lmforge.eval.bootstrap import (bootstrap_ci, paired_bootstrap_ci, percentile_interval, preference_intervals,
                                    resample_indices)


def test_constant_sample_has_zero_width():
    assert bootstrap_ci([0.7] * 9) == (0.7, 0.7)
    assert bootstrap_ci([1.0] * 5, stat=np.median) == (1.0, 1.0)


def test_percentile_interval_by_hand():
    # thetas 0..100: linear quantile at q is 100 q -> (2.5, 97.5); at alpha 0.1 -> (5, 95)
    assert percentile_interval(np.arange(101.0)) == pytest.approx((2.5, 97.5))
    assert percentile_interval(np.arange(101.0), alpha=0.1) == pytest.approx((5.0, 95.0))
    # two values: Q_0.025 of [0, 1] = 0.025, Q_0.975 = 0.975
    assert percentile_interval([0.0, 1.0]) == pytest.approx((0.025, 0.975))


def test_known_small_sample():
    # values [0, 0, 0, 1]: the resample mean k/4 has k ~ Binomial(4, 1/4).
    # P(mean = 0) = (3/4)^4 = 0.316 > 0.025  -> low = 0
    # P(mean >= 0.75) = 13/256 = 0.051 > 0.025, P(mean = 1) = 1/256 = 0.004 < 0.025 -> high = 0.75
    lo, hi = bootstrap_ci([0, 0, 0, 1], n_resamples=4000, seed=0)
    assert lo == 0.0 and hi == 0.75
    # a one-item difference in the data moves the interval: [0, 0, 1, 1] -> P(mean=0) = 1/16 > 0.025 -> 0 ... 1
    assert bootstrap_ci([0, 0, 1, 1], n_resamples=4000, seed=0) == (0.0, 1.0)


def test_matches_a_direct_loop_over_the_same_draws():
    values = np.array([3.0, -1.0, 4.0, 1.5, -5.0, 9.0, 2.0])
    rng = np.random.default_rng(7)
    idx = rng.integers(0, len(values), size=(50, len(values)))
    thetas = sorted(float(np.mean([values[j] for j in row])) for row in idx)
    # linear quantile at q over B sorted values: position q (B - 1), interpolated
    def q(p):
        pos = p * (len(thetas) - 1)
        k = int(np.floor(pos))
        return thetas[k] + (pos - k) * (thetas[min(k + 1, len(thetas) - 1)] - thetas[k])
    assert bootstrap_ci(values, n_resamples=50, seed=7) == pytest.approx((q(0.025), q(0.975)), abs=1e-12)
    assert np.array_equal(resample_indices(len(values), 50, 7), idx)


def test_seed_reproducibility():
    rng = np.random.default_rng(1)
    x = rng.normal(size=40)
    assert bootstrap_ci(x, seed=3) == bootstrap_ci(x, seed=3)
    assert bootstrap_ci(x, seed=3) != bootstrap_ci(x, seed=4)
    lo, hi = bootstrap_ci(x)
    assert lo < float(np.mean(x)) < hi


def test_paired_difference():
    a = np.array([0.0, 1.0, 1.0, 0.0, 1.0, 1.0, 1.0, 0.0])
    # identical runs: every resample difference is 0
    assert paired_bootstrap_ci(a, a) == (0.0, 0.0)
    # b = a - 0.5 on every item: the difference is exactly 0.5 in every resample
    assert paired_bootstrap_ci(a, a - 0.5) == pytest.approx((0.5, 0.5))
    # pairing removes item spread: b = a + small noise gives a much narrower interval than unpaired
    rng = np.random.default_rng(0)
    x = rng.normal(0, 5, size=200)
    y = x + rng.normal(0.1, 0.1, size=200)
    plo, phi = paired_bootstrap_ci(y, x)
    ulo, uhi = bootstrap_ci(y)[0] - bootstrap_ci(x)[1], bootstrap_ci(y)[1] - bootstrap_ci(x)[0]
    assert 0 < plo < 0.1 < phi and (phi - plo) < 0.1 * (uhi - ulo)
    # same draws as resampling the per-item differences of a mean
    assert paired_bootstrap_ci(y, x, seed=5) == pytest.approx(bootstrap_ci(y - x, seed=5), abs=1e-12)


def test_bad_input():
    with pytest.raises(LmforgeError, match="no values"):
        bootstrap_ci([])
    with pytest.raises(LmforgeError, match="same items"):
        paired_bootstrap_ci([1, 2], [1, 2, 3])
    with pytest.raises(LmforgeError, match="alpha"):
        bootstrap_ci([1, 2], alpha=1.5)


def test_preference_intervals_by_hand():
    # margins [1, 1, 1, 1] -> accuracy 1 and margin 1 in every resample
    assert preference_intervals([2, 2, 2, 2], [1, 1, 1, 1]) == {"accuracy_ci95": [1.0, 1.0], "margin_ci95": [1.0, 1.0]}
    # a tie counts as a miss, as in preference_report: margins [0, 0, 0, 2] -> correct [0, 0, 0, 1]
    rep = preference_intervals([1, 1, 1, 3], [1, 1, 1, 1], n_resamples=4000)
    assert rep["accuracy_ci95"] == [0.0, 0.75] and rep["margin_ci95"] == [0.0, 1.5]


@pytest.mark.parametrize("paired", [False, True])
def test_parity_with_scipy_percentile_bootstrap(paired):
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(2)
    x = rng.normal(size=30)
    y = x + rng.normal(0.2, 0.5, size=30)
    if paired:
        ref = stats.bootstrap((y, x), lambda u, v, axis=-1: np.mean(u, axis=axis) - np.mean(v, axis=axis),
                              paired=True, method="percentile", n_resamples=500, rng=np.random.default_rng(11))
        ours = paired_bootstrap_ci(y, x, n_resamples=500, seed=11)
    else:
        ref = stats.bootstrap((x,), np.mean, method="percentile", n_resamples=500, rng=np.random.default_rng(11))
        ours = bootstrap_ci(x, n_resamples=500, seed=11)
    ci = ref.confidence_interval
    assert ours == pytest.approx((ci.low, ci.high), abs=1e-12)
