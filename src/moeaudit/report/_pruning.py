"""The report's view of ``pruning.parquet``: the computation lives in :mod:`moeaudit.prune.summary` (shared with
the terminal summary of ``moeaudit prune``); this module re-exports it under the names the report uses."""

from __future__ import annotations

from moeaudit.options import RANDOM
from moeaudit.prune.summary import (
    ALL_LAYERS,
    BAND,
    SINGLE_LAYER,
    baseline,
    criteria_order,
    jaccard_matrices,
    per_layer,
    selection_of,
    summary,
    value_column,
    whole_model,
)

__all__ = ["ALL_LAYERS", "BAND", "RANDOM", "SINGLE_LAYER", "baseline", "criteria_order", "jaccard_matrices",
           "per_layer", "selection_of", "summary", "value_column", "whole_model"]
