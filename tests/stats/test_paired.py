"""Tests for moeaudit.stats.paired: every statistic against scipy, the paper's hand-worked CI, error rates."""

from __future__ import annotations

import dataclasses
import json
import math
import warnings

import numpy as np
import pytest
from scipy import stats as sps

from moeaudit.errors import InvalidParameterError
from moeaudit.stats import DegenerateInputWarning, PairedContrastResult, paired_contrast


def _standardised(n: int, seed: int) -> np.ndarray:
    """A sample with mean exactly 0 and sd (ddof=1) exactly 1."""
    z = np.random.default_rng(seed).normal(size=n)
    return (z - z.mean()) / z.std(ddof=1)


def _pair(n: int = 80, shift: float = 0.3, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    low = rng.exponential(0.05, size=n)
    return low + rng.normal(shift * 0.05, 0.05, size=n), low


# --- the paper's hand-worked case ----------------------------------------------------------------------


def test_hand_worked_dz_and_analytic_ci_match_the_paper():
    diff = _standardised(200, seed=1) + 0.231  # d_z = 0.231 exactly
    res = paired_contrast(diff, np.zeros(200))
    assert res.d_z == pytest.approx(0.231, abs=1e-12)
    assert (round(res.ci_low, 2), round(res.ci_high, 2)) == (0.09, 0.37)
    se = math.sqrt(1 / 200 + 0.231**2 / (2 * 200))
    assert res.ci_low == pytest.approx(0.231 - 1.959963984540054 * se, rel=1e-12)
    assert res.ci_high == pytest.approx(0.231 + 1.959963984540054 * se, rel=1e-12)
    assert res.confidence_level == pytest.approx(0.95)


def test_dz_uses_ddof_1_and_equals_t_over_sqrt_n():
    high, low = _pair()
    diff = high - low
    res = paired_contrast(high, low)
    assert res.sd_diff == pytest.approx(np.std(diff, ddof=1), rel=1e-12)
    assert res.d_z == pytest.approx(diff.mean() / np.std(diff, ddof=1), rel=1e-12)
    assert res.d_z != pytest.approx(diff.mean() / np.std(diff, ddof=0), rel=1e-6)
    assert res.t_statistic == pytest.approx(res.d_z * math.sqrt(res.n), rel=1e-10)


# --- against scipy -------------------------------------------------------------------------------------


@pytest.mark.parametrize("alternative", ["two-sided", "greater", "less"])
def test_tests_match_scipy(alternative):
    high, low = _pair(n=60, shift=0.2, seed=3)
    res = paired_contrast(high, low, alternative=alternative)
    t = sps.ttest_rel(high, low, alternative=alternative)
    w = sps.wilcoxon(high - low, alternative=alternative)
    assert res.p_t == pytest.approx(t.pvalue, rel=1e-12)
    assert res.t_statistic == pytest.approx(t.statistic, rel=1e-12)
    assert res.p_wilcoxon == pytest.approx(w.pvalue, rel=1e-12)
    assert res.wilcoxon_statistic == pytest.approx(w.statistic, rel=1e-12)
    assert res.mean_diff == pytest.approx(np.mean(high - low), rel=1e-12)
    assert res.share_high_gt_low == pytest.approx(np.mean(high > low))
    assert res.alternative == alternative


@pytest.mark.parametrize("zero_method", ["wilcox", "pratt", "zsplit"])
def test_wilcoxon_zero_method_is_passed_to_scipy(zero_method):
    rng = np.random.default_rng(5)
    diff = np.round(rng.normal(0.3, 1.0, size=40), 1)
    diff[:6] = 0.0
    res = paired_contrast(diff, np.zeros_like(diff), zero_method=zero_method)
    expected = sps.wilcoxon(diff, zero_method=zero_method)
    assert res.p_wilcoxon == pytest.approx(expected.pvalue, rel=1e-12)
    assert res.zero_method == zero_method
    assert res.share_high_gt_low == pytest.approx(np.mean(diff > 0))


def test_zero_methods_differ_when_there_are_zeros():
    diff = np.array([0.0] * 8 + [0.5, 0.7, 0.2, -0.1, 0.9, 0.4, 0.3, -0.2, 0.6, 0.8])
    p = {z: paired_contrast(diff, np.zeros_like(diff), zero_method=z).p_wilcoxon for z in ("wilcox", "pratt")}
    assert p["wilcox"] != pytest.approx(p["pratt"], rel=1e-3)


def test_nan_pairs_are_dropped_and_counted():
    high, low = _pair(n=50)
    high_nan, low_nan = high.copy(), low.copy()
    high_nan[[3, 7]] = np.nan
    low_nan[11] = np.nan
    res = paired_contrast(high_nan, low_nan)
    keep = np.ones(50, bool)
    keep[[3, 7, 11]] = False
    clean = paired_contrast(high[keep], low[keep])
    assert (res.n, res.n_dropped) == (47, 3)
    assert res.d_z == clean.d_z and res.p_t == clean.p_t and res.p_wilcoxon == clean.p_wilcoxon


def test_distinct_experts_are_counted_over_kept_pairs():
    high, low = _pair(n=6)
    high[5] = np.nan
    res = paired_contrast(high, low, high_expert=[3, 3, 3, 3, 3, 9], low_expert=[1, 2, 1, 2, 4, 7])
    assert (res.n_distinct_high, res.n_distinct_low) == (1, 3)
    plain = paired_contrast(high, low)
    assert plain.n_distinct_high is None and plain.n_distinct_low is None


# --- intervals -----------------------------------------------------------------------------------------


def test_confidence_interval_method_reproduces_fields_and_narrows():
    high, low = _pair(n=120, shift=0.4)
    res = paired_contrast(high, low, alpha=0.05)
    ci95 = res.confidence_interval(0.95)
    assert (ci95.low, ci95.high) == pytest.approx((res.ci_low, res.ci_high), rel=1e-12)
    ci80 = res.confidence_interval(0.80)
    assert res.ci_low < ci80.low < res.d_z < ci80.high < res.ci_high
    res90 = paired_contrast(high, low, alpha=0.10)
    assert res90.confidence_level == pytest.approx(0.90)
    assert (res90.ci_low, res90.ci_high) == pytest.approx(tuple(res.confidence_interval(0.90).to_dict().values()))


def test_one_sided_interval_is_open_on_the_untested_side():
    high, low = _pair(n=100, shift=0.4)
    two = paired_contrast(high, low)
    greater = paired_contrast(high, low, alternative="greater")
    less = paired_contrast(high, low, alternative="less")
    assert greater.ci_high == math.inf and two.ci_low < greater.ci_low < greater.d_z
    assert less.ci_low == -math.inf and less.d_z < less.ci_high < two.ci_high


def test_bca_is_deterministic_for_a_seed_and_depends_on_it():
    high, low = _pair(n=60, shift=0.3)
    a = paired_contrast(high, low, ci="bca", n_boot=300, seed=7)
    b = paired_contrast(high, low, ci="bca", n_boot=300, seed=7)
    c = paired_contrast(high, low, ci="bca", n_boot=300, seed=8)
    assert (a.ci_low, a.ci_high) == (b.ci_low, b.ci_high)
    assert (a.ci_low, a.ci_high) != (c.ci_low, c.ci_high)
    again = a.confidence_interval(0.95)
    assert (again.low, again.high) == (a.ci_low, a.ci_high)
    assert a.ci_method == "bca" and a.d_z == paired_contrast(high, low).d_z


def test_bca_covers_the_analytic_centre_on_a_large_sample():
    diff = np.random.default_rng(11).normal(0.3, 1.0, size=1000)
    analytic = paired_contrast(diff, np.zeros_like(diff))
    bca = paired_contrast(diff, np.zeros_like(diff), ci="bca", n_boot=1000, seed=0)
    assert bca.ci_low < analytic.d_z < bca.ci_high
    assert bca.ci_low == pytest.approx(analytic.ci_low, abs=0.02)
    assert bca.ci_high == pytest.approx(analytic.ci_high, abs=0.02)


# --- error rates ---------------------------------------------------------------------------------------


def test_planted_effect_is_significant():
    diff = np.random.default_rng(2).normal(0.5, 1.0, size=200)
    res = paired_contrast(diff, np.zeros(200))
    assert res.p_t < 1e-6 and res.p_wilcoxon < 1e-6
    assert res.ci_low > 0.3 and res.ci_high < 0.75
    assert res.share_high_gt_low > 0.6


def test_null_false_positive_rate_is_within_the_binomial_band():
    alpha, reps, n = 0.05, 400, 30
    rng = np.random.default_rng(2026)
    data = rng.normal(0.0, 1.0, size=(reps, n))
    results = [paired_contrast(row, np.zeros(n), alpha=alpha) for row in data]
    lo, hi = sps.binom.interval(0.99, reps, alpha)
    hits_t = sum(r.p_t <= alpha for r in results)
    hits_w = sum(r.p_wilcoxon <= alpha for r in results)
    assert lo <= hits_t <= hi, hits_t
    assert lo <= hits_w <= hi, hits_w
    # The analytic interval excludes the true d_z = 0 about as often as the t-test rejects.
    misses = sum(not (r.ci_low <= 0.0 <= r.ci_high) for r in results)
    assert lo <= misses <= hi, misses


def test_analytic_interval_covers_a_planted_dz_at_its_level():
    reps, n, d_true = 400, 100, 0.5
    data = np.random.default_rng(99).normal(d_true, 1.0, size=(reps, n))
    covered = sum(r.ci_low <= d_true <= r.ci_high for r in (paired_contrast(row, np.zeros(n)) for row in data))
    lo, hi = sps.binom.interval(0.99, reps, 0.95)
    assert lo <= covered <= hi, covered


# --- degenerate input ----------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [0, 1])
def test_too_few_pairs_warn_and_give_nan(n):
    with pytest.warns(DegenerateInputWarning, match="n = "):
        res = paired_contrast(np.ones(n), np.zeros(n))
    assert res.n == n
    for name in ("sd_diff", "d_z", "ci_low", "ci_high", "p_t", "p_wilcoxon"):
        assert math.isnan(getattr(res, name)), name
    assert math.isnan(res.confidence_interval().low)


def test_zero_variance_gives_nan_effect_but_a_real_wilcoxon():
    with pytest.warns(RuntimeWarning, match="zero variance"):
        res = paired_contrast(np.full(12, 0.5), np.zeros(12))
    assert math.isnan(res.d_z) and math.isnan(res.p_t) and math.isnan(res.ci_low)
    assert res.p_wilcoxon == pytest.approx(sps.wilcoxon(np.full(12, 0.5)).pvalue)
    assert res.mean_diff == 0.5 and res.sd_diff == 0.0


def test_all_zero_differences_never_give_p_equal_one():
    x = np.linspace(0, 1, 20)
    with pytest.warns(DegenerateInputWarning, match="every difference is zero"):
        res = paired_contrast(x, x)
    assert math.isnan(res.p_t) and math.isnan(res.p_wilcoxon) and math.isnan(res.d_z)
    assert res.share_high_gt_low == 0.0


def test_well_posed_input_does_not_warn():
    high, low = _pair()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        paired_contrast(high, low)
        paired_contrast(high, low, ci="bca", n_boot=200)


# --- result object ---------------------------------------------------------------------------------------


def test_result_is_frozen_and_serialisable():
    res = paired_contrast(*_pair())
    assert isinstance(res, PairedContrastResult)
    with pytest.raises(dataclasses.FrozenInstanceError):
        res.d_z = 0.0  # type: ignore[misc]
    row = res.to_dict()
    assert {"n", "d_z", "ci_low", "ci_high", "p_t", "p_wilcoxon", "share_high_gt_low"} <= set(row)
    assert not any(k.startswith("_") for k in row)
    assert json.loads(json.dumps(row))["n"] == res.n


# --- bad parameters ------------------------------------------------------------------------------------


def test_message_shape():
    with pytest.raises(InvalidParameterError, match=r"^`alpha` must be in \(0, 1\); got 1\.5\.$"):
        paired_contrast([1.0, 2.0], [0.0, 1.0], alpha=1.5)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"alpha": 0.0}, "alpha"),
        ({"alpha": "0.05"}, "alpha"),
        ({"ci": "percentile"}, "ci"),
        ({"n_boot": 10}, "n_boot"),
        ({"n_boot": 500.0}, "n_boot"),
        ({"seed": -1}, "seed"),
        ({"seed": 1.5}, "seed"),
        ({"alternative": "larger"}, "alternative"),
        ({"zero_method": "drop"}, "zero_method"),
        ({"high": [[1.0, 2.0], [3.0, 4.0]]}, "high"),
        ({"low": [0.0, 1.0]}, "low"),
        ({"high": [1.0, np.inf, 2.0]}, "high"),
        ({"high": ["a", "b", "c"]}, "high"),
        ({"high_expert": [1, 2, 3]}, "low_expert"),
        ({"high_expert": [1, 2, 3], "low_expert": [0.5, 1.0, 2.0]}, "low_expert"),
        ({"high_expert": [1, 2], "low_expert": [1, 2]}, "high_expert"),
    ],
)
def test_bad_parameters_raise_naming_the_parameter(kwargs, name):
    args = {"high": [1.0, 2.0, 3.5], "low": [0.0, 1.5, 2.0]} | kwargs
    with pytest.raises(InvalidParameterError, match=f"`{name}`"):
        paired_contrast(args.pop("high"), args.pop("low"), **args)


def test_confidence_interval_rejects_bad_level():
    res = paired_contrast(*_pair())
    with pytest.raises(InvalidParameterError, match="`confidence_level`"):
        res.confidence_interval(95)


def test_bca_on_a_degenerate_bootstrap_distribution_warns_and_gives_nan():
    with pytest.warns(DegenerateInputWarning, match="BCa"):
        res = paired_contrast([0.0, 0.0, 1.0, 0.0], np.zeros(4), ci="bca", n_boot=200)
    assert res.d_z == pytest.approx(0.5) and math.isnan(res.ci_low) and math.isnan(res.ci_high)
    assert not math.isnan(res.p_t)
