"""frequency, count, gate_mass, mean_gate_active against the hand-worked table (conftest.py)."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest
from numpy.testing import assert_allclose, assert_array_equal

from moeaudit.metrics import compute_expert_metrics
from moeaudit.metrics.routing import count, frequency, gate_mass, mean_gate_active


def test_count_and_frequency(routing):
    assert_array_equal(count(routing.expert, num_experts=4), [3, 2, 1, 0])
    assert_allclose(frequency(routing.expert, num_experts=4, n_tokens=3), [3 / 3, 2 / 3, 1 / 3, 0.0])


def test_frequency_of_no_tokens_is_nan():
    assert np.isnan(frequency([], num_experts=3, n_tokens=0)).all()


def test_gate_mass_sums_the_combine_weight(routing):
    got = gate_mass(routing.expert, routing.combine_weight, num_experts=4)
    assert_allclose(got, [1.25 + 1.0 + 0.5, 0.75 + 1.5, 1.0, 0.0])


def test_mean_gate_active_is_the_mean_raw_gate_when_active(routing):
    got = mean_gate_active(routing.expert, routing.raw_gate, num_experts=4)
    assert_allclose(got, [(0.5 + 0.4 + 0.2) / 3, (0.3 + 0.6) / 2, 0.4, np.nan])


def test_mean_gate_active_uses_the_per_token_mask_not_a_global_threshold():
    # Full router probabilities of 3 tokens over 4 experts, top-2 per token.
    probs = np.array(
        [
            [0.50, 0.26, 0.00, 0.24],  # selects 0, 1; expert 3 gets 0.24 but is NOT selected
            [0.90, 0.03, 0.05, 0.02],  # selects 0, 2; expert 2 is active with a tiny gate 0.05
            [0.10, 0.70, 0.15, 0.05],  # selects 1, 2; expert 2 active with 0.15
        ]
    )
    topk = np.argsort(-probs, axis=1)[:, :2]
    rows = [(t, s, int(e), probs[t, e]) for t in range(3) for s, e in enumerate(topk[t])]
    routing = pd.DataFrame(rows, columns=["pos", "slot", "expert", "raw_gate"]).assign(layer=0, seq=0)
    table = compute_expert_metrics(routing, {0: 4}, metrics=["count", "mean_gate_active"])

    # Per-token mask: expert 2 averages its two active gates; expert 3 was never in an active set.
    assert_allclose(table.mean_gate_active, [(0.50 + 0.90) / 2, (0.26 + 0.70) / 2, (0.05 + 0.15) / 2, np.nan])
    assert_array_equal(table["count"], [2, 2, 2, 0])
    # The global-threshold reading (p > 0.2 anywhere) would give different answers for both experts.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # nanmean of an empty column
        thresholded = np.nanmean(np.where(probs > 0.2, probs, np.nan), axis=0)
    assert np.isnan(thresholded[2]) and thresholded[3] == pytest.approx(0.24)
    assert not np.allclose(thresholded[2:], table.mean_gate_active.to_numpy()[2:], equal_nan=True)
