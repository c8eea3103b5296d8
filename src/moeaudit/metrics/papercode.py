r"""The two metrics of arXiv 2606.10703 whose released OLMoE script differs from the paper's wording.

The authors' OLMoE script (github.com/callmeloui/observational_metrics, ``per_token_ablation_olmoe.py``,
``ExpertMetricsComputer.compute_metrics``) hooks the router module's output, which for OLMoE is the
router *logits* :math:`z_e(x_t)` (a variable named ``routing_weights`` holds them), and computes, per
expert, over every row of the stacked logit matrix:

``utilization_rate``
    ``expert_routing.mean()``: the mean logit over all tokens, not the share of tokens routed to the
    expert. moeaudit's name: ``paper_code_utilization``.
``mean_routing_weight_when_active``
    a mask OR-ed over tokens: for every token :math:`t'` with top-k threshold :math:`\tau(t')` (its k-th
    largest logit), ``active_mask |= expert_routing >= tau(t')``, then the mean logit over the mask.
    moeaudit's name: ``paper_code_mean_weight_active``.

The script's ``activation_norm`` and ``activation_std`` are the mean and the std (``torch.std``,
ddof = 1) of the expert's un-gated output norms over the tokens routed to it: moeaudit's ``ean_mean``
and ``act_std``, so they need no second definition. The DeepSeek-V2-Lite script defines utilisation as
the share of tokens routed and the weight when active as the mean top-k weight: moeaudit's
``frequency`` and ``mean_gate_active``. Every one of those scripts pooled padding positions; moeaudit
never pads, so these metrics are computed over real tokens only (see :mod:`moeaudit.presets`).

Both functions read the full router-logit matrix of a layer (``router_logits.parquet``, recorded when
``observe.router_logits_layers`` chooses the layer), one row per token in ascending (seq, pos) order.
"""

from __future__ import annotations

import warnings

import numpy as np
from numpy.typing import ArrayLike, NDArray

from moeaudit.errors import invalid

__all__ = ["global_topk_threshold", "paper_code_mean_weight_active", "paper_code_utilization"]


def _check_logits(router_logits: ArrayLike) -> NDArray[np.float64]:
    z = np.asarray(router_logits, dtype=np.float64)
    if z.ndim != 2 or z.shape[1] < 1:
        raise invalid("router_logits", "a 2-D array [n_tokens, num_experts]", f"shape {z.shape}")
    if not np.isfinite(z).all():
        raise invalid("router_logits", "finite values", f"{int((~np.isfinite(z)).sum())} non-finite entries")
    return z


def paper_code_utilization(router_logits: ArrayLike) -> NDArray[np.float64]:
    r"""Mean router logit of each expert over all tokens: the OLMoE script's "utilization".

    Parameters
    ----------
    router_logits : array_like of float, shape (T, E)
        Router logits :math:`z_e(x_t)` of every token of one MoE layer (the router's output before the
        softmax).

    Returns
    -------
    ndarray of float64, shape (E,)
        :math:`u_e = \frac{1}{T} \sum_t z_e(x_t)`; all NaN (with a RuntimeWarning) when T = 0.

    Notes
    -----
    This is not a share of tokens and does not sum to top-k. Within a layer it ranks experts as the mean
    log-probability :math:`\frac{1}{T}\sum_t \log p_e(x_t)` does, because :math:`\log p_e(x_t) = z_e(x_t)
    - \log\sum_j e^{z_j(x_t)}` subtracts the same per-token constant from every expert; the numbers
    differ by the mean log-sum-exp. Over tokens that pool padding (as the script did) it is not this
    value; see :mod:`moeaudit.metrics.papercode`.

    References
    ----------
    .. [1] Engmann, Medeiros Adriano, Giese, arXiv 2606.10703; the released OLMoE script,
       ``utilization_rate = expert_routing.mean()``.
    """
    z = _check_logits(router_logits)
    if z.shape[0] == 0:
        warnings.warn("paper_code_utilization: no tokens; the values are NaN.", RuntimeWarning, stacklevel=2)
        return np.full(z.shape[1], np.nan)
    return z.mean(axis=0)


def global_topk_threshold(router_logits: ArrayLike, top_k: int) -> float:
    r"""The smallest top-k threshold of the tokens: :math:`\tau_{\min} = \min_t \tau(t)`.

    Parameters
    ----------
    router_logits : array_like of float, shape (T, E), T ≥ 1
    top_k : int
        k, 1 ≤ k ≤ E.

    Returns
    -------
    float
        :math:`\tau(t)` is token t's k-th largest logit (``np.sort(z_t)[-k]``); the minimum over t.

    Notes
    -----
    OR-ing ``z_e(t) >= tau(t')`` over every token :math:`t'` marks :math:`z_e(t) \ge \tau_{\min}`: the
    comparison against the smallest threshold is the only one that can add tokens.
    """
    z = _check_logits(router_logits)
    if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or not 1 <= top_k <= z.shape[1]:
        raise invalid("top_k", f"an int in [1, {z.shape[1]}]", top_k)
    if z.shape[0] == 0:
        raise invalid("router_logits", "at least one token", "0 rows")
    return float(np.sort(z, axis=1)[:, -int(top_k)].min())


def paper_code_mean_weight_active(router_logits: ArrayLike, top_k: int) -> NDArray[np.float64]:
    r"""Mean router logit over a batch-global "active" mask: the OLMoE script's "mean routing weight when
    active".

    Parameters
    ----------
    router_logits : array_like of float, shape (T, E)
        Router logits of every token of one MoE layer.
    top_k : int
        The layer's k (8 for OLMoE-1B-7B).

    Returns
    -------
    ndarray of float64, shape (E,)
        :math:`w_e = \operatorname{mean}\{z_e(x_t) : z_e(x_t) \ge \tau_{\min}\}` with :math:`\tau_{\min}`
        from :func:`global_topk_threshold`; NaN for an expert no token reaches the threshold with (the
        script wrote 0.0 there; such an expert is in no token's top-k, so it is never ranked). All NaN,
        with a RuntimeWarning, when T = 0.

    Notes
    -----
    Not moeaudit's ``mean_gate_active``: the mask is not the token's own top-k (an expert counts as
    active at every token where its logit reaches the lowest threshold of the whole batch, so usually at
    many more tokens than it is routed), and the averaged value is a logit, not a probability.

    References
    ----------
    .. [1] Engmann, Medeiros Adriano, Giese, arXiv 2606.10703; the released OLMoE script,
       ``active_mask |= (expert_routing >= top_k_threshold)`` over all tokens.
    """
    z = _check_logits(router_logits)
    if z.shape[0] == 0:
        warnings.warn("paper_code_mean_weight_active: no tokens; the values are NaN.", RuntimeWarning,
                      stacklevel=2)
        return np.full(z.shape[1], np.nan)
    mask = z >= global_topk_threshold(z, top_k)
    count = mask.sum(axis=0)
    total = np.where(mask, z, 0.0).sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / np.maximum(count, 1), np.nan)
