"""The game functions against brute force: Shapley by enumerating orderings, the axioms, the estimate."""

from __future__ import annotations

from itertools import permutations

import numpy as np
import pytest

from moeaudit.errors import InvalidParameterError
from moeaudit.interactions.games import (
    all_masks,
    exact_shapley,
    pair_masks,
    permutation_masks,
    permutation_shapley,
    popcount,
)


def shapley_by_orderings(values: np.ndarray, k: int) -> np.ndarray:
    """Mean marginal cost of each player over all k! orderings (the definition)."""
    phi = np.zeros(k)
    orders = list(permutations(range(k)))
    for order in orders:
        mask = 0
        for player in order:
            phi[player] += values[mask | (1 << player)] - values[mask]
            mask |= 1 << player
    return phi / len(orders)


@pytest.mark.parametrize("k", [1, 2, 3, 5, 7])
def test_exact_shapley_matches_the_definition(k):
    rng = np.random.default_rng(k)
    values = rng.normal(size=(4, 1 << k))
    values[:, 0] = 0.0
    phi = exact_shapley(values)
    for game in range(4):
        assert np.allclose(phi[game], shapley_by_orderings(values[game], k), atol=1e-12)
    assert np.allclose(phi.sum(axis=1), values[:, -1], atol=1e-12)  # efficiency


def test_null_player_and_symmetry():
    rng = np.random.default_rng(0)
    k = 4
    base = rng.normal(size=1 << (k - 1))
    base[0] = 0.0
    masks = np.arange(1 << k)
    without_last = masks & ((1 << (k - 1)) - 1)
    values = base[without_last]  # player 3 never changes v: a null player
    assert exact_shapley(values)[3] == 0.0
    # two players that enter v only through their count are symmetric
    sym = np.array([{0: 0.0, 1: 1.0, 2: 3.0}[int(popcount(m))] for m in range(4)])
    assert np.allclose(exact_shapley(sym), [1.5, 1.5])


def test_permutation_estimate_with_every_ordering_is_exact():
    k = 4
    rng = np.random.default_rng(3)
    values = rng.normal(size=1 << k)
    values[0] = 0.0
    orderings = permutation_masks(k, 2000, np.random.default_rng(1))
    assert (orderings[:, 0, 1] == 0).all() and (orderings[:, k, 1] == (1 << k) - 1).all()
    assert all(sorted(o[:k, 0]) == list(range(k)) for o in orderings)
    phi, se = permutation_shapley(orderings, values[orderings[:, :, 1]])
    assert phi.sum() == pytest.approx(values[-1], abs=1e-12)  # efficiency holds for any sample
    assert np.all(np.abs(phi - exact_shapley(values)) < 5 * se + 1e-12)
    assert np.all(se > 0)


def test_masks():
    assert list(popcount(np.array([0, 1, 3, 255, 1 << 40]))) == [0, 1, 2, 8, 1]
    assert list(all_masks(3)) == [1, 2, 3, 4, 5, 6, 7]
    a, b, mask = pair_masks(4)
    assert len(mask) == 6 and all(a < b) and all(mask == (1 << a) | (1 << b))
    with pytest.raises(InvalidParameterError, match="k"):
        all_masks(11)
    with pytest.raises(InvalidParameterError, match="values"):
        exact_shapley(np.zeros(6))
