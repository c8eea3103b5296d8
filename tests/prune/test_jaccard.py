"""Jaccard overlap of dropped sets and its exact random expectation."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from moeaudit.prune import expected_random_jaccard, jaccard, jaccard_table, layer_jaccard_summary


def test_jaccard_basics():
    assert jaccard({1, 2, 3}, {1, 2, 3}) == 1.0
    assert jaccard({1, 2}, {3, 4}) == 0.0
    assert jaccard({1, 2, 3}, {2, 3, 4}) == pytest.approx(2 / 4)
    assert jaccard(set(), set()) == 1.0


@pytest.mark.parametrize("n, d", [(8, 1), (8, 2), (8, 4), (6, 5), (6, 6)])
def test_expected_random_jaccard_by_enumeration(n, d):
    subsets = [set(c) for c in itertools.combinations(range(n), d)]
    brute = np.mean([jaccard(a, b) for a in subsets for b in subsets])
    assert expected_random_jaccard(n, d) == pytest.approx(brute, abs=1e-12)


@pytest.mark.parametrize("n, d, g", [(8, 2, 2), (8, 4, 2), (12, 6, 3), (8, 4, 4), (6, 4, 2)])
def test_expected_group_balanced_jaccard_by_enumeration(n, d, g):
    """Two group-balanced draws (d/g of each of g groups of n/g): the convolution equals the mean over all
    pairs of such sets, and differs from the unconstrained expectation."""
    size, share = n // g, d // g
    per_group = [list(itertools.combinations(range(k * size, (k + 1) * size), share)) for k in range(g)]
    subsets = [set(itertools.chain(*parts)) for parts in itertools.product(*per_group)]
    brute = np.mean([jaccard(a, b) for a in subsets for b in subsets])
    assert expected_random_jaccard(n, d, groups=g) == pytest.approx(brute, abs=1e-12)
    assert abs(expected_random_jaccard(n, d, groups=g) - expected_random_jaccard(n, d)) > 1e-3


def test_jaccard_table_self_is_one_and_random_rows():
    dropped = {("a", 0.25, None): {0: [0, 1], 1: [2, 3]}, ("b", 0.25, None): {0: [0, 2], 1: [4, 5]},
               ("random", 0.25, 1): {0: [0, 1], 1: [6, 7]}, ("random", 0.25, 2): {0: [5, 6], 1: [2, 3]}}
    table = jaccard_table(dropped, {0: 8, 1: 8})
    diagonal = table[(table.criterion_a == table.criterion_b) & (table.criterion_a != "random")]
    assert len(diagonal) == 4 and (diagonal.jaccard == 1.0).all()
    ab = table[(table.criterion_a == "a") & (table.criterion_b == "b")].set_index("layer").jaccard
    assert ab[0] == pytest.approx(1 / 3) and ab[1] == 0.0
    a_random = table[(table.criterion_a == "a") & (table.criterion_b == "random")].set_index("layer")
    assert a_random.loc[0, "jaccard"] == pytest.approx((1 + 0) / 2) and a_random.loc[0, "n_pairs"] == 2
    assert a_random.loc[1, "jaccard"] == pytest.approx((0 + 1) / 2)
    assert np.allclose(table.expected_random, expected_random_jaccard(8, 2))
    summary = layer_jaccard_summary(table)
    assert summary.set_index("layer").loc[0, "mean_jaccard"] == pytest.approx(1 / 3)
    assert summary.set_index("layer").loc[1, "n_criteria"] == 2
