"""Tests for moeaudit.stats.power: TTestPower, the noncentral t, and TOST against statsmodels."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as sps
from statsmodels.stats.power import TTestPower
from statsmodels.stats.weightstats import ttost_paired

from moeaudit.errors import InvalidParameterError
from moeaudit.stats import DegenerateInputWarning, min_detectable_dz, power_dz, tost_paired


def _nct_power(d_z: float, n: int, alpha: float) -> float:
    """Two-sided power from the noncentral t directly (independent of statsmodels)."""
    crit = sps.t.ppf(1 - alpha / 2, n - 1)
    ncp = d_z * math.sqrt(n)
    return float(sps.nct.sf(crit, n - 1, ncp) + sps.nct.cdf(-crit, n - 1, ncp))


@pytest.mark.parametrize(("n", "alpha", "power"), [(200, 0.05, 0.8), (200, 0.05 / 20, 0.8), (30, 0.01, 0.9)])
def test_min_detectable_dz_matches_statsmodels_and_inverts_power(n, alpha, power):
    d = min_detectable_dz(n, alpha=alpha, power=power)
    assert d == pytest.approx(TTestPower().solve_power(nobs=n, alpha=alpha, power=power), rel=1e-10)
    assert _nct_power(d, n, alpha) == pytest.approx(power, abs=1e-4)  # solver tolerance
    assert power_dz(d, n, alpha) == pytest.approx(power, abs=1e-4)


def test_min_detectable_dz_shrinks_with_n_and_one_sided_signs():
    assert min_detectable_dz(50) > min_detectable_dz(200) > min_detectable_dz(1000)
    greater = min_detectable_dz(200, alternative="greater")
    assert 0 < greater < min_detectable_dz(200)
    assert greater == pytest.approx(TTestPower().solve_power(nobs=200, alpha=0.05, power=0.8, alternative="larger"))
    assert min_detectable_dz(200, alternative="less") == pytest.approx(-greater, rel=1e-4)


@pytest.mark.parametrize(("d_z", "n", "alpha"), [(0.231, 200, 0.01), (0.1, 200, 0.05), (0.0, 50, 0.05), (0.5, 20, 0.05)])
def test_power_dz_matches_statsmodels_and_noncentral_t(d_z, n, alpha):
    value = power_dz(d_z, n, alpha)
    assert value == pytest.approx(TTestPower().power(effect_size=d_z, nobs=n, alpha=alpha), rel=1e-10)
    assert value == pytest.approx(_nct_power(d_z, n, alpha), abs=1e-8)


def test_power_dz_one_sided():
    assert power_dz(0.2, 100, alternative="greater") == pytest.approx(
        TTestPower().power(effect_size=0.2, nobs=100, alpha=0.05, alternative="larger"), rel=1e-10
    )
    assert power_dz(0.2, 100, alternative="less") < 0.05


@pytest.mark.parametrize(
    ("call", "name"),
    [
        (lambda: min_detectable_dz(1), "n"),
        (lambda: min_detectable_dz(200.0), "n"),
        (lambda: min_detectable_dz(200, alpha=1.0), "alpha"),
        (lambda: min_detectable_dz(200, power=1.2), "power"),
        (lambda: min_detectable_dz(200, alternative="larger"), "alternative"),
        (lambda: power_dz(float("nan"), 200), "d_z"),
        (lambda: power_dz(0.2, True), "n"),
        (lambda: power_dz(0.2, 200, 0.0), "alpha"),
        (lambda: power_dz(0.2, 200, alternative="smaller"), "alternative"),
    ],
)
def test_power_bad_parameters(call, name):
    with pytest.raises(InvalidParameterError, match=f"`{name}`"):
        call()


# --- TOST -------------------------------------------------------------------------------------------------


def test_tost_matches_statsmodels_with_the_same_raw_bounds():
    diff = np.random.default_rng(0).normal(0.05, 1.0, size=300)
    res = tost_paired(diff, bound_dz=0.2)
    sd = np.std(diff, ddof=1)
    assert (res.bound_low, res.bound_high) == pytest.approx((-0.2 * sd, 0.2 * sd), rel=1e-12)
    p, lower, upper = ttost_paired(diff, np.zeros_like(diff), -0.2 * sd, 0.2 * sd)
    assert res.p == pytest.approx(p, rel=1e-10)
    assert res.p_lower == pytest.approx(lower[1], rel=1e-10)
    assert res.p_upper == pytest.approx(upper[1], rel=1e-10)
    assert res.p == max(res.p_lower, res.p_upper)
    assert res.d_z == pytest.approx(diff.mean() / sd)


def test_tost_decides_equivalence_only_when_both_sides_pass():
    rng = np.random.default_rng(1)
    null = tost_paired(rng.normal(0.0, 1.0, size=400), bound_dz=0.2)
    assert null.equivalent and null.p < 0.05
    planted = tost_paired(rng.normal(0.5, 1.0, size=400), bound_dz=0.2)
    assert not planted.equivalent and planted.p_upper > 0.5 and planted.p_lower < 1e-6
    small = tost_paired(rng.normal(0.0, 1.0, size=20), bound_dz=0.2)
    assert not small.equivalent  # too little data to show equivalence


def test_tost_size_at_the_margin_is_near_alpha():
    # True d_z exactly on the margin: equivalence should be declared at most about alpha of the time.
    reps, n, alpha = 400, 200, 0.05
    data = np.random.default_rng(7).normal(0.2, 1.0, size=(reps, n))
    hits = sum(tost_paired(row, bound_dz=0.2, alpha=alpha).equivalent for row in data)
    assert hits <= sps.binom.ppf(0.995, reps, alpha), hits


def test_tost_drops_nan_and_degenerates():
    diff = np.r_[np.random.default_rng(2).normal(size=50), np.nan]
    assert tost_paired(diff).n == 50
    with pytest.warns(DegenerateInputWarning, match="n = 1"):
        res = tost_paired([0.3, np.nan])
    assert math.isnan(res.p) and res.equivalent is False
    with pytest.warns(RuntimeWarning, match="zero variance"):
        res = tost_paired(np.zeros(10))
    assert math.isnan(res.p_lower) and math.isnan(res.bound_low) and not res.equivalent
    assert set(res.to_dict()) >= {"p_lower", "p_upper", "p", "equivalent"}


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [({"bound_dz": 0.0}, "bound_dz"), ({"bound_dz": -0.2}, "bound_dz"), ({"bound_dz": math.inf}, "bound_dz"),
     ({"alpha": 0.5j}, "alpha"), ({"diff": [[0.1, 0.2]]}, "diff")],
)
def test_tost_bad_parameters(kwargs, name):
    args = {"diff": [0.1, -0.2, 0.3]} | kwargs
    with pytest.raises(InvalidParameterError, match=f"`{name}`"):
        tost_paired(args.pop("diff"), **args)
