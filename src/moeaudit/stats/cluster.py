"""Cluster-robust inference for a census: tokens of one document are not independent draws.

A census measures every token, and tokens of one document share its topic, style and routing, so their
effects are correlated. Treating them as independent makes a plain t-test anti-conservative (its
standard error ignores the design effect). The functions here answer with the document (or window) as the
unit of replication:

- :func:`cluster_robust_mean` — the mean with its CR2 standard error and Bell–McCaffrey degrees of freedom
  (the cluster-robust t), the design effect and the number of clusters;
- :func:`cluster_bootstrap_ci` — a bootstrap that resamples whole clusters (percentile or BCa);
- :func:`mixed_effects_mean` — the mean as the intercept of a linear mixed model with random intercepts for
  the clusters (and optionally a crossed variance component, e.g. the audit's (high, low) expert pair),
  fitted with statsmodels' ``MixedLM``.

With one observation per cluster every one of them reduces to its independent-data counterpart: the CR2
variance to :math:`s^2/n`, its degrees of freedom to :math:`n-1`, the cluster bootstrap to the ordinary
bootstrap (same resampled indices for the same seed).
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Any, Literal

import numpy as np
import pandas as pd
from scipy import stats as sps

from moeaudit.errors import InvalidParameterError
from moeaudit.options import Alternative
from moeaudit.stats._common import (
    ALTERNATIVES,
    ConfidenceInterval,
    ResultMixin,
    as_1d_float,
    check_choice,
    check_finite,
    check_int,
    check_open_unit,
    check_seed,
    resolve_seed,
    rng_kwargs,
    warn_degenerate,
)

__all__ = [
    "ClusterMeanResult",
    "MixedMeanResult",
    "cluster_bootstrap_ci",
    "cluster_robust_mean",
    "mixed_effects_mean",
]

BootStatistic = Literal["mean", "d_z"]
BootMethod = Literal["percentile", "bca"]
_BOOT_STATISTICS = ("mean", "d_z")
_BOOT_METHODS = ("percentile", "bca")
_MIN_BOOT = 100


# ----------------------------------------------------------------------------------------------------
# Shared pieces (also used by paired_contrast, tost_paired and within_token_spearman)
# ----------------------------------------------------------------------------------------------------


def as_cluster_codes(name: str, cluster: Any, n: int) -> np.ndarray:
    """Integer codes 0..G-1 of one cluster label per observation (any hashable labels; NaN refused)."""
    labels = pd.Series(np.asarray(cluster, dtype=object) if not isinstance(cluster, pd.Series) else cluster)
    if labels.ndim != 1 or len(labels) != n:
        raise InvalidParameterError(f"`{name}` must hold one label per observation ({n}); got {len(labels)}.")
    if labels.isna().any():
        where = int(np.flatnonzero(labels.isna().to_numpy())[0])
        raise InvalidParameterError(f"`{name}` must not contain missing labels; got one at index {where}.")
    codes, _ = pd.factorize(labels, sort=False)
    return codes.astype(np.int64)


@dataclasses.dataclass(frozen=True)
class _CR2:
    """The CR2 sandwich for the mean of ``values`` clustered by ``codes`` (see :func:`cluster_robust_mean`)."""

    n: int
    n_clusters: int
    mean: float
    variance: float  # CR2 variance of the mean
    df: float  # Bell-McCaffrey degrees of freedom
    design_effect: float  # variance / (s^2 / n)


def cr2(values: np.ndarray, codes: np.ndarray) -> _CR2:
    """CR2 variance and Bell–McCaffrey df of the mean (closed forms of the intercept-only model, Notes of
    :func:`cluster_robust_mean`). ``values`` without NaN; ``codes`` 0..G-1, every code used."""
    n = int(values.size)
    g = int(codes.max()) + 1 if n else 0
    mean = float(values.mean()) if n else math.nan
    nan = math.nan
    if n < 2 or g < 2:
        return _CR2(n, g, mean, nan, nan, nan)
    resid = values - mean
    sizes = np.bincount(codes, minlength=g).astype(float)
    sums = np.bincount(codes, weights=resid, minlength=g)
    share = sizes / n
    inflate = 1.0 / (1.0 - share)  # c_g^2 = (1 - n_g/n)^-1
    variance = float(np.sum(inflate * sums**2)) / n**2
    a = inflate * sizes
    u2 = inflate * sizes**2
    trace = float(np.sum(a) - np.sum(u2) / n)
    trace_sq = float(np.sum(a**2) - 2.0 * np.sum(a * u2) / n + np.sum(u2) ** 2 / n**2)
    df = trace**2 / trace_sq if trace_sq > 0 else nan
    s2 = float(resid @ resid) / (n - 1)
    design_effect = variance / (s2 / n) if s2 > 0 else nan
    return _CR2(n, g, mean, variance, df, design_effect)


def cluster_means(values: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """Mean of ``values`` within each cluster, in code order."""
    g = int(codes.max()) + 1
    return np.bincount(codes, weights=values, minlength=g) / np.bincount(codes, minlength=g)


def t_test(estimate: float, se: float, df: float, popmean: float, alternative: str) -> tuple[float, float]:
    """Statistic and p-value of ``(estimate - popmean) / se`` against Student's t with ``df``."""
    t = (estimate - popmean) / se
    if alternative == "greater":
        return t, float(sps.t.sf(t, df))
    if alternative == "less":
        return t, float(sps.t.cdf(t, df))
    return t, float(2.0 * sps.t.sf(abs(t), df))


def t_interval(estimate: float, se: float, df: float, level: float, alternative: str) -> ConfidenceInterval:
    """Student-t interval ``estimate ± t_df · se`` (one-sided intervals open on the untested side)."""
    if alternative == "two-sided":
        half = float(sps.t.ppf(0.5 + level / 2.0, df)) * se
        return ConfidenceInterval(estimate - half, estimate + half)
    half = float(sps.t.ppf(level, df)) * se
    if alternative == "greater":
        return ConfidenceInterval(estimate - half, math.inf)
    return ConfidenceInterval(-math.inf, estimate + half)


def bootstrap_clusters(values: np.ndarray, codes: np.ndarray, statistic: str, level: float, alternative: str,
                       n_boot: int, seed: int, method: str, ddof: int = 1) -> ConfidenceInterval:
    """Bootstrap interval of the mean or d_z resampling whole clusters (:func:`scipy.stats.bootstrap` on the
    cluster indices; the statistic is computed from per-cluster sums, so a resample costs O(G))."""
    g = int(codes.max()) + 1
    shift = float(values.mean())  # centring keeps the sum-of-squares form of the variance accurate
    centred = values - shift
    count = np.bincount(codes, minlength=g).astype(float)
    s1 = np.bincount(codes, weights=centred, minlength=g)
    s2 = np.bincount(codes, weights=centred**2, minlength=g)

    def stat(index: np.ndarray, axis: int = -1) -> np.ndarray:
        idx = np.asarray(index, dtype=np.int64)
        m = count[idx].sum(axis=axis)
        t1, t2 = s1[idx].sum(axis=axis), s2[idx].sum(axis=axis)
        with np.errstate(divide="ignore", invalid="ignore"):
            mean = t1 / m
            if statistic == "mean":
                return mean + shift
            var = (t2 - m * mean**2) / (m - ddof)
            return (mean + shift) / np.sqrt(var)

    with warnings.catch_warnings():
        warnings.simplefilter("error", sps.DegenerateDataWarning)
        try:
            res = sps.bootstrap((np.arange(g, dtype=float),), stat, n_resamples=n_boot, vectorized=True,
                                confidence_level=level, alternative=alternative,
                                method="BCa" if method == "bca" else "percentile",
                                **rng_kwargs(sps.bootstrap, seed))
        except sps.DegenerateDataWarning as exc:
            warn_degenerate(f"cluster bootstrap: the interval is undefined ({exc}); it is NaN.", 4)
            return ConfidenceInterval(math.nan, math.nan)
    return ConfidenceInterval(float(res.confidence_interval.low), float(res.confidence_interval.high))


# ----------------------------------------------------------------------------------------------------
# cluster_robust_mean
# ----------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ClusterMeanResult(ResultMixin):
    """Result of :func:`cluster_robust_mean`.

    Attributes
    ----------
    n, n_clusters : int
        Observations used (NaN dropped) and distinct clusters among them.
    mean : float
        Sample mean.
    se : float
        CR2 cluster-robust standard error of the mean.
    df : float
        Bell–McCaffrey (Satterthwaite) degrees of freedom of the t reference; at most ``n_clusters - 1``,
        less when cluster sizes are unequal — read ``df + 1`` as the effective number of clusters.
    t_statistic, p : float
        ``(mean - popmean) / se`` and its p-value against Student's t with ``df``.
    ci_low, ci_high : float
        t interval for the mean at ``confidence_level``.
    confidence_level : float
    alternative : str
    design_effect : float
        ``se**2 / (s**2 / n)``: the variance of the mean relative to independent sampling (Kish's deff;
        ``n / design_effect`` is the effective sample size).
    """

    n: int
    n_clusters: int
    mean: float
    se: float
    df: float
    t_statistic: float
    p: float
    ci_low: float
    ci_high: float
    confidence_level: float
    alternative: str
    design_effect: float


def cluster_robust_mean(
    values: Any,
    cluster: Any,
    *,
    popmean: float = 0.0,
    alpha: float = 0.05,
    alternative: Alternative = "two-sided",
) -> ClusterMeanResult:
    r"""Cluster-robust t test and interval for a mean: CR2 standard error, Bell–McCaffrey degrees of freedom.

    Parameters
    ----------
    values : array_like, shape (n,)
        Observations, e.g. per-token differences ΔNLL_high − ΔNLL_low. NaN marks a missing value and is
        dropped together with its label.
    cluster : array_like, shape (n,)
        One label per observation (document id, window id, …); observations sharing a label are allowed to
        be correlated, clusters are independent.
    popmean : float, default 0.0
        Mean under the null hypothesis.
    alpha : float, default 0.05
        The interval has level ``1 - alpha``.
    alternative : {"two-sided", "greater", "less"}, default "two-sided"

    Returns
    -------
    ClusterMeanResult
        ``n``, ``n_clusters``, ``mean``, ``se``, ``df``, ``t_statistic``, ``p``, ``ci_low``, ``ci_high``,
        ``confidence_level``, ``alternative``, ``design_effect``.

    Warns
    -----
    DegenerateInputWarning
        With fewer than two clusters or zero variance; the affected fields are NaN.

    Notes
    -----
    The model is :math:`y_i = \mu + e_i` with clusters :math:`g = 1..G` of sizes :math:`n_g`. With
    residuals :math:`e_i = y_i - \bar y`, cluster sums :math:`S_g = \sum_{i \in g} e_i` and the hat matrix
    :math:`H = J/n`, the CR2 ("bias-reduced linearisation") estimator uses the adjustment
    :math:`A_g = (I - H_{gg})^{-1/2}`; for the intercept-only model :math:`H_{gg} = J_g / n` and it reduces to

    .. math::

        \widehat{V}_\text{CR2}(\bar y) = \frac{1}{n^2} \sum_g \frac{S_g^2}{1 - n_g / n}.

    The Bell–McCaffrey degrees of freedom are :math:`(\sum_j \lambda_j)^2 / \sum_j \lambda_j^2` with
    :math:`\lambda_j` the eigenvalues of :math:`G^\top G`, :math:`G_g = (I - H)_{\cdot g} A_g X_g (X^\top
    X)^{-1}` [2]_ [3]_. Here :math:`G^\top G \propto C(D - \mathbf{n}\mathbf{n}^\top / n)C` with
    :math:`D = \operatorname{diag}(n_g)`, :math:`C = \operatorname{diag}(1 - n_g/n)^{-1/2}`, so with
    :math:`a_g = n_g/(1 - n_g/n)` and :math:`u_g = n_g^2/(1 - n_g/n)`

    .. math::

        \mathrm{df} = \frac{\big(\sum_g a_g - \tfrac1n \sum_g u_g\big)^2}
                           {\sum_g a_g^2 - \tfrac2n \sum_g a_g u_g + \tfrac{1}{n^2}\big(\sum_g u_g\big)^2}.

    With equal cluster sizes this is :math:`G - 1` and the test equals the one-sample t-test on the
    :math:`G` cluster means; with one observation per cluster it is the ordinary one-sample t-test
    (:math:`\widehat V = s^2/n`, df :math:`= n - 1`). The design effect is
    :math:`\widehat V_\text{CR2} / (s^2/n)` with :math:`s^2` the ``ddof=1`` variance [4]_.

    References
    ----------
    .. [1] Engmann, Medeiros Adriano, Giese, arXiv:2606.10703 (2026): per-token effects whose tests assume
       independent tokens (Sec. 3.3).
    .. [2] Bell & McCaffrey, "Bias reduction in standard errors for linear regression with multi-stage
       samples", Survey Methodology 28(2):169-181 (2002).
    .. [3] Imbens & Kolesár, "Robust standard errors in small samples: some practical advice", Review of
       Economics and Statistics 98(4):701-712 (2016), Sec. III.
    .. [4] Kish, *Survey Sampling*, Wiley (1965), the design effect.

    Examples
    --------
    >>> import numpy as np
    >>> from moeaudit.stats import cluster_robust_mean
    >>> rng = np.random.default_rng(0)
    >>> doc = np.repeat(np.arange(30), 20)
    >>> y = rng.normal(size=30)[doc] + rng.normal(size=600)
    >>> res = cluster_robust_mean(y, doc)
    >>> res.n_clusters, round(res.df, 6), res.design_effect > 5
    (30, 29.0, True)
    """
    values_arr, codes, popmean, alpha = _validate_cluster_robust_mean(values, cluster, popmean, alpha, alternative)
    keep = ~np.isnan(values_arr)
    y = values_arr[keep]
    codes = pd.factorize(codes[keep], sort=False)[0] if y.size else codes[:0]
    fit = cr2(y, codes)
    level = 1.0 - alpha
    nan = math.nan
    t_stat = p = ci_low = ci_high = se = nan
    if fit.n_clusters < 2:
        warn_degenerate(f"cluster_robust_mean: {fit.n_clusters} cluster(s) (need at least 2); se, p and the CI "
                        "are NaN.")
    elif not fit.variance > 0:
        warn_degenerate("cluster_robust_mean: the observations have zero variance; se, p and the CI are NaN.")
    else:
        se = math.sqrt(fit.variance)
        t_stat, p = t_test(fit.mean, se, fit.df, popmean, alternative)
        interval = t_interval(fit.mean, se, fit.df, level, alternative)
        ci_low, ci_high = interval.low, interval.high
    return ClusterMeanResult(
        n=fit.n, n_clusters=fit.n_clusters, mean=fit.mean, se=se, df=fit.df if fit.n_clusters >= 2 else nan,
        t_statistic=t_stat, p=p, ci_low=ci_low, ci_high=ci_high, confidence_level=level,
        alternative=alternative, design_effect=fit.design_effect,
    )


def _validate_cluster_robust_mean(
    values: Any, cluster: Any, popmean: Any, alpha: Any, alternative: Any
) -> tuple[np.ndarray, np.ndarray, float, float]:
    arr = as_1d_float("values", values)
    codes = as_cluster_codes("cluster", cluster, arr.size)
    popmean = check_finite("popmean", popmean)
    alpha = check_open_unit("alpha", alpha)
    check_choice("alternative", alternative, ALTERNATIVES)
    return arr, codes, popmean, alpha


# ----------------------------------------------------------------------------------------------------
# cluster_bootstrap_ci
# ----------------------------------------------------------------------------------------------------


def cluster_bootstrap_ci(
    values: Any,
    cluster: Any,
    *,
    statistic: BootStatistic = "mean",
    method: BootMethod = "percentile",
    alpha: float = 0.05,
    n_boot: int = 2000,
    seed: int | None = 0,
    alternative: Alternative = "two-sided",
) -> ConfidenceInterval:
    r"""Bootstrap confidence interval that resamples whole clusters.

    Parameters
    ----------
    values : array_like, shape (n,)
        Observations; NaN entries are dropped with their labels.
    cluster : array_like, shape (n,)
        One label per observation.
    statistic : {"mean", "d_z"}, default "mean"
        The mean, or the standardised mean :math:`\bar y / s` (``ddof=1``; d_z when ``values`` are paired
        differences).
    method : {"percentile", "bca"}, default "percentile"
        Percentile interval, or bias-corrected and accelerated (acceleration from the leave-one-cluster-out
        jackknife).
    alpha, n_boot, seed, alternative
        Level ``1 - alpha``; resamples (at least 100); seed (None draws one); one- or two-sided.

    Returns
    -------
    ConfidenceInterval
        NaN bounds (with a :class:`DegenerateInputWarning`) when fewer than two clusters remain or the
        bootstrap distribution is degenerate.

    Notes
    -----
    Each resample draws :math:`G` clusters with replacement and pools their observations — the cluster
    (block) bootstrap, valid when clusters are independent and :math:`G` is not small [1]_ [2]_. It runs
    :func:`scipy.stats.bootstrap` on the cluster indices, so with one observation per cluster it draws the
    same resamples, for the same seed, as the ordinary bootstrap of the observations.

    References
    ----------
    .. [1] Field & Welsh, "Bootstrapping clustered data", JRSS B 69(3):369-390 (2007).
    .. [2] Cameron, Gelbach & Miller, "Bootstrap-based improvements for inference with clustered errors",
       Review of Economics and Statistics 90(3):414-427 (2008).

    Examples
    --------
    >>> import numpy as np
    >>> from moeaudit.stats import cluster_bootstrap_ci
    >>> doc = np.repeat(np.arange(40), 10)
    >>> y = np.random.default_rng(1).normal(size=40)[doc] + 0.5
    >>> ci = cluster_bootstrap_ci(y, doc)
    >>> bool(ci.low < 0.5 < ci.high)
    True
    """
    arr, codes, level, seed = _validate_cluster_bootstrap_ci(values, cluster, statistic, method, alpha, n_boot, seed,
                                                             alternative)
    keep = ~np.isnan(arr)
    y = arr[keep]
    codes = pd.factorize(codes[keep], sort=False)[0] if y.size else codes[:0]
    if y.size == 0 or int(codes.max()) + 1 < 2:
        warn_degenerate("cluster_bootstrap_ci: fewer than 2 clusters; the interval is NaN.")
        return ConfidenceInterval(math.nan, math.nan)
    return bootstrap_clusters(y, codes, statistic, level, alternative, n_boot, seed, method)


def _validate_cluster_bootstrap_ci(
    values: Any, cluster: Any, statistic: Any, method: Any, alpha: Any, n_boot: Any, seed: Any, alternative: Any
) -> tuple[np.ndarray, np.ndarray, float, int]:
    arr = as_1d_float("values", values)
    codes = as_cluster_codes("cluster", cluster, arr.size)
    check_choice("statistic", statistic, _BOOT_STATISTICS)
    check_choice("method", method, _BOOT_METHODS)
    level = 1.0 - check_open_unit("alpha", alpha)
    check_int("n_boot", n_boot, _MIN_BOOT)
    check_choice("alternative", alternative, ALTERNATIVES)
    return arr, codes, level, resolve_seed(check_seed("seed", seed))


# ----------------------------------------------------------------------------------------------------
# mixed_effects_mean
# ----------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class MixedMeanResult(ResultMixin):
    """Result of :func:`mixed_effects_mean`.

    Attributes
    ----------
    n, n_clusters : int
        Observations and clusters used.
    n_components : int or None
        Distinct levels of the crossed component (None when not given).
    estimate, se : float
        The fixed intercept (the model-based mean) and its standard error.
    ci_low, ci_high : float
        Wald interval at ``confidence_level`` (statsmodels' ``conf_int``).
    p : float
        Wald z-test of intercept = 0.
    confidence_level : float
    var_cluster, var_component, var_residual : float
        REML variance estimates of the cluster intercepts, the crossed component (NaN when not given) and
        the residual.
    icc : float
        ``var_cluster / (var_cluster + var_component + var_residual)`` (the component counts as 0 when
        absent).
    converged : bool
        Whether the optimiser reported convergence (fields are still filled when it did not).
    """

    n: int
    n_clusters: int
    n_components: int | None
    estimate: float
    se: float
    ci_low: float
    ci_high: float
    p: float
    confidence_level: float
    var_cluster: float
    var_component: float
    var_residual: float
    icc: float
    converged: bool


def mixed_effects_mean(
    values: Any,
    cluster: Any,
    *,
    component: Any = None,
    alpha: float = 0.05,
) -> MixedMeanResult:
    r"""The mean as the intercept of a linear mixed model with random cluster intercepts (REML).

    Parameters
    ----------
    values : array_like, shape (n,)
        Observations; NaN entries are dropped with their labels.
    cluster : array_like, shape (n,)
        One label per observation (document id): random intercepts.
    component : array_like, shape (n,), optional
        A second grouping crossed with ``cluster``, fitted as a variance component — in the audit's paired
        design the (high expert, low expert) pair, so that a few experts recurring as "highest" and
        "lowest" across documents are not counted as independent evidence.
    alpha : float, default 0.05
        The interval has level ``1 - alpha``.

    Returns
    -------
    MixedMeanResult
        NaN fields (with a :class:`DegenerateInputWarning`) when fewer than two clusters or the fit fails.

    Notes
    -----
    Without ``component``: :math:`y_{gi} = \mu + u_g + \varepsilon_{gi}`,
    :math:`u_g \sim N(0, \sigma_u^2)`, fitted by ``statsmodels.regression.mixed_linear_model.MixedLM`` with
    ``groups = cluster``. With ``component`` (:math:`c(i)`): :math:`y_i = \mu + u_{g(i)} + v_{c(i)} +
    \varepsilon_i`, crossed effects fitted the way statsmodels documents them — one group holding all
    observations and both groupings as variance components (``vc_formula``); this costs
    :math:`O(n q^2)` per likelihood evaluation with :math:`q` the number of levels, so it is slower (seconds
    at n = 2,000). The interval is the Wald interval of the intercept; it is model-based (exchangeable
    normal effects), where :func:`cluster_robust_mean` is design-based — reporting both shows how much the
    conclusion rests on the model.

    References
    ----------
    .. [1] Laird & Ware, "Random-effects models for longitudinal data", Biometrics 38(4):963-974 (1982).
    .. [2] Baayen, Davidson & Bates, "Mixed-effects modeling with crossed random effects for subjects and
       items", J. Memory and Language 59(4):390-412 (2008).

    Examples
    --------
    >>> import numpy as np
    >>> from moeaudit.stats import mixed_effects_mean
    >>> rng = np.random.default_rng(0)
    >>> doc = np.repeat(np.arange(30), 20)
    >>> y = 0.3 + rng.normal(size=30)[doc] + rng.normal(size=600)
    >>> res = mixed_effects_mean(y, doc)
    >>> res.n_clusters, bool(res.ci_low < 0.3 < res.ci_high), bool(0.3 < res.icc < 0.7)
    (30, True, True)
    """
    frame, level = _validate_mixed_effects_mean(values, cluster, component, alpha)
    import statsmodels.formula.api as smf
    from statsmodels.regression.mixed_linear_model import MixedLM

    n, g = len(frame), int(frame["cluster"].nunique())
    n_comp = int(frame["component"].nunique()) if component is not None else None
    nan = math.nan
    empty = MixedMeanResult(n, g, n_comp, nan, nan, nan, nan, nan, level, nan, nan, nan, nan, False)
    if g < 2 or n < 3 or not frame["y"].var() > 0:
        warn_degenerate(f"mixed_effects_mean: {g} cluster(s), n = {n} (need at least 2 clusters, 3 observations "
                        "and non-zero variance); the fields are NaN.")
        return empty
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # statsmodels' convergence chatter; `converged` records the outcome
        try:
            if component is None:
                model = MixedLM(frame["y"].to_numpy(), np.ones((n, 1)), groups=frame["cluster"].to_numpy())
            else:
                model = smf.mixedlm("y ~ 1", frame, groups=np.zeros(n), re_formula="0",
                                    vc_formula={"cluster": "0 + C(cluster)", "component": "0 + C(component)"})
            # Powell then Nelder-Mead: derivative-free, they reach a variance on the boundary (0) where
            # statsmodels' default gradient methods stall; a third of the audit's cells sit there
            fit = model.fit(reml=True, method=["powell", "nm"])
        except (np.linalg.LinAlgError, ValueError) as exc:
            warn_degenerate(f"mixed_effects_mean: the fit failed ({exc}); the fields are NaN.")
            return empty
    estimate, se = float(np.asarray(fit.fe_params)[0]), float(np.asarray(fit.bse_fe)[0])
    ci = np.asarray(fit.conf_int(alpha=1.0 - level))[0]
    p = float(2.0 * sps.norm.sf(abs(estimate / se))) if se > 0 else nan
    residual = float(fit.scale)
    if component is None:
        var_cluster, var_component = float(np.asarray(fit.cov_re)[0, 0]), nan
    else:
        names = list(model.exog_vc.names)
        var_cluster = float(fit.vcomp[names.index("cluster")])
        var_component = float(fit.vcomp[names.index("component")])
    total = var_cluster + (0.0 if math.isnan(var_component) else var_component) + residual
    return MixedMeanResult(
        n=n, n_clusters=g, n_components=n_comp, estimate=estimate, se=se, ci_low=float(ci[0]),
        ci_high=float(ci[1]), p=p, confidence_level=level, var_cluster=var_cluster, var_component=var_component,
        var_residual=residual, icc=var_cluster / total if total > 0 else nan, converged=bool(fit.converged),
    )


def _validate_mixed_effects_mean(values: Any, cluster: Any, component: Any, alpha: Any) -> tuple[pd.DataFrame, float]:
    arr = as_1d_float("values", values)
    codes = as_cluster_codes("cluster", cluster, arr.size)
    comp = as_cluster_codes("component", component, arr.size) if component is not None else np.zeros(arr.size, int)
    level = 1.0 - check_open_unit("alpha", alpha)
    keep = ~np.isnan(arr)
    return pd.DataFrame({"y": arr[keep], "cluster": codes[keep], "component": comp[keep]}), level
