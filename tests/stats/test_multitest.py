"""Tests for moeaudit.stats.multitest: adjust against statsmodels, the dual verdict, family tables."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from statsmodels.stats.multitest import multipletests

from moeaudit.errors import InvalidParameterError
from moeaudit.stats import VERDICTS, adjust, dual_verdict, paired_contrast, verdicts_for_family

SM_NAME = {"bonferroni": "bonferroni", "holm": "holm", "bh": "fdr_bh"}
RNG_P = np.concatenate([np.random.default_rng(0).uniform(0, 0.2, size=17), [0.001, 0.001, 0.9]])


@pytest.mark.parametrize("method", ["bonferroni", "holm", "bh"])
def test_adjust_matches_statsmodels(method):
    expected = multipletests(RNG_P, method=SM_NAME[method])[1]
    np.testing.assert_allclose(adjust(RNG_P, method), expected, rtol=1e-12)
    assert adjust(RNG_P, method).max() <= 1.0


@pytest.mark.parametrize("method", ["bonferroni", "holm", "bh"])
def test_nan_is_passed_through_and_left_out_of_the_family(method):
    p = RNG_P.copy()
    p[[2, 9]] = np.nan
    out = adjust(p, method)
    assert np.isnan(out[[2, 9]]).all()
    ok = ~np.isnan(p)
    np.testing.assert_allclose(out[ok], multipletests(p[ok], method=SM_NAME[method])[1], rtol=1e-12)


def test_bonferroni_family_size_and_cap_by_hand():
    np.testing.assert_allclose(adjust([0.01, np.nan, 0.02, 0.6], "bonferroni"), [0.03, np.nan, 0.06, 1.0])


def test_adjust_keeps_shape_and_handles_all_nan_and_empty():
    grid = RNG_P[:12].reshape(3, 4)
    out = adjust(grid, "holm")
    assert out.shape == (3, 4)
    np.testing.assert_allclose(out.ravel(), multipletests(grid.ravel(), method="holm")[1])
    assert np.isnan(adjust([np.nan, np.nan], "bh")).all()
    assert adjust([], "bh").shape == (0,)


@pytest.mark.parametrize(
    ("args", "name"),
    [(([0.1, 0.2], "fdr_bh"), "method"), (([0.1, 1.2], "holm"), "pvalues"), (([-0.1], "holm"), "pvalues"),
     ((["x"], "holm"), "pvalues")],
)
def test_adjust_bad_parameters(args, name):
    with pytest.raises(InvalidParameterError, match=f"`{name}`"):
        adjust(*args)


def test_dual_verdict_truth_table():
    p_t = [0.001, 0.001, 0.2, 0.2, np.nan, 0.001, 0.01]
    p_w = [0.004, 0.09, 0.001, 0.5, 0.001, np.nan, 0.01]
    assert dual_verdict(p_t, p_w, 0.01).tolist() == [
        "significant", "not significant", "not significant", "not significant", "untestable", "untestable",
        "significant",
    ]
    assert set(VERDICTS) == {"significant", "not significant", "untestable"}


def test_dual_verdict_boundary_matches_statsmodels_reject_rule():
    p = np.array([0.01, 0.02, 0.03, 0.04])
    reject, corrected = multipletests(p, alpha=0.04, method="bonferroni")[:2]
    verdict = dual_verdict(corrected, corrected, 0.04)
    assert ((verdict == "significant") == reject).all()


def test_dual_verdict_broadcasts():
    out = dual_verdict(np.array([[0.001], [0.5]]), np.array([0.001, 0.002, 0.9]), 0.05)
    assert out.shape == (2, 3)
    assert out[0].tolist() == ["significant", "significant", "not significant"]
    assert (out[1] == "not significant").all()


@pytest.mark.parametrize(
    ("args", "name"),
    [(([0.1], [0.1], 1.0), "alpha"), (([0.1], [2.0], 0.05), "p_w_adjusted"), (([-1.0], [0.1], 0.05), "p_t_adjusted"),
     (([0.1, 0.2], [0.1, 0.2, 0.3], 0.05), "p_t_adjusted")],
)
def test_dual_verdict_bad_parameters(args, name):
    with pytest.raises(InvalidParameterError, match=f"`{name}`"):
        dual_verdict(*args)


def test_verdicts_for_family_per_model_families():
    cells = pd.DataFrame({
        "model": ["a"] * 3 + ["b"] * 2,
        "metric": ["freq", "norm", "gate", "freq", "norm"],
        "p_t": [0.001, 0.02, np.nan, 0.02, 0.3],
        "p_wilcoxon": [0.004, 0.001, 0.001, 0.01, 0.2],
    }, index=[10, 11, 12, 13, 14])
    out = verdicts_for_family(cells, method="bonferroni", alpha=0.05, by="model")
    assert list(out.index) == [10, 11, 12, 13, 14] and list(out["metric"]) == list(cells["metric"])
    # Family "a": 2 testable t-tests (NaN left out), 3 Wilcoxon tests.
    np.testing.assert_allclose(out["p_t_adjusted"], [0.002, 0.04, np.nan, 0.04, 0.6])
    np.testing.assert_allclose(out["p_wilcoxon_adjusted"], [0.012, 0.003, 0.003, 0.02, 0.4])
    np.testing.assert_allclose(out["p_adjusted"], [0.012, 0.04, np.nan, 0.04, 0.6])
    assert out["verdict"].tolist() == ["significant", "significant", "untestable", "significant", "not significant"]
    one_family = verdicts_for_family(cells, method="bonferroni", alpha=0.05)
    assert one_family["p_t_adjusted"].iloc[0] == pytest.approx(0.004)
    assert "p_adjusted" not in cells.columns  # input untouched


def test_verdicts_for_family_accepts_results_and_mappings():
    rng = np.random.default_rng(4)
    results = [paired_contrast(rng.normal(mu, 1, 100), np.zeros(100)) for mu in (0.6, 0.0, 0.05)]
    out = verdicts_for_family(results, method="holm", alpha=0.01)
    np.testing.assert_allclose(out["p_t_adjusted"], adjust([r.p_t for r in results], "holm"))
    np.testing.assert_allclose(out["p_wilcoxon_adjusted"], adjust([r.p_wilcoxon for r in results], "holm"))
    assert out["verdict"].iloc[0] == "significant" and "d_z" in out.columns
    same = verdicts_for_family([{"p_t": r.p_t, "p_wilcoxon": r.p_wilcoxon} for r in results], method="holm",
                               alpha=0.01)
    assert same["verdict"].tolist() == out["verdict"].tolist()
    assert verdicts_for_family([], alpha=0.05).empty


@pytest.mark.parametrize(
    ("cells", "kwargs", "name"),
    [
        (pd.DataFrame({"p_t": [0.1]}), {}, "cells"),
        (pd.DataFrame({"p_t": [0.1], "p_wilcoxon": [0.1]}), {"by": "model"}, "by"),
        (pd.DataFrame({"p_t": [0.1], "p_wilcoxon": [0.1]}), {"method": "BH"}, "method"),
        (pd.DataFrame({"p_t": [0.1], "p_wilcoxon": [0.1]}), {"alpha": -0.05}, "alpha"),
        (pd.DataFrame({"p_t": [1.1], "p_wilcoxon": [0.1]}), {}, r"cells\['p_t'\]"),
        (42, {}, "cells"),
        ([0.1, 0.2], {}, "cells"),
    ],
)
def test_verdicts_for_family_bad_parameters(cells, kwargs, name):
    with pytest.raises(InvalidParameterError, match=f"`{name}`"):
        verdicts_for_family(cells, **kwargs)
