"""The audit's designs and :func:`audit`: does an observational metric predict the causal effect of
removing an expert?

Each design of :data:`moeaudit.options.DESIGNS` is a function of one layer's :class:`LayerInputs`
registered with :func:`register_design`; :func:`audit` runs the chosen ones over every layer (and
metric) and corrects each design's cells as one family. The designs are described in
:mod:`moeaudit.audit`.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import pandas as pd

from moeaudit.errors import invalid
from moeaudit.options import (
    CLUSTER_BY,
    CORRECTIONS,
    DESIGNS,
    MIXED_MODELS,
    CIMethod,
    ClusterBy,
    Correction,
    Design,
    MixedModel,
    one_of,
)
from moeaudit.stats import (
    expert_level_spearman,
    min_detectable_dz,
    mixed_effects_mean,
    paired_contrast,
    tost_paired,
    verdicts_for_family,
    within_token_spearman_frame,
)

logger = logging.getLogger(__name__)

#: The paper's four metrics, in moeaudit's single definitions (arXiv 2606.10703).
PAPER_METRICS: tuple[str, ...] = ("frequency", "ean_mean", "mean_gate_active", "act_std")
TOKEN = ["seq", "pos"]
#: The column of a layer's sample that holds each token's cluster (document or window) when tests cluster.
CLUSTER = "cluster"


@dataclass(frozen=True)
class AuditSettings:
    """Settings of :func:`audit`; defaults follow the paper (arXiv 2606.10703) where it has one.

    Attributes
    ----------
    metrics : sequence of str or None
        Metric columns of ``expert_metrics`` to test (None: every numeric metric column).
    designs : sequence of Design
    n : int or None
        Token positions sampled per cell (paper: 200); None = census (every eligible token).
    seed : int
        Sampling seed (paper: 42).
    correction : {"bonferroni", "holm", "bh"}
        Family-wise correction over metrics × layers within a design (paper: Bonferroni).
    alpha : float
    ci : {"analytic", "bca"}
        CI of d_z: the paper's analytic normal interval, or a seeded BCa bootstrap.
    equivalence_bound : float
        |d_z| bound of the TOST equivalence test.
    n_permutations : int
        Permutations of the expert-level Spearman test.
    cluster : {"auto", "document", "window", "none"}
        Unit of replication of the token-level designs (paired, routing_weight, random_pair, within_token):
        tokens of one document are correlated, so their tests treat documents as independent, not tokens
        (:func:`moeaudit.stats.paired_contrast` with ``cluster``). ``"auto"``: by document (by window when
        :func:`audit` gets no ``documents``) in every cell where some document holds more than one of the
        cell's tokens, so a census is always clustered and a sample of one token per document never is;
        ``"none"``: tokens are independent (the paper's analysis, arXiv 2606.10703 Sec. 3.3).
    dz_ddof : {0, 1}
        ddof of the sd in d_z (1; 0 replays the paper's released scripts, :func:`paired_contrast`).
    mixed : {"document", "document+pair", "none"}
        The mixed-effects view of each clustered paired cell (:func:`moeaudit.stats.mixed_effects_mean`):
        random document intercepts, plus the (high, low) expert pair as a crossed variance component
        (seconds per cell), or none.
    """

    metrics: Sequence[str] | None = None
    designs: Sequence[Design] = DESIGNS
    n: int | None = 200
    seed: int = 42
    correction: Correction = "bonferroni"
    alpha: float = 0.05
    ci: CIMethod = "analytic"
    equivalence_bound: float = 0.2
    n_permutations: int = 9999
    cluster: ClusterBy = "auto"
    mixed: MixedModel = "document"
    dz_ddof: int = 1

    def __post_init__(self) -> None:
        bad = [d for d in self.designs if d not in DESIGNS]
        if bad:
            raise invalid("designs", "a subset of " + ", ".join(DESIGNS), bad[0])
        if self.n is not None and self.n < 3:
            raise invalid("n", "an integer >= 3 or None (census)", self.n)
        if not 0 < self.alpha < 1:
            raise invalid("alpha", "in (0, 1)", self.alpha)
        if self.correction not in CORRECTIONS:
            raise invalid("correction", one_of(CORRECTIONS), self.correction)
        if self.cluster not in CLUSTER_BY:
            raise invalid("cluster", one_of(CLUSTER_BY), self.cluster)
        if isinstance(self.dz_ddof, bool) or self.dz_ddof not in (0, 1):
            raise invalid("dz_ddof", "0 or 1", self.dz_ddof)
        if self.mixed not in MIXED_MODELS:
            raise invalid("mixed", one_of(MIXED_MODELS), self.mixed)


@dataclass
class AuditResult:
    """What :func:`audit` returns: the ``tests`` table and its counters (``cells``, ``significant``, ...)."""

    tests: pd.DataFrame
    counters: dict[str, Any] = field(default_factory=dict)

    def _repr_html_(self) -> str:
        from moeaudit.tables import html_summary

        if self.tests.empty:
            return html_summary("audit: no cell could be tested")
        design = "paired" if (self.tests["design"] == "paired").any() else str(self.tests["design"].iloc[0])
        notes = [f"{self.counters.get('significant', 0)} of {self.counters.get('cells', len(self.tests))} cells "
                 f"significant; {design} design below (d_z [95% CI] p_t/p_W, * significant); every design and "
                 "column in .tests", clustering_summary(self.tests)]
        return html_summary("audit: does each metric predict the effect of removing an expert?",
                            paper_table(self.tests, design), notes)


def _metric_columns(expert_metrics: pd.DataFrame, wanted: Sequence[str] | None) -> list[str]:
    numeric = [c for c in expert_metrics.columns if c not in ("layer", "expert")
               and pd.api.types.is_numeric_dtype(expert_metrics[c])]
    if wanted is None:  # `count` ranks experts exactly as `frequency` does: testing both adds a duplicate cell
        return [c for c in numeric if c != "count" and expert_metrics[c].notna().any()]
    missing = [m for m in wanted if m not in numeric]
    if missing:
        raise invalid("metrics", "columns of expert_metrics: " + ", ".join(numeric), missing[0])
    return list(wanted)


def complete_tokens(layer_effects: pd.DataFrame) -> pd.DataFrame:
    """Keep tokens whose whole active set was intervened on (the same k for every kept token)."""
    sizes = layer_effects.groupby(TOKEN)["expert"].transform("size")
    k = int(sizes.max()) if len(sizes) else 0
    return layer_effects[sizes == k]


def _sample_tokens(tokens: pd.DataFrame, n: int | None, rng: np.random.Generator) -> pd.DataFrame:
    if n is None or len(tokens) <= n:
        return tokens
    chosen = np.sort(rng.choice(len(tokens), size=n, replace=False))
    return tokens.iloc[chosen]


def high_low(frame: pd.DataFrame, score: str) -> tuple[pd.DataFrame, int]:
    """Per token, the rows with the highest and lowest ``score`` (ties broken by the lower expert id).

    Tokens whose active experts all share one score (or have NaN scores) cannot be ranked and are dropped;
    their count is returned.
    """
    usable = frame[frame[score].notna()]
    ordered = usable.sort_values(TOKEN + [score, "expert"], ascending=[True, True, True, True])
    grouped = ordered.groupby(TOKEN, sort=True)
    low, high = grouped.first(), grouped.last()
    keep = (grouped[score].max() > grouped[score].min()).to_numpy()
    pairs = pd.DataFrame({
        "high": high["delta_nll"].to_numpy()[keep], "low": low["delta_nll"].to_numpy()[keep],
        "high_expert": high["expert"].to_numpy()[keep], "low_expert": low["expert"].to_numpy()[keep],
    }, index=high.index[keep])
    if CLUSTER in frame.columns:
        pairs[CLUSTER] = high[CLUSTER].to_numpy()[keep]
    dropped = int(frame.groupby(TOKEN).ngroups - keep.sum())
    return pairs, dropped


def _cell_clusters(frame: pd.DataFrame, data: LayerInputs) -> tuple[str, np.ndarray | None]:
    """The cluster kind a cell's tests use and its labels (None: tokens are independent), per ``settings.cluster``."""
    if data.cluster_by == "none" or CLUSTER not in frame.columns:
        return "none", None
    labels = frame[CLUSTER].to_numpy()
    if data.settings.cluster == "auto" and pd.Series(labels).is_unique:
        return "none", None
    return data.cluster_by, labels


def _paired_row(pairs: pd.DataFrame, data: LayerInputs, **key) -> dict[str, Any]:
    settings = data.settings
    cluster_by, labels = _cell_clusters(pairs, data)
    diff = pairs["high"].to_numpy() - pairs["low"].to_numpy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # degenerate cells are reported as NaN rows
        result = paired_contrast(pairs["high"].to_numpy(), pairs["low"].to_numpy(), alpha=0.05, ci=settings.ci,
                                 seed=settings.seed, high_expert=pairs["high_expert"].to_numpy(),
                                 low_expert=pairs["low_expert"].to_numpy(), cluster=labels,
                                 ddof=settings.dz_ddof) if len(pairs) >= 2 else None
        tost = tost_paired(diff, bound_dz=settings.equivalence_bound, alpha=settings.alpha,
                           cluster=labels) if len(pairs) >= 3 else None
        mixed = None
        if labels is not None and settings.mixed != "none" and result is not None and result.n_clusters >= 2:
            component = None
            if settings.mixed == "document+pair":
                component = [f"{a}/{b}" for a, b in zip(pairs["high_expert"], pairs["low_expert"])]
            mixed = mixed_effects_mean(diff, labels, component=component, alpha=0.05)
    if result is None:
        return dict(key, n=len(pairs), effect=np.nan, ci_low=np.nan, ci_high=np.nan, p_t=np.nan,
                    p_wilcoxon=np.nan, tests_used="t+wilcoxon", cluster=cluster_by)
    row = dict(key, n=result.n, effect=result.d_z, ci_low=result.ci_low, ci_high=result.ci_high, p_t=result.p_t,
               p_wilcoxon=result.p_wilcoxon, tests_used="t+wilcoxon", mean_diff=result.mean_diff,
               share_high_gt_low=result.share_high_gt_low, n_distinct_high=result.n_distinct_high,
               n_distinct_low=result.n_distinct_low,
               p_tost=tost.p if tost is not None else np.nan,
               equivalent=bool(tost.equivalent) if tost is not None else False, cluster=cluster_by)
    if labels is not None:
        row.update(n_clusters=result.n_clusters, design_effect=result.design_effect, df_t=result.df_t,
                   mean_diff_ci_low=result.mean_diff_ci_low, mean_diff_ci_high=result.mean_diff_ci_high)
    if mixed is not None:
        row.update(mixed_mean_diff=mixed.estimate, mixed_ci_low=mixed.ci_low, mixed_ci_high=mixed.ci_high,
                   mixed_icc=mixed.icc)
    return row


@dataclass(frozen=True, eq=False)
class LayerInputs:
    """One MoE layer's inputs to the designs; what a design function receives.

    Attributes
    ----------
    layer : int
    effects : DataFrame
        The layer's effects rows of the tokens whose whole active set was intervened on
        (:func:`complete_tokens`).
    sample : DataFrame
        Those rows at the sampled tokens (``settings.n`` of them, or all), joined with the metric columns.
    scores : DataFrame
        The layer's ``expert_metrics`` rows, indexed by expert.
    settings : AuditSettings
    rng : numpy.random.Generator
        The layer's generator (seeded by ``settings.seed`` and the layer), already used to sample tokens.
    untestable : dict
        ``{"layer/metric": tokens}`` the paired design could not rank; written by the design.
    cluster_by : {"document", "window", "none"}
        What the ``cluster`` column of ``sample`` holds (absent when "none"); the designs cluster a cell
        by it as ``settings.cluster`` says.
    metric_samples : dict
        ``{metric: rows}`` when each metric has its own position set (:func:`audit` ``position_sets``): the
        paired design tests a metric on its own rows; ``sample`` is then their union.
    """

    layer: int
    effects: pd.DataFrame
    sample: pd.DataFrame
    scores: pd.DataFrame
    settings: AuditSettings
    rng: np.random.Generator
    untestable: dict[str, int] = field(default_factory=dict)
    cluster_by: str = "none"
    metric_samples: dict[str, pd.DataFrame] = field(default_factory=dict)


def layer_inputs(effects: pd.DataFrame, expert_metrics: pd.DataFrame, metrics: Sequence[str],
                 settings: AuditSettings, untestable: dict[str, int] | None = None,
                 documents: pd.Series | None = None,
                 position_sets: Sequence[Any] | None = None) -> Iterator[LayerInputs]:
    """The :class:`LayerInputs` of every layer of ``effects``, in ascending order (see :func:`audit`)."""
    untestable = {} if untestable is None else untestable
    cluster_by = cluster_kind(settings.cluster, documents)
    sets = None
    if position_sets is not None:
        sets = {metric: pd.DataFrame(np.asarray(part, dtype=np.int64).reshape(-1, 2), columns=TOKEN)
                for metric, part in zip(metrics, position_sets)}
    for layer in sorted(effects["layer"].unique()):
        layer_effects = complete_tokens(effects[effects["layer"] == layer])
        scores = expert_metrics[expert_metrics["layer"] == layer].set_index("expert")
        frame = layer_effects.join(scores[list(metrics)], on="expert")
        tokens = frame[TOKEN].drop_duplicates()
        rng = np.random.default_rng([settings.seed, int(layer)])
        if sets is None:
            sampled = _sample_tokens(tokens, settings.n, rng)
        else:  # the given sets are the samples: their union for the designs that test every metric at once
            sampled = pd.concat(sets.values()).drop_duplicates().sort_values(TOKEN)
        sample = frame.merge(sampled, on=TOKEN)
        if cluster_by == "document":
            sample[CLUSTER] = sample["seq"].map(documents).to_numpy()
        elif cluster_by == "window":
            sample[CLUSTER] = sample["seq"].to_numpy()
        per_metric = {} if sets is None else {metric: sample.merge(part, on=TOKEN) for metric, part in sets.items()}
        yield LayerInputs(int(layer), layer_effects, sample, scores, settings, rng, untestable, cluster_by,
                          per_metric)


def cluster_kind(cluster: str, documents: pd.Series | None) -> str:
    """What the token-level tests cluster by: ``"document"``, ``"window"`` or ``"none"`` (see
    :class:`AuditSettings`); ``cluster="document"`` without ``documents`` is refused."""
    if cluster == "none":
        return "none"
    if cluster == "window":
        return "window"
    if documents is None:
        if cluster == "document":
            raise invalid("cluster", "'auto', 'window' or 'none' when the documents of the windows are unknown "
                          "(pass `documents`)", cluster)
        return "window"
    return "document"


DesignFn = Callable[[LayerInputs, "str | None"], dict[str, Any]]


@dataclass(frozen=True)
class DesignSpec:
    """A registered design: its name, its function and whether it runs once per metric or once per layer.

    Calling the spec runs the design on one layer and returns one row of the ``tests`` table (before the
    family-wise correction).
    """

    name: str
    fn: DesignFn
    per_metric: bool

    def __call__(self, data: LayerInputs, metric: str | None = None) -> dict[str, Any]:
        return self.fn(data, metric)


_REGISTRY: dict[str, DesignSpec] = {}


def register_design(name: str, *, per_metric: bool) -> Callable[[DesignFn], DesignFn]:
    """Register the function of one of the designs of :data:`moeaudit.options.DESIGNS` (a decorator).

    Parameters
    ----------
    name : Design
        The design's name; one of :data:`moeaudit.options.DESIGNS`, each registered once.
    per_metric : bool
        Whether the design tests each metric (``fn(data, metric)``) or the layer once (``fn(data, None)``).

    Returns
    -------
    callable
        A decorator that registers ``fn(data: LayerInputs, metric) -> row`` and returns it.
    """
    if name not in DESIGNS or name in _REGISTRY:
        raise invalid("name", "an unregistered design, " + one_of(DESIGNS), name)

    def _register(fn: DesignFn) -> DesignFn:
        _REGISTRY[name] = DesignSpec(name=name, fn=fn, per_metric=per_metric)
        return fn

    return _register


def list_designs() -> list[str]:
    """Names of the registered designs, in the order of :data:`moeaudit.options.DESIGNS`."""
    return [name for name in DESIGNS if name in _REGISTRY]


def get_design(name: str) -> DesignSpec:
    """The :class:`DesignSpec` registered under ``name``."""
    if name not in _REGISTRY:
        raise invalid("designs", "registered designs, " + one_of(tuple(list_designs())), name)
    return _REGISTRY[name]


@register_design("paired", per_metric=True)
def paired_design(data: LayerInputs, metric: str | None) -> dict[str, Any]:
    """The paper's contrast (arXiv 2606.10703, Sec. 3.3): ΔNLL of the highest- minus the lowest-metric
    active expert per sampled token."""
    pairs, dropped = high_low(data.metric_samples.get(metric, data.sample), metric)
    data.untestable[f"{data.layer}/{metric}"] = dropped
    return _paired_row(pairs, data, layer=data.layer, metric=metric, design="paired")


@register_design("routing_weight", per_metric=False)
def routing_weight_design(data: LayerInputs, metric: str | None = None) -> dict[str, Any]:
    """The paired contrast with high/low chosen by the token's own raw gate (``metric = "token_gate"``)."""
    pairs, _ = high_low(data.sample, "raw_gate")
    return _paired_row(pairs, data, layer=data.layer, metric="token_gate", design="routing_weight")


@register_design("random_pair", per_metric=False)
def random_pair_design(data: LayerInputs, metric: str | None = None) -> dict[str, Any]:
    """The paired contrast of two distinct random active experts per token (``metric = "random"``)."""
    pairs = _random_pairs(data.sample, data.rng)
    return _paired_row(pairs, data, layer=data.layer, metric="random", design="random_pair")


@register_design("within_token", per_metric=True)
def within_token_design(data: LayerInputs, metric: str | None) -> dict[str, Any]:
    """Mean Spearman ρ between the metric and ΔNLL over each token's active experts; t and sign tests."""
    tokens = data.sample.drop_duplicates(TOKEN)
    cluster_by, labels = _cell_clusters(tokens, data)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        r = within_token_spearman_frame(data.sample, metric=metric, effect="delta_nll", token=tuple(TOKEN),
                                        cluster=CLUSTER if labels is not None else None)
    row = dict(layer=data.layer, metric=metric, design="within_token", n=r.n_tokens, effect=r.mean_rho,
               ci_low=r.ci_low, ci_high=r.ci_high, p_t=r.p_t, p_wilcoxon=np.nan, p_sign=r.p_sign,
               tests_used="t+sign", n_skipped=r.n_skipped, cluster=cluster_by)
    if labels is not None:
        row.update(n_clusters=r.n_clusters, design_effect=r.design_effect, df_t=r.df_t)
    return row


@register_design("expert_level", per_metric=True)
def expert_level_design(data: LayerInputs, metric: str | None) -> dict[str, Any]:
    """Spearman ρ across the layer's experts of mean ΔNLL and the metric, with a permutation p."""
    per_expert = data.effects.groupby("expert")["delta_nll"].mean()
    values = data.scores[metric].reindex(per_expert.index)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        r = expert_level_spearman(values.to_numpy(), per_expert.to_numpy(),
                                  n_permutations=data.settings.n_permutations, seed=data.settings.seed)
    return dict(layer=data.layer, metric=metric, design="expert_level", n=r.n, effect=r.rho,
                ci_low=np.nan, ci_high=np.nan, p_t=np.nan, p_wilcoxon=np.nan,
                p_permutation=r.p_permutation, tests_used="permutation", p_asymptotic=r.p_asymptotic,
                cluster="none")  # the units are experts (their tokens averaged), permuted across the layer


def audit(effects: pd.DataFrame, expert_metrics: pd.DataFrame, settings: AuditSettings | None = None, *,
          documents: pd.Series | None = None, position_sets: Sequence[Any] | None = None) -> AuditResult:
    """Run every selected design for every metric × layer; return the ``tests`` table.

    Parameters
    ----------
    effects : DataFrame
        Single-expert interventions of one kind and scope: ``layer``, ``seq``, ``pos``, ``expert``,
        ``delta_nll``, ``raw_gate``.
    expert_metrics : DataFrame
        ``layer``, ``expert`` and one column per metric (population values, ideally from another split).
    settings : AuditSettings
    documents : pandas.Series, optional
        The document id of each window, indexed by ``seq`` (the run's ``windows`` table): the clusters of
        the token-level designs (``settings.cluster``). Without it they cluster by window.
    position_sets : sequence of int arrays [m, 2] of (seq, pos), optional
        One position set per metric, in the order of ``settings.metrics`` (required then): the paired
        design tests metric i on set i, the other designs use their union, and ``settings.n`` is not drawn —
        the released scripts of arXiv 2606.10703 (:func:`moeaudit.data.positions.paper_code_positions`).

    Returns
    -------
    AuditResult
        ``tests``: layer, metric, design, n, effect (d_z for contrast designs, mean ρ or ρ for correlation
        designs), ci_low, ci_high, p_t, p_wilcoxon, p_sign, p_permutation (NaN where a design has no such
        test), tests_used, p_adjusted, verdict, cluster (what the cell's tests treated as independent:
        document, window or none), plus design-specific columns: for clustered cells ``n_clusters``,
        ``design_effect``, ``df_t`` and, for the contrasts, the cluster-bootstrap interval of the mean
        difference (``mean_diff_ci_low/high``, nats) beside the mixed model's (``mixed_mean_diff``,
        ``mixed_ci_low/high``, ``mixed_icc``). ``mde_dz`` uses the effective sample size ``n / design_effect``.
    """
    settings = settings or AuditSettings()
    metrics = _metric_columns(expert_metrics, settings.metrics)
    if position_sets is not None and (settings.metrics is None or len(position_sets) < len(metrics)):
        raise invalid("position_sets", f"one set per metric of settings.metrics ({len(metrics)})",
                      f"{len(position_sets)} sets" + ("" if settings.metrics else " without settings.metrics"))
    chosen = [get_design(name) for name in list_designs() if name in settings.designs]
    rows: list[dict[str, Any]] = []
    counters: dict[str, Any] = {"untestable_tokens": {}}
    for data in layer_inputs(effects, expert_metrics, metrics, settings, counters["untestable_tokens"], documents,
                             position_sets):
        for metric in metrics:
            rows.extend(spec(data, metric) for spec in chosen if spec.per_metric)
        rows.extend(spec(data, None) for spec in chosen if not spec.per_metric)
    tests = pd.DataFrame(rows)
    if tests.empty:
        return AuditResult(tests, counters)
    tests = _verdicts(tests, settings)
    paired = tests["tests_used"] == "t+wilcoxon"
    family = tests.groupby("design")["design"].transform("size")
    tests["mde_dz"] = np.nan
    for design in tests.loc[paired, "design"].unique():
        rows_ = paired & (tests["design"] == design)
        corrected_alpha = settings.alpha / family[rows_].iloc[0] if settings.correction == "bonferroni" else settings.alpha
        deff = tests.loc[rows_, "design_effect"].fillna(1.0) if "design_effect" in tests.columns else 1.0
        effective = tests.loc[rows_, "n"] / deff  # the effective sample size of a clustered cell
        tests.loc[rows_, "mde_dz"] = [min_detectable_dz(int(n), alpha=corrected_alpha) if n >= 3 else np.nan
                                      for n in np.floor(effective.fillna(0)).astype(int)]
    counters["cells"] = len(tests)
    counters["clustered_cells"] = int((tests["cluster"] != "none").sum())
    counters["significant"] = int((tests["verdict"] == "significant").sum())
    return AuditResult(tests, counters)


# The two tests whose corrected p-values must both pass, per design (expert_level has one test).
_DUAL_TESTS = {"t+wilcoxon": ("p_t", "p_wilcoxon"), "t+sign": ("p_t", "p_sign"),
               "permutation": ("p_permutation", "p_permutation")}


def _verdicts(tests: pd.DataFrame, settings: AuditSettings) -> pd.DataFrame:
    """Correct each design's pair of tests over its metrics × layers family; the dual-test verdict."""
    for column in ("p_sign", "p_permutation"):
        if column not in tests.columns:
            tests[column] = np.nan
    first = tests.apply(lambda row: row[_DUAL_TESTS[row.tests_used][0]], axis=1)
    second = tests.apply(lambda row: row[_DUAL_TESTS[row.tests_used][1]], axis=1)
    judged = verdicts_for_family(pd.DataFrame({"design": tests["design"], "p_t": first, "p_wilcoxon": second}),
                                 method=settings.correction, alpha=settings.alpha, by="design")
    out = tests.copy()
    out["p_first_adjusted"] = judged["p_t_adjusted"].to_numpy()
    out["p_second_adjusted"] = judged["p_wilcoxon_adjusted"].to_numpy()
    out["p_adjusted"] = judged["p_adjusted"].to_numpy()
    out["verdict"] = judged["verdict"].to_numpy()
    return out


def _random_pairs(sample: pd.DataFrame, rng: np.random.Generator) -> pd.DataFrame:
    """Two distinct random active experts per token."""
    ordered = sample.sort_values(TOKEN + ["expert"]).reset_index(drop=True)
    starts = ordered.groupby(TOKEN, sort=True).indices
    first, second = [], []
    for index in starts.values():
        a, b = rng.choice(index, size=2, replace=False)
        first.append(a)
        second.append(b)
    a_rows, b_rows = ordered.loc[first], ordered.loc[second]
    pairs = pd.DataFrame({"high": a_rows["delta_nll"].to_numpy(), "low": b_rows["delta_nll"].to_numpy(),
                          "high_expert": a_rows["expert"].to_numpy(), "low_expert": b_rows["expert"].to_numpy()})
    if CLUSTER in sample.columns:
        pairs[CLUSTER] = a_rows[CLUSTER].to_numpy()
    return pairs


def clustering_summary(cells: pd.DataFrame) -> str:
    """One sentence on what the cells' tests treated as independent units ("" when no cell is clustered)."""
    if "cluster" not in cells or not (cells["cluster"] != "none").any():
        return ""
    clustered = cells[cells["cluster"] != "none"]
    kinds = " / ".join(sorted(set(clustered["cluster"])))
    deff = clustered["design_effect"].dropna()
    groups = clustered["n_clusters"].dropna().astype(int)
    span = (str(groups.min()) if groups.min() == groups.max() else f"{groups.min()}-{groups.max()}") if len(groups) \
        else "?"
    return (f"Tokens of one {kinds} are correlated, so {len(clustered)} of {len(cells)} cells treat {span} {kinds}s, "
            f"not tokens, as the independent units (cluster-robust t and signed-rank test of {kinds} means); "
            f"median design effect {deff.median():.2g}" + (f", up to {deff.max():.2g}." if len(deff) else "."))


def paper_table(tests: pd.DataFrame, design: str = "paired", *, compact: bool = False) -> pd.DataFrame:
    """The paper-style table: metric × layer cells "d_z [lo, hi] p_t/p_W" with "*" for significant.

    ``compact`` keeps only "d_z*" (for terminals); the full cell is what papers print.
    """
    cells = tests[tests["design"] == design]

    def cell(row) -> str:
        if not np.isfinite(row.effect):
            return "untestable"
        mark = "*" if row.verdict == "significant" else ""
        if compact:
            return f"{row.effect:+.2f}{mark}"
        return (f"{row.effect:+.3f} [{row.ci_low:+.2f}, {row.ci_high:+.2f}] "
                f"{row.p_t:.2g}/{row.p_wilcoxon:.2g}{mark}")

    table = cells.assign(cell=cells.apply(cell, axis=1)).pivot(index="metric", columns="layer", values="cell")
    table.columns = [f"layer {c}" for c in table.columns]
    return table.reset_index()
