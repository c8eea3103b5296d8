"""routing_entropy and routing_gini of each expert's probability column over tokens."""

from __future__ import annotations

import math

import numpy as np
import pytest
from numpy.testing import assert_allclose

from moeaudit.metrics.distribution import routing_entropy, routing_gini


def test_uniform_and_one_hot_columns_hit_the_extremes():
    t = 5
    probs = np.zeros((t, 3))
    probs[:, 0] = 0.2  # the same probability from every token
    probs[2, 1] = 0.9  # all of the column's mass on one token
    probs[:, 2] = 1.0 - probs[:, 0] - probs[:, 1]
    entropy = routing_entropy(probs)
    gini = routing_gini(probs)
    assert entropy[0] == pytest.approx(1.0) and entropy[1] == pytest.approx(0.0)
    assert gini[0] == pytest.approx(0.0) and gini[1] == pytest.approx(1 - 1 / t)


def test_hand_worked_column():
    # column [1, 1, 2] / 4 -> q = (1/4, 1/4, 1/2)
    probs = np.array([[0.1], [0.1], [0.2]])
    h = -(0.25 * math.log(0.25) * 2 + 0.5 * math.log(0.5)) / math.log(3)
    # Gini: sum over ordered pairs |x_s - x_t| = 4 × 0.1 (pairs with the 0.2), / (2 · 3 · 0.4)
    g = 4 * 0.1 / (2 * 3 * 0.4)
    assert routing_entropy(probs)[0] == pytest.approx(h)
    assert routing_gini(probs)[0] == pytest.approx(g)


def test_blocked_reduction_matches_per_column():
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(40), size=30)  # more experts than one block
    per_column_entropy = [routing_entropy(probs[:, [e]])[0] for e in range(40)]
    per_column_gini = [routing_gini(probs[:, [e]])[0] for e in range(40)]
    assert_allclose(routing_entropy(probs), per_column_entropy)
    assert_allclose(routing_gini(probs), per_column_gini)


def test_degenerate_columns_are_nan():
    assert np.isnan(routing_entropy(np.array([[0.5, 0.5]]))).all()  # one token: log T = 0
    assert np.isnan(routing_entropy(np.zeros((3, 1))))[0]
    assert np.isnan(routing_gini(np.zeros((3, 1))))[0]


def test_wrong_rank_is_refused():
    with pytest.raises(ValueError, match="2-D"):
        routing_entropy(np.ones(3))
