"""Tests for moeaudit.stats.redundancy: the cliff and the progressive-ablation summary."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from moeaudit.errors import InvalidParameterError
from moeaudit.stats import DegenerateInputWarning, cliff, progressive_summary


def test_cliff_is_first_strict_crossing_one_based():
    assert cliff([0.02, 0.12, 0.2, 0.43]) == 2
    assert cliff([0.2, 0.05]) == 1
    assert cliff([0.01, 0.1, 0.09]) is None  # 0.1 is not above 0.1
    assert cliff([0.01, 0.1, 0.09], threshold=0.05) == 2
    assert cliff([np.nan, 0.3]) == 2
    assert cliff([]) is None


def test_paper_curves():
    # OLMoE layer 15 passes 0.1 nats at j = 2 and reaches 0.43 at j = 7; layers 0-9 stay below 0.09.
    assert cliff([0.05, 0.11, 0.16, 0.22, 0.28, 0.35, 0.43]) == 2
    assert cliff([0.0, 0.01, 0.01, 0.02, 0.04, 0.06, 0.088]) is None


@pytest.mark.parametrize(("args", "name"), [(([[0.1, 0.2]],), "mean_by_j"), (([0.1], np.inf), "threshold"),
                                            (([0.1], "0.1"), "threshold")])
def test_cliff_bad_parameters(args, name):
    with pytest.raises(InvalidParameterError, match=f"`{name}`"):
        cliff(*args)


def test_progressive_summary_matches_numpy_and_feeds_cliff():
    rng = np.random.default_rng(0)
    delta = rng.exponential(scale=[0.01, 0.03, 0.08, 0.2], size=(500, 4))
    delta[rng.uniform(size=delta.shape) < 0.05] = np.nan
    out = progressive_summary(delta)
    assert list(out.index) == [1, 2, 3, 4] and list(out.columns) == ["n", "mean", "median", "p95"]
    for j in range(1, 5):
        col = delta[:, j - 1][~np.isnan(delta[:, j - 1])]
        assert out.loc[j, "n"] == col.size
        assert out.loc[j, "mean"] == pytest.approx(col.mean())
        assert out.loc[j, "median"] == pytest.approx(np.median(col))
        assert out.loc[j, "p95"] == pytest.approx(np.quantile(col, 0.95))
    assert cliff(out["mean"]) == 4
    assert out["n"].dtype.kind == "i"


def test_progressive_summary_mapping_equals_array():
    delta = np.array([[0.0, 0.01, 0.3], [0.0, 0.02, 0.1], [0.01, 0.5, 0.9]])
    from_map = progressive_summary({3: delta[:, 2], 1: delta[:, 0], 2: list(delta[:, 1])})
    pd.testing.assert_frame_equal(from_map, progressive_summary(delta))


def test_progressive_summary_empty_j_warns():
    with pytest.warns(DegenerateInputWarning, match=r"j = \[2\]"):
        out = progressive_summary({1: [0.1, 0.2], 2: [np.nan]})
    assert out.loc[2, "n"] == 0 and np.isnan(out.loc[2, "mean"]) and out.loc[1, "mean"] == pytest.approx(0.15)


@pytest.mark.parametrize("bad", [[0.1, 0.2], {0: [0.1]}, {"a": [0.1]}, {1: [[0.1]]}, [[0.1, np.inf]], "x"])
def test_progressive_summary_bad_parameters(bad):
    with pytest.raises(InvalidParameterError, match="`delta_nll_by_j"):
        progressive_summary(bad)
