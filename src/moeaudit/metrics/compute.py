"""Build the ``expert_metrics`` table: one row per (layer, expert), one column per registered metric.

Inputs (the observe stage's data contract):

``routing``
    One row per (layer, seq, pos, slot) for real tokens. Required columns: ``layer``, ``seq``, ``pos``,
    ``expert`` (ints). Value columns read by the built-in metrics: ``raw_gate``, ``combine_weight``,
    ``renorm_gate`` (derived as raw_gate / Σ raw_gate over the token's selected experts when absent),
    ``act_norm``, ``act_max_abs``; a metric whose column is missing gives a NaN column. ``domain``
    (str) is used by :func:`compute_expert_metrics_by_domain`.
``num_experts``
    ``{layer: E}``; every expert 0 .. E-1 of every layer in ``routing`` gets a row, routed or not.
``router_probs``
    ``{layer: array [T_layer, E]}``: full router probabilities, one row per distinct token of that
    layer in ``routing``, **rows in ascending (seq, pos) order**. The rows are aligned by that order,
    so ``seqs=`` and per-domain breakdowns select the matching rows.
``router_logits``
    ``{layer: array [T_layer, E]}``: full router logits, rows aligned as ``router_probs``; read by the
    ``paper_code_*`` metrics (:mod:`moeaudit.metrics.papercode`).
``weights``
    ``{layer: LayerWeights | {"gate_up_proj": ..., "down_proj": ..., "router": ...}}``.

Experts never routed at a layer get frequency 0, count 0, gate_mass 0 and ean_sum 0; the metrics that
are means (or std, or max) over the expert's active tokens (mean_gate_active, ean_mean, msan,
act_std, reap, max_act) are NaN for them, because there is nothing to average. act_std is also NaN
for an expert active on a single token (ddof = 1).
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from numpy.typing import NDArray

from moeaudit.errors import invalid
from moeaudit.metrics import _builtin  # noqa: F401  (registers the built-in metrics)
from moeaudit.metrics._builtin import WEIGHT_ONLY
from moeaudit.metrics.reap import REAP_GATES, ReapGate
from moeaudit.metrics.registry import LayerData, MetricSpec, MissingInputError, get_metric, list_metrics
from moeaudit.metrics.weights import LayerWeights

__all__ = ["REQUIRED_COLUMNS", "compute_expert_metrics", "compute_expert_metrics_by_domain"]

logger = logging.getLogger(__name__)

#: Columns every ``routing`` table must have.
REQUIRED_COLUMNS: tuple[str, ...] = ("layer", "seq", "pos", "expert")


@dataclass(frozen=True, eq=False)
class _LayerInput:
    """One layer's validated inputs over *all* of its tokens (before any token selection)."""

    layer: int
    num_experts: int
    frame: pd.DataFrame  # the layer's routing rows
    row_token: NDArray[np.int64]  # per row: index into the layer's tokens sorted by (seq, pos)
    n_tokens: int
    router_probs: NDArray[np.floating] | None
    weights: LayerWeights | None
    router_logits: NDArray[np.floating] | None = None


# --------------------------------------------------------------------------------------------------
# validation (one private step per public entry point, house message shape)


def check_routing(routing: object) -> pd.DataFrame:
    """The routing table, checked: a non-empty DataFrame with the required integer key columns (one line each)."""
    if not isinstance(routing, pd.DataFrame):
        raise invalid("routing", "a pandas DataFrame", type(routing).__name__)
    missing = [c for c in REQUIRED_COLUMNS if c not in routing.columns]
    if missing:
        raise invalid("routing", f"a table with columns {list(REQUIRED_COLUMNS)} (missing {missing})",
                      sorted(map(str, routing.columns)))
    for c in REQUIRED_COLUMNS:
        col = routing[c]
        if not pd.api.types.is_integer_dtype(col.dtype):
            raise invalid(f"routing['{c}']", "an integer column", str(col.dtype))
        if col.isna().any():
            raise invalid(f"routing['{c}']", "free of missing values", f"{int(col.isna().sum())} missing")
    for c in ("seq", "pos"):
        if len(routing) and int(routing[c].min()) < 0:
            raise invalid(f"routing['{c}']", "non-negative", int(routing[c].min()))
    if len(routing) == 0:
        raise invalid("routing", "a non-empty table", "0 rows")
    return routing


def _check_num_experts(num_experts: object, layers: Sequence[int]) -> dict[int, int]:
    if not isinstance(num_experts, Mapping):
        raise invalid("num_experts", "a mapping {layer: number of routed experts}", type(num_experts).__name__)
    out: dict[int, int] = {}
    for layer in layers:
        if layer not in num_experts:
            raise invalid("num_experts", f"a mapping with an entry for every layer in `routing` {list(layers)}",
                          f"no entry for layer {layer}")
        e = num_experts[layer]
        if isinstance(e, bool) or not isinstance(e, (int, np.integer)) or e < 1:
            raise invalid(f"num_experts[{layer}]", "a positive int", e)
        out[layer] = int(e)
    return out


def _check_reap_gate(reap_gate: object) -> ReapGate:
    if reap_gate not in REAP_GATES:
        raise invalid("reap_gate", f"one of {list(REAP_GATES)}", reap_gate)
    return reap_gate  # type: ignore[return-value]


def _check_metrics(metrics: Iterable[str] | str | None) -> tuple[list[MetricSpec], bool]:
    if metrics is None:
        return [get_metric(n) for n in list_metrics()], False
    if isinstance(metrics, str):
        metrics = [metrics]
    names = list(metrics)
    if not names:
        raise invalid("metrics", f"a non-empty list of registered metric names, from {list_metrics()}", names)
    if len(set(names)) != len(names):
        raise invalid("metrics", "a list without repeated names", names)
    return [get_metric(n) for n in names], True


def _check_seqs(seqs: Iterable[int] | None) -> NDArray[np.int64] | None:
    if seqs is None:
        return None
    arr = np.asarray(list(seqs) if not isinstance(seqs, np.ndarray) else seqs)
    if arr.size == 0 or arr.ndim != 1 or not (np.issubdtype(arr.dtype, np.integer)):
        raise invalid("seqs", "a non-empty 1-D collection of int sequence indices", seqs)
    return arr.astype(np.int64)


def _to_array(x: Any) -> NDArray[np.floating]:
    if hasattr(x, "detach"):  # torch.Tensor without importing torch
        x = x.detach().float().cpu().numpy()
    arr = np.asarray(x)
    if not np.issubdtype(arr.dtype, np.floating):
        arr = arr.astype(np.float64)
    return arr


def _layer_weights(layer: int, w: object, n_experts: int) -> LayerWeights:
    if isinstance(w, LayerWeights):
        lw = w
    elif isinstance(w, Mapping):
        lw = LayerWeights.from_mapping(w)
    else:
        raise invalid(f"weights[{layer}]", "a LayerWeights or a mapping {name: tensor [E, ...]}", type(w).__name__)
    sizes = lw.num_experts()
    if sizes and sizes != {n_experts}:
        raise invalid(f"weights[{layer}]", f"tensors with leading (expert) size {n_experts}", sorted(sizes))
    return lw


# --------------------------------------------------------------------------------------------------
# preparation: split by layer, index tokens, align optional inputs


def _prepare(
    routing: pd.DataFrame,
    num_experts: Mapping[int, int],
    router_probs: Mapping[int, Any] | None,
    weights: Mapping[int, Any] | None,
    router_logits: Mapping[int, Any] | None = None,
) -> list[_LayerInput]:
    routing = check_routing(routing)
    groups = routing.groupby("layer", sort=True).indices
    layers = [int(layer) for layer in groups]
    n_exp = _check_num_experts(num_experts, layers)
    if router_probs is not None and not isinstance(router_probs, Mapping):
        raise invalid("router_probs", "a mapping {layer: array [n_tokens, num_experts]}", type(router_probs).__name__)
    if router_logits is not None and not isinstance(router_logits, Mapping):
        raise invalid("router_logits", "a mapping {layer: array [n_tokens, num_experts]}",
                      type(router_logits).__name__)
    if weights is not None and not isinstance(weights, Mapping):
        raise invalid("weights", "a mapping {layer: LayerWeights or {name: tensor}}", type(weights).__name__)

    out: list[_LayerInput] = []
    derive_renorm = "renorm_gate" not in routing.columns and "raw_gate" in routing.columns
    for layer, idx in zip(layers, groups.values(), strict=True):
        frame = routing.take(idx)
        e_count = n_exp[layer]
        expert = frame["expert"].to_numpy(dtype=np.int64)
        if expert.min() < 0 or expert.max() >= e_count:
            bad = int(expert.min() if expert.min() < 0 else expert.max())
            raise invalid(f"routing['expert'] at layer {layer}", f"in [0, {e_count - 1}]", bad)
        seq = frame["seq"].to_numpy(dtype=np.int64)
        pos = frame["pos"].to_numpy(dtype=np.int64)
        key = seq * (int(pos.max()) + 1) + pos
        tokens, row_token = np.unique(key, return_inverse=True)
        row_token = row_token.astype(np.int64).reshape(-1)
        pair = row_token * e_count + expert
        if len(pd.unique(pair)) != len(pair):
            raise invalid(f"routing at layer {layer}", "one row per (seq, pos, expert): an expert is selected at "
                          "most once per token", "repeated (seq, pos, expert) rows")
        if derive_renorm:
            raw = frame["raw_gate"].to_numpy(dtype=np.float64)
            total = np.bincount(row_token, weights=raw, minlength=len(tokens))
            with np.errstate(invalid="ignore", divide="ignore"):
                frame = frame.assign(renorm_gate=raw / total[row_token])

        probs, logits = (_token_matrix(name, given, layer, len(tokens), e_count)
                         for name, given in (("router_probs", router_probs), ("router_logits", router_logits)))
        lw = None
        if weights is not None and layer in weights and weights[layer] is not None:
            lw = _layer_weights(layer, weights[layer], e_count)
        out.append(_LayerInput(layer, e_count, frame, row_token, len(tokens), probs, lw, logits))
    return out


def _token_matrix(name: str, given: Mapping[int, Any] | None, layer: int, n_tokens: int,
                  e_count: int) -> NDArray[np.floating] | None:
    """Layer ``layer``'s [n_tokens, E] matrix of ``router_probs`` / ``router_logits``, checked; None if absent."""
    if given is None or layer not in given or given[layer] is None:
        return None
    matrix = _to_array(given[layer])
    if matrix.shape != (n_tokens, e_count):
        raise invalid(f"{name}[{layer}]", f"an array of shape ({n_tokens}, {e_count}): one row per distinct "
                      "(seq, pos) of the layer in `routing`, in ascending (seq, pos) order", f"shape {matrix.shape}")
    return matrix


# --------------------------------------------------------------------------------------------------
# computation


def _select(li: _LayerInput, row_mask: NDArray[np.bool_] | None, options: Mapping[str, Any]) -> LayerData:
    """Restrict one layer to the rows in ``row_mask`` (whole tokens) and build the metric input."""
    if row_mask is None:
        frame, row_token_full = li.frame, li.row_token
        used = None
        n_tokens = li.n_tokens
        token = row_token_full
    else:
        frame, row_token_full = li.frame[row_mask], li.row_token[row_mask]
        used = np.unique(row_token_full)
        n_tokens = len(used)
        token = np.searchsorted(used, row_token_full).astype(np.int64)
    probs, logits = li.router_probs, li.router_logits
    if used is not None:
        probs = None if probs is None else probs[used]
        logits = None if logits is None else logits[used]
    return LayerData(
        layer=li.layer,
        num_experts=li.num_experts,
        n_tokens=n_tokens,
        expert=frame["expert"].to_numpy(dtype=np.int64),
        token=token,
        routing=frame,
        router_probs=probs,
        weights=li.weights,
        options=options,
        router_logits=logits,
    )


def _run(
    prepared: Sequence[_LayerInput],
    specs: Sequence[MetricSpec],
    explicit: bool,
    options: Mapping[str, Any],
    row_masks: Mapping[int, NDArray[np.bool_] | None],
    cache: dict[tuple[str, int], NDArray[Any]],
) -> pd.DataFrame:
    frames = []
    for li in prepared:
        data = _select(li, row_masks.get(li.layer), options)
        if data.n_tokens == 0:
            warnings.warn(f"layer {li.layer} has no selected tokens; its token metrics are NaN.", RuntimeWarning,
                          stacklevel=3)
        cols: dict[str, NDArray[Any]] = {
            "layer": np.full(li.num_experts, li.layer, dtype=np.int64),
            "expert": np.arange(li.num_experts, dtype=np.int64),
        }
        for spec in specs:
            key = (spec.name, li.layer)
            if spec.name in WEIGHT_ONLY and key in cache:
                cols[spec.name] = cache[key]
                continue
            try:
                value = spec(data)
            except MissingInputError:
                if explicit:
                    raise
                logger.debug("metric %s skipped at layer %d: input missing", spec.name, li.layer)
                value = np.full(li.num_experts, np.nan)
            if spec.name in WEIGHT_ONLY:
                cache[key] = value
            cols[spec.name] = value
        frames.append(pd.DataFrame(cols))
    return pd.concat(frames, ignore_index=True)


def _seq_masks(prepared: Sequence[_LayerInput], seqs: NDArray[np.int64] | None) -> dict[int, NDArray[np.bool_] | None]:
    if seqs is None:
        return {li.layer: None for li in prepared}
    masks = {li.layer: np.isin(li.frame["seq"].to_numpy(), seqs) for li in prepared}
    if not any(m.any() for m in masks.values()):
        raise invalid("seqs", "sequence indices that occur in `routing`", seqs.tolist()[:10])
    return masks


def compute_expert_metrics(
    routing: pd.DataFrame,
    num_experts: Mapping[int, int],
    *,
    router_probs: Mapping[int, Any] | None = None,
    weights: Mapping[int, Any] | None = None,
    metrics: Iterable[str] | str | None = None,
    reap_gate: ReapGate = "combine",
    seqs: Iterable[int] | None = None,
    router_logits: Mapping[int, Any] | None = None,
) -> pd.DataFrame:
    """Compute every registered metric for every (layer, expert).

    Parameters
    ----------
    routing : pandas.DataFrame
        One row per (layer, seq, pos, slot) for real tokens; see the module docstring for columns.
    num_experts : mapping of int to int
        Number of routed experts per layer; needed for every layer in ``routing``.
    router_probs : mapping of int to array [T_layer, E], optional
        Full router probabilities per layer, rows in ascending (seq, pos) order of the layer's tokens
        in ``routing`` (before ``seqs`` selection). Enables ``routing_entropy`` and ``routing_gini``.
    weights : mapping of int to LayerWeights or mapping, optional
        Expert tensors ([E, ...], e.g. ``gate_up_proj``, ``down_proj``) and ``router`` [E, H] per layer.
        Enables ``aimer`` and ``router_row_norm``.
    metrics : iterable of str, optional
        Names of registered metrics to compute, in output order; default all (:func:`list_metrics`).
        A metric named here whose input is missing raises :class:`MissingInputError`; with the default
        its column is NaN instead.
    reap_gate : {"combine", "renorm", "raw"}
        The gate REAP multiplies the activation norm by: ``combine_weight`` (default, what REAP's
        released code effectively uses), ``renorm_gate`` or ``raw_gate``. See :func:`moeaudit.metrics.reap`.
    seqs : iterable of int, optional
        Restrict to these sequences (e.g. the calibration split); token metrics are computed over their
        tokens only. Default: all.
    router_logits : mapping of int to array [T_layer, E], optional
        Full router logits per layer, rows aligned as ``router_probs``. Enables ``paper_code_utilization``
        and ``paper_code_mean_weight_active``.

    Returns
    -------
    pandas.DataFrame
        One row per (layer, expert), every expert 0 .. E-1 of every layer in ``routing``, sorted by
        layer then expert. Columns ``layer``, ``expert`` (int64), then one per metric: by default
        frequency, count (int64), gate_mass, mean_gate_active, ean_sum, ean_mean, msan, act_std, reap,
        routing_entropy, routing_gini, max_act, aimer, router_row_norm (float64), then user metrics.

    Notes
    -----
    Never-routed experts: frequency = count = gate_mass = ean_sum = 0; means over active tokens
    (mean_gate_active, ean_mean, msan, act_std, reap, max_act) are NaN. ``frequency`` = count / T with
    T the number of distinct selected (seq, pos) at the layer.

    Examples
    --------
    >>> import pandas as pd
    >>> routing = pd.DataFrame({"layer": [0, 0, 0, 0], "seq": [0, 0, 0, 0], "pos": [0, 0, 1, 1],
    ...                         "slot": [0, 1, 0, 1], "expert": [2, 0, 2, 1],
    ...                         "raw_gate": [.5, .3, .6, .2], "combine_weight": [.5, .3, .6, .2],
    ...                         "act_norm": [1., 2., 3., 4.]})
    >>> table = compute_expert_metrics(routing, {0: 4})
    >>> table[["expert", "frequency", "mean_gate_active"]].to_numpy().round(2).tolist()
    [[0.0, 0.5, 0.3], [1.0, 0.5, 0.2], [2.0, 1.0, 0.55], [3.0, 0.0, nan]]
    """
    specs, explicit = _check_metrics(metrics)
    options = {"reap_gate": _check_reap_gate(reap_gate)}
    seq_arr = _check_seqs(seqs)
    start = time.perf_counter()
    prepared = _prepare(routing, num_experts, router_probs, weights, router_logits)
    table = _run(prepared, specs, explicit, options, _seq_masks(prepared, seq_arr), cache={})
    table.attrs["reap_gate"] = options["reap_gate"]
    logger.info("expert metrics: %d layers, %d rows, %.2fs", len(prepared), len(routing), time.perf_counter() - start)
    return table


def compute_expert_metrics_by_domain(
    routing: pd.DataFrame,
    num_experts: Mapping[int, int],
    *,
    router_probs: Mapping[int, Any] | None = None,
    weights: Mapping[int, Any] | None = None,
    metrics: Iterable[str] | str | None = None,
    reap_gate: ReapGate = "combine",
    seqs: Iterable[int] | None = None,
    domain_column: str = "domain",
    router_logits: Mapping[int, Any] | None = None,
) -> pd.DataFrame:
    """Compute the metrics separately over each domain's tokens.

    Parameters are those of :func:`compute_expert_metrics` (``router_logits`` included), plus
    ``domain_column``, the routing column naming each token's domain. Rows with a missing domain are left out
    of every domain.

    Returns
    -------
    pandas.DataFrame
        The :func:`compute_expert_metrics` table for each domain, stacked, with a leading ``domain`` key
        column; domains in sorted order. Each domain's block equals ``compute_expert_metrics`` run on
        the routing rows of that domain (same ``router_probs`` alignment as the full table).
    """
    if not isinstance(routing, pd.DataFrame) or domain_column not in routing.columns:
        got = sorted(map(str, routing.columns)) if isinstance(routing, pd.DataFrame) else type(routing).__name__
        raise invalid("routing", f"a table with a `{domain_column}` column for a per-domain breakdown", got)
    specs, explicit = _check_metrics(metrics)
    options = {"reap_gate": _check_reap_gate(reap_gate)}
    seq_arr = _check_seqs(seqs)
    prepared = _prepare(routing, num_experts, router_probs, weights, router_logits)
    base = _seq_masks(prepared, seq_arr)
    domains = sorted(pd.unique(routing[domain_column].dropna()).tolist())
    if not domains:
        raise invalid(f"routing['{domain_column}']", "at least one non-missing domain", "all missing")
    cache: dict[tuple[str, int], NDArray[Any]] = {}
    blocks = []
    for dom in domains:
        masks = {}
        for li in prepared:
            m = (li.frame[domain_column] == dom).to_numpy(dtype=bool, na_value=False)
            b = base[li.layer]
            masks[li.layer] = m if b is None else (m & b)
        if not any(m.any() for m in masks.values()):
            continue  # the domain has no tokens inside `seqs`
        block = _run(prepared, specs, explicit, options, masks, cache)
        block.insert(0, "domain", dom)
        blocks.append(block)
    table = pd.concat(blocks, ignore_index=True)
    table.attrs["reap_gate"] = options["reap_gate"]
    return table
