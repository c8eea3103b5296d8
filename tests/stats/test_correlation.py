"""Tests for moeaudit.stats.correlation: per-token and expert-level Spearman against scipy."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps

from moeaudit.errors import InvalidParameterError
from moeaudit.stats import (
    DegenerateInputWarning,
    expert_level_spearman,
    within_token_spearman,
    within_token_spearman_frame,
)


def _groups(n_tokens: int = 60, slope: float = 0.0, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """Tokens with active sets of size 3..8; effects rounded so that ties occur."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n_tokens):
        k = int(rng.integers(3, 9))
        metric = np.round(rng.uniform(size=k), 1)
        out.append((metric, np.round(slope * metric + rng.normal(0, 0.3, size=k), 1)))
    return out


def _with_skips(groups):
    """Add one token of each skip kind: k = 2, constant metric, constant effect, NaN leaving k = 2."""
    return groups + [
        (np.array([0.1, 0.2]), np.array([0.3, 0.1])),
        (np.full(4, 0.5), np.array([0.1, 0.2, 0.3, 0.4])),
        (np.array([0.1, 0.2, 0.3]), np.zeros(3)),
        (np.array([0.1, np.nan, 0.3]), np.array([0.2, 0.1, 0.5])),
    ]


def _to_frame(groups) -> pd.DataFrame:
    rows = []
    for t, (m, e) in enumerate(groups):
        rows += [{"seq": t // 10, "pos": t % 10, "freq": mi, "delta_nll": ei} for mi, ei in zip(m, e)]
    return pd.DataFrame(rows)


def test_per_token_rhos_and_tests_match_scipy():
    groups = _groups(slope=0.5)
    res = within_token_spearman(_with_skips(groups), alpha=0.1)
    expected = np.array([sps.spearmanr(m, e).statistic for m, e in groups])
    np.testing.assert_allclose(res.rhos, expected, rtol=1e-12, atol=1e-15)
    assert (res.n_tokens, res.n_skipped_small, res.n_skipped_constant, res.n_skipped) == (60, 2, 2, 4)
    t = sps.ttest_1samp(expected, 0.0)
    assert res.p_t == pytest.approx(t.pvalue, rel=1e-10)
    assert res.t_statistic == pytest.approx(t.statistic, rel=1e-10)
    ci = t.confidence_interval(0.9)
    assert (res.ci_low, res.ci_high) == pytest.approx((ci.low, ci.high), rel=1e-10)
    n_pos, n_neg = int((expected > 0).sum()), int((expected < 0).sum())
    assert (res.n_positive, res.n_negative) == (n_pos, n_neg)
    assert res.p_sign == pytest.approx(sps.binomtest(n_pos, n_pos + n_neg).pvalue, rel=1e-12)
    assert res.mean_rho == pytest.approx(expected.mean()) and res.median_rho == pytest.approx(np.median(expected))
    assert res.confidence_interval(0.9).to_dict() == pytest.approx({"low": ci.low, "high": ci.high})


@pytest.mark.parametrize("alternative", ["greater", "less"])
def test_one_sided_alternatives_match_scipy(alternative):
    groups = _groups(slope=0.2, seed=3)
    res = within_token_spearman(groups, alternative=alternative)
    rhos = np.array([sps.spearmanr(m, e).statistic for m, e in groups])
    assert res.p_t == pytest.approx(sps.ttest_1samp(rhos, 0.0, alternative=alternative).pvalue, rel=1e-10)
    n_pos, n_neg = int((rhos > 0).sum()), int((rhos < 0).sum())
    assert res.p_sign == pytest.approx(sps.binomtest(n_pos, n_pos + n_neg, alternative=alternative).pvalue)


def test_frame_variant_equals_iterable_variant():
    groups = _with_skips(_groups(slope=0.3, seed=1))
    frame = _to_frame(groups).sample(frac=1.0, random_state=0)  # rows in any order
    a = within_token_spearman(groups)
    b = within_token_spearman_frame(frame, metric="freq")
    for field in ("n_tokens", "n_skipped_small", "n_skipped_constant", "n_positive", "n_negative"):
        assert getattr(a, field) == getattr(b, field), field
    for field in ("mean_rho", "p_t", "p_sign", "ci_low", "ci_high"):
        assert getattr(a, field) == pytest.approx(getattr(b, field), rel=1e-12), field
    np.testing.assert_allclose(np.sort(a.rhos), np.sort(b.rhos))


def test_frame_variant_keeps_table_order_of_tokens():
    groups = _groups(n_tokens=12, slope=0.5, seed=2)
    res = within_token_spearman_frame(_to_frame(groups), metric="freq", effect="delta_nll", token=["seq", "pos"])
    np.testing.assert_allclose(res.rhos, [sps.spearmanr(m, e).statistic for m, e in groups])


def test_planted_and_null_association():
    planted = within_token_spearman(_groups(n_tokens=200, slope=1.0, seed=5))
    assert planted.mean_rho > 0.3 and planted.p_t < 1e-10 and planted.p_sign < 1e-6 and planted.ci_low > 0
    null = within_token_spearman(_groups(n_tokens=200, slope=0.0, seed=5))
    assert abs(null.mean_rho) < 0.1 and null.ci_low < 0 < null.ci_high


def test_degenerate_inputs_warn_and_give_nan():
    with pytest.warns(DegenerateInputWarning, match="usable tokens"):
        res = within_token_spearman([(np.array([1.0, 2.0]), np.array([2.0, 1.0]))] * 5)
    assert (res.n_tokens, res.n_skipped_small) == (0, 5)
    assert math.isnan(res.mean_rho) and math.isnan(res.p_t) and math.isnan(res.p_sign)
    perfect = [(np.arange(4.0), np.arange(4.0) * 2)] * 10
    with pytest.warns(RuntimeWarning, match="same rho"):
        res = within_token_spearman(perfect)
    assert res.mean_rho == 1.0 and math.isnan(res.p_t) and math.isnan(res.ci_low)
    assert res.p_sign == pytest.approx(sps.binomtest(10, 10).pvalue)
    with pytest.warns(DegenerateInputWarning):
        empty = within_token_spearman([])
    assert empty.n_tokens == 0 and empty.n_skipped == 0


def test_well_posed_input_does_not_warn():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        within_token_spearman(_groups())
        expert_level_spearman(np.arange(10.0), np.arange(10.0) ** 2, n_permutations=99)


@pytest.mark.parametrize(
    ("groups", "kwargs", "name"),
    [
        (5, {}, "groups"),
        (pd.DataFrame({"a": [1]}), {}, "groups"),
        ([(np.ones(3),)], {}, "groups"),
        ([(np.ones(3), np.ones(4))], {}, r"groups\[0\]\[0\]"),
        ([(np.ones(3), [1.0, np.inf, 2.0])], {}, r"groups\[0\]\[1\]"),
        ([], {"alpha": 2.0}, "alpha"),
        ([], {"alternative": "two_sided"}, "alternative"),
    ],
)
def test_within_token_bad_parameters(groups, kwargs, name):
    with pytest.raises(InvalidParameterError, match=f"`{name}`"):
        within_token_spearman(groups, **kwargs)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [({"metric": "gate"}, "metric"), ({"effect": "kl"}, "effect"), ({"token": "window"}, "token"),
     ({"token": []}, "token"), ({"alpha": 0}, "alpha"), ({"frame": [1, 2]}, "frame")],
)
def test_within_token_frame_bad_parameters(kwargs, name):
    args = {"frame": _to_frame(_groups(n_tokens=3)), "metric": "freq"} | kwargs
    with pytest.raises(InvalidParameterError, match=f"`{name}`"):
        within_token_spearman_frame(args.pop("frame"), **args)


# --- expert level --------------------------------------------------------------------------------------


def _experts(n: int = 40, slope: float = 0.3, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    metric = rng.uniform(size=n)
    return metric, slope * metric + rng.normal(0, 0.3, size=n)


@pytest.mark.parametrize("alternative", ["two-sided", "greater", "less"])
def test_expert_level_matches_scipy(alternative):
    x, y = _experts()
    res = expert_level_spearman(x, y, n_permutations=499, seed=3, alternative=alternative)
    ref = sps.spearmanr(x, y, alternative=alternative)
    assert res.rho == pytest.approx(ref.statistic, rel=1e-12)
    assert res.p_asymptotic == pytest.approx(ref.pvalue, rel=1e-12)
    perm = sps.permutation_test(
        (x,), lambda xp: sps.spearmanr(xp, y).statistic, permutation_type="pairings", n_resamples=499,
        alternative=alternative, rng=np.random.default_rng(3),
    )
    assert res.p_permutation == pytest.approx(perm.pvalue, rel=1e-12)
    assert (res.n, res.n_dropped, res.n_permutations) == (40, 0, 499)


def test_expert_level_exact_for_small_n():
    x = np.array([0.1, 0.4, 0.2, 0.9, 0.5])
    y = np.array([0.0, 0.3, 0.1, 0.7, 0.2])
    res = expert_level_spearman(x, y, n_permutations=9999)
    # Exact enumeration of 5! pairings: count those with |rho| >= observed.
    import itertools

    observed = sps.spearmanr(x, y).statistic
    rhos = [sps.spearmanr(np.array(p), y).statistic for p in itertools.permutations(x)]
    expected = min(1.0, 2 * min(np.mean(np.array(rhos) >= observed - 1e-12), np.mean(np.array(rhos) <= observed + 1e-12)))
    assert res.p_permutation == pytest.approx(expected, rel=1e-12)


def test_expert_level_planted_null_seed_and_nan():
    x, y = _experts(n=64, slope=2.0, seed=1)
    assert expert_level_spearman(x, y, n_permutations=999).p_permutation < 0.01
    xn, yn = _experts(n=64, slope=0.0, seed=1)
    null = expert_level_spearman(xn, yn, n_permutations=999)
    assert null.p_permutation > 0.05
    again = expert_level_spearman(xn, yn, n_permutations=999)
    other = expert_level_spearman(xn, yn, n_permutations=999, seed=1)
    assert null.p_permutation == again.p_permutation != other.p_permutation
    yn[[0, 5]] = np.nan
    dropped = expert_level_spearman(xn, yn, n_permutations=99)
    assert (dropped.n, dropped.n_dropped) == (62, 2)
    assert dropped.rho == pytest.approx(sps.spearmanr(np.delete(xn, [0, 5]), np.delete(yn, [0, 5])).statistic)


def test_expert_level_degenerate():
    with pytest.warns(DegenerateInputWarning, match="n = 2"):
        res = expert_level_spearman([1.0, 2.0, np.nan], [1.0, 3.0, 2.0])
    assert math.isnan(res.rho) and math.isnan(res.p_permutation) and math.isnan(res.p_asymptotic)
    with pytest.warns(DegenerateInputWarning, match="`effect` is constant"):
        res = expert_level_spearman(np.arange(6.0), np.zeros(6))
    assert math.isnan(res.rho) and res.to_dict()["n"] == 6


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [({"metric": [1.0, 2.0]}, "metric"), ({"effect": [[1.0, 2.0, 3.0]]}, "effect"), ({"n_permutations": 0}, "n_permutations"),
     ({"seed": "a"}, "seed"), ({"alternative": "both"}, "alternative")],
)
def test_expert_level_bad_parameters(kwargs, name):
    args = {"metric": [1.0, 2.0, 3.0], "effect": [0.1, 0.3, 0.2]} | kwargs
    with pytest.raises(InvalidParameterError, match=f"`{name}`"):
        expert_level_spearman(args.pop("metric"), args.pop("effect"), **args)
