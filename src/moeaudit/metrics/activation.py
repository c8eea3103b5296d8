"""Activation metrics: statistics of each expert's ungated output norm over the tokens it serves.

``act_norm`` is :math:`\\lVert f_e(x_t) \\rVert_2`, the L2 norm of the expert's output *before* the gate
multiplies it; ``act_max_abs`` is :math:`\\max_i |f_e(x_t)_i|`. Every function returns one value per
routed expert; "mean over active tokens" statistics are NaN for experts never routed.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike, NDArray

from moeaudit.metrics._common import as_expert_index, as_values, group_count, group_mean, group_sum

__all__ = ["act_std", "ean_mean", "ean_sum", "max_act", "msan"]


def ean_sum(expert: ArrayLike, act_norm: ArrayLike, *, num_experts: int) -> NDArray[np.float64]:
    r"""Expert activation norm, summed over active tokens (EAN).

    Parameters
    ----------
    expert : array_like of int, shape (n_rows,)
    act_norm : array_like of float, shape (n_rows,)
        :math:`\lVert f_e(x_t) \rVert_2` of the row's expert at the row's token.
    num_experts : int

    Returns
    -------
    ndarray of float64, shape (E,)
        :math:`\mathrm{EAN}_e = \sum_{t: e \in A(t)} \lVert f_e(x_t) \rVert_2`; 0 for experts never routed.

    References
    ----------
    .. [1] Lasby et al., "REAP the Experts", arXiv 2510.13999 (EAN baseline); ``ean_sum`` in
       CerebrasResearch/reap, ``src/reap/observer.py``.
    """
    e = as_expert_index(expert)
    return group_sum(e, as_values(act_norm, e.shape[0], "act_norm"), num_experts)


def ean_mean(expert: ArrayLike, act_norm: ArrayLike, *, num_experts: int) -> NDArray[np.float64]:
    r"""Mean activation norm over active tokens (MAN).

    Returns
    -------
    ndarray of float64, shape (E,)
        :math:`\mathrm{MAN}_e = \frac{1}{c_e}\sum_{t: e \in A(t)} \lVert f_e(x_t) \rVert_2`; NaN for
        experts never routed.

    References
    ----------
    .. [1] Liu et al., "How to Score Experts for One-Shot MoE Expert Pruning", arXiv 2606.15716 (MAN);
       ``ean_mean`` in CerebrasResearch/reap, ``src/reap/observer.py``; the "activation norm" metric of
       Engmann et al., arXiv 2606.10703.
    """
    e = as_expert_index(expert)
    return group_mean(e, as_values(act_norm, e.shape[0], "act_norm"), num_experts)


def msan(expert: ArrayLike, act_norm: ArrayLike, *, num_experts: int) -> NDArray[np.float64]:
    r"""Mean squared activation norm over active tokens (MSAN).

    Returns
    -------
    ndarray of float64, shape (E,)
        :math:`\mathrm{MSAN}_e = \frac{1}{c_e}\sum_{t: e \in A(t)} \lVert f_e(x_t) \rVert_2^2`; NaN for
        experts never routed.

    References
    ----------
    .. [1] Liu et al., "How to Score Experts for One-Shot MoE Expert Pruning", arXiv 2606.15716 (MSAN).
    """
    e = as_expert_index(expert)
    a = as_values(act_norm, e.shape[0], "act_norm")
    return group_mean(e, a * a, num_experts)


def act_std(expert: ArrayLike, act_norm: ArrayLike, *, num_experts: int) -> NDArray[np.float64]:
    r"""Sample standard deviation of the per-token activation norms of each expert.

    Returns
    -------
    ndarray of float64, shape (E,)
        :math:`s_e = \sqrt{\frac{1}{c_e - 1}\sum_{t: e \in A(t)} (\lVert f_e(x_t) \rVert_2 - \mathrm{MAN}_e)^2}`
        (ddof = 1); NaN when the expert is active on fewer than 2 tokens.

    Notes
    -----
    Computed in two passes (mean, then squared deviations) for numerical stability. The engmann2026
    Qwen script took the std over output *values*; this is the std over per-token *norms*
    (github.com/callmeloui/observational_metrics, the scripts of arXiv 2606.10703).

    References
    ----------
    .. [1] Engmann, Medeiros Adriano, Giese, arXiv 2606.10703 ("activation std").
    """
    e = as_expert_index(expert)
    a = as_values(act_norm, e.shape[0], "act_norm")
    c = group_count(e, num_experts)
    mean = group_mean(e, a, num_experts)
    dev = a - np.nan_to_num(mean)[e]
    ss = group_sum(e, dev * dev, num_experts)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(c >= 2, np.sqrt(ss / np.maximum(c - 1, 1)), np.nan)


def max_act(expert: ArrayLike, act_max_abs: ArrayLike, *, num_experts: int) -> NDArray[np.float64]:
    r"""Largest absolute output coordinate of each expert over active tokens ("super experts").

    Parameters
    ----------
    expert : array_like of int, shape (n_rows,)
    act_max_abs : array_like of float, shape (n_rows,)
        :math:`\max_i |f_e(x_t)_i|` of the row's expert at the row's token.
    num_experts : int

    Returns
    -------
    ndarray of float64, shape (E,)
        :math:`\max_{t: e \in A(t)} \max_i |f_e(x_t)_i|`; NaN for experts never routed.

    Notes
    -----
    REAP's ``max_activations`` takes the signed maximum of the output; this uses the absolute value, so
    large negative outliers count too.

    References
    ----------
    .. [1] Su et al., "Unveiling Super Experts in Mixture-of-Experts Large Language Models",
       arXiv 2507.23279; ``max_activations`` in CerebrasResearch/reap, ``src/reap/observer.py``.
    """
    e = as_expert_index(expert)
    v = as_values(act_max_abs, e.shape[0], "act_max_abs")
    out = np.full(num_experts, -np.inf)
    np.maximum.at(out, e, v)
    out[group_count(e, num_experts) == 0] = np.nan
    return out
