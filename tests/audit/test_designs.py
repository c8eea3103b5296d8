"""The design registry: every design of options.DESIGNS is registered, and its function gives the rows
that :func:`audit` reports for it."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from moeaudit import options
from moeaudit.audit import AuditSettings, audit, get_design, layer_inputs, list_designs, register_design
from moeaudit.audit.designs import _metric_columns
from moeaudit.errors import InvalidParameterError

from tests.audit.test_audit import synthetic

SETTINGS = AuditSettings(n=60, n_permutations=199)


def test_every_declared_design_is_registered_once_in_order():
    assert list_designs() == list(options.DESIGNS)
    assert {get_design(name).name for name in options.DESIGNS} == set(options.DESIGNS)
    assert {name for name in options.DESIGNS if not get_design(name).per_metric} == {"routing_weight",
                                                                                      "random_pair"}
    with pytest.raises(InvalidParameterError):
        get_design("median_split")
    with pytest.raises(InvalidParameterError):  # a second definition of a design
        register_design("paired", per_metric=True)
    with pytest.raises(InvalidParameterError):  # a name not declared in moeaudit.options
        register_design("median_split", per_metric=True)


@pytest.fixture(scope="module")
def synthetic_audit():
    effects, metrics = synthetic(n_tokens=120, gate_scale=0.2)
    return effects, metrics, audit(effects, metrics, SETTINGS)


@pytest.mark.parametrize("name", options.DESIGNS)
def test_registered_function_gives_the_audit_rows(synthetic_audit, name):
    effects, metrics, result = synthetic_audit
    spec = get_design(name)
    names = _metric_columns(metrics, SETTINGS.metrics)
    rows = []
    for data in layer_inputs(effects, metrics, names, SETTINGS):
        rows.extend(spec(data, m) for m in names) if spec.per_metric else rows.append(spec(data))
    direct = pd.DataFrame(rows)
    reported = result.tests[result.tests["design"] == name].reset_index(drop=True)
    assert len(direct) == len(reported) > 0  # (the full table's columns are float where other designs left NaN)
    pd.testing.assert_frame_equal(direct, reported[direct.columns], check_exact=True, check_dtype=False)
    # Run alone, a design gives the same cells as beside the others (its family is its own).
    alone = audit(effects, metrics, AuditSettings(n=60, n_permutations=199, designs=(name,))).tests
    pd.testing.assert_frame_equal(alone[reported.columns.intersection(alone.columns)],
                                  reported[reported.columns.intersection(alone.columns)], check_exact=True,
                                  check_dtype=False)


def test_paired_design_counts_untestable_tokens():
    effects, metrics = synthetic(n_tokens=40, layers=(0,))
    metrics["flat"] = 1.0  # one score for every expert: no token can be ranked
    data = next(layer_inputs(effects, metrics, ["flat"], SETTINGS))
    row = get_design("paired")(data, "flat")
    assert data.untestable == {"0/flat": 40} and row["n"] == 0 and np.isnan(row["effect"])
