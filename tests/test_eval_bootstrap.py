"""eval.metrics.bootstrap_interval: the error bars of the best-of-N tables.

Oracles: coverage of the true value over many synthetic experiments whose per-problem success rates are known
(the true pass@k is then a closed form); the width against the plug-in standard error of a mean; invariants
(a constant has a zero-width interval; rows shifted by a constant get intervals shifted by it, since the rows
share their resampled problems).
"""
import math

import numpy as np
import pytest

from eval.metrics import bootstrap_interval, pass_at_k


def test_interval_covers_the_true_pass_at_k_at_its_nominal_rate():
    """Synthetic best-of-N: each of P = 64 problems has a success rate p drawn uniformly from RATES (the problem
    population), c ~ Binomial(n = 16, p) correct samples, and its value is pass_at_k(16, c, 4). That estimator is
    unbiased, E[pass_at_k(n, c, k) | p] = 1 - (1 - p)^k, so the true value is theta = mean over RATES of
    1 - (1 - p)^4. Over M = 400 independent experiments the number of 95% intervals that hold theta is
    Binomial(M, q) with q the true coverage; the percentile bootstrap's coverage error is O(1 / P) (Hall 1992),
    allowed here as 0.03 below nominal, plus 3 binomial standard errors sqrt(0.95 * 0.05 / M) = 0.033 either
    side. An interval that ignores the problems' spread (too narrow: coverage far below) or uses the spread of
    single values instead of means (too wide: coverage ~1) fails."""
    rates = np.array([0.0, 0.02, 0.1, 0.3, 0.6, 0.95])
    n, k, problems, experiments = 16, 4, 64, 400
    theta = float(np.mean(1 - (1 - rates) ** k))
    rng = np.random.default_rng(1)
    covered = 0
    for experiment in range(experiments):
        p = rng.choice(rates, size=problems)
        correct = rng.binomial(n, p)
        values = [pass_at_k(n, int(c), k) for c in correct]
        low, high = bootstrap_interval(values, level=0.95, resamples=1000, seed=experiment)
        covered += bool(low <= theta <= high)
    standard_error = math.sqrt(0.95 * 0.05 / experiments)
    assert 0.95 - 0.03 - 3 * standard_error <= covered / experiments <= 0.95 + 3 * standard_error


def test_width_is_that_of_the_plug_in_standard_error():
    """For P = 400 values the mean is close to normal, so the 95% percentile interval is about
    2 * 1.96 * sqrt(sum (x - mean)^2 / P) / sqrt(P) wide (the bootstrap's variance is the plug-in one, divisor P).
    Tolerance 5%: the quantiles of 20000 resamples carry ~1% Monte Carlo error, the normal approximation the rest."""
    x = np.random.default_rng(2).uniform(size=400)
    low, high = bootstrap_interval(x, level=0.95, resamples=20000, seed=3)
    plug_in = math.sqrt(np.mean((x - x.mean()) ** 2) / len(x))
    assert high - low == pytest.approx(2 * 1.959964 * plug_in, rel=0.05)
    assert low < x.mean() < high


def test_rows_share_their_resampled_problems():
    """Row 1 = row 0 + 0.1 on the same problems: its interval is row 0's shifted by exactly 0.1 (paired), and
    their difference, a constant, has a zero-width interval."""
    x = np.random.default_rng(4).uniform(size=(1, 32))
    rows = np.concatenate([x, x + 0.1])  # (2, 32)
    low, high = bootstrap_interval(rows, seed=5)
    assert low.shape == high.shape == (2,)
    np.testing.assert_allclose(low[1] - low[0], 0.1, atol=1e-12)
    np.testing.assert_allclose(high[1] - high[0], 0.1, atol=1e-12)
    diff_low, diff_high = bootstrap_interval(rows[1] - rows[0], seed=5)
    assert diff_low == pytest.approx(0.1, abs=1e-12) and diff_high == pytest.approx(0.1, abs=1e-12)


@pytest.mark.parametrize("values, kwargs", [([], {}), ([0.5], {"level": 1.0}), ([0.5], {"resamples": 0})])
def test_rejects_bad_arguments(values, kwargs):
    with pytest.raises(ValueError, match="bootstrap_interval"):
        bootstrap_interval(values, **kwargs)
