"""The tables a run writes: each one's columns, declared once, and the one definition of single-expert rows.

Every stage that writes a table and every reader that filters one takes its columns from here, so a
column is added in one place. Torch-free (pyarrow and pandas only): the audit and the report import it.

Tables (one Parquet file each in a run directory):

``windows``
    One row per observed window, with the document it was cut from: :data:`WINDOWS_SCHEMA`.
``tokens``
    One row per real (non-padding) position: :data:`TOKENS_SCHEMA`.
``routing``
    One row per (layer, seq, pos, slot) of a selected expert: :data:`ROUTING_SCHEMA`.
``router_probs``
    Full router probabilities of chosen layers: :func:`router_probs_schema`.
``router_logits``
    Full router logits of chosen layers (``observe.router_logits_layers``): :func:`router_logits_schema`.
``effects``
    One row per intervention at a token: :data:`EFFECT_COLUMNS`.
``pruning``
    One row per pruned configuration: :data:`PRUNING_COLUMNS`.
``prune_evals``
    The prune stage's per-unit evaluations: :data:`EVALS_SCHEMA`.
``jaccard``, ``downstream``
    :data:`JACCARD_COLUMNS`, :data:`DOWNSTREAM_COLUMNS` (and :data:`DOWNSTREAM_COMPARISON_COLUMNS` for a
    pruned checkpoint against its baseline).
``calibration``
    One row per (metric, layer): how stable the metric's expert ranking is under resampled calibration
    data: :data:`CALIBRATION_SCHEMA`.
``interactions``, ``shapley``, ``interaction_sets``
    Joint removals inside a token's active set (:mod:`moeaudit.interactions`): one row per pair of active
    experts, per active expert, and per (removal set, token): :data:`INTERACTION_COLUMNS`,
    :data:`SHAPLEY_COLUMNS`, :data:`INTERACTION_SET_COLUMNS`.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

import pandas as pd
import pyarrow as pa

__all__ = [
    "CALIBRATION_SCHEMA",
    "DOWNSTREAM_COLUMNS",
    "DOWNSTREAM_COMPARISON_COLUMNS",
    "EFFECT_COLUMNS",
    "EVALS_SCHEMA",
    "EVALS_SCHEMA_FIELDS",
    "INTERACTION_COLUMNS",
    "INTERACTION_DTYPES",
    "INTERACTION_SET_COLUMNS",
    "JACCARD_COLUMNS",
    "PRUNING_COLUMNS",
    "ROUTING_SCHEMA",
    "SHAPLEY_COLUMNS",
    "TOKENS_SCHEMA",
    "WINDOWS_SCHEMA",
    "empty_frame",
    "html_summary",
    "router_logits_schema",
    "router_probs_schema",
    "single_expert_rows",
    "single_expert_sql",
]

#: ``windows``: ``start`` is the offset of the window's first token in its document; tokens of one document
#: are correlated, so the audit's tests use ``doc_id`` as their unit of replication (its ``cluster``).
WINDOWS_SCHEMA = pa.schema([
    ("seq", pa.int32()), ("doc_id", pa.string()), ("domain", pa.string()), ("split", pa.string()),
    ("start", pa.int32()), ("n_tokens", pa.int32()),
])

#: ``tokens``: ``nll`` is the NLL of the next token (null at a window's last position).
TOKENS_SCHEMA = pa.schema([
    ("seq", pa.int32()), ("pos", pa.int32()), ("token_id", pa.int32()), ("nll", pa.float32()),
    ("domain", pa.string()), ("split", pa.string()),
])

#: ``routing``: ``raw_gate`` is the router probability of the selected expert (the paper's gate weight,
#: arXiv 2606.10703 Sec. 3.1), ``combine_weight`` what the architecture multiplies the expert output by,
#: ``renorm_gate`` the raw gate over the token's selected raw gates; ``slot`` 0 is the largest raw gate.
ROUTING_SCHEMA = pa.schema([
    ("layer", pa.int16()), ("seq", pa.int32()), ("pos", pa.int32()), ("slot", pa.int8()), ("expert", pa.int16()),
    ("raw_gate", pa.float32()), ("combine_weight", pa.float32()), ("renorm_gate", pa.float32()),
    ("act_norm", pa.float32()), ("act_max_abs", pa.float32()),
])


def router_probs_schema(num_experts: int) -> pa.Schema:
    """Schema of ``router_probs``: ``layer``, ``seq``, ``pos`` and ``probs``, a float16 list of length E.

    Parameters
    ----------
    num_experts : int
        E, the number of routed experts of the recorded layers (one count for the whole table).

    Returns
    -------
    pyarrow.Schema
    """
    return _token_matrix_schema("probs", pa.float16(), num_experts)


def router_logits_schema(num_experts: int) -> pa.Schema:
    """Schema of ``router_logits``: ``layer``, ``seq``, ``pos`` and ``logits``, a float32 list of length E.

    Parameters
    ----------
    num_experts : int
        E, the number of routed experts of the recorded layers (one count for the whole table).

    Returns
    -------
    pyarrow.Schema
    """
    return _token_matrix_schema("logits", pa.float32(), num_experts)


def _token_matrix_schema(column: str, value_type: pa.DataType, num_experts: int) -> pa.Schema:
    return pa.schema([("layer", pa.int16()), ("seq", pa.int32()), ("pos", pa.int32()),
                      (column, pa.list_(value_type, num_experts))])


#: Columns of the ``effects`` table, in order. ``delta_nll`` is the causal effect of the intervention
#: (arXiv 2606.10703 Sec. 3.2); ``estimate`` marks gradient estimates, ``shared`` shared-expert rows and
#: ``j`` the number of experts removed together (progressive rows have ``selection == "progressive"``).
EFFECT_COLUMNS: tuple[str, ...] = (
    "layer", "seq", "pos", "expert", "kind", "scope",
    "delta_nll", "kl", "top1_flip", "raw_gate", "gate_rank",
    "delta_nll_later_sum", "gap_norm", "compensation_cos", "estimate",
    "j", "role", "shared", "combine_weight", "nll_clean", "selection", "engine",
)

#: Columns of the ``pruning`` table, in order.
PRUNING_COLUMNS: tuple[str, ...] = (
    "criterion", "ratio", "seed", "mode", "layer", "kept", "dropped", "n_dropped", "num_experts",
    "heldout_nll", "heldout_ppl", "mean_kl", "delta_nll", "unpruned_nll", "unpruned_ppl", "n_tokens",
    "random_percentile", "random_median_nll", "criterion_kind", "direction", "guard", "budget", "selection",
)

#: The prune stage's evaluation rows (one per pruned configuration and domain), as (name, pyarrow type).
EVALS_SCHEMA_FIELDS: tuple[tuple[str, str], ...] = (
    ("config", "int32"), ("domain", "string"), ("n_tokens", "int64"), ("heldout_nll", "float64"),
    ("heldout_ppl", "float64"), ("mean_kl", "float64"),
)
EVALS_SCHEMA = pa.schema([(name, getattr(pa, kind)()) for name, kind in EVALS_SCHEMA_FIELDS])

#: Columns of :func:`moeaudit.prune.jaccard_table`, in order.
JACCARD_COLUMNS: tuple[str, ...] = ("criterion_a", "criterion_b", "ratio", "layer", "jaccard", "n_pairs",
                                    "expected_random", "n_dropped", "num_experts")

#: ``calibration`` (:func:`moeaudit.calibration.calibration_sensitivity`), one row per (metric, layer). A *unit*
#: is what is resampled (``unit``: a calibration document, or a window); Kendall's τ is tau-b between the
#: expert ranking on the resampled or reduced calibration data and on the whole calibration split.
#:
#: ``n_units``, ``n_tokens``
#:     Calibration units and tokens of the whole split.
#: ``n_resamples``, ``tau_mean``, ``tau_p05``, ``tau_median``
#:     Bootstrap resamples with a defined τ, and the mean, 5th percentile and median of τ over them.
#: ``flip_ratio``, ``n_pruned``, ``flip_share``, ``flip_share_p95``
#:     The share of experts pruned (``n_pruned = round(flip_ratio * E)``, the lowest-ranked, as the prune
#:     stage does) and the share of the layer's experts whose prune/keep decision differs from the full
#:     split's: mean and 95th percentile over resamples.
#: ``curve_units``, ``curve_tokens``, ``curve_tau``
#:     The learning curve: nested random subsets of ``curve_units`` units (mean ``curve_tokens`` tokens)
#:     and the mean τ at each size.
#: ``tau_target``, ``units_to_target``, ``tokens_to_target``
#:     The smallest curve size whose mean τ reaches ``tau_target``; NaN when no size does.
#: ``n_domains``, ``domain_tau_mean``, ``domain_tau_min``, ``domain_pair_min``
#:     τ between the rankings computed on each calibration domain alone, over domain pairs (mean, min, and
#:     the pair with the minimum as ``"a | b"``).
#: ``seed``
#:     Seed of the resampling.
CALIBRATION_SCHEMA = pa.schema([
    ("metric", pa.string()), ("layer", pa.int32()), ("num_experts", pa.int32()), ("unit", pa.string()),
    ("n_units", pa.int32()), ("n_tokens", pa.int64()),
    ("n_resamples", pa.int32()), ("tau_mean", pa.float64()), ("tau_p05", pa.float64()),
    ("tau_median", pa.float64()),
    ("flip_ratio", pa.float64()), ("n_pruned", pa.int32()), ("flip_share", pa.float64()),
    ("flip_share_p95", pa.float64()),
    ("curve_units", pa.list_(pa.int32())), ("curve_tokens", pa.list_(pa.float64())),
    ("curve_tau", pa.list_(pa.float64())),
    ("tau_target", pa.float64()), ("units_to_target", pa.float64()), ("tokens_to_target", pa.float64()),
    ("n_domains", pa.int32()), ("domain_tau_mean", pa.float64()), ("domain_tau_min", pa.float64()),
    ("domain_pair_min", pa.string()),
    ("seed", pa.int64()),
])

#: Columns of the ``interactions`` table: one row per pair of a target token's active experts (token scope,
#: layer ℓ only). ``gate_rank_a < gate_rank_b`` (0 = largest raw gate); ``delta_nll_a``/``_b`` remove one of
#: them, ``delta_nll_joint`` both, ``interaction = delta_nll_joint - delta_nll_a - delta_nll_b`` (nats;
#: > 0: removing both costs more than the two removals apart, e.g. each expert compensates for the other;
#: :mod:`moeaudit.interactions.games`); ``kl_joint`` and ``top1_flip_joint`` are the joint removal's.
INTERACTION_COLUMNS: tuple[str, ...] = (
    "layer", "seq", "pos", "kind", "expert_a", "expert_b", "gate_rank_a", "gate_rank_b",
    "delta_nll_a", "delta_nll_b", "delta_nll_joint", "interaction", "kl_joint", "top1_flip_joint",
)

#: Columns of the ``shapley`` table: one row per active expert of a target token. ``shapley`` (nats) is the
#: expert's Shapley value in the game v(S) = ΔNLL of removing S ⊆ A_ℓ(t); per token the values sum to
#: ``delta_nll_all`` (every active expert removed). ``delta_nll_single`` is v({e}) (the census's effect);
#: ``estimate`` marks permutation estimates (k > the exact limit) with their standard error ``shapley_se``
#: (NaN for exact values); ``n_players`` is k.
SHAPLEY_COLUMNS: tuple[str, ...] = (
    "layer", "seq", "pos", "kind", "expert", "gate_rank", "raw_gate", "combine_weight", "delta_nll_single",
    "shapley", "shapley_se", "delta_nll_all", "n_players", "estimate",
)

#: Columns of the ``interaction_sets`` table: one row per (removal set, target token). A removal set is a
#: pruning configuration's dropped experts at the layer (``criterion``, ``ratio``, ``seed``: null but for
#: ``random``); ``n_removed`` of them are active at the token and removed together (``delta_nll_joint``;
#: 0 when none is), ``delta_nll_sum`` is the sum of their single removals.
INTERACTION_SET_COLUMNS: tuple[str, ...] = (
    "criterion", "ratio", "seed", "layer", "seq", "pos", "kind", "n_removed", "delta_nll_joint", "delta_nll_sum",
)

#: pandas dtypes of the columns of :data:`INTERACTION_COLUMNS`, :data:`SHAPLEY_COLUMNS` and
#: :data:`INTERACTION_SET_COLUMNS` (one name, one type across the three): what an empty table of them holds, so
#: that a work unit without target tokens merges with the others (:func:`empty_frame`).
INTERACTION_DTYPES: dict[str, str] = {
    "layer": "int64", "seq": "int64", "pos": "int64", "kind": "str", "expert_a": "int64", "expert_b": "int64",
    "gate_rank_a": "int64", "gate_rank_b": "int64", "delta_nll_a": "float64", "delta_nll_b": "float64",
    "delta_nll_joint": "float64", "interaction": "float64", "kl_joint": "float64", "top1_flip_joint": "bool",
    "expert": "int64", "gate_rank": "int64", "raw_gate": "float64", "combine_weight": "float64",
    "delta_nll_single": "float64", "shapley": "float64", "shapley_se": "float64", "delta_nll_all": "float64",
    "n_players": "int64", "estimate": "bool", "criterion": "str", "ratio": "float64", "seed": "Int64",
    "n_removed": "int64", "delta_nll_sum": "float64",
}


def empty_frame(columns: Collection[str], dtypes: dict[str, str] = INTERACTION_DTYPES) -> pd.DataFrame:
    """A table of ``columns`` without rows, each column of its type in ``dtypes``."""
    return pd.DataFrame({name: pd.Series(dtype=dtypes[name]) for name in columns})


#: Columns of :attr:`moeaudit.prune.DownstreamResult.table`, in order.
DOWNSTREAM_COLUMNS: tuple[str, ...] = ("task", "metric", "filter", "value", "stderr", "n")

#: Columns of :func:`moeaudit.prune.downstream.compare_downstream`: one row per (task, metric, filter) with
#: the baseline's and the pruned checkpoint's value and stderr, and ``difference`` = pruned - baseline.
DOWNSTREAM_COMPARISON_COLUMNS: tuple[str, ...] = (
    "task", "metric", "filter", "baseline", "baseline_stderr", "pruned", "pruned_stderr", "difference", "n",
)


def single_expert_rows(effects: pd.DataFrame) -> pd.DataFrame:
    """Exact removals of one routed expert: no gradient estimates, shared-expert or progressive (j > 1) rows.

    The rows the audit tests and the oracle criterion scores (arXiv 2606.10703 Sec. 3.2 removes one expert
    at a time). :func:`single_expert_sql` is the same filter for DuckDB.

    Parameters
    ----------
    effects : DataFrame
        An ``effects`` table. Tables that lack some of ``estimate``, ``shared``, ``j``, ``selection``
        (e.g. written by other tools) are accepted: a missing column filters nothing.

    Returns
    -------
    DataFrame
        The kept rows of ``effects`` (same index and columns).
    """
    keep = pd.Series(True, index=effects.index)
    if "estimate" in effects:
        keep &= ~effects["estimate"].astype(bool)
    if "shared" in effects:
        keep &= ~effects["shared"].astype(bool)
    if "j" in effects:
        keep &= effects["j"] == 1
    if "selection" in effects:
        keep &= effects["selection"] != "progressive"
    return effects[keep]


def single_expert_sql(columns: Collection[str], *, kind: str | None = None,
                      scope: str | None = None) -> tuple[str, list[Any]]:
    """SQL ``WHERE`` clause (DuckDB) for exact single-expert removals, as :func:`single_expert_rows`.

    Parameters
    ----------
    columns : collection of str
        The columns the ``effects`` table has; a filter on an absent column is left out.
    kind, scope : str, optional
        Also keep only this intervention kind / scope (where the table has the column).

    Returns
    -------
    where : str
        The conditions joined by ``AND`` (``"TRUE"`` when there are none), with ``?`` placeholders.
    params : list
        The placeholders' values, in order.

    Notes
    -----
    Null flags count as false and a null ``j`` as 1, so rows of tables written without those values
    are kept.
    """
    where, params = ["TRUE"], []
    for column, value in (("kind", kind), ("scope", scope)):
        if column in columns and value is not None:
            where.append(f"{column} = ?")
            params.append(value)
    if "estimate" in columns:
        where.append("NOT coalesce(estimate, FALSE)")
    if "shared" in columns:
        where.append("NOT coalesce(shared, FALSE)")
    if "j" in columns:
        where.append("coalesce(j, 1) = 1")
    if "selection" in columns:
        where.append("coalesce(selection, '') <> 'progressive'")
    return " AND ".join(where), params


def html_summary(title: str, frame: pd.DataFrame | None = None, notes: Collection[str] = (), *,
                 max_rows: int = 30) -> str:
    """A result object's ``_repr_html_`` (Jupyter): a title, notes and a summary table (escaped by pandas).

    Parameters
    ----------
    title : str
    frame : DataFrame, optional
        The summary to show; longer frames show their first ``max_rows`` rows and say how many there are.
    notes : collection of str
        Short lines under the title (counters, the engine, ...).
    """
    from html import escape

    parts = [f"<p><strong>{escape(title)}</strong></p>"]
    parts += [f"<p>{escape(note)}</p>" for note in notes if note]
    if frame is not None:
        shown = frame.head(max_rows)
        parts.append(shown.to_html(index=False, float_format=lambda v: f"{v:.4g}", na_rep="–", border=0))
        if len(frame) > max_rows:
            parts.append(f"<p>{max_rows} of {len(frame):,} rows shown</p>")
    return "<div>" + "".join(parts) + "</div>"
