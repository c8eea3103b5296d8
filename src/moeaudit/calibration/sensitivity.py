"""Calibration sensitivity: how much an expert ranking depends on which, and how many, calibration tokens
were used.

Pruning by an observational metric (REAP, frequency, EAN, ...) ranks a layer's experts on a calibration set
and drops the lowest. These functions measure how much that ranking would change with other calibration
data from the same source, without running the model: they resample the calibration split's routing rows
and recompute the metrics with :func:`moeaudit.metrics.compute_expert_metrics`.

Three views, one row per (metric, layer) each:

* :func:`ranking_stability`: bootstrap resamples of calibration *units* (documents, or windows) drawn with
  replacement; Kendall's τ of each resample's ranking to the full split's, and the share of prune/keep
  decisions at a pruning ratio that flip.
* :func:`learning_curve` and :func:`tokens_to_tau`: nested random subsets of growing size; τ to the full
  ranking per size, and the calibration size (tokens) from which the mean τ reaches a target.
* :func:`domain_agreement`: τ between the rankings computed on each calibration domain alone.

:func:`calibration_sensitivity` runs all three and returns the ``calibration`` table
(:data:`moeaudit.tables.CALIBRATION_SCHEMA`).

Metrics covered: every registered metric that reads the calibration tokens (routing columns, router
probabilities), built-in and user-registered alike, because each resample is recomputed by the same
function that computed the run's ``expert_metrics``. Weight-only metrics (``aimer``, ``router_row_norm``,
and any metric that needs ``weights``) do not depend on calibration data and are left out.

Rankings are oriented as the prune stage prunes (:func:`moeaudit.prune.criteria.direction_of`): an expert
a metric could not score (NaN: never routed in the sample, for the means over active tokens) ranks as the
first to prune, whatever the direction. τ is tau-b, so tied experts (several NaN, say) count as ties.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from numpy.typing import NDArray

from moeaudit.errors import invalid
from moeaudit.metrics.compute import check_routing, compute_expert_metrics
from moeaudit.metrics.reap import REAP_GATES, ReapGate
from moeaudit.metrics.registry import get_metric, list_metrics
from moeaudit.prune.criteria import direction_of, drop_count
from moeaudit.stats._common import check_choice, check_int, check_open_unit, check_seed, warn_degenerate
from moeaudit.tables import CALIBRATION_SCHEMA

__all__ = [
    "CURVE_MAX_SHARE",
    "UNITS",
    "calibration_metrics",
    "calibration_sensitivity",
    "curve_sizes",
    "domain_agreement",
    "kendall_tau_b",
    "learning_curve",
    "ranking_stability",
    "tokens_to_tau",
]

#: What :func:`calibration_sensitivity` may resample: whole documents or single windows.
UNITS: tuple[str, ...] = ("document", "window")
#: Largest share of the calibration units on the learning curve: a subset of m of n units shares m/n of its
#: data with the full split, so sizes beyond half say little about stability (τ -> 1 as m -> n regardless).
CURVE_MAX_SHARE = 0.5
_KEYS = ("layer", "expert")
_TAU_CHUNK = 64  # resamples per block of the vectorised tau-b (bounds memory at E = 256: 64 x 32 640 pairs)


# =============================================================================================== τ
def kendall_tau_b(reference: Any, values: Any) -> NDArray[np.float64]:
    r"""Kendall's tau-b between one reference vector and each row of a matrix (vectorised).

    Parameters
    ----------
    reference : array_like, shape (E,)
        The reference scores (e.g. each expert's metric on the whole calibration split). Finite values or
        ``-inf``; ties allowed.
    values : array_like, shape (B, E) or (E,)
        Scores to compare, one vector per row.

    Returns
    -------
    ndarray of float64, shape (B,)
        :math:`\tau_b` per row; NaN where either vector is constant (no untied pair), with a
        :class:`~moeaudit.stats.DegenerateInputWarning`.

    Notes
    -----
    Over the :math:`n_0 = E(E-1)/2` pairs :math:`i < j`, with :math:`s_x = \operatorname{sign}(x_i - x_j)`
    and :math:`s_y` likewise,

    .. math::

        \tau_b = \frac{\sum_{i<j} s_x s_y}{\sqrt{(n_0 - n_1)(n_0 - n_2)}},

    :math:`n_1` and :math:`n_2` the pairs tied in :math:`x` and in :math:`y`. This is the value of
    :func:`scipy.stats.kendalltau` (``variant="b"``) for every row, computed for all rows at once.

    References
    ----------
    .. [1] Kendall, "The treatment of ties in ranking problems", Biometrika 33(3):239-251 (1945).

    Examples
    --------
    >>> kendall_tau_b([1, 2, 3, 4], [[1, 2, 3, 4], [4, 3, 2, 1], [1, 2, 4, 3]]).round(3).tolist()
    [1.0, -1.0, 0.667]
    """
    x, y = _validate_kendall_tau_b(reference, values)
    tau = _tau_b(x, y)
    if np.isnan(tau).any():
        warn_degenerate(f"kendall_tau_b: {int(np.isnan(tau).sum())} of {len(tau)} comparisons have a constant "
                        "vector (no untied pair); their τ is NaN.")
    return tau


def _validate_kendall_tau_b(reference: Any, values: Any) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    try:
        x = np.asarray(reference, dtype=np.float64)
        y = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError):
        raise invalid("reference, values", "arrays of numbers", type(values).__name__) from None
    if x.ndim != 1 or x.size < 2:
        raise invalid("reference", "a 1-D array of at least 2 scores", f"shape {x.shape}")
    y = y[None, :] if y.ndim == 1 else y
    if y.ndim != 2 or y.shape[1] != x.size:
        raise invalid("values", f"an array of shape (B, {x.size}) or ({x.size},)", f"shape {y.shape}")
    if np.isnan(x).any() or np.isnan(y).any() or np.isposinf(x).any() or np.isposinf(y).any():
        raise invalid("reference, values", "finite scores or -inf (rank NaN explicitly first or last)",
                      "NaN or +inf")
    return x, y


def _tau_b(x: NDArray[np.float64], y: NDArray[np.float64]) -> NDArray[np.float64]:
    """tau-b of ``x`` against each row of ``y`` (no checks). ``-inf`` is the lowest value, tied with itself."""
    n = x.size
    i, j = np.triu_indices(n, 1)
    x = _finite_floor(x[None, :])[0]
    sx = np.sign(x[i] - x[j]).astype(np.int8)
    untied_x = int(np.count_nonzero(sx))
    out = np.empty(y.shape[0], dtype=np.float64)
    for start in range(0, y.shape[0], _TAU_CHUNK):
        block = _finite_floor(y[start:start + _TAU_CHUNK])
        sy = np.sign(block[:, i] - block[:, j]).astype(np.int8)
        score = (sy * sx).sum(axis=1, dtype=np.int64)
        untied_y = np.count_nonzero(sy, axis=1)
        denominator = np.sqrt(float(untied_x) * untied_y.astype(np.float64))
        with np.errstate(invalid="ignore", divide="ignore"):
            out[start:start + _TAU_CHUNK] = np.where(denominator > 0, score / denominator, np.nan)
    return out


def _finite_floor(rows: NDArray[np.float64]) -> NDArray[np.float64]:
    """Each row with ``-inf`` replaced by one value below the row's finite minimum: the same order and ties,
    and differences that are never ``-inf - -inf`` (NaN)."""
    low = np.isneginf(rows)
    if not low.any():
        return rows
    finite = np.where(low, np.inf, rows)
    floor = np.where(np.isfinite(finite.min(axis=1)), finite.min(axis=1) - 1.0, 0.0)
    return np.where(low, floor[:, None], rows)


def _oriented(values: NDArray[np.float64], direction: str) -> NDArray[np.float64]:
    """Scores oriented so that lower = pruned first, NaN (unscored) lowest of all: the prune stage's order."""
    oriented = values if direction == "low" else -values
    return np.where(np.isnan(oriented), -np.inf, oriented)


# ====================================================================================== the sample pool
@dataclass(frozen=True, eq=False)
class _Pool:
    """The calibration routing rows, grouped into resampling units, ready to be drawn with repetition.

    A draw gives each unit a count; a unit drawn c times contributes c copies of its rows, copy ``k`` with
    its ``seq`` shifted by ``k * span`` so that copies are distinct tokens, and its router-probability rows
    ``c`` times, in the ascending (seq, pos) order :func:`compute_expert_metrics` expects. Drawing every unit
    once gives back the rows in their original order, so the metrics are bit for bit those of the split.
    """

    routing: pd.DataFrame  # selected rows, original order
    row_unit: NDArray[np.int64]
    seq: NDArray[np.int64]
    span: int
    probs: dict[int, tuple[NDArray[Any], NDArray[np.int64]]]  # layer -> (rows in (seq, pos) order, unit per row)
    units: tuple[Any, ...]
    unit_tokens: NDArray[np.int64]

    @property
    def n_units(self) -> int:
        return len(self.units)

    def draw(self, counts: NDArray[np.int64]) -> tuple[pd.DataFrame, dict[int, NDArray[Any]] | None]:
        copies = int(counts.max())
        rows, offsets = [], []
        row_count = counts[self.row_unit]
        for k in range(copies):
            chosen = np.flatnonzero(row_count > k)
            rows.append(chosen)
            offsets.append(np.full(chosen.size, k * self.span, dtype=np.int64))
        index = np.concatenate(rows)
        frame = self.routing.take(index)
        if copies > 1:
            frame = frame.assign(seq=self.seq[index] + np.concatenate(offsets))
        probs = None
        if self.probs:
            probs = {}
            for layer, (matrix, unit) in self.probs.items():
                token_count = counts[unit]
                probs[layer] = np.concatenate([matrix[token_count > k] for k in range(copies)])
        return frame, probs


def _build_pool(routing: pd.DataFrame, router_probs: Mapping[int, Any] | None, seqs: NDArray[np.int64] | None,
                documents: Mapping[Any, Any] | None) -> _Pool:
    keys = routing["seq"].to_numpy(dtype=np.int64)
    keep = np.ones(len(routing), dtype=bool) if seqs is None else np.isin(keys, seqs)
    selected = routing[keep]
    seq = selected["seq"].to_numpy(dtype=np.int64)
    distinct = np.unique(seq)
    if documents is None:
        labels = distinct.astype(object)
    else:
        labels = np.array([documents[int(s)] for s in distinct], dtype=object)
    units, unit_of_seq = _factorize(labels)
    row_unit = unit_of_seq[np.searchsorted(distinct, seq)]
    pos = selected["pos"].to_numpy(dtype=np.int64)
    token_keys = np.unique(seq * (int(pos.max()) + 1) + pos)
    unit_tokens = np.bincount(unit_of_seq[np.searchsorted(distinct, token_keys // (int(pos.max()) + 1))],
                              minlength=len(units)).astype(np.int64)
    probs: dict[int, tuple[NDArray[Any], NDArray[np.int64]]] = {}
    if router_probs:
        layer_col = routing["layer"].to_numpy()
        for layer, matrix in router_probs.items():
            if matrix is None:
                continue
            at = layer_col == layer
            if not at.any():
                continue
            layer_seq = keys[at]
            layer_pos = routing["pos"].to_numpy(dtype=np.int64)[at]
            width = int(layer_pos.max()) + 1
            tokens = np.unique(layer_seq * width + layer_pos)
            token_seq = tokens // width
            chosen = np.ones(tokens.size, dtype=bool) if seqs is None else np.isin(token_seq, seqs)
            matrix = np.asarray(matrix.detach().float().cpu().numpy() if hasattr(matrix, "detach") else matrix)
            probs[int(layer)] = (matrix[chosen], unit_of_seq[np.searchsorted(distinct, token_seq[chosen])])
    span = int(seq.max()) + 1
    return _Pool(selected, row_unit, seq, span, probs, tuple(units), unit_tokens)


def _factorize(labels: NDArray[Any]) -> tuple[list[Any], NDArray[np.int64]]:
    """Unit keys in order of first appearance (seq order) and each seq's unit index."""
    order: dict[Any, int] = {}
    index = np.empty(len(labels), dtype=np.int64)
    for i, label in enumerate(labels):
        index[i] = order.setdefault(label, len(order))
    return list(order), index


@contextmanager
def _quiet_compute() -> Iterator[None]:
    """Silence the per-call INFO line of compute_expert_metrics during the hundreds of resamples."""
    compute_logger = logging.getLogger("moeaudit.metrics.compute")
    level = compute_logger.level
    compute_logger.setLevel(max(level, logging.WARNING))
    try:
        yield
    finally:
        compute_logger.setLevel(level)


@dataclass(frozen=True, eq=False)
class _Setup:
    """Validated inputs shared by the public functions: the reference table, the pool, the metrics."""

    pool: _Pool
    reference: pd.DataFrame  # compute_expert_metrics on the whole selection
    metrics: tuple[str, ...]
    directions: dict[str, str]
    num_experts: dict[int, int]
    reap_gate: str
    layers: tuple[int, ...]
    explicit: bool
    cache: dict[bytes, NDArray[np.float64]] = field(default_factory=dict)

    def values(self, counts: NDArray[np.int64]) -> NDArray[np.float64]:
        """The metrics on one draw, shape (layers, metrics, max E); NaN-padded where a layer has fewer experts.

        Draws with the same counts are the same sample, so their metrics are computed once (a split of few
        units repeats draws often: 3 documents have 10 distinct bootstrap samples).
        """
        key = counts.tobytes()
        if key not in self.cache:
            self.cache[key] = self._compute(counts)
        return self.cache[key]

    def _compute(self, counts: NDArray[np.int64]) -> NDArray[np.float64]:
        frame, probs = self.pool.draw(counts)
        # the metrics asked for by name, or (default) every metric, NaN where an input is missing at a layer
        table = compute_expert_metrics(frame, self.num_experts, router_probs=probs,
                                       metrics=list(self.metrics) if self.explicit else None,
                                       reap_gate=self.reap_gate)  # type: ignore[arg-type]
        return _as_cube(table, self.layers, self.metrics, self.num_experts)

    def reference_cube(self) -> NDArray[np.float64]:
        return _as_cube(self.reference, self.layers, self.metrics, self.num_experts)


def _as_cube(table: pd.DataFrame, layers: tuple[int, ...], metrics: tuple[str, ...],
             num_experts: Mapping[int, int]) -> NDArray[np.float64]:
    width = max(num_experts[layer] for layer in layers)
    cube = np.full((len(layers), len(metrics), width), np.nan)
    position = {layer: i for i, layer in enumerate(layers)}
    layer_index = np.array([position.get(int(x), -1) for x in table["layer"].to_numpy()], dtype=np.int64)
    expert = table["expert"].to_numpy(dtype=np.int64)
    known = layer_index >= 0
    values = table[list(metrics)].to_numpy(dtype=np.float64)
    cube[layer_index[known], :, expert[known]] = values[known]
    return cube


def calibration_metrics(available: Iterable[str] | None = None) -> list[str]:
    """The registered metrics that depend on calibration tokens (every one that does not need ``weights``).

    Parameters
    ----------
    available : iterable of str, optional
        Keep only these names (e.g. the columns of a run's ``expert_metrics``); default every registered one.

    Returns
    -------
    list of str
        In registration order.
    """
    names = list_metrics()
    chosen = set(names) if available is None else set(available)
    return [n for n in names if n in chosen and "weights" not in get_metric(n).needs]


def _setup(routing: Any, num_experts: Any, router_probs: Any, documents: Any, seqs: Any, metrics: Any,
           reap_gate: Any, directions: Any) -> _Setup:
    """The shared part of every ``_validate_*`` step: check the tables, compute the reference, build the pool."""
    check_routing(routing)
    check_choice("reap_gate", reap_gate, REAP_GATES)
    if directions is not None and not isinstance(directions, Mapping):
        raise invalid("directions", "a mapping {metric: 'low' or 'high'}", type(directions).__name__)
    explicit = metrics is not None
    if isinstance(metrics, str):
        metrics = [metrics]
    if explicit:
        names = list(metrics)
        weight_only = [n for n in names if n in list_metrics() and "weights" in get_metric(n).needs]
        if weight_only:
            raise invalid("metrics", "metrics that read calibration tokens (a weight-only metric does not depend on "
                          "the calibration data)", weight_only)
    if seqs is not None:
        seqs_arr = np.asarray(list(seqs) if not isinstance(seqs, np.ndarray) else seqs)
        if seqs_arr.ndim != 1 or seqs_arr.size == 0 or not np.issubdtype(seqs_arr.dtype, np.integer):
            raise invalid("seqs", "a non-empty 1-D collection of int sequence indices", seqs)
        seqs = seqs_arr.astype(np.int64)
    if documents is not None:
        if not isinstance(documents, Mapping) and not isinstance(documents, pd.Series):
            raise invalid("documents", "a mapping or Series {seq: document key}", type(documents).__name__)
        present = np.unique(routing["seq"].to_numpy()) if seqs is None else np.intersect1d(
            np.unique(routing["seq"].to_numpy()), seqs)
        lacking = [int(s) for s in present if int(s) not in documents or pd.isna(documents[int(s)])]
        if lacking:
            raise invalid("documents", "a document key for every selected seq", f"none for seq {lacking[:5]}")
    # the reference: compute_expert_metrics validates routing, num_experts, router_probs and seqs in depth
    with _quiet_compute():
        reference = compute_expert_metrics(routing, num_experts, router_probs=router_probs,
                                           metrics=list(metrics) if explicit else None, reap_gate=reap_gate,
                                           seqs=seqs)
    if explicit:
        chosen = tuple(metrics)
    else:
        usable = [c for c in reference.columns if c not in _KEYS and reference[c].notna().any()]
        chosen = tuple(calibration_metrics(usable))
        if not chosen:
            raise invalid("routing", "the inputs of at least one calibration metric", "none computable")
    reference = reference[[*_KEYS, *chosen]]
    dirs = {m: direction_of(m, directions) for m in chosen}
    layers = tuple(int(x) for x in pd.unique(reference["layer"]))
    sizes = {layer: int(num_experts[layer]) for layer in layers}
    pool = _build_pool(routing, router_probs, seqs, documents)
    return _Setup(pool, reference, chosen, dirs, sizes, reap_gate, layers, explicit)


# ================================================================================ bootstrap stability
def ranking_stability(
    routing: pd.DataFrame,
    num_experts: Mapping[int, int],
    *,
    router_probs: Mapping[int, Any] | None = None,
    documents: Mapping[int, Any] | pd.Series | None = None,
    seqs: Iterable[int] | None = None,
    metrics: Iterable[str] | str | None = None,
    reap_gate: ReapGate = "combine",
    n_resamples: int = 200,
    ratio: float = 0.25,
    seed: int = 0,
    directions: Mapping[str, str] | None = None,
) -> pd.DataFrame:
    r"""Stability of each metric's expert ranking under bootstrap resamples of the calibration documents.

    Parameters
    ----------
    routing : pandas.DataFrame
        The observe stage's ``routing`` table (columns as for :func:`moeaudit.metrics.compute_expert_metrics`).
    num_experts : mapping of int to int
        Routed experts per layer.
    router_probs : mapping of int to array [T_layer, E], optional
        Full router probabilities, aligned with ``routing`` as :func:`compute_expert_metrics` expects
        (enables ``routing_entropy`` and ``routing_gini``).
    documents : mapping or Series {seq: document key}, optional
        The document each window (``seq``) comes from; the units resampled. Default: each window is a unit.
    seqs : iterable of int, optional
        The calibration windows (default: every window in ``routing``).
    metrics : iterable of str, optional
        Metrics to rank by; default every registered metric that reads calibration tokens and whose inputs
        are present (:func:`calibration_metrics`).
    reap_gate : {"combine", "renorm", "raw"}
        As in :func:`compute_expert_metrics`.
    n_resamples : int, default 200
        Bootstrap resamples (at least 2).
    ratio : float, default 0.25
        Share of each layer's experts pruned when counting decision flips, in (0, 1).
    seed : int, default 0
        Seed of :func:`numpy.random.default_rng` for the draws.
    directions : mapping {metric: "low" or "high"}, optional
        Which end a metric prunes first, where it differs from :data:`moeaudit.prune.criteria.DIRECTIONS`.

    Returns
    -------
    pandas.DataFrame
        One row per (metric, layer): ``metric``, ``layer``, ``num_experts``, ``n_units``, ``n_tokens``,
        ``n_resamples`` (resamples with a defined τ), ``tau_mean``, ``tau_p05``, ``tau_median``, ``flip_ratio``,
        ``n_pruned``, ``flip_share``, ``flip_share_p95``.

    Warns
    -----
    DegenerateInputWarning
        When fewer than 2 units are given (every resample would be the split itself: no information, so
        every statistic is NaN) or when a layer's full-split ranking is constant (τ undefined: NaN).

    Notes
    -----
    With :math:`n` units, resample :math:`b` draws :math:`n` units uniformly with replacement; a unit drawn
    :math:`c` times enters with :math:`c` copies of its tokens, and every metric is recomputed on that
    sample exactly as on the split. With :math:`s^{(b)}_e` the oriented score of expert :math:`e`
    (module docstring) and :math:`s_e` the full split's,

    .. math::

        \tau^{(b)} = \tau_b\big(s, s^{(b)}\big), \qquad
        \mathrm{flip}^{(b)} = \frac{1}{E}\sum_e \big[\,e \in P(s) \;\oplus\; e \in P(s^{(b)})\big],

    :math:`P(s)` the ``round(ratio * E)`` experts the prune stage drops by :math:`s` (lowest first, NaN
    first, ties by expert index). ``tau_p05`` is the 5th percentile of :math:`\tau^{(b)}`, ``flip_share_p95``
    the 95th of :math:`\mathrm{flip}^{(b)}`. Resampling documents rather than windows keeps a document's
    windows together, as they are not independent [2]_.

    References
    ----------
    .. [1] Efron, Tibshirani, "An Introduction to the Bootstrap", Chapman & Hall (1993), ch. 6.
    .. [2] Davison, Hinkley, "Bootstrap Methods and their Application", Cambridge (1997), Sec. 3.8
       (resampling clusters).
    .. [3] Engmann, Medeiros Adriano, Giese, arXiv 2606.10703 (2026): the metrics audited and the
       calibration / held-out protocol.

    Examples
    --------
    >>> table = ranking_stability(routing, {0: 8}, n_resamples=50)  # doctest: +SKIP
    >>> table[["metric", "layer", "tau_mean", "flip_share"]]  # doctest: +SKIP
    """
    setup, n_resamples, ratio, seed = _validate_ranking_stability(
        routing, num_experts, router_probs, documents, seqs, metrics, reap_gate, n_resamples, ratio, seed,
        directions)
    return _stability(setup, n_resamples, ratio, seed)


def _validate_ranking_stability(routing: Any, num_experts: Any, router_probs: Any, documents: Any, seqs: Any,
                                metrics: Any, reap_gate: Any, n_resamples: Any, ratio: Any, seed: Any,
                                directions: Any) -> tuple[_Setup, int, float, int]:
    n_resamples = check_int("n_resamples", n_resamples, 2)
    ratio = check_open_unit("ratio", ratio)
    seed = check_seed("seed", seed)
    if seed is None:
        raise invalid("seed", "a non-negative integer (the resampling is recorded with its seed)", None)
    setup = _setup(routing, num_experts, router_probs, documents, seqs, metrics, reap_gate, directions)
    return setup, n_resamples, ratio, seed


def _bootstrap_counts(n_units: int, n_resamples: int, seed: int) -> NDArray[np.int64]:
    rng = np.random.default_rng([seed, 0])
    draws = rng.integers(0, n_units, size=(n_resamples, n_units))
    return np.stack([np.bincount(row, minlength=n_units) for row in draws]).astype(np.int64)


def _stability(setup: _Setup, n_resamples: int, ratio: float, seed: int) -> pd.DataFrame:
    pool = setup.pool
    reference = setup.reference_cube()
    degenerate = pool.n_units < 2
    if degenerate:
        warn_degenerate(f"ranking_stability: {pool.n_units} calibration unit (need at least 2 to resample); "
                        "every statistic is NaN.", 4)
        cubes = np.full((0, *reference.shape), np.nan)
    else:
        with _quiet_compute():
            cubes = np.stack([setup.values(c) for c in _bootstrap_counts(pool.n_units, n_resamples, seed)])
    rows, constant = [], []
    for li, layer in enumerate(setup.layers):
        e = setup.num_experts[layer]
        n_pruned = drop_count(ratio, e)
        for mi, metric in enumerate(setup.metrics):
            direction = setup.directions[metric]
            ref = _oriented(reference[li, mi, :e], direction)
            row = dict(metric=metric, layer=layer, num_experts=e, n_units=pool.n_units,
                       n_tokens=int(pool.unit_tokens.sum()), n_resamples=0, tau_mean=math.nan, tau_p05=math.nan,
                       tau_median=math.nan, flip_ratio=ratio, n_pruned=n_pruned, flip_share=math.nan,
                       flip_share_p95=math.nan)
            if not degenerate and np.unique(ref).size < 2:
                constant.append(f"{metric}@{layer}")
            elif not degenerate:
                sample = np.stack([_oriented(c[li, mi, :e], direction) for c in cubes])
                tau = _tau_b(ref, sample)
                defined = tau[~np.isnan(tau)]
                flips = (_pruned(sample, n_pruned) != _pruned(ref[None, :], n_pruned)).mean(axis=1)
                row.update(n_resamples=int(defined.size), flip_share=float(flips.mean()),
                           flip_share_p95=float(np.percentile(flips, 95)))
                if defined.size:
                    row.update(tau_mean=float(defined.mean()), tau_p05=float(np.percentile(defined, 5)),
                               tau_median=float(np.median(defined)))
            rows.append(row)
    if constant:
        warn_degenerate(f"ranking_stability: the full-split ranking is constant for {', '.join(constant[:6])}"
                        f"{' and more' if len(constant) > 6 else ''}; τ and flips are NaN there.", 4)
    return pd.DataFrame(rows)


def _pruned(oriented: NDArray[np.float64], n_pruned: int) -> NDArray[np.bool_]:
    """Which experts the prune stage drops at ``n_pruned``, per row of oriented scores (B, E): the lowest
    first, ties by expert index. A stable sort of the scores is :func:`moeaudit.prune.criteria.prune_order`
    without protected experts (which sorts by score, then index)."""
    order = np.argsort(oriented, axis=1, kind="stable")[:, :n_pruned]
    out = np.zeros(oriented.shape, dtype=bool)
    np.put_along_axis(out, order, True, axis=1)
    return out


# ===================================================================================== learning curve
def learning_curve(
    routing: pd.DataFrame,
    num_experts: Mapping[int, int],
    *,
    router_probs: Mapping[int, Any] | None = None,
    documents: Mapping[int, Any] | pd.Series | None = None,
    seqs: Iterable[int] | None = None,
    metrics: Iterable[str] | str | None = None,
    reap_gate: ReapGate = "combine",
    points: int = 6,
    repeats: int = 10,
    seed: int = 0,
    directions: Mapping[str, str] | None = None,
) -> pd.DataFrame:
    r"""τ between the ranking on growing nested subsets of the calibration units and the full split's.

    Parameters
    ----------
    routing, num_experts, router_probs, documents, seqs, metrics, reap_gate, directions
        As in :func:`ranking_stability`.
    points : int, default 6
        Subset sizes: up to ``points`` distinct sizes spaced geometrically from 1 unit to
        ``floor(n / 2)`` (:data:`CURVE_MAX_SHARE`).
    repeats : int, default 10
        Random unit orders; each size's subset is the first m units of an order, so the subsets of one
        order are nested, and τ is averaged over the orders.
    seed : int, default 0
        Seed of the orders.

    Returns
    -------
    pandas.DataFrame
        One row per (metric, layer, size): ``metric``, ``layer``, ``units`` (m), ``tokens`` (mean tokens of the
        m-unit subsets), ``tau`` (mean τ over the orders with a defined τ), ``n_defined``.

    Warns
    -----
    DegenerateInputWarning
        With fewer than 2 units there is no proper subset: the table is empty.

    Notes
    -----
    For order :math:`r` and size :math:`m`, :math:`S_{r,m}` is the first :math:`m` units of a uniform random
    permutation and :math:`\bar\tau_m = \frac{1}{R}\sum_r \tau_b(s, s^{S_{r,m}})`. Sizes stop at half the
    split: a subset of :math:`m` of :math:`n` units shares the fraction :math:`m/n` of its data with the
    reference, so τ reaches 1 at :math:`m = n` whatever the metric's stability. :func:`tokens_to_tau` reads
    the calibration size at which :math:`\bar\tau_m` reaches a target.

    References
    ----------
    .. [1] Politis, Romano, Wolf, "Subsampling", Springer (1999): subsets drawn without replacement.
    """
    setup, points, repeats, seed = _validate_learning_curve(
        routing, num_experts, router_probs, documents, seqs, metrics, reap_gate, points, repeats, seed, directions)
    return _curve(setup, points, repeats, seed)


def _validate_learning_curve(routing: Any, num_experts: Any, router_probs: Any, documents: Any, seqs: Any,
                             metrics: Any, reap_gate: Any, points: Any, repeats: Any, seed: Any,
                             directions: Any) -> tuple[_Setup, int, int, int]:
    points = check_int("points", points, 1)
    repeats = check_int("repeats", repeats, 1)
    seed = check_seed("seed", seed)
    if seed is None:
        raise invalid("seed", "a non-negative integer (the orders are recorded with their seed)", None)
    setup = _setup(routing, num_experts, router_probs, documents, seqs, metrics, reap_gate, directions)
    return setup, points, repeats, seed


def curve_sizes(n_units: int, points: int) -> list[int]:
    """The learning curve's subset sizes: up to ``points`` distinct integers, geometric from 1 to
    ``floor(n_units * CURVE_MAX_SHARE)``; empty for fewer than 2 units."""
    top = int(math.floor(n_units * CURVE_MAX_SHARE))
    if top < 1:
        return []
    return sorted({int(round(v)) for v in np.geomspace(1, top, num=points)})


_CURVE_COLUMNS = ("metric", "layer", "units", "tokens", "tau", "n_defined")


def _curve(setup: _Setup, points: int, repeats: int, seed: int) -> pd.DataFrame:
    pool = setup.pool
    sizes = curve_sizes(pool.n_units, points)
    if not sizes:
        warn_degenerate(f"learning_curve: {pool.n_units} calibration unit (need at least 2 for a proper "
                        "subset); the curve is empty.", 4)
        return pd.DataFrame({c: pd.Series(dtype=t) for c, t in zip(
            _CURVE_COLUMNS, (object, "int64", "int64", "float64", "float64", "int64"))})
    reference = setup.reference_cube()
    rng = np.random.default_rng([seed, 1])
    cubes = np.empty((repeats, len(sizes), *reference.shape))
    tokens = np.empty((repeats, len(sizes)))
    with _quiet_compute():
        for r in range(repeats):
            order = rng.permutation(pool.n_units)
            for si, m in enumerate(sizes):
                counts = np.zeros(pool.n_units, dtype=np.int64)
                counts[order[:m]] = 1
                cubes[r, si] = setup.values(counts)
                tokens[r, si] = pool.unit_tokens[order[:m]].sum()
    rows = []
    for li, layer in enumerate(setup.layers):
        e = setup.num_experts[layer]
        for mi, metric in enumerate(setup.metrics):
            direction = setup.directions[metric]
            ref = _oriented(reference[li, mi, :e], direction)
            constant = np.unique(ref).size < 2
            for si, m in enumerate(sizes):
                if constant:
                    tau = np.full(repeats, np.nan)
                else:
                    tau = _tau_b(ref, np.stack([_oriented(cubes[r, si, li, mi, :e], direction)
                                                for r in range(repeats)]))
                defined = tau[~np.isnan(tau)]
                rows.append(dict(metric=metric, layer=layer, units=m, tokens=float(tokens[:, si].mean()),
                                 tau=float(defined.mean()) if defined.size else math.nan,
                                 n_defined=int(defined.size)))
    return pd.DataFrame(rows, columns=list(_CURVE_COLUMNS))


def tokens_to_tau(curve: pd.DataFrame, target: float = 0.9) -> pd.DataFrame:
    r"""The calibration size from which a learning curve's mean τ reaches ``target``.

    Parameters
    ----------
    curve : pandas.DataFrame
        A :func:`learning_curve` table (``metric``, ``layer``, ``units``, ``tokens``, ``tau``).
    target : float, default 0.9
        In (0, 1].

    Returns
    -------
    pandas.DataFrame
        One row per (metric, layer): ``units_to_target`` and ``tokens_to_target``, the smallest size with
        :math:`\bar\tau_m \ge` ``target`` (its units and mean tokens); NaN where no size reaches it.

    Warns
    -----
    DegenerateInputWarning
        Listing the (metric, layer) cells that never reach ``target`` on the curve: their size is NaN, never
        a stand-in such as the whole split (which reaches τ = 1 by construction).

    Examples
    --------
    >>> import pandas as pd
    >>> curve = pd.DataFrame({"metric": ["reap"] * 3, "layer": [0] * 3, "units": [1, 2, 4],
    ...                       "tokens": [100.0, 200.0, 400.0], "tau": [0.5, 0.92, 0.95]})
    >>> tokens_to_tau(curve)[["units_to_target", "tokens_to_target"]].values.tolist()
    [[2.0, 200.0]]
    """
    curve, target = _validate_tokens_to_tau(curve, target)
    rows, never = [], []
    for (metric, layer), group in curve.groupby(["metric", "layer"], sort=False):
        group = group.sort_values("units")
        reached = group[group["tau"] >= target]
        if len(reached):
            first = reached.iloc[0]
            rows.append(dict(metric=metric, layer=int(layer), units_to_target=float(first["units"]),
                             tokens_to_target=float(first["tokens"])))
        else:
            never.append(f"{metric}@{layer}")
            rows.append(dict(metric=metric, layer=int(layer), units_to_target=math.nan, tokens_to_target=math.nan))
    if never:
        warn_degenerate(f"tokens_to_tau: mean τ never reaches {target:g} on the curve for {len(never)} cell(s) "
                        f"({', '.join(never[:6])}{' ...' if len(never) > 6 else ''}); their size is NaN.")
    return pd.DataFrame(rows, columns=["metric", "layer", "units_to_target", "tokens_to_target"])


def _validate_tokens_to_tau(curve: Any, target: Any) -> tuple[pd.DataFrame, float]:
    if not isinstance(curve, pd.DataFrame):
        raise invalid("curve", "a learning_curve table (pandas DataFrame)", type(curve).__name__)
    missing = [c for c in ("metric", "layer", "units", "tokens", "tau") if c not in curve.columns]
    if missing:
        raise invalid("curve", f"a learning_curve table (missing {missing})", sorted(map(str, curve.columns)))
    if isinstance(target, bool) or not isinstance(target, (int, float, np.integer, np.floating)) \
            or not 0 < float(target) <= 1:
        raise invalid("target", "a τ in (0, 1]", target)
    return curve, float(target)


# ===================================================================================== domains
def domain_agreement(
    by_domain: pd.DataFrame,
    *,
    metrics: Iterable[str] | str | None = None,
    directions: Mapping[str, str] | None = None,
) -> pd.DataFrame:
    r"""τ between the expert rankings computed on each calibration domain alone.

    Parameters
    ----------
    by_domain : pandas.DataFrame
        A :func:`moeaudit.metrics.compute_expert_metrics_by_domain` table (the run's
        ``expert_metrics_by_domain``): ``domain``, ``layer``, ``expert`` and one column per metric.
    metrics : iterable of str, optional
        Metric columns to compare; default every column that is a registered calibration metric
        (:func:`calibration_metrics`).
    directions : mapping {metric: "low" or "high"}, optional
        As in :func:`ranking_stability` (it decides where unscored experts rank).

    Returns
    -------
    pandas.DataFrame
        One row per (metric, layer): ``n_domains``, ``domain_tau_mean`` and ``domain_tau_min`` (mean and
        minimum of τ over the domain pairs with a defined τ), ``domain_pair_min`` (``"a | b"``, the least
        concordant pair).

    Warns
    -----
    DegenerateInputWarning
        When a layer has fewer than 2 domains, or no pair with a defined τ (a constant ranking): NaN there.

    Notes
    -----
    For domains :math:`a \ne b` with oriented scores :math:`s^{a}`, :math:`s^{b}`:
    :math:`\tau_{ab} = \tau_b(s^a, s^b)`, summarised over the :math:`\binom{D}{2}` pairs. Low agreement means
    that a calibration set drawn from one domain prunes other experts than one from another domain.
    """
    by_domain, names, dirs = _validate_domain_agreement(by_domain, metrics, directions)
    rows, thin = [], []
    for layer, block in by_domain.groupby("layer", sort=True):
        domains = sorted(block["domain"].dropna().unique().tolist())
        indexed = block.set_index(["domain", "expert"])
        pivots = {m: indexed[m].unstack("expert").reindex(index=domains) for m in names}
        for metric in names:
            row = dict(metric=metric, layer=int(layer), n_domains=len(domains), domain_tau_mean=math.nan,
                       domain_tau_min=math.nan, domain_pair_min=None)
            scores = pivots[metric].to_numpy(dtype=np.float64)
            taus, pairs = [], []
            for a in range(len(domains)):
                oriented_a = _oriented(scores[a], dirs[metric])
                if np.unique(oriented_a).size < 2:
                    continue
                for b in range(a + 1, len(domains)):
                    oriented_b = _oriented(scores[b], dirs[metric])
                    if np.unique(oriented_b).size < 2:
                        continue
                    taus.append(float(_tau_b(oriented_a, oriented_b[None, :])[0]))
                    pairs.append(f"{domains[a]} | {domains[b]}")
            if taus:
                worst = int(np.argmin(taus))
                row.update(domain_tau_mean=float(np.mean(taus)), domain_tau_min=taus[worst],
                           domain_pair_min=pairs[worst])
            else:
                thin.append(f"{metric}@{int(layer)}")
            rows.append(row)
    if thin:
        warn_degenerate(f"domain_agreement: no pair of domains with a defined τ for {len(thin)} cell(s) "
                        f"({', '.join(thin[:6])}{' ...' if len(thin) > 6 else ''}): fewer than 2 domains or a "
                        "constant ranking; NaN there.")
    return pd.DataFrame(rows, columns=["metric", "layer", "n_domains", "domain_tau_mean", "domain_tau_min",
                                       "domain_pair_min"])


def _validate_domain_agreement(by_domain: Any, metrics: Any, directions: Any
                               ) -> tuple[pd.DataFrame, list[str], dict[str, str]]:
    if not isinstance(by_domain, pd.DataFrame):
        raise invalid("by_domain", "an expert_metrics_by_domain table (pandas DataFrame)", type(by_domain).__name__)
    missing = [c for c in ("domain", "layer", "expert") if c not in by_domain.columns]
    if missing:
        raise invalid("by_domain", f"a table with columns domain, layer, expert (missing {missing})",
                      sorted(map(str, by_domain.columns)))
    if len(by_domain) == 0:
        raise invalid("by_domain", "a non-empty table", "0 rows")
    if directions is not None and not isinstance(directions, Mapping):
        raise invalid("directions", "a mapping {metric: 'low' or 'high'}", type(directions).__name__)
    if metrics is None:
        names = calibration_metrics(c for c in by_domain.columns if c not in ("domain", *_KEYS))
    else:
        names = [metrics] if isinstance(metrics, str) else list(metrics)
        absent = [m for m in names if m not in by_domain.columns]
        if absent or not names:
            raise invalid("metrics", "metric columns of `by_domain`", absent or names)
    return by_domain, names, {m: direction_of(m, directions) for m in names}


# ===================================================================================== all three
def calibration_sensitivity(
    routing: pd.DataFrame,
    num_experts: Mapping[int, int],
    *,
    router_probs: Mapping[int, Any] | None = None,
    documents: Mapping[int, Any] | pd.Series | None = None,
    seqs: Iterable[int] | None = None,
    by_domain: pd.DataFrame | None = None,
    metrics: Iterable[str] | str | None = None,
    reap_gate: ReapGate = "combine",
    n_resamples: int = 200,
    ratio: float = 0.25,
    tau_target: float = 0.9,
    points: int = 6,
    repeats: int = 10,
    seed: int = 0,
    directions: Mapping[str, str] | None = None,
) -> pd.DataFrame:
    """The ``calibration`` table: :func:`ranking_stability`, :func:`learning_curve` with
    :func:`tokens_to_tau`, and :func:`domain_agreement`, one row per (metric, layer).

    Parameters
    ----------
    routing, num_experts, router_probs, documents, seqs, metrics, reap_gate, n_resamples, ratio, seed, directions
        As in :func:`ranking_stability` (``points``, ``repeats`` as in :func:`learning_curve`).
    by_domain : pandas.DataFrame, optional
        The per-domain metrics of the same calibration windows (:func:`domain_agreement`); without it the
        domain columns are NaN (``n_domains`` 0).
    tau_target : float, default 0.9
        The τ the learning curve is read at (:func:`tokens_to_tau`).

    Returns
    -------
    pandas.DataFrame
        The columns of :data:`moeaudit.tables.CALIBRATION_SCHEMA`, in order, one row per (metric, layer);
        ``unit`` is ``"document"`` when ``documents`` is given, else ``"window"``.

    Warns
    -----
    DegenerateInputWarning
        As the three analyses do (fewer than 2 units, constant rankings, a target never reached, fewer than 2
        domains): the affected values are NaN.

    Notes
    -----
    The bootstrap and the curve use independent streams of one seed (``default_rng([seed, 0])`` and
    ``default_rng([seed, 1])``), so changing ``n_resamples`` does not change the curve.
    """
    setup, n_resamples, ratio, tau_target, points, repeats, seed = _validate_calibration_sensitivity(
        routing, num_experts, router_probs, documents, seqs, by_domain, metrics, reap_gate, n_resamples, ratio,
        tau_target, points, repeats, seed, directions)
    table = _stability(setup, n_resamples, ratio, seed)
    curve = _curve(setup, points, repeats, seed)
    lists = {}
    for (metric, layer), group in curve.groupby(["metric", "layer"], sort=False):
        group = group.sort_values("units")
        lists[(metric, int(layer))] = (group["units"].astype(int).tolist(), group["tokens"].astype(float).tolist(),
                                       group["tau"].astype(float).tolist())
    empty: tuple[list[int], list[float], list[float]] = ([], [], [])
    keys = list(zip(table["metric"], table["layer"].astype(int)))
    table["unit"] = "window" if documents is None else "document"
    table["curve_units"] = [lists.get(k, empty)[0] for k in keys]
    table["curve_tokens"] = [lists.get(k, empty)[1] for k in keys]
    table["curve_tau"] = [lists.get(k, empty)[2] for k in keys]
    table["tau_target"] = tau_target
    if len(curve):
        reach = tokens_to_tau(curve, tau_target).set_index(["metric", "layer"])
        table["units_to_target"] = [reach["units_to_target"].get(k, math.nan) for k in keys]
        table["tokens_to_target"] = [reach["tokens_to_target"].get(k, math.nan) for k in keys]
    else:
        table["units_to_target"] = table["tokens_to_target"] = math.nan
    table["n_domains"], table["domain_tau_mean"], table["domain_tau_min"], table["domain_pair_min"] = (
        0, math.nan, math.nan, None)
    if by_domain is not None:
        present = [m for m in setup.metrics if m in by_domain.columns]
        if present:
            agreement = domain_agreement(by_domain, metrics=present, directions=setup.directions)
            agreement = agreement.set_index(["metric", "layer"])
            for column in ("n_domains", "domain_tau_mean", "domain_tau_min", "domain_pair_min"):
                fill = 0 if column == "n_domains" else (None if column == "domain_pair_min" else math.nan)
                table[column] = [agreement[column].get(k, fill) for k in keys]
    table["seed"] = seed
    return table[list(CALIBRATION_SCHEMA.names)]


def _validate_calibration_sensitivity(routing: Any, num_experts: Any, router_probs: Any, documents: Any,
                                      seqs: Any, by_domain: Any, metrics: Any, reap_gate: Any, n_resamples: Any,
                                      ratio: Any, tau_target: Any, points: Any, repeats: Any, seed: Any,
                                      directions: Any) -> tuple[_Setup, int, float, float, int, int, int]:
    n_resamples = check_int("n_resamples", n_resamples, 2)
    ratio = check_open_unit("ratio", ratio)
    if isinstance(tau_target, bool) or not isinstance(tau_target, (int, float, np.integer, np.floating)) \
            or not 0 < float(tau_target) <= 1:
        raise invalid("tau_target", "a τ in (0, 1]", tau_target)
    points = check_int("points", points, 1)
    repeats = check_int("repeats", repeats, 1)
    seed = check_seed("seed", seed)
    if seed is None:
        raise invalid("seed", "a non-negative integer (the resampling is recorded with its seed)", None)
    if by_domain is not None:
        _validate_domain_agreement(by_domain, None, directions)
    setup = _setup(routing, num_experts, router_probs, documents, seqs, metrics, reap_gate, directions)
    return setup, n_resamples, ratio, float(tau_target), points, repeats, seed
