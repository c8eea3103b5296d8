"""Observational expert metrics: the ``expert_metrics`` table, one row per (layer, expert).

Pure functions of the ``routing`` table (and, for a few metrics, full router probabilities or expert
weights). Each metric is a small function in a module named for what it measures, and a registry
(:func:`register_metric`) runs built-in and user metrics alike.

=====================  ============================================================  ==============
column                 definition (per layer ℓ, expert e, active set A(t))             module
=====================  ============================================================  ==============
frequency              count / T (T = distinct tokens at ℓ)                           routing
count                  number of tokens with e ∈ A(t)                                 routing
gate_mass              Σ combine weight over active tokens                            routing
mean_gate_active       mean raw gate over active tokens (per-token mask)              routing
ean_sum                Σ ‖f_e(x)‖ over active tokens                                   activation
ean_mean               mean ‖f_e(x)‖ (MAN)                                             activation
msan                   mean ‖f_e(x)‖²                                                  activation
act_std                std of ‖f_e(x)‖ over active tokens, ddof = 1                   activation
reap                   mean gate × ‖f_e(x)‖ over active tokens                         reap
routing_entropy        normalised entropy of e's probability column over tokens       distribution
routing_gini           Gini of e's probability column over tokens                     distribution
max_act                max over active tokens of max_i |f_e(x)_i|                     activation
aimer                  mean |W| / RMS(W) over e's weights (weight-only)               weights
router_row_norm        ‖router row e‖₂ (weight-only)                                   weights
paper_code_            mean router logit over all tokens (arXiv 2606.10703's OLMoE    papercode
utilization            script's "utilization"; needs router logits)
paper_code_mean_       mean router logit where it reaches the batch's smallest top-k  papercode
weight_active          threshold (the same script's "mean weight when active")
=====================  ============================================================  ==============
"""

from __future__ import annotations

from moeaudit.metrics.activation import act_std, ean_mean, ean_sum, max_act, msan
from moeaudit.metrics.compute import REQUIRED_COLUMNS, compute_expert_metrics, compute_expert_metrics_by_domain
from moeaudit.metrics.distribution import routing_entropy, routing_gini
from moeaudit.metrics.papercode import paper_code_mean_weight_active, paper_code_utilization
from moeaudit.metrics.reap import REAP_GATES, ReapGate, reap
from moeaudit.metrics.registry import (
    LayerData,
    MetricSpec,
    MissingInputError,
    get_metric,
    list_metrics,
    register_metric,
    unregister_metric,
)
from moeaudit.metrics.routing import count, frequency, gate_mass, mean_gate_active
from moeaudit.metrics.weights import LayerWeights, aimer, router_row_norm

__all__ = [
    "REAP_GATES",
    "REQUIRED_COLUMNS",
    "LayerData",
    "LayerWeights",
    "MetricSpec",
    "MissingInputError",
    "ReapGate",
    "act_std",
    "aimer",
    "compute_expert_metrics",
    "compute_expert_metrics_by_domain",
    "count",
    "ean_mean",
    "ean_sum",
    "frequency",
    "gate_mass",
    "get_metric",
    "list_metrics",
    "max_act",
    "mean_gate_active",
    "msan",
    "paper_code_mean_weight_active",
    "paper_code_utilization",
    "reap",
    "register_metric",
    "routing_entropy",
    "routing_gini",
    "router_row_norm",
    "unregister_metric",
]
