"""Pruning criteria: which experts of each MoE layer a criterion drops at a given ratio.

A **criterion** is a score per (layer, expert) and a **direction**: ``low`` means the lowest scores are
pruned first, ``high`` the highest. Every metric column of ``expert_metrics`` is a criterion; so are
``random`` (a seeded uniform permutation per layer, drawn for many seeds to give a distribution) and two
oracles that look at what removal actually does:

``oracle_delta_nll``
    Mean ΔNLL per token of removing the expert, read from the ``effects`` table
    (:func:`oracle_delta_nll`).
``oracle_reconstruction``
    NAEE-style leave-one-out reconstruction error of the MoE block output with the expert routed away,
    measured on calibration windows (:func:`reconstruction_errors`).

=======================  =========  ==============================================================
criterion                direction  why
=======================  =========  ==============================================================
frequency, count         low        rarely routed experts serve few tokens (frequency pruning)
gate_mass                low        little routing weight in total
mean_gate_active         low        weakly weighted when chosen
ean_sum, ean_mean, msan  low        small outputs (EAN / MAN, arXiv 2510.13999, 2606.15716)
act_std                  low        like every activation statistic; no paper prescribes a direction
reap                     low        REAP prunes the lowest saliency (arXiv 2510.13999)
routing_entropy          low        low entropy = the probability column is concentrated on few tokens
                                    (a rarely decisive specialist), so fewer tokens lose the expert
routing_gini             high       the same notion as ``routing_entropy`` (high Gini = concentrated)
max_act                  low        super experts have the largest activations (arXiv 2507.23279)
aimer                    high       "Higher AIMER scores are treated as more removable" (AIMER release,
                                    arXiv 2603.18492; see :func:`moeaudit.metrics.aimer`)
router_row_norm          low        router weight norm (arXiv 2504.05586)
oracle_delta_nll         low        smallest measured loss increase
oracle_reconstruction    low        smallest change of the layer output (NAEE, arXiv 2402.14800)
any other column         low        user metrics; override with ``directions``
=======================  =========  ==============================================================

A NaN score (an expert never routed on the calibration windows, an all-zero expert) is pruned first
whatever the direction: the metric saw nothing of the expert. Ties are broken by expert index.

Ratios: a layer with E routed experts drops ``round(ratio * E)`` experts (halves rounded up) and keeps the
rest; every kept set must hold at least top-k experts. Identity experts (LongCat-Flash's zero-computation
experts, :meth:`moeaudit.models.FamilyAdapter.identity_experts`) hold no weights, so pruning one saves
nothing: they are neither counted in E nor dropped (:func:`prunable_experts`).
"""

from __future__ import annotations

import logging
import math
from typing import Any, Callable, Iterable, Literal, Mapping, Sequence

import numpy as np
import pandas as pd

from moeaudit.errors import InvalidParameterError, RunDirectoryError, invalid
from moeaudit.options import RANDOM
from moeaudit.tables import single_expert_rows

logger = logging.getLogger(__name__)

Direction = Literal["low", "high"]
ORACLE_DELTA_NLL = "oracle_delta_nll"
ORACLE_RECONSTRUCTION = "oracle_reconstruction"
ORACLES: tuple[str, ...] = (ORACLE_DELTA_NLL, ORACLE_RECONSTRUCTION)

#: Which end of each built-in criterion is pruned first (see the module docstring for the reasons).
DIRECTIONS: dict[str, Direction] = {
    "frequency": "low",
    "count": "low",
    "gate_mass": "low",
    "mean_gate_active": "low",
    "ean_sum": "low",
    "ean_mean": "low",
    "msan": "low",
    "act_std": "low",
    "reap": "low",
    "routing_entropy": "low",
    "routing_gini": "high",
    "max_act": "low",
    "aimer": "high",
    "router_row_norm": "low",
    ORACLE_DELTA_NLL: "low",
    ORACLE_RECONSTRUCTION: "low",
}

#: Default pruning ratios (share of routed experts dropped per layer), as in issue 7 / REAP's 25 % and 50 %.
DEFAULT_RATIOS: tuple[float, ...] = (0.125, 0.25, 0.5)

_KEY_COLUMNS = ("layer", "expert")


# ----------------------------------------------------------------------------- ratios and budgets
def drop_count(ratio: float, num_experts: int) -> int:
    """Experts dropped from a layer of ``num_experts`` at ``ratio``: ``round(ratio * E)``, halves up."""
    return int(math.floor(ratio * num_experts + 0.5))


def check_ratio(ratio: Any, num_experts: int, top_k: int, context: str = "") -> int:
    """Validate one pruning ratio for a layer of ``num_experts`` experts and top-``top_k``; return the drop count.

    Raises
    ------
    InvalidParameterError
        One line naming the allowed range: ratio not a number in (0, 1), too small to drop one expert,
        or leaving fewer than ``top_k`` experts.
    """
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float, np.integer, np.floating)) \
            or not math.isfinite(float(ratio)) or not 0 < float(ratio) < 1:
        raise invalid("ratio", "a share of the routed experts in (0, 1), e.g. 0.25", ratio, context)
    ratio = float(ratio)
    count = drop_count(ratio, num_experts)
    if count < 1:
        raise invalid("ratio", f"at least {0.5 / num_experts:.4g} to drop one of {num_experts} experts per layer",
                      ratio, context)
    if num_experts - count < top_k:
        largest = (num_experts - top_k) / num_experts
        raise invalid("ratio", f"at most {largest:.4g} so that each layer keeps at least top_k = {top_k} of "
                      f"{num_experts} experts", ratio, context)
    return count


def check_ratios(ratios: Any, num_experts: Mapping[int, int], top_k: Mapping[int, int],
                 context: str = "") -> tuple[float, ...]:
    """Validate a sequence of ratios against every layer; return them as floats, duplicates removed."""
    if isinstance(ratios, (int, float)) and not isinstance(ratios, bool):
        ratios = (ratios,)
    try:
        values = tuple(ratios)
    except TypeError:
        raise invalid("ratios", "a sequence of shares in (0, 1), e.g. (0.125, 0.25, 0.5)", ratios, context) from None
    if not values:
        raise invalid("ratios", "a non-empty sequence of shares in (0, 1), e.g. (0.125, 0.25, 0.5)", ratios, context)
    for ratio in values:
        for layer in num_experts:
            check_ratio(ratio, num_experts[layer], top_k[layer], context)
    return tuple(dict.fromkeys(float(r) for r in values))


def layer_budgets(ratio: float, num_experts: Mapping[int, int], top_k: Mapping[int, int], *,
                  weights: Mapping[int, float] | None = None,
                  protected: Mapping[int, Iterable[int]] | None = None, context: str = "") -> dict[int, int]:
    """Experts to drop per layer at ``ratio``: uniform, or spread over layers by ``weights``.

    Parameters
    ----------
    ratio : float
        Share of routed experts to drop, in (0, 1).
    num_experts, top_k : mapping layer -> int
    weights : mapping layer -> float >= 0, optional
        Non-uniform budgets: the total ``sum_l round(ratio * E_l)`` is shared out in proportion to
        ``weights[l] * E_l`` (largest remainder, one expert at a time), never leaving a layer with fewer
        than top-k experts or dropping a protected expert. Missing layers weigh 0. None = uniform.
    protected : mapping layer -> experts, optional
        Experts that may not be dropped (the super-expert guard).

    Returns
    -------
    dict layer -> int
    """
    protected = {layer: set(protected.get(layer, ())) for layer in num_experts} if protected else \
        {layer: set() for layer in num_experts}
    caps = {layer: min(num_experts[layer] - top_k[layer], num_experts[layer] - len(protected[layer]))
            for layer in num_experts}
    if weights is None:
        budgets = {layer: check_ratio(ratio, num_experts[layer], top_k[layer], context) for layer in num_experts}
        for layer, count in budgets.items():
            if count > caps[layer]:
                raise invalid("guard", f"at most {num_experts[layer] - count} so that {count} unprotected experts "
                              f"of layer {layer} remain to drop at ratio {ratio}", len(protected[layer]), context)
        return budgets
    bad = {k: v for k, v in weights.items() if k not in num_experts}
    if bad:
        raise invalid("budget_weights", f"keyed by MoE layers {sorted(num_experts)}", sorted(bad), context)
    values = {layer: float(weights.get(layer, 0.0)) for layer in num_experts}
    if any(not math.isfinite(v) or v < 0 for v in values.values()) or not any(v > 0 for v in values.values()):
        raise invalid("budget_weights", "non-negative finite numbers, at least one positive", dict(weights), context)
    if not (isinstance(ratio, (int, float)) and 0 < float(ratio) < 1):
        raise invalid("ratio", "a share of the routed experts in (0, 1), e.g. 0.25", ratio, context)
    total = sum(drop_count(float(ratio), e) for e in num_experts.values())
    mass = sum(values[layer] * num_experts[layer] for layer in num_experts)
    target = {layer: total * values[layer] * num_experts[layer] / mass for layer in num_experts}
    budgets = {layer: 0 for layer in num_experts}
    for _ in range(total):
        open_layers = [layer for layer in num_experts if budgets[layer] < caps[layer] and target[layer] > 0]
        if not open_layers:
            raise invalid("budget_weights", f"weights that can place {total} dropped experts without leaving a "
                          "layer below top_k (spread the weight over more layers or lower the ratio)",
                          dict(weights), context)
        layer = max(open_layers, key=lambda l: (target[l] - budgets[l], -l))
        budgets[layer] += 1
    return budgets


# ----------------------------------------------------------------------------- scores
def metric_criteria(expert_metrics: pd.DataFrame) -> list[str]:
    """The criterion columns of an ``expert_metrics`` table: every numeric column except the keys, and except
    a column that is NaN throughout (a metric whose input the run did not record, e.g. router logits): it
    ranks nothing, and pruning "by" it would only repeat the tie-break."""
    return [c for c in expert_metrics.columns
            if c not in _KEY_COLUMNS and pd.api.types.is_numeric_dtype(expert_metrics[c])
            and not pd.api.types.is_bool_dtype(expert_metrics[c]) and expert_metrics[c].notna().any()]


def direction_of(criterion: str, directions: Mapping[str, str] | None = None) -> Direction:
    """The direction of ``criterion``: ``directions`` first, then :data:`DIRECTIONS`, else ``low``."""
    direction = (directions or {}).get(criterion, DIRECTIONS.get(criterion, "low"))
    if direction not in ("low", "high"):
        raise invalid(f"directions[{criterion!r}]", "'low' or 'high'", direction)
    return direction  # type: ignore[return-value]


def prune_order(scores: Sequence[float] | np.ndarray, direction: Direction = "low",
                protected: Iterable[int] = ()) -> np.ndarray:
    """Experts in the order a criterion prunes them (first = first dropped).

    NaN scores come first, then ascending (``low``) or descending (``high``) scores, ties by expert index;
    ``protected`` experts are moved to the end (never dropped while others remain).
    """
    values = np.asarray(scores, dtype=np.float64)
    oriented = values if direction == "low" else -values
    key = np.where(np.isnan(oriented), -np.inf, oriented)
    guard = np.zeros(len(values), dtype=bool)
    guard[list(protected)] = True
    return np.lexsort((np.arange(len(values)), key, guard))


def random_order(num_experts: int, seed: int, layer: int, protected: Iterable[int] = ()) -> np.ndarray:
    """A uniform random prune order of one layer, from ``numpy.random.default_rng([seed, layer])``.

    The same (seed, layer) always gives the same permutation; larger ratios extend smaller ones (the
    dropped sets of one seed are nested). ``protected`` experts go last.
    """
    rng = np.random.default_rng([int(seed), int(layer)])
    guard = set(int(e) for e in protected)
    free = np.array([e for e in range(num_experts) if e not in guard], dtype=np.int64)
    return np.concatenate([rng.permutation(free), np.array(sorted(guard), dtype=np.int64)])


def prunable_experts(expert_metrics: pd.DataFrame, num_experts: Mapping[int, int], identity: Mapping[int, int],
                     guard: int) -> tuple[dict[int, int], dict[int, list[int]], dict[int, list[int]]]:
    """What pruning may drop, per layer, when the last ``identity[layer]`` experts are identity experts.

    Returns
    -------
    real : dict of layer -> int
        Experts with weights (``num_experts - identity``): the E of the ratios and budgets.
    guarded : dict of layer -> list of int
        The super-expert guard among them (:func:`super_experts` of the experts with weights).
    protected : dict of layer -> list of int
        Never dropped: the guarded experts and the identity experts.
    """
    real = {int(l): int(n) - int(identity.get(l, 0)) for l, n in num_experts.items()}
    if any(identity.get(l, 0) for l in num_experts):
        with_weights = expert_metrics["expert"] < expert_metrics["layer"].map(real).fillna(np.inf)
        expert_metrics = expert_metrics[with_weights]
    guarded = super_experts(expert_metrics, guard)
    protected = {l: sorted(set(guarded.get(l, ())) | set(range(real[l], int(num_experts[l])))) for l in real}
    return real, guarded, {l: ids for l, ids in protected.items() if ids}


def super_experts(expert_metrics: pd.DataFrame, n: int) -> dict[int, list[int]]:
    """The ``n`` experts with the largest ``max_act`` in each layer (the super-expert guard).

    Super experts (arXiv 2507.23279) are the few experts whose activations reach extreme outliers; pruning
    them collapses the model whatever their other statistics. ``n = 0`` guards nothing.
    """
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        raise invalid("guard", "a non-negative integer (super experts kept per layer by max_act)", n)
    if n == 0:
        return {}
    if "max_act" not in expert_metrics:
        raise RunDirectoryError("the super-expert guard needs the `max_act` column of expert_metrics.parquet; "
                                "recompute the metrics or pass guard=0")
    out = {}
    for layer, group in expert_metrics.groupby("layer"):
        values = group["max_act"].to_numpy(dtype=np.float64)
        order = np.lexsort((group["expert"].to_numpy(), -np.nan_to_num(values, nan=-np.inf)))
        out[int(layer)] = sorted(int(e) for e in group["expert"].to_numpy()[order[:n]])
    return out


def oracle_delta_nll(effects: pd.DataFrame, num_experts: Mapping[int, int], *, kind: str | None = None,
                     scope: str | None = None) -> tuple[pd.DataFrame, dict[str, Any]]:
    r"""Causal oracle: each expert's mean ΔNLL per token when it is removed, from the ``effects`` table.

    Parameters
    ----------
    effects : DataFrame
        Rows with ``layer``, ``seq``, ``pos``, ``expert``, ``kind``, ``scope``, ``delta_nll`` (and, where
        present, ``estimate``, ``shared``, ``j``, ``selection`` to keep only exact single-expert removals).
    num_experts : mapping layer -> int
        Routed experts per layer (experts without rows score 0).
    kind : str, optional
        Intervention kind to read; default ``reroute`` (what pruning does) when present, else ``zero``,
        else the first kind in the table.
    scope : str, optional
        Default ``sequence`` (the expert removed wherever it is active in the window, as pruning would)
        when present, else ``token`` (the census).

    Returns
    -------
    scores : DataFrame
        ``layer``, ``expert``, ``oracle_delta_nll``.
    info : dict
        ``kind``, ``scope``, ``rows`` used, ``positions`` per layer.

    Notes
    -----
    With :math:`P_\ell` the distinct (seq, pos) positions of layer ℓ's rows,
    :math:`\mathrm{score}_e = \frac{1}{|P_\ell|}\sum_{(t, e)\ \mathrm{rows}} \Delta\mathrm{NLL}_t`: a
    position where e was not active counts 0 (removing an expert that is not used changes nothing at that
    token under ``zero``), so the score is frequency × mean conditional effect — the first-order
    loss of pruning e alone. The effects are measured on the held-out windows the pruned models are
    evaluated on, so this is an in-sample *oracle*, an optimistic reference rather than a fair criterion.
    """
    needed = {"layer", "seq", "pos", "expert", "kind", "scope", "delta_nll"}
    missing = needed - set(effects.columns)
    if missing:
        raise RunDirectoryError(f"effects.parquet lacks columns {sorted(missing)}; rerun `moeaudit intervene`")
    rows = single_expert_rows(effects)
    if rows.empty:
        raise RunDirectoryError("effects.parquet has no exact single-expert removals; run `moeaudit intervene`")
    scopes = set(rows["scope"].unique())
    scope = scope or ("sequence" if "sequence" in scopes else "token")
    rows = rows[rows["scope"] == scope]
    kinds = list(rows["kind"].unique())
    kind = kind or next((k for k in ("reroute", "zero", "renorm", "mean") if k in kinds), kinds[0] if kinds else None)
    rows = rows[rows["kind"] == kind]
    if rows.empty:
        raise invalid("kind/scope", f"a kind and scope present in effects.parquet ({sorted(scopes)})",
                      f"{kind}/{scope}")
    frames, positions = [], {}
    for layer, n_experts in num_experts.items():
        at = rows[rows["layer"] == layer]
        n_pos = len(at[["seq", "pos"]].drop_duplicates())
        positions[int(layer)] = n_pos
        sums = np.bincount(at["expert"].to_numpy(dtype=np.int64), weights=at["delta_nll"].to_numpy(dtype=np.float64),
                           minlength=n_experts)[:n_experts]
        score = sums / n_pos if n_pos else np.full(n_experts, np.nan)
        frames.append(pd.DataFrame({"layer": int(layer), "expert": np.arange(n_experts), ORACLE_DELTA_NLL: score}))
    info = {"kind": kind, "scope": scope, "rows": int(len(rows)), "positions": positions}
    logger.info("oracle_delta_nll from %d %s/%s effect rows", len(rows), kind, scope)
    return pd.concat(frames, ignore_index=True), info


def reconstruction_errors(moe, input_ids, attention_mask=None, *, layers: Sequence[int] | None = None,
                          batch_size: int = 8, on_batch: Callable[[int, int], None] | None = None) -> pd.DataFrame:
    r"""NAEE-style leave-one-out reconstruction error of each MoE layer's output, with router masking.

    Parameters
    ----------
    moe : MoEModel
    input_ids : LongTensor [B, T]
        Calibration windows.
    attention_mask : Tensor [B, T], optional
        1 at real tokens; padding is excluded from the error.
    layers : sequence of int, optional
        MoE layers (default: all).
    batch_size : int
        Windows per forward pass.
    on_batch : callable(done, total), optional
        Progress callback, once per (batch, layer).

    Returns
    -------
    DataFrame
        ``layer``, ``expert``, ``oracle_reconstruction``, ``n_tokens``.

    Notes
    -----
    For every layer ℓ the clean block input X is captured, Z = block(X) and
    :math:`Z_{-e}` = block(X) with e's router logit masked to −inf and the top-k re-selected with the
    family's rule (exactly what a model pruned of e computes at ℓ). The score is the per-token RMS of the
    difference, :math:`\sqrt{\frac{1}{N}\sum_t \lVert Z_t - Z_{-e,t} \rVert_2^2} = \lVert Z - Z_{-e}
    \rVert_F / \sqrt{N}`, over the N real tokens. NAEE searches combinations of experts by this loss; the
    leave-one-out ranking is its single-expert version. The layer input is the clean one (earlier layers
    unpruned), so the score measures ℓ alone.

    References
    ----------
    .. [1] Lu et al., "Not All Experts are Equal: Efficient Expert Pruning and Skipping for Mixture-of-Experts
       Large Language Models", arXiv 2402.14800 (NAEE; expert pruning by the layer-output
       reconstruction loss on calibration data).
    """
    import torch

    from moeaudit.models.base import block_hidden
    from moeaudit.models.hooks import Ablation

    chosen = [moe.layer(l).layer for l in (layers if layers is not None else moe.moe_layer_indices)]
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    sq = {l: np.zeros(moe.layer(l).num_experts) for l in chosen}
    n_tokens = 0
    starts = list(range(0, input_ids.shape[0], batch_size))
    total, done = len(starts) * len(chosen), 0
    for start in starts:
        ids = input_ids[start:start + batch_size].to(moe.device)
        mask = attention_mask[start:start + batch_size].to(moe.device)
        valid = mask.bool().reshape(-1)
        n_tokens += int(valid.sum())
        with torch.no_grad(), moe.intervene((), blocks=chosen) as trace:
            moe.model(input_ids=ids, attention_mask=mask)
        for l in chosen:
            described = moe.layer(l)
            x = trace.block_inputs[l][-1]
            with torch.no_grad():
                clean = block_hidden(described.block(x)).float().reshape(-1, x.shape[-1])[valid]
                for e in range(described.num_experts):
                    with moe.intervene([Ablation(layer=l, experts=[e], kind="reroute")], warn_unchanged=False):
                        out = block_hidden(described.block(x)).float().reshape(-1, x.shape[-1])[valid]
                    sq[l][e] += float(((out - clean).double() ** 2).sum())
            done += 1
            if on_batch is not None:
                on_batch(done, total)
    frames = [pd.DataFrame({"layer": l, "expert": np.arange(len(sq[l])),
                            ORACLE_RECONSTRUCTION: np.sqrt(sq[l] / max(n_tokens, 1)), "n_tokens": n_tokens})
              for l in chosen]
    return pd.concat(frames, ignore_index=True)


def criterion_scores(expert_metrics: pd.DataFrame, *, extra: Iterable[pd.DataFrame] = ()) -> pd.DataFrame:
    """One row per (layer, expert), one column per criterion: the metric columns plus oracle columns.

    Parameters
    ----------
    expert_metrics : DataFrame
        ``layer``, ``expert`` and one numeric column per metric.
    extra : iterable of DataFrame
        Further score tables keyed by ``layer``, ``expert`` (e.g. from :func:`oracle_delta_nll`,
        :func:`reconstruction_errors`); their numeric columns other than ``n_tokens`` are added.
    """
    scores = expert_metrics[list(_KEY_COLUMNS) + metric_criteria(expert_metrics)].copy()
    for frame in extra:
        columns = [c for c in metric_criteria(frame) if c != "n_tokens"]
        scores = scores.merge(frame[list(_KEY_COLUMNS) + columns], on=list(_KEY_COLUMNS), how="left")
    return scores.sort_values(list(_KEY_COLUMNS)).reset_index(drop=True)


def dropped_experts(scores: pd.DataFrame, criterion: str, budgets: Mapping[int, int], *,
                    directions: Mapping[str, str] | None = None,
                    protected: Mapping[int, Iterable[int]] | None = None, seed: int | None = None,
                    num_experts: Mapping[int, int] | None = None,
                    groups: Mapping[int, int] | None = None) -> dict[int, list[int]]:
    """The experts ``criterion`` drops in each layer, ``budgets[layer]`` of them.

    Parameters
    ----------
    scores : DataFrame
        From :func:`criterion_scores` (unused for ``random``).
    criterion : str
        A column of ``scores`` or ``"random"``.
    budgets : mapping layer -> int
        Experts to drop per layer (:func:`layer_budgets`).
    seed : int, optional
        Required for ``random``.
    num_experts : mapping layer -> int, optional
        Experts per layer for ``random`` (default: from ``scores``).
    groups : mapping layer -> int, optional
        Group-balanced selection: layer ``l``'s experts form ``groups[l]`` equal consecutive groups (the
        ``n_group`` of group-limited routing: DeepSeek-V3 / R1, Mistral 4), and each group loses
        ``budgets[l] / groups[l]`` experts, the first of that group in the criterion's order (its worst by the
        criterion, or its first random ones). A pruned checkpoint of such a model routes exactly as the
        masked model only when every group keeps as many experts (:mod:`moeaudit.prune.export`); the global
        selection (the default, as the prune stage evaluates) rarely does.

    Returns
    -------
    dict layer -> sorted list of dropped experts

    Raises
    ------
    InvalidParameterError
        With ``groups``: a layer's budget that is not a multiple of its groups, or a group whose share would
        drop a protected expert.
    """
    protected = protected or {}
    out = {}
    if criterion == RANDOM:
        if seed is None:
            raise invalid("seed", "an integer for the random criterion", seed)
        sizes = num_experts or {int(l): int(g["expert"].max()) + 1 for l, g in scores.groupby("layer")}
        for layer, count in budgets.items():
            order = random_order(sizes[layer], seed, layer, protected.get(layer, ()))
            out[int(layer)] = _first_dropped(order, count, (groups or {}).get(layer), protected.get(layer, ()),
                                             layer)
        return out
    if criterion not in scores:
        allowed = ", ".join([RANDOM] + [c for c in scores.columns if c not in _KEY_COLUMNS])
        raise invalid("criterion", f"one of {allowed}", criterion)
    direction = direction_of(criterion, directions)
    for layer, count in budgets.items():
        at = scores[scores["layer"] == layer].sort_values("expert")
        if len(at) == 0 or not np.array_equal(at["expert"].to_numpy(), np.arange(len(at))):
            raise RunDirectoryError(f"expert_metrics.parquet must hold experts 0..E-1 of layer {layer} once each; "
                                    "recompute the metrics")
        order = prune_order(at[criterion].to_numpy(dtype=np.float64), direction, protected.get(layer, ()))
        out[int(layer)] = _first_dropped(order, count, (groups or {}).get(layer), protected.get(layer, ()), layer)
    return out


def check_group_budget(count: int, n_group: int, total: int, protected: Iterable[int], layer: int) -> None:
    """Refuse, in one line, a group-balanced drop of ``count`` of ``total`` experts in ``n_group`` equal
    consecutive groups that cannot be made: ``count`` not a multiple of ``n_group``, or a group with fewer
    unprotected experts than its share (``protected`` go last in every prune order, so the guard would be
    reached whatever the criterion)."""
    if count % n_group:
        examples = " or ".join(f"{m * n_group / total:g}" for m in (1, 2) if m * n_group < total)
        raise InvalidParameterError(
            f"the ratio drops {count} of the {total} experts of layer {layer}, not a multiple of its {n_group} expert "
            f"groups (group-balanced selection); choose a ratio that drops a multiple of {n_group}, e.g. {examples}")
    size, share, guard = total // n_group, count // n_group, {int(e) for e in protected}
    for group in range(n_group):
        members = set(range(group * size, (group + 1) * size))
        if size - len(members & guard) < share:
            raise InvalidParameterError(
                f"the guard protects experts {sorted(members & guard)} of layer {layer} that group {group}'s share "
                f"of {share} would drop (group-balanced selection); lower the guard or the ratio")


def _first_dropped(order: np.ndarray, count: int, n_group: int | None, protected: Iterable[int],
                   layer: int) -> list[int]:
    """The first ``count`` experts of a prune ``order``; with ``n_group`` > 1, the first ``count / n_group`` of
    each of the ``n_group`` equal consecutive groups (:func:`dropped_experts`' ``groups``;
    :func:`check_group_budget` first). Sorted."""
    if not n_group or n_group <= 1:
        return sorted(int(e) for e in order[:count])
    total = len(order)
    check_group_budget(count, n_group, total, protected, layer)
    size, share = total // n_group, count // n_group
    dropped = []
    for group in range(n_group):
        dropped += [int(e) for e in order if int(e) // size == group][:share]
    return sorted(dropped)


def kept_from_dropped(dropped: Mapping[int, Iterable[int]], num_experts: Mapping[int, int]) -> dict[int, list[int]]:
    """Complement of each layer's dropped set: the kept experts, sorted."""
    return {int(layer): sorted(set(range(num_experts[layer])) - {int(e) for e in experts})
            for layer, experts in dropped.items()}


def resolve_criteria(requested: Sequence[str] | None, available: Sequence[str]) -> list[str]:
    """Validate requested criteria against the available ones (metric columns, oracles, ``random``)."""
    if requested is None:
        return list(available)
    if isinstance(requested, str):
        requested = [requested]
    bad = [c for c in requested if c not in available]
    if bad:
        raise InvalidParameterError(f"`criteria` must be drawn from {', '.join(available)}; got {bad[0]!r}.")
    return list(dict.fromkeys(requested))
