"""Routing metrics: how often, and how strongly, the router sends tokens to each expert.

Each function takes one MoE layer's routing rows (one row per token and selected expert, real tokens
only) and returns one value per routed expert ``0 .. num_experts - 1``.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike, NDArray

from moeaudit.metrics._common import as_expert_index, as_values, group_count, group_mean, group_sum

__all__ = ["count", "frequency", "gate_mass", "mean_gate_active"]


def count(expert: ArrayLike, *, num_experts: int) -> NDArray[np.int64]:
    r"""Number of tokens whose active set contains each expert.

    Parameters
    ----------
    expert : array_like of int, shape (n_rows,)
        Expert id of each routing row at one layer.
    num_experts : int
        Number of routed experts E at the layer.

    Returns
    -------
    ndarray of int64, shape (E,)
        :math:`c_e = |\{t : e \in A(t)\}|`; 0 for experts never routed.

    Notes
    -----
    A token selects each expert at most once (top-k of distinct experts), so the number of rows equals
    the number of tokens.
    """
    return group_count(as_expert_index(expert), num_experts)


def frequency(expert: ArrayLike, *, num_experts: int, n_tokens: int) -> NDArray[np.float64]:
    r"""Share of tokens routed to each expert (utilisation).

    Parameters
    ----------
    expert : array_like of int, shape (n_rows,)
        Expert id of each routing row at one layer.
    num_experts : int
        Number of routed experts E at the layer.
    n_tokens : int
        Number of distinct tokens (seq, pos) at the layer.

    Returns
    -------
    ndarray of float64, shape (E,)
        :math:`f_e = c_e / T` with :math:`c_e` from :func:`count` and :math:`T` = ``n_tokens``; all NaN
        when ``n_tokens`` is 0. The values sum to top-k.

    References
    ----------
    .. [1] Lasby et al., "REAP the Experts", arXiv 2510.13999; CerebrasResearch/reap,
       ``src/reap/observer.py`` (``expert_frequency`` / ``total_tokens``).
    """
    c = count(expert, num_experts=num_experts).astype(np.float64)
    if n_tokens <= 0:
        return np.full(num_experts, np.nan)
    return c / float(n_tokens)


def gate_mass(expert: ArrayLike, combine_weight: ArrayLike, *, num_experts: int) -> NDArray[np.float64]:
    r"""Total weight with which the layer mixes each expert's output into the residual stream.

    Parameters
    ----------
    expert : array_like of int, shape (n_rows,)
    combine_weight : array_like of float, shape (n_rows,)
        The weight the architecture's own combine rule multiplies the expert output by.
    num_experts : int

    Returns
    -------
    ndarray of float64, shape (E,)
        :math:`m_e = \sum_{t: e \in A(t)} w_e(t)`; 0 for experts never routed.

    References
    ----------
    .. [1] REAP's ``weighted_expert_frequency_sum`` (CerebrasResearch/reap, ``src/reap/observer.py``),
       which sums REAP's gate; here the sum is of the combine weight.
    """
    e = as_expert_index(expert)
    return group_sum(e, as_values(combine_weight, e.shape[0], "combine_weight"), num_experts)


def mean_gate_active(expert: ArrayLike, raw_gate: ArrayLike, *, num_experts: int) -> NDArray[np.float64]:
    r"""Mean raw gate of each expert over the tokens where it is active.

    Parameters
    ----------
    expert : array_like of int, shape (n_rows,)
    raw_gate : array_like of float, shape (n_rows,)
        Router probability :math:`p_e(x_t)` of the selected expert: the family's score
        (:meth:`moeaudit.models.MoELayer.router_probs`; softmax over all routed experts, or a sigmoid score).
    num_experts : int

    Returns
    -------
    ndarray of float64, shape (E,)
        :math:`\bar g_e = \frac{1}{c_e} \sum_{t: e \in A(t)} p_e(x_t)`; NaN for experts never routed.

    Notes
    -----
    "Active" is the token's own top-k set :math:`A(t)` (a per-token mask). The engmann2026 OLMoE script
    instead thresholded the probability globally; that is not this metric (github.com/callmeloui/observational_metrics, the
    scripts of arXiv 2606.10703).

    References
    ----------
    .. [1] Engmann, Medeiros Adriano, Giese, arXiv 2606.10703 ("mean routing weight when active").
    """
    e = as_expert_index(expert)
    return group_mean(e, as_values(raw_gate, e.shape[0], "raw_gate"), num_experts)
