"""Observe: one clean forward pass per batch of windows, streamed to ``tokens`` and ``routing`` tables.

The forward passes and routing capture are in :mod:`moeaudit.observe.forward`, the stage on a run
directory in :mod:`moeaudit.observe.stage`; the tables' columns in :mod:`moeaudit.tables`.

Examples
--------
>>> from moeaudit.observe import observe  # doctest: +SKIP
>>> stats = observe(moe, windows, tokens_path="tokens.parquet", routing_path="routing.parquet")  # doctest: +SKIP
"""

from moeaudit.observe.forward import (
    BatchTables,
    ObserveStats,
    WindowInput,
    as_windows,
    observe,
    observe_batches,
    read_router_logits,
    read_router_probs,
)
from moeaudit.tables import ROUTING_SCHEMA, TOKENS_SCHEMA, router_logits_schema, router_probs_schema

__all__ = [
    "BatchTables", "ObserveStats", "ROUTING_SCHEMA", "TOKENS_SCHEMA", "WindowInput", "as_windows", "observe",
    "observe_batches", "read_router_logits", "read_router_probs", "router_logits_schema", "router_probs_schema",
]
