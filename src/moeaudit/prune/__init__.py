"""Prune: run the pruning experiment the paper argued about — criteria vs random vs causal oracles.

Every metric of ``expert_metrics`` is a pruning criterion (with a documented direction,
:data:`DIRECTIONS`), next to ``random`` (many seeds: a distribution) and two oracles (the measured ΔNLL
of removing the expert, and NAEE's leave-one-out reconstruction error). Each criterion drops the same
number of experts per layer at each ratio; the pruned model is evaluated on the held-out windows by
masking the dropped experts out of routing (exactly what a smaller checkpoint computes —
:func:`export_pruned` writes one). Interchangeability is measured directly: Jaccard overlap of the dropped
sets and each criterion's percentile in the random distribution, for all layers at once and per layer.

Public: :func:`run_prune` (the stage), :func:`pruning_summary`, :func:`kept_from_table`, :func:`select_kept`,
:func:`export_pruned`, :func:`push_to_hub` (upload an export), :func:`evaluate_pruned`,
:func:`pruning_ablations`, :func:`evaluate_downstream` (lm-evaluation-harness tasks on an exported checkpoint;
``pip install "moeaudit[eval]"``), criteria helpers (:func:`criterion_scores`, :func:`dropped_experts`,
:func:`layer_budgets`, :func:`check_ratio`, :func:`oracle_delta_nll`, :func:`reconstruction_errors`,
:func:`super_experts`) and Jaccard helpers (:func:`jaccard`, :func:`expected_random_jaccard`,
:func:`jaccard_table`). torch (and lm_eval) are imported only by the functions that run the model.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

from moeaudit.options import RANDOM
from moeaudit.prune.criteria import (
    DEFAULT_RATIOS,
    DIRECTIONS,
    ORACLE_DELTA_NLL,
    ORACLE_RECONSTRUCTION,
    check_ratio,
    check_ratios,
    criterion_scores,
    drop_count,
    dropped_experts,
    kept_from_dropped,
    layer_budgets,
    metric_criteria,
    oracle_delta_nll,
    prune_order,
    random_order,
    reconstruction_errors,
    super_experts,
)
from moeaudit.prune.jaccard import expected_random_jaccard, jaccard, jaccard_table, layer_jaccard_summary

_LAZY = {
    "run_prune": "moeaudit.prune.stage",
    "prune_settings": "moeaudit.prune.stage",
    "select_kept": "moeaudit.prune.stage",
    "pruning_summary": "moeaudit.prune.summary",
    "PruningSummary": "moeaudit.prune.summary",
    "kept_from_table": "moeaudit.prune.summary",
    "PRUNING_COLUMNS": "moeaudit.tables",
    "export_pruned": "moeaudit.prune.export",
    "ExportResult": "moeaudit.prune.export",
    "push_to_hub": "moeaudit.prune.export",
    "evaluate_pruned": "moeaudit.prune.evaluate",
    "pruning_ablations": "moeaudit.prune.evaluate",
    "PrunedEval": "moeaudit.prune.evaluate",
    # lm-evaluation-harness (the optional `eval` extra) is imported only when an evaluation runs.
    "evaluate_downstream": "moeaudit.prune.downstream",
    "DownstreamResult": "moeaudit.prune.downstream",
    "compare_downstream": "moeaudit.prune.downstream",
    "DownstreamComparison": "moeaudit.prune.downstream",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'moeaudit.prune' has no attribute {name!r}")


__all__ = [
    "DEFAULT_RATIOS", "DIRECTIONS", "ORACLE_DELTA_NLL", "ORACLE_RECONSTRUCTION", "RANDOM", "check_ratio",
    "check_ratios", "criterion_scores", "drop_count", "dropped_experts", "expected_random_jaccard", "jaccard",
    "jaccard_table", "kept_from_dropped", "layer_budgets", "layer_jaccard_summary", "metric_criteria",
    "oracle_delta_nll", "prune_order", "random_order", "reconstruction_errors", "super_experts", *_LAZY,
]
