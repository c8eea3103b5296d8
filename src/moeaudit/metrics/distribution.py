"""How evenly an expert's router probability is spread over the tokens (needs full router probabilities).

Both metrics look at one expert's *column* of router probabilities, :math:`p_e(x_1), \\dots, p_e(x_T)`
over the T tokens of the layer (all tokens, selected or not), not at a token's row.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy.special import xlogy

__all__ = ["routing_entropy", "routing_gini"]

#: Experts per block when reducing a [T, E] matrix, so a float64 copy of one block stays small.
_BLOCK = 16


def _as_probs(router_probs: ArrayLike) -> NDArray[np.floating]:
    p = np.asarray(router_probs)
    if p.ndim != 2:
        raise ValueError(f"`router_probs` must be a 2-D array [n_tokens, num_experts]; got shape {p.shape}.")
    return p


def routing_entropy(router_probs: ArrayLike) -> NDArray[np.float64]:
    r"""Normalised Shannon entropy of each expert's probability column over tokens.

    Parameters
    ----------
    router_probs : array_like of float, shape (T, E)
        Router probabilities :math:`p_e(x_t)` of the T tokens (the family's non-negative scores:
        the softmax over all routed experts, or DeepSeek-V3-style sigmoid scores; only each expert's column
        over tokens is normalised, so scores that do not sum to 1 over experts are fine).

    Returns
    -------
    ndarray of float64, shape (E,)
        With :math:`q_t = p_e(x_t) / \sum_s p_e(x_s)`,
        :math:`H_e = -\frac{1}{\log T}\sum_t q_t \log q_t \in [0, 1]` (nats, :math:`0 \log 0 = 0`).
        1 when the expert receives the same probability from every token (a generalist), 0 when a
        single token holds all of it (a specialist). NaN when T < 2 or the column sums to 0.

    Notes
    -----
    moeaudit's definition (the engmann2026 scripts computed an entropy but define it per model); the
    normalisation by :math:`\log T` makes layers and splits with different token counts comparable.

    References
    ----------
    .. [1] Engmann, Medeiros Adriano, Giese, arXiv 2606.10703 (routing entropy, computed, not tested).
    """
    p = _as_probs(router_probs)
    n_tokens, n_experts = p.shape
    out = np.full(n_experts, np.nan)
    if n_tokens < 2:
        return out
    for lo in range(0, n_experts, _BLOCK):
        block = np.asarray(p[:, lo : lo + _BLOCK], dtype=np.float64)
        total = block.sum(axis=0)
        with np.errstate(invalid="ignore", divide="ignore"):
            q = block / total
            h = -xlogy(q, q).sum(axis=0) / np.log(n_tokens)
        out[lo : lo + _BLOCK] = np.where(total > 0, h, np.nan)
    return out


def routing_gini(router_probs: ArrayLike) -> NDArray[np.float64]:
    r"""Gini coefficient of each expert's probability column over tokens.

    Parameters
    ----------
    router_probs : array_like of float, shape (T, E)

    Returns
    -------
    ndarray of float64, shape (E,)
        :math:`G_e = \frac{\sum_{s,t} |p_e(x_s) - p_e(x_t)|}{2 T \sum_t p_e(x_t)}
        = \frac{\sum_{i=1}^{T} (2i - T - 1)\, p_{(i)}}{T \sum_t p_e(x_t)}` with :math:`p_{(i)}` the column
        sorted ascending. 0 when every token gives the expert the same probability; :math:`1 - 1/T`
        (its maximum) when one token holds all of it. NaN when T = 0 or the column sums to 0.

    Notes
    -----
    The standard (unnormalised) Gini coefficient of the column; high = concentrated on few tokens.

    References
    ----------
    .. [1] Engmann, Medeiros Adriano, Giese, arXiv 2606.10703 (routing Gini, computed, not tested).
    """
    p = _as_probs(router_probs)
    n_tokens, n_experts = p.shape
    out = np.full(n_experts, np.nan)
    if n_tokens < 1:
        return out
    rank_weight = (2.0 * np.arange(1, n_tokens + 1) - n_tokens - 1.0)[:, None]
    for lo in range(0, n_experts, _BLOCK):
        block = np.sort(np.asarray(p[:, lo : lo + _BLOCK], dtype=np.float64), axis=0)
        total = block.sum(axis=0)
        with np.errstate(invalid="ignore", divide="ignore"):
            g = (rank_weight * block).sum(axis=0) / (n_tokens * total)
        out[lo : lo + _BLOCK] = np.where(total > 0, g, np.nan)
    return out
