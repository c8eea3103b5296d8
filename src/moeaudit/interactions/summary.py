"""Per-layer summaries of the interaction tables, pruning sets jointly vs additively, and the audit on Shapley
values. Torch-free (pandas, scipy): the report imports it.
"""

from __future__ import annotations

import dataclasses
import warnings

import numpy as np
import pandas as pd
from scipy.stats import spearmanr

__all__ = ["INTERACTION_TOLERANCE", "interaction_matrix", "interaction_summary", "set_layer_table", "set_summary",
           "shapley_tests"]

TOKEN = ["layer", "seq", "pos"]
#: |interaction| (nats) at or below which a pair counts as additive: a few times the fast engine's float32
#: noise floor (~1e-6 nats on the built-in models).
INTERACTION_TOLERANCE = 1e-5


def interaction_summary(pairs: pd.DataFrame, shapley: pd.DataFrame, *,
                        tolerance: float = INTERACTION_TOLERANCE) -> pd.DataFrame:
    """One row per MoE layer: how the removals of a token's active experts combine.

    Parameters
    ----------
    pairs, shapley : DataFrame
        The ``interactions`` and ``shapley`` tables (:func:`moeaudit.interactions.measure_interactions`).
    tolerance : float
        |interaction| at or below this counts as neither positive nor negative.

    Returns
    -------
    DataFrame
        ``layer``, ``tokens``, ``k`` (active experts), ``pairs``;
        ``mean_interaction``, ``median_interaction``, ``p05_interaction``, ``p95_interaction`` (nats);
        ``share_positive`` (removing both costs more than the two apart: each compensates for the other),
        ``share_negative`` (removing one already costs much of what removing both does);
        ``mean_delta_all`` (every active expert removed) and ``mean_sum_single`` (the sum of the k single
        removals), and their difference ``excess_all`` (nats; > 0: the whole active set costs more removed
        together than its single removals add up to). Differences, not ratios: mean effects near 0 (deep
        layers, a random model) make ratios meaningless;
        ``top_gate_share``: Σ_t |φ_top(t)| / Σ_t Σ_e |φ_e(t)|, the share of the Shapley mass held by the
        expert with the largest gate (1/k if gates carried no information; absolute values so that tokens
        whose effects cancel cannot push it outside [0, 1]);
        ``spearman_single_shapley``: Spearman ρ between single-expert effects and Shapley values over the
        layer's (token, expert) rows — how well the one-at-a-time census ranks the experts' shares;
        ``estimated``: whether any Shapley value is a permutation estimate.
    """
    rows = []
    for layer, games in shapley.groupby("layer", sort=True):
        layer_pairs = pairs[pairs["layer"] == layer]
        interaction = layer_pairs["interaction"].to_numpy(dtype=float)
        per_token = games.groupby(["seq", "pos"], sort=False)
        everything = per_token["delta_nll_all"].first()
        top = games.loc[games["gate_rank"] == 0, "shapley"].abs().sum()
        mass = games["shapley"].abs().sum()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            rho = spearmanr(games["delta_nll_single"], games["shapley"]).statistic if len(games) >= 3 else np.nan
        single_sum = float(per_token["delta_nll_single"].sum().mean())
        rows.append(dict(
            layer=int(layer), tokens=int(per_token.ngroups), k=int(games["n_players"].max()), pairs=len(layer_pairs),
            mean_interaction=_stat(interaction, np.mean), median_interaction=_stat(interaction, np.median),
            p05_interaction=_stat(interaction, lambda x: np.quantile(x, 0.05)),
            p95_interaction=_stat(interaction, lambda x: np.quantile(x, 0.95)),
            share_positive=_stat(interaction, lambda x: float(np.mean(x > tolerance))),
            share_negative=_stat(interaction, lambda x: float(np.mean(x < -tolerance))),
            mean_delta_all=float(everything.mean()), mean_sum_single=single_sum,
            excess_all=float(everything.mean()) - single_sum,
            top_gate_share=float(top) / float(mass) if mass else np.nan,
            spearman_single_shapley=float(rho), estimated=bool(games["estimate"].any()),
        ))
    return pd.DataFrame(rows)


def _stat(values: np.ndarray, fn) -> float:
    return float(fn(values)) if len(values) else np.nan


def interaction_matrix(pairs: pd.DataFrame, layer: int, num_experts: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean interaction of each expert pair at ``layer``, over the tokens where both are active.

    Returns
    -------
    (mean, count) : float array [E, E] (NaN where the pair was never active together; symmetric),
        int array [E, E]
    """
    at = pairs[pairs["layer"] == layer]
    total = np.zeros((num_experts, num_experts))
    count = np.zeros((num_experts, num_experts), dtype=np.int64)
    a, b = at["expert_a"].to_numpy(dtype=np.int64), at["expert_b"].to_numpy(dtype=np.int64)
    value = at["interaction"].to_numpy(dtype=float)
    for x, y in ((a, b), (b, a)):
        np.add.at(total, (x, y), value)
        np.add.at(count, (x, y), 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(count > 0, total / np.maximum(count, 1), np.nan)
    return mean, count


def set_summary(sets: pd.DataFrame) -> pd.DataFrame:
    """Per (criterion, ratio, layer): the held-out cost of a pruning configuration's dropped set at a token,
    removed together vs the sum of its members' single removals.

    Over every target token of the layer (a token where no dropped expert is active costs 0 both ways).
    ``random`` configurations (one per seed) are pooled: their columns are means over seeds, with the 5th
    and 95th percentile over seeds of the joint cost (``joint_p05``, ``joint_p95``; NaN for a criterion).

    Returns
    -------
    DataFrame
        ``criterion``, ``ratio``, ``layer``, ``tokens``, ``seeds``, ``share_hit`` (tokens where at least one
        dropped expert is active), ``mean_removed``, ``mean_joint``, ``mean_sum``, ``excess`` (mean_joint -
        mean_sum, nats; < 0: removing the set costs less than its members' single effects add up to),
        ``joint_p05``, ``joint_p95``.
    """
    if sets.empty:
        return pd.DataFrame(columns=["criterion", "ratio", "layer", "tokens", "seeds", "share_hit", "mean_removed",
                                     "mean_joint", "mean_sum", "excess", "joint_p05", "joint_p95"])
    frame = sets.assign(seed=sets["seed"].astype("Int64").fillna(-1), hit=sets["n_removed"] > 0)
    per_config = frame.groupby(["criterion", "ratio", "seed", "layer"], sort=False).agg(
        tokens=("pos", "size"), share_hit=("hit", "mean"), mean_removed=("n_removed", "mean"),
        mean_joint=("delta_nll_joint", "mean"), mean_sum=("delta_nll_sum", "mean")).reset_index()
    grouped = per_config.groupby(["criterion", "ratio", "layer"], sort=False)
    out = grouped.agg(tokens=("tokens", "first"), seeds=("seed", "size"), share_hit=("share_hit", "mean"),
                      mean_removed=("mean_removed", "mean"), mean_joint=("mean_joint", "mean"),
                      mean_sum=("mean_sum", "mean")).reset_index()
    out["seeds"] = out["seeds"].astype(np.int64)
    out["excess"] = out["mean_joint"] - out["mean_sum"]
    keys = ["criterion", "ratio", "layer"]
    spread = grouped["mean_joint"].quantile([0.05, 0.95]).unstack()
    spread.columns = ["joint_p05", "joint_p95"]
    out = out.merge(spread.reset_index(), on=keys, how="left")
    for column in ("joint_p05", "joint_p95"):
        out[column] = np.where(out["seeds"] > 1, out[column].to_numpy(dtype=float, na_value=np.nan), np.nan)
    return out


def set_layer_table(summary: pd.DataFrame) -> pd.DataFrame:
    """Per (ratio, layer): do the criteria's dropped sets cost what random sets of the same size cost?

    From :func:`set_summary`. At a layer where every criterion's joint cost lies inside the random sets'
    5-95 % band, the criteria are interchangeable with random pruning there — the paper's reading of
    early-layer redundancy (arXiv 2606.10703, Sec. 5) — measured here on the removals themselves, token by
    token, rather than through the pruned model's perplexity.

    Returns
    -------
    DataFrame
        ``ratio``, ``layer``, ``criteria`` (how many), ``joint_min``, ``joint_max`` (the criteria's mean
        joint cost, nats), ``random_p05``, ``random_p95`` (the random seeds' band; NaN without ``random``),
        ``inside_random`` (criteria whose joint cost lies in the band), ``excess`` (the criteria's mean of
        mean_joint - mean_sum, nats) and ``random_excess``.
    """
    rows = []
    for (ratio, layer), at in summary.groupby(["ratio", "layer"], sort=True):
        criteria = at[at["criterion"] != "random"]
        random = at[at["criterion"] == "random"]
        low = float(random["joint_p05"].iloc[0]) if len(random) else np.nan
        high = float(random["joint_p95"].iloc[0]) if len(random) else np.nan
        inside = int(((criteria["mean_joint"] >= low) & (criteria["mean_joint"] <= high)).sum()) \
            if np.isfinite(low) and np.isfinite(high) else 0
        rows.append(dict(ratio=float(ratio), layer=int(layer), criteria=len(criteria),
                         joint_min=float(criteria["mean_joint"].min()) if len(criteria) else np.nan,
                         joint_max=float(criteria["mean_joint"].max()) if len(criteria) else np.nan,
                         random_p05=low, random_p95=high, inside_random=inside,
                         excess=float(criteria["excess"].mean()) if len(criteria) else np.nan,
                         random_excess=float(random["excess"].iloc[0]) if len(random) else np.nan))
    return pd.DataFrame(rows)


def shapley_tests(shapley: pd.DataFrame, expert_metrics: pd.DataFrame, settings, *,
                  documents: pd.Series | None = None) -> pd.DataFrame:
    """Does an observational metric predict Shapley values better than single-expert effects?

    The paired and expert-level designs of :func:`moeaudit.audit.audit` run twice on the same tokens: with
    the single-expert effect v({e}) as the outcome and with the Shapley value φ_e. Each run corrects its
    own cells as one family per design (the Shapley tests are a family of their own, apart from the main
    audit's ``tests.parquet``).

    Parameters
    ----------
    shapley : DataFrame
        The ``shapley`` table.
    expert_metrics : DataFrame
    settings : moeaudit.audit.AuditSettings
        The run's audit settings; ``designs``, ``n`` and ``mixed`` are replaced (paired and expert_level, every
        token, no mixed model: the cluster-robust tests stay, the mixed-model cross-check is the main audit's).
    documents : pandas.Series, optional
        Each window's document (clusters of the paired design), as for :func:`moeaudit.audit.audit`.

    Returns
    -------
    DataFrame
        The ``tests`` columns of :func:`moeaudit.audit.audit` plus ``outcome`` (``single`` or ``shapley``).
    """
    from moeaudit.audit import audit

    chosen = dataclasses.replace(settings, designs=("paired", "expert_level"), n=None, mixed="none")
    parts = []
    for outcome, column in (("single", "delta_nll_single"), ("shapley", "shapley")):
        effects = shapley[["layer", "seq", "pos", "expert", "raw_gate"]].assign(delta_nll=shapley[column])
        tests = audit(effects, expert_metrics, chosen, documents=documents).tests
        if not tests.empty:
            parts.append(tests.assign(outcome=outcome))
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()
