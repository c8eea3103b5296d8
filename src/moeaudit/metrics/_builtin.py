"""Registration of the built-in metrics, in the column order of ``expert_metrics.parquet``.

Modules are imported by name (``routing``, ``activation``, ...) except :func:`reap`, whose module shares
the function's name: ``moeaudit.metrics.reap`` is the function once the package is imported.
"""

from __future__ import annotations

import warnings

import numpy as np
from numpy.typing import NDArray

from moeaudit.metrics import activation, distribution, papercode, routing, weights
from moeaudit.metrics.reap import gate_column, reap
from moeaudit.metrics.registry import LayerData, MissingInputError, register_metric


def _frequency(d: LayerData) -> NDArray[np.float64]:
    return routing.frequency(d.expert, num_experts=d.num_experts, n_tokens=d.n_tokens)


def _count(d: LayerData) -> NDArray[np.int64]:
    return routing.count(d.expert, num_experts=d.num_experts)


def _gate_mass(d: LayerData) -> NDArray[np.float64]:
    return routing.gate_mass(d.expert, d.column("combine_weight"), num_experts=d.num_experts)


def _mean_gate_active(d: LayerData) -> NDArray[np.float64]:
    return routing.mean_gate_active(d.expert, d.column("raw_gate"), num_experts=d.num_experts)


def _ean_sum(d: LayerData) -> NDArray[np.float64]:
    return activation.ean_sum(d.expert, d.column("act_norm"), num_experts=d.num_experts)


def _ean_mean(d: LayerData) -> NDArray[np.float64]:
    return activation.ean_mean(d.expert, d.column("act_norm"), num_experts=d.num_experts)


def _msan(d: LayerData) -> NDArray[np.float64]:
    return activation.msan(d.expert, d.column("act_norm"), num_experts=d.num_experts)


def _act_std(d: LayerData) -> NDArray[np.float64]:
    return activation.act_std(d.expert, d.column("act_norm"), num_experts=d.num_experts)


def _reap(d: LayerData) -> NDArray[np.float64]:
    gate = d.column(gate_column(d.options.get("reap_gate", "combine")))
    return reap(d.expert, gate, d.column("act_norm"), num_experts=d.num_experts)


def _routing_entropy(d: LayerData) -> NDArray[np.float64]:
    return distribution.routing_entropy(d.router_probs)


def _routing_gini(d: LayerData) -> NDArray[np.float64]:
    return distribution.routing_gini(d.router_probs)


def _max_act(d: LayerData) -> NDArray[np.float64]:
    return activation.max_act(d.expert, d.column("act_max_abs"), num_experts=d.num_experts)


def _aimer(d: LayerData) -> NDArray[np.float64]:
    assert d.weights is not None
    if not d.weights.experts:
        raise MissingInputError(f"metric `aimer` needs expert tensors in `weights[{d.layer}]`; got only a router.")
    # NaN for identity experts (LongCat-Flash's zero-computation experts): they hold no weights
    return np.concatenate([weights.aimer(*d.weights.experts), np.full(d.weights.identity, np.nan)])


def _router_row_norm(d: LayerData) -> NDArray[np.float64]:
    assert d.weights is not None
    if d.weights.router is None:
        raise MissingInputError(f"metric `router_row_norm` needs `weights[{d.layer}]['router']`; got none.")
    return weights.router_row_norm(d.weights.router)


def _paper_code_utilization(d: LayerData) -> NDArray[np.float64]:
    assert d.router_logits is not None
    return papercode.paper_code_utilization(d.router_logits)


def _paper_code_mean_weight_active(d: LayerData) -> NDArray[np.float64]:
    assert d.router_logits is not None
    per_token = np.bincount(d.token, minlength=d.n_tokens)
    if d.n_tokens and per_token.min() != per_token.max():
        warnings.warn(f"paper_code_mean_weight_active: layer {d.layer} has tokens with {per_token.min()} to "
                      f"{per_token.max()} routing rows, so no single top-k; the values are NaN.", RuntimeWarning,
                      stacklevel=2)
        return np.full(d.num_experts, np.nan)
    top_k = int(per_token[0]) if d.n_tokens else 1
    return papercode.paper_code_mean_weight_active(d.router_logits, top_k)


#: Built-in metrics that read only weights: computed once per layer, not per token selection.
WEIGHT_ONLY: frozenset[str] = frozenset({"aimer", "router_row_norm"})

register_metric("frequency", _frequency)
register_metric("count", _count)
register_metric("gate_mass", _gate_mass, needs=("combine_weight",))
register_metric("mean_gate_active", _mean_gate_active, needs=("raw_gate",))
register_metric("ean_sum", _ean_sum, needs=("act_norm",))
register_metric("ean_mean", _ean_mean, needs=("act_norm",))
register_metric("msan", _msan, needs=("act_norm",))
register_metric("act_std", _act_std, needs=("act_norm",))
register_metric("reap", _reap, needs=("act_norm",))
register_metric("routing_entropy", _routing_entropy, needs=("router_probs",))
register_metric("routing_gini", _routing_gini, needs=("router_probs",))
register_metric("max_act", _max_act, needs=("act_max_abs",))
register_metric("aimer", _aimer, needs=("weights",))
register_metric("router_row_norm", _router_row_norm, needs=("weights",))
register_metric("paper_code_utilization", _paper_code_utilization, needs=("router_logits",))
register_metric("paper_code_mean_weight_active", _paper_code_mean_weight_active, needs=("router_logits",))
