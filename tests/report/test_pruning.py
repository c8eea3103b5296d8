"""Reading pruning.parquet / jaccard.parquet in both layouts the report accepts (moeaudit.report._pruning)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from moeaudit.report import _pruning
from tests.report.conftest import EXPERTS, _pruning as synthetic_pruning


def test_modes_split_whole_model_and_single_layer():
    pruning = synthetic_pruning()
    whole, single = _pruning.whole_model(pruning), _pruning.per_layer(pruning)
    assert len(whole) == 2 * (2 + 5) and sorted(single["layer"].unique()) == [0, 1]
    reap = whole[(whole["criterion"] == "reap") & (whole["ratio"] == 0.25)]["value"]
    assert reap.tolist() == [24.0]
    assert _pruning.baseline(pruning) == 20.0


def test_layer_null_layout_without_mode():
    frame = pd.DataFrame({"criterion": ["a", "a", "random"], "ratio": [0.5, 0.5, 0.5], "seed": [None, None, 1],
                          "layer": [None, 3, None], "heldout_ppl": [10.0, 12.0, 11.0]})
    assert _pruning.whole_model(frame)["value"].tolist() == [10.0, 11.0]
    assert _pruning.per_layer(frame)[["layer", "value"]].values.tolist() == [[3, 12.0]]


def test_jaccard_from_kept_sets():
    matrices = _pruning.jaccard_matrices(synthetic_pruning(), None, lambda layer: EXPERTS)
    assert sorted(matrices) == [0.25, 0.5]
    at = matrices[0.25]
    assert list(at.index) == ["frequency", "reap", "random"]
    assert at.loc["reap", "reap"] == 1.0 and at.loc["frequency", "reap"] == pytest.approx(1 / 3)  # {6,7} vs {5,7}
    assert np.allclose(at.to_numpy(), at.to_numpy().T)
    assert matrices[0.5].loc["frequency", "reap"] == 1.0


def test_jaccard_table_of_the_prune_stage():
    table = pd.DataFrame({"criterion_a": ["freq", "freq", "freq", "random", "freq"],
                          "criterion_b": ["freq", "reap", "random", "random", "reap"],
                          "ratio": [0.25] * 4 + [0.25], "layer": [0, 0, 0, 0, 1],
                          "jaccard": [1.0, 0.5, 0.2, 0.1, 0.7]})
    matrix = _pruning.jaccard_matrices(None, table, lambda layer: None)[0.25]
    assert list(matrix.index) == ["freq", "reap", "random"]
    assert matrix.loc["reap", "freq"] == pytest.approx(0.6) and matrix.loc["reap", "reap"] == 1.0
    assert matrix.loc["random", "freq"] == pytest.approx(0.2) and np.isnan(matrix.loc["reap", "random"])
