"""The cooperative game of a token's active set, and its Shapley values and pairwise interactions.

For a token t at MoE layer ℓ with active set A = A_ℓ(t) of k experts (the *players*, ordered by raw gate:
player 0 has the largest), the game is the removal cost

    v(S) = ΔNLL_t(remove S at ℓ, token scope),    S ⊆ A,    v(∅) = 0,

measured exactly by the intervention engine (:func:`moeaudit.intervene.engine.removal_outcomes`). A
coalition is a bit mask over the players (bit i set: player i removed), so ``values[..., mask]`` is v(S).

Shapley value (Shapley 1953) of player i::

    φ_i = Σ_{S ⊆ A \\ {i}} |S|! (k - |S| - 1)! / k! · (v(S ∪ {i}) - v(S))

It splits the cost of removing the whole active set among its members: Σ_i φ_i = v(A) (efficiency), a
player whose removal never changes v has φ_i = 0 (null player), and with k = 1 φ = v. The exact sum needs
all 2^k coalitions (256 for top-8); for larger k, :func:`permutation_shapley` averages the marginal costs
along seeded random orderings (Castro, Gómez & Tejada 2009), which keeps efficiency exactly for every
ordering and comes with a standard error.

Pairwise interaction of players a and b (the second-order difference of v at ∅, the pairwise Shapley
interaction index of Grabisch & Roubens 1999 restricted to the empty context)::

    I_ab = v({a, b}) - v({a}) - v({b})

Its sign says how the two removals combine. I_ab > 0 (super-additive cost): removing both costs more than
the two removals separately; the typical cause is mutual compensation — each expert covers for the other,
so either alone can go (the experts are *redundant given each other*). I_ab < 0 (sub-additive cost):
removing one already costs most of what removing both does — the two contribute one thing together, and it
is lost as soon as either goes. I_ab = 0: the removals add up (e.g. a model linear in the MoE output).

References
----------
.. [1] L. S. Shapley, "A value for n-person games", Contributions to the Theory of Games II (1953).
.. [2] J. Castro, D. Gómez, J. Tejada, "Polynomial calculation of the Shapley value based on sampling",
   Computers & Operations Research 36(5) (2009).
.. [3] M. Grabisch, M. Roubens, "An axiomatic approach to the concept of interaction among players in
   cooperative games", International Journal of Game Theory 28 (1999).
.. [4] Engmann, Medeiros Adriano, Giese, arXiv 2606.10703 (2026), Sec. 6 (limitations): single-expert
   removal only; multi-expert joint ablation named as future work.
"""

from __future__ import annotations

from math import factorial

import numpy as np

from moeaudit.errors import invalid

__all__ = ["all_masks", "exact_shapley", "pair_masks", "permutation_masks", "permutation_shapley", "popcount"]

#: Largest number of players whose 2^k coalitions are enumerated (1,024 removals per token).
MAX_EXACT_PLAYERS = 10


def popcount(masks: np.ndarray) -> np.ndarray:
    """Number of set bits of each (non-negative) integer mask."""
    masks = np.asarray(masks, dtype=np.int64)
    count = np.zeros(masks.shape, dtype=np.int64)
    for bit in range(63):
        count += (masks >> bit) & 1
    return count


def all_masks(k: int) -> np.ndarray:
    """Every coalition of ``k`` players but the empty one: masks 1 .. 2^k - 1."""
    _check_players(k, MAX_EXACT_PLAYERS)
    return np.arange(1, 1 << k, dtype=np.int64)


def pair_masks(k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The k(k-1)/2 pairs a < b of ``k`` players: (a, b, mask of {a, b})."""
    a, b = np.triu_indices(k, 1)
    return a.astype(np.int64), b.astype(np.int64), (np.int64(1) << a) | (np.int64(1) << b)


def shapley_weights(k: int) -> np.ndarray:
    """|S|! (k - |S| - 1)! / k! for |S| = 0 .. k-1 (float64)."""
    return np.array([factorial(s) * factorial(k - s - 1) / factorial(k) for s in range(k)], dtype=np.float64)


def exact_shapley(values: np.ndarray) -> np.ndarray:
    """Exact Shapley values of games given on every coalition.

    Parameters
    ----------
    values : float array [..., 2^k]
        v(S) for every mask S (``values[..., 0]`` is v(∅), normally 0).

    Returns
    -------
    float64 array [..., k]
        φ_i per game; Σ_i φ_i = v(all) - v(∅) up to float64 rounding.

    Examples
    --------
    >>> exact_shapley(np.array([0.0, 1.0, 1.0, 1.0]))  # either removal costs all: split evenly
    array([0.5, 0.5])
    """
    values = np.asarray(values, dtype=np.float64)
    size = values.shape[-1]
    k = size.bit_length() - 1
    if size != 1 << k or k < 1:
        raise invalid("values", "v(S) on all 2^k coalitions (last axis of length 2, 4, 8, ...)", values.shape)
    masks = np.arange(size, dtype=np.int64)
    weights = shapley_weights(k)
    sizes = popcount(masks)
    out = np.empty(values.shape[:-1] + (k,), dtype=np.float64)
    for i in range(k):
        without = masks[(masks >> i) & 1 == 0]
        marginal = values[..., without | (1 << i)] - values[..., without]
        out[..., i] = marginal @ weights[sizes[without]]
    return out


def permutation_masks(k: int, permutations: int, rng: np.random.Generator) -> np.ndarray:
    """Seeded random orderings of ``k`` players and the coalition masks of their prefixes.

    Returns
    -------
    int64 array [permutations, k + 1, 2]
        ``[..., j, 0]`` the player added at step j (j < k; -1 at j = k), ``[..., j, 1]`` the mask of the
        first j players of the ordering (``[..., 0, 1] == 0``, ``[..., k, 1]`` the full set).
    """
    _check_players(k, 62)
    out = np.zeros((permutations, k + 1, 2), dtype=np.int64)
    for m in range(permutations):
        order = rng.permutation(k)
        out[m, :k, 0] = order
        out[m, k, 0] = -1
        out[m, 1:, 1] = np.cumsum(np.int64(1) << order.astype(np.int64))
    return out


def permutation_shapley(orderings: np.ndarray, prefix_values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Shapley values estimated from the marginal costs along sampled orderings.

    Parameters
    ----------
    orderings : int array [M, k + 1, 2]
        From :func:`permutation_masks`.
    prefix_values : float array [M, k + 1]
        v of each prefix (``prefix_values[:, 0]`` = v(∅), normally 0).

    Returns
    -------
    (phi, se) : float64 arrays [k]
        The mean marginal cost of each player and its standard error (sample standard deviation / √M; NaN
        for M = 1). Σ_i φ_i equals the mean of v(all) - v(∅) over the orderings exactly (each ordering's
        marginals telescope).
    """
    orderings = np.asarray(orderings)
    prefix_values = np.asarray(prefix_values, dtype=np.float64)
    m, steps = prefix_values.shape
    k = steps - 1
    marginal = np.empty((m, k), dtype=np.float64)
    rows = np.arange(m)[:, None]
    marginal[rows, orderings[:, :k, 0]] = np.diff(prefix_values, axis=1)
    phi = marginal.mean(axis=0)
    se = marginal.std(axis=0, ddof=1) / np.sqrt(m) if m > 1 else np.full(k, np.nan)
    return phi, se


def _check_players(k: int, most: int) -> None:
    if not isinstance(k, (int, np.integer)) or not 1 <= k <= most:
        raise invalid("k", f"between 1 and {most} players", k)
