"""Rank correlations between a metric and causal effects: within each token's active set, and across experts.

The paper compares only the top- and bottom-ranked expert of each active set; the within-token rank
correlation uses every active expert, and the expert-level test asks the population question directly
(does the metric rank experts by their mean effect?).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats as sps

from moeaudit.errors import InvalidParameterError
from moeaudit.options import Alternative  # noqa: F401 (the annotations)
from moeaudit.stats._common import (
    ALTERNATIVES,
    ConfidenceInterval,
    ResultMixin,
    as_1d_float,
    check_choice,
    check_int,
    check_open_unit,
    check_same_length,
    check_seed,
    resolve_seed,
    rng_kwargs,
    warn_degenerate,
)
from moeaudit.stats.cluster import as_cluster_codes, cluster_means, cr2, t_interval, t_test

__all__ = [
    "ExpertLevelSpearmanResult",
    "WithinTokenSpearmanResult",
    "expert_level_spearman",
    "within_token_spearman",
    "within_token_spearman_frame",
]

MIN_ACTIVE = 3
"""Smallest active set with a usable rank correlation (with k = 2, rho is always ±1)."""


# ----------------------------------------------------------------------------------------------------
# Within-token rank correlation
# ----------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class WithinTokenSpearmanResult(ResultMixin):
    """Result of :func:`within_token_spearman` / :func:`within_token_spearman_frame`.

    Attributes
    ----------
    n_tokens : int
        Tokens with a defined rho (the sample the tests use).
    n_skipped : int
        ``n_skipped_small + n_skipped_constant``.
    n_skipped_small : int
        Tokens with fewer than 3 complete (metric, effect) pairs.
    n_skipped_constant : int
        Tokens where the metric or the effect is constant over the active set (rho undefined).
    mean_rho, median_rho, sd_rho : float
        Mean, median and standard deviation (``ddof=1``) of the per-token Spearman rhos.
    ci_low, ci_high : float
        Student-t confidence interval for the mean rho at ``confidence_level``.
    confidence_level : float
        ``1 - alpha``.
    alternative : {"two-sided", "greater", "less"}
        Alternative of both tests and of the interval.
    t_statistic, p_t : float
        One-sample t-test of the rhos against 0 (:func:`scipy.stats.ttest_1samp`).
    n_positive, n_negative : int
        Tokens with rho > 0 and rho < 0 (rho = 0 counts for neither).
    p_sign : float
        Exact binomial sign test of ``n_positive`` out of ``n_positive + n_negative`` against 1/2
        (:func:`scipy.stats.binomtest`); with clusters, of the signs of the cluster-mean rhos.
    n_clusters, design_effect, df_t : int, float, float or None
        With ``cluster`` (:func:`within_token_spearman_frame`): the clusters among the usable tokens, the
        CR2 design effect of the mean rho and the Bell–McCaffrey degrees of freedom of its t; else None.
    """

    n_tokens: int
    n_skipped: int
    n_skipped_small: int
    n_skipped_constant: int
    mean_rho: float
    median_rho: float
    sd_rho: float
    ci_low: float
    ci_high: float
    confidence_level: float
    alternative: str
    t_statistic: float
    p_t: float
    n_positive: int
    n_negative: int
    p_sign: float
    n_clusters: int | None = None
    design_effect: float | None = None
    df_t: float | None = None
    _rhos: np.ndarray | None = dataclasses.field(default=None, repr=False, compare=False)
    _codes: np.ndarray | None = dataclasses.field(default=None, repr=False, compare=False)

    @property
    def rhos(self) -> np.ndarray:
        """The per-token rhos of the usable tokens (a copy), in input order (first appearance for a table)."""
        return np.array([] if self._rhos is None else self._rhos, dtype=float)

    def confidence_interval(self, confidence_level: float = 0.95) -> ConfidenceInterval:
        """Student-t interval for the mean rho at another level (same alternative); NaN if undefined."""
        level = check_open_unit("confidence_level", confidence_level)
        if self._rhos is None or not math.isfinite(self.p_t):
            return ConfidenceInterval(math.nan, math.nan)
        if self._codes is not None:
            fit = cr2(self._rhos, self._codes)
            return t_interval(fit.mean, math.sqrt(fit.variance), fit.df, level, self.alternative)
        ci = sps.ttest_1samp(self._rhos, 0.0, alternative=self.alternative).confidence_interval(level)
        return ConfidenceInterval(float(ci.low), float(ci.high))


def within_token_spearman(
    groups: Iterable[tuple[Any, Any]],
    *,
    alpha: float = 0.05,
    alternative: Alternative = "two-sided",
) -> WithinTokenSpearmanResult:
    r"""Does the metric order a token's active experts by their effect? Spearman rho per token, then tests.

    Parameters
    ----------
    groups : iterable of (metric_values, effects) pairs
        One pair per token: ``metric_values`` (shape (k,)) is the metric's population value of each expert
        in the token's active set, ``effects`` (shape (k,)) the effect of ablating that expert at the
        token (e.g. ΔNLL). NaN pairs inside a token are dropped before counting k.
    alpha : float, default 0.05
        The interval has level ``1 - alpha``.
    alternative : {"two-sided", "greater", "less"}, default "two-sided"
        ``"greater"``: rho > 0, i.e. the metric's higher-ranked experts matter more.

    Returns
    -------
    WithinTokenSpearmanResult
        Fields ``n_tokens``, ``n_skipped``, ``n_skipped_small``, ``n_skipped_constant``, ``mean_rho``,
        ``median_rho``, ``sd_rho``, ``ci_low``, ``ci_high``, ``confidence_level``, ``alternative``,
        ``t_statistic``, ``p_t``, ``n_positive``, ``n_negative``, ``p_sign``; property ``rhos``; method
        ``confidence_interval(confidence_level)``.

    Warns
    -----
    DegenerateInputWarning
        When fewer than 2 tokens are usable, the rhos have zero variance, or no rho is non-zero; the
        undefined fields are NaN.

    Notes
    -----
    For token t with active set of size :math:`k_t \ge 3`, :math:`\rho_t` is Spearman's rank correlation
    (Pearson correlation of average ranks, as :func:`scipy.stats.spearmanr`; computed here in batches of
    equal k). Tokens with :math:`k_t < 3` are skipped (with k = 2, rho is ±1 whatever the data), and so are
    tokens where either variable is constant (rho undefined). With small k rho is coarse (k = 3: rho ∈
    {±1, ±0.5}), so the sign test is reported next to the t-test:

    .. math::

        \bar\rho \pm t_{1-\alpha/2,\,T-1}\, s_\rho/\sqrt{T}, \qquad
        p_\text{sign} = \text{binomtest}(\#\{\rho_t>0\},\ \#\{\rho_t\ne 0\},\ 1/2).

    Tokens are treated as independent; positions within one window are not, strictly, so treat the
    p-values of a census as optimistic and prefer sampling positions apart.

    References
    ----------
    .. [1] arXiv:2606.10703 (2026) compares only the top and bottom of each active set; this statistic
       uses all of it (one of the extensions listed in its discussion).

    Examples
    --------
    >>> import numpy as np
    >>> from moeaudit.stats import within_token_spearman
    >>> rng = np.random.default_rng(0)
    >>> groups = []
    >>> for _ in range(100):
    ...     metric = rng.normal(size=8)
    ...     groups.append((metric, 0.5 * metric + rng.normal(size=8)))
    >>> res = within_token_spearman(groups)
    >>> res.n_tokens, res.mean_rho > 0, res.p_t < 0.05, res.p_sign < 0.05
    (100, True, True, True)
    """
    blocks, n_small, n_seen = _validate_within_token_spearman(groups, alpha, alternative)
    return _summarise_rhos(blocks, n_small, n_seen, alpha, alternative)


def _validate_within_token_spearman(
    groups: Any, alpha: Any, alternative: Any
) -> tuple[dict[int, list[tuple[np.ndarray, np.ndarray, np.ndarray]]], int, int]:
    check_open_unit("alpha", alpha)
    check_choice("alternative", alternative, ALTERNATIVES)
    if isinstance(groups, (str, bytes, pd.DataFrame)) or not isinstance(groups, Iterable):
        raise InvalidParameterError(
            "`groups` must be an iterable of (metric_values, effects) pairs (use within_token_spearman_frame "
            f"for a table); got {type(groups).__name__}."
        )
    blocks: dict[int, list[tuple[np.ndarray, np.ndarray, np.ndarray]]] = {}
    n_small = 0
    n_seen = 0
    for i, item in enumerate(groups):
        try:
            metric_values, effects = item
        except (TypeError, ValueError):
            raise InvalidParameterError(
                f"`groups` must yield (metric_values, effects) pairs; got {type(item).__name__} at item {i}."
            ) from None
        m = as_1d_float(f"groups[{i}][0]", metric_values)
        e = as_1d_float(f"groups[{i}][1]", effects)
        check_same_length((f"groups[{i}][0]", f"groups[{i}][1]"), m, e)
        keep = ~(np.isnan(m) | np.isnan(e))
        m, e = m[keep], e[keep]
        n_seen += 1
        if m.size < MIN_ACTIVE:
            n_small += 1
            continue
        blocks.setdefault(int(m.size), []).append((m, e, np.array([i])))
    return blocks, n_small, n_seen


def within_token_spearman_frame(
    frame: pd.DataFrame,
    *,
    metric: str,
    effect: str = "delta_nll",
    token: str | Sequence[str] = ("seq", "pos"),
    alpha: float = 0.05,
    alternative: Alternative = "two-sided",
    cluster: str | None = None,
) -> WithinTokenSpearmanResult:
    """:func:`within_token_spearman` on a long table: one row per (token, active expert).

    Parameters
    ----------
    frame : pandas.DataFrame
        E.g. ``effects.parquet`` for one layer and one intervention kind, joined with the metric column of
        ``expert_metrics.parquet`` on ``(layer, expert)``.
    metric : str
        Column holding the metric's population value of the row's expert.
    effect : str, default "delta_nll"
        Column holding the effect of ablating the row's expert at the row's token.
    token : str or sequence of str, default ("seq", "pos")
        Column(s) identifying a token; rows sharing them form one active set.
    alpha, alternative
        As in :func:`within_token_spearman`.
    cluster : str, optional
        Column holding each token's cluster (its document or window; constant within a token). The mean rho
        is then tested with the cluster-robust t of :func:`moeaudit.stats.cluster_robust_mean` (its CI too)
        and the sign test counts the signs of the cluster-mean rhos, since the rhos of one document's tokens
        are correlated. None (default): tokens are independent.

    Returns
    -------
    WithinTokenSpearmanResult
        As :func:`within_token_spearman`; rows with NaN in ``metric`` or ``effect`` are dropped first.

    Notes
    -----
    Same statistic as :func:`within_token_spearman`, computed without a Python loop over tokens (a census
    has millions), so the per-token rhos come out grouped by active-set size rather than in table order.

    Examples
    --------
    >>> import pandas as pd
    >>> from moeaudit.stats import within_token_spearman_frame
    >>> frame = pd.DataFrame({"seq": 0, "pos": [0, 0, 0, 1, 1, 1], "expert": [1, 2, 3, 1, 2, 4],
    ...                       "freq": [0.3, 0.2, 0.1, 0.3, 0.2, 0.05],
    ...                       "delta_nll": [0.3, 0.2, 0.1, 0.1, 0.3, 0.2]})
    >>> res = within_token_spearman_frame(frame, metric="freq")
    >>> res.n_tokens, res.rhos.tolist()
    (2, [1.0, -0.5])
    """
    blocks, n_small, n_seen, codes = _validate_within_token_spearman_frame(frame, metric, effect, token, alpha,
                                                                         alternative, cluster)
    return _summarise_rhos(blocks, n_small, n_seen, alpha, alternative, codes)


def _validate_within_token_spearman_frame(
    frame: Any, metric: Any, effect: Any, token: Any, alpha: Any, alternative: Any, cluster: Any
) -> tuple[dict[int, list[tuple[np.ndarray, np.ndarray, np.ndarray]]], int, int, np.ndarray | None]:
    check_open_unit("alpha", alpha)
    check_choice("alternative", alternative, ALTERNATIVES)
    if not isinstance(frame, pd.DataFrame):
        raise InvalidParameterError(f"`frame` must be a pandas DataFrame; got {type(frame).__name__}.")
    token_cols = [token] if isinstance(token, str) else list(token)
    named = (("metric", [metric]), ("effect", [effect]), ("token", token_cols))
    for name, cols in named + ((("cluster", [cluster]),) if cluster is not None else ()):
        absent = [c for c in cols if c not in frame.columns]
        if absent or not cols:
            raise InvalidParameterError(f"`{name}` must name columns of `frame`; got {absent or cols!r}.")
    m_all = as_1d_float(f"frame[{metric!r}]", frame[metric].to_numpy(dtype=float))
    e_all = as_1d_float(f"frame[{effect!r}]", frame[effect].to_numpy(dtype=float))
    grouped = frame.groupby(token_cols, sort=False, dropna=False)
    token_id = grouped.ngroup().to_numpy()
    n_seen = int(token_id.max()) + 1 if token_id.size else 0
    codes = None
    if cluster is not None:
        if (grouped[cluster].nunique(dropna=False) > 1).any():
            raise InvalidParameterError(f"`cluster` must name a column constant within each token; {cluster!r} "
                                        "varies inside a token.")
        codes = as_cluster_codes("cluster", grouped[cluster].first().to_numpy(), n_seen)
    keep = ~(np.isnan(m_all) | np.isnan(e_all))
    token_id, m_all, e_all = token_id[keep], m_all[keep], e_all[keep]
    order = np.argsort(token_id, kind="stable")
    token_id, m_all, e_all = token_id[order], m_all[order], e_all[order]
    sizes = np.bincount(token_id, minlength=n_seen)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]) if n_seen else np.zeros(0, dtype=int)
    blocks: dict[int, list[tuple[np.ndarray, np.ndarray, np.ndarray]]] = {}
    for k in np.unique(sizes[sizes >= MIN_ACTIVE]):
        tokens_k = np.flatnonzero(sizes == k)
        rows = starts[tokens_k][:, None] + np.arange(k)[None, :]
        blocks[int(k)] = [(m_all[rows], e_all[rows], tokens_k)]
    n_small = int(np.sum(sizes < MIN_ACTIVE))
    return blocks, n_small, n_seen, codes


def _rowwise_spearman(m: np.ndarray, e: np.ndarray) -> np.ndarray:
    """Spearman rho of each row pair of two (g, k) arrays; NaN where a row is constant."""
    rm = sps.rankdata(m, axis=1)
    re = sps.rankdata(e, axis=1)
    rm -= rm.mean(axis=1, keepdims=True)
    re -= re.mean(axis=1, keepdims=True)
    den = np.sqrt(np.sum(rm * rm, axis=1) * np.sum(re * re, axis=1))
    with np.errstate(divide="ignore", invalid="ignore"):
        rho = np.sum(rm * re, axis=1) / den
    rho[den == 0] = np.nan
    return np.clip(rho, -1.0, 1.0)


def _summarise_rhos(
    blocks: dict[int, list[tuple[np.ndarray, np.ndarray, np.ndarray]]],
    n_small: int,
    n_seen: int,
    alpha: float,
    alternative: str,
    codes: np.ndarray | None = None,
) -> WithinTokenSpearmanResult:
    by_token = np.full(n_seen, np.nan)  # too-small tokens stay NaN, as do constant ones
    n_rated = 0
    for parts in blocks.values():
        m = np.concatenate([np.atleast_2d(part[0]) for part in parts])
        e = np.concatenate([np.atleast_2d(part[1]) for part in parts])
        idx = np.concatenate([part[2] for part in parts])
        by_token[idx] = _rowwise_spearman(m, e)
        n_rated += idx.size
    rated = ~np.isnan(by_token)
    rhos = by_token[rated]
    if codes is not None:
        codes = pd.factorize(codes[rated], sort=False)[0]
    n_constant = int(n_rated - rhos.size)
    n = int(rhos.size)
    level = 1.0 - alpha
    nan = math.nan
    n_pos, n_neg = int(np.sum(rhos > 0)), int(np.sum(rhos < 0))
    mean_rho = float(rhos.mean()) if n else nan
    median_rho = float(np.median(rhos)) if n else nan
    sd_rho = float(rhos.std(ddof=1)) if n >= 2 else nan
    ci_low = ci_high = t_stat = p_t = p_sign = nan

    fit = cr2(rhos, codes) if codes is not None else None
    clustered: dict[str, Any] = {}
    if fit is not None:
        clustered = dict(n_clusters=fit.n_clusters, design_effect=fit.design_effect, df_t=fit.df)
    problems = []
    if n < 2:
        problems.append(f"{n} usable tokens (need at least 2; {n_small} too small, {n_constant} constant)")
    elif fit is not None and fit.n_clusters < 2:
        problems.append(f"{fit.n_clusters} cluster(s) (need at least 2 for clustered inference)")
    elif sd_rho == 0.0:
        problems.append("every token has the same rho (p_t and the CI are NaN)")
    elif fit is None:
        t_res = sps.ttest_1samp(rhos, 0.0, alternative=alternative)
        t_stat, p_t = float(t_res.statistic), float(t_res.pvalue)
        ci = t_res.confidence_interval(level)
        ci_low, ci_high = float(ci.low), float(ci.high)
    else:
        se = math.sqrt(fit.variance)
        t_stat, p_t = t_test(fit.mean, se, fit.df, 0.0, alternative)
        interval = t_interval(fit.mean, se, fit.df, level, alternative)
        ci_low, ci_high = interval.low, interval.high
    signs = rhos if fit is None else (cluster_means(rhos, codes) if n else rhos)
    n_pos_s, n_neg_s = int(np.sum(signs > 0)), int(np.sum(signs < 0))
    if n_pos_s + n_neg_s == 0:
        problems.append("no token has a non-zero rho (p_sign is NaN)")
    else:
        p_sign = float(sps.binomtest(n_pos_s, n_pos_s + n_neg_s, 0.5, alternative=alternative).pvalue)
    if problems:
        warn_degenerate("within_token_spearman: " + "; ".join(problems) + ".", 4)
    assert n + n_small + n_constant == n_seen
    return WithinTokenSpearmanResult(
        n_tokens=n,
        n_skipped=n_small + n_constant,
        n_skipped_small=n_small,
        n_skipped_constant=n_constant,
        mean_rho=mean_rho,
        median_rho=median_rho,
        sd_rho=sd_rho,
        ci_low=ci_low,
        ci_high=ci_high,
        confidence_level=level,
        alternative=alternative,
        t_statistic=t_stat,
        p_t=p_t,
        n_positive=n_pos,
        n_negative=n_neg,
        p_sign=p_sign,
        **clustered,
        _rhos=rhos,
        _codes=codes,
    )


# ----------------------------------------------------------------------------------------------------
# Expert-level rank correlation
# ----------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ExpertLevelSpearmanResult(ResultMixin):
    """Result of :func:`expert_level_spearman`.

    Attributes
    ----------
    n : int
        Experts with both values present.
    n_dropped : int
        Experts dropped because the metric or the effect was NaN.
    rho : float
        Spearman's rank correlation (:func:`scipy.stats.spearmanr`).
    p_permutation : float
        Permutation-test p-value (:func:`scipy.stats.permutation_test`, ``permutation_type="pairings"``);
        exact when n! <= ``n_permutations``.
    p_asymptotic : float
        scipy's large-sample p-value (t approximation), for comparison only at the usual 16-128 experts.
    n_permutations : int
        Random permutations requested.
    alternative : {"two-sided", "greater", "less"}
    """

    n: int
    n_dropped: int
    rho: float
    p_permutation: float
    p_asymptotic: float
    n_permutations: int
    alternative: str


def expert_level_spearman(
    metric: Any,
    effect: Any,
    *,
    n_permutations: int = 9999,
    seed: int | None = 0,
    alternative: Alternative = "two-sided",
) -> ExpertLevelSpearmanResult:
    r"""Do experts with a higher metric have a larger mean causal effect? Spearman rho with a permutation test.

    Parameters
    ----------
    metric : array_like, shape (n_experts,)
        The metric per expert of one layer (a column of ``expert_metrics``).
    effect : array_like, shape (n_experts,)
        The expert's causal importance, e.g. mean ΔNLL over the tokens where it was ablated. NaN (an expert
        never ablated) drops the pair; drops are counted.
    n_permutations : int, default 9999
        Random re-pairings for the permutation test (at least 1).
    seed : int or None, default 0
        Seed of the permutations.
    alternative : {"two-sided", "greater", "less"}, default "two-sided"

    Returns
    -------
    ExpertLevelSpearmanResult
        Fields ``n``, ``n_dropped``, ``rho``, ``p_permutation``, ``p_asymptotic``, ``n_permutations``,
        ``alternative``.

    Warns
    -----
    DegenerateInputWarning
        When fewer than 3 pairs remain or either variable is constant; ``rho`` and the p-values are NaN.

    Notes
    -----
    :math:`\rho` is the Pearson correlation of the average ranks. Under the null of no association every
    re-pairing of metric and effect is equally likely, so the permutation p-value is exact up to Monte-Carlo
    error, :math:`p = (1 + \#\{\rho^* \text{ at least as extreme}\}) / (1 + B)` (scipy's convention;
    two-sided: twice the smaller one-sided p, capped at 1). Ranks are computed once and only their pairing
    is permuted, which equals recomputing :func:`scipy.stats.spearmanr` per permutation.

    References
    ----------
    .. [1] arXiv:2606.10703 (2026) tests metrics per token only; the expert-level test is our extension.

    Examples
    --------
    >>> import numpy as np
    >>> from moeaudit.stats import expert_level_spearman
    >>> rng = np.random.default_rng(1)
    >>> freq = rng.dirichlet(np.ones(64))
    >>> mean_delta_nll = 0.5 * freq + rng.normal(0, 0.01, size=64)
    >>> res = expert_level_spearman(freq, mean_delta_nll, n_permutations=999)
    >>> res.n, res.rho > 0, res.p_permutation < 0.05
    (64, True, True)
    """
    x, y, seed = _validate_expert_level_spearman(metric, effect, n_permutations, seed, alternative)
    keep = ~(np.isnan(x) | np.isnan(y))
    x, y = x[keep], y[keep]
    n, n_dropped = int(x.size), int(keep.size - x.size)
    rho = p_perm = p_asym = math.nan
    if n < MIN_ACTIVE:
        warn_degenerate(f"expert_level_spearman: n = {n} complete pairs (need at least {MIN_ACTIVE}).")
    elif np.ptp(x) == 0 or np.ptp(y) == 0:
        which = "metric" if np.ptp(x) == 0 else "effect"
        warn_degenerate(f"expert_level_spearman: `{which}` is constant, so rho is undefined.")
    else:
        res = sps.spearmanr(x, y, alternative=alternative)
        rho, p_asym = float(res.statistic), float(res.pvalue)
        rx = sps.rankdata(x)
        ry = sps.rankdata(y)
        ry_c = (ry - ry.mean()) / np.sqrt(np.sum((ry - ry.mean()) ** 2))

        def statistic(rx_perm: np.ndarray, axis: int = -1) -> np.ndarray:
            centred = rx_perm - rx_perm.mean(axis=axis, keepdims=True)
            norm = np.sqrt(np.sum(centred * centred, axis=axis))
            return np.sum(centred * ry_c, axis=axis) / norm

        perm = sps.permutation_test(
            (rx,),
            statistic,
            permutation_type="pairings",
            vectorized=True,
            n_resamples=n_permutations,
            alternative=alternative,
            **rng_kwargs(sps.permutation_test, seed),
        )
        p_perm = float(perm.pvalue)
    return ExpertLevelSpearmanResult(
        n=n,
        n_dropped=n_dropped,
        rho=rho,
        p_permutation=p_perm,
        p_asymptotic=p_asym,
        n_permutations=n_permutations,
        alternative=alternative,
    )


def _validate_expert_level_spearman(
    metric: Any, effect: Any, n_permutations: Any, seed: Any, alternative: Any
) -> tuple[np.ndarray, np.ndarray, int]:
    x = as_1d_float("metric", metric)
    y = as_1d_float("effect", effect)
    check_same_length(("metric", "effect"), x, y)
    check_int("n_permutations", n_permutations, 1)
    seed = resolve_seed(check_seed("seed", seed))
    check_choice("alternative", alternative, ALTERNATIVES)
    return x, y, seed
