"""REAP: mean over active tokens of gate × act_norm, with the three gate choices."""

from __future__ import annotations

import numpy as np
import pytest
from numpy.testing import assert_allclose

from moeaudit.errors import InvalidParameterError
from moeaudit.metrics import compute_expert_metrics
from moeaudit.metrics.reap import reap

# expert 0: rows (gate, norm) at tokens 0, 1, 2 with norms 2, 4, 6; expert 1: norms 4, 2; expert 2: norm 1
WANT = {
    "raw": [(0.5 * 2 + 0.4 * 4 + 0.2 * 6) / 3, (0.3 * 4 + 0.6 * 2) / 2, 0.4 * 1, np.nan],
    "renorm": [(0.625 * 2 + 0.5 * 4 + 0.25 * 6) / 3, (0.375 * 4 + 0.75 * 2) / 2, 0.5 * 1, np.nan],
    "combine": [(1.25 * 2 + 1.0 * 4 + 0.5 * 6) / 3, (0.75 * 4 + 1.5 * 2) / 2, 1.0 * 1, np.nan],
}


def test_reap_function(routing):
    assert_allclose(reap(routing.expert, routing.raw_gate, routing.act_norm, num_experts=4), WANT["raw"])


@pytest.mark.parametrize("gate", ["raw", "renorm", "combine"])
def test_reap_gate_switch(routing, gate):
    table = compute_expert_metrics(routing, {0: 4}, metrics=["reap"], reap_gate=gate)
    assert_allclose(table.reap, WANT[gate])
    assert table.attrs["reap_gate"] == gate


def test_reap_gates_differ_and_default_is_combine(routing):
    assert len({tuple(np.round(v[:3], 9)) for v in WANT.values()}) == 3
    assert_allclose(compute_expert_metrics(routing, {0: 4}).reap, WANT["combine"])


def test_renorm_gate_is_derived_when_absent(routing):
    table = compute_expert_metrics(routing.drop(columns="renorm_gate"), {0: 4}, metrics=["reap"], reap_gate="renorm")
    assert_allclose(table.reap, WANT["renorm"])


def test_bad_reap_gate_is_refused(routing):
    with pytest.raises(InvalidParameterError, match="`reap_gate` must be one of"):
        compute_expert_metrics(routing, {0: 4}, reap_gate="softmax")
