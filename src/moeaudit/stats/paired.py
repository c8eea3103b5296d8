"""The paired contrast: the paper's test of whether a metric's top-ranked expert matters more than its
bottom-ranked one at the same token (Engmann, Medeiros Adriano, Giese, arXiv 2606.10703, the
causal-effectiveness test of a metric)."""

from __future__ import annotations

import dataclasses
import functools
import math
import warnings
from typing import Any, Literal

import numpy as np
import pandas as pd
from scipy import stats as sps

from moeaudit.errors import InvalidParameterError, invalid
from moeaudit.options import CI_METHODS, Alternative, CIMethod  # noqa: F401 (the annotations)
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
from moeaudit.stats.cluster import as_cluster_codes, bootstrap_clusters, cluster_means, cr2, t_test

__all__ = ["PairedContrastResult", "paired_contrast"]

ZeroMethod = Literal["wilcox", "pratt", "zsplit"]

_CI_METHODS = CI_METHODS
_ZERO_METHODS = ("wilcox", "pratt", "zsplit")
_MIN_BOOT = 100


@dataclasses.dataclass(frozen=True)
class PairedContrastResult(ResultMixin):
    """Result of :func:`paired_contrast`.

    Attributes
    ----------
    n : int
        Number of complete pairs used (pairs with a NaN on either side are dropped).
    n_dropped : int
        Number of pairs dropped because ``high`` or ``low`` was NaN.
    mean_diff, sd_diff : float
        Mean and standard deviation (``ddof=1``) of ``diff = high - low``, in the effects' units (nats).
    d_z : float
        Standardised paired effect ``mean_diff / sd_diff``.
    ci_low, ci_high : float
        Confidence interval for ``d_z`` at ``confidence_level`` (one-sided intervals are open, i.e.
        infinite, on the side the alternative does not test).
    confidence_level : float
        ``1 - alpha``.
    ci_method : {"analytic", "bca"}
        How the interval was computed.
    alternative : {"two-sided", "greater", "less"}
        Alternative of both tests and of the interval.
    t_statistic, p_t : float
        Paired t statistic and p-value (:func:`scipy.stats.ttest_rel`).
    wilcoxon_statistic, p_wilcoxon : float
        Wilcoxon signed-rank statistic and p-value (:func:`scipy.stats.wilcoxon` on ``diff``).
    zero_method : {"wilcox", "pratt", "zsplit"}
        How the Wilcoxon test treated zero differences.
    share_high_gt_low : float
        Share of pairs with ``diff > 0`` (ties count as not greater).
    n_distinct_high, n_distinct_low : int or None
        Number of distinct expert ids among the high / low picks (the paper's "degeneracy": a metric that
        always picks the same expert tests one expert, not the metric); None when ids were not given.
    n_clusters : int or None
        Distinct clusters among the complete pairs; None without ``cluster``.
    design_effect : float or None
        CR2 variance of ``mean_diff`` over the independent-pairs variance ``sd_diff**2 / n``
        (:func:`moeaudit.stats.cluster_robust_mean`); None without ``cluster``.
    df_t : float or None
        Bell–McCaffrey degrees of freedom of the cluster-robust t (``n - 1`` without clusters, reported as
        None then).
    mean_diff_ci_low, mean_diff_ci_high : float or None
        Cluster-bootstrap percentile interval of ``mean_diff`` (nats); None without ``cluster``.
    """

    n: int
    n_dropped: int
    mean_diff: float
    sd_diff: float
    d_z: float
    ci_low: float
    ci_high: float
    confidence_level: float
    ci_method: str
    alternative: str
    t_statistic: float
    p_t: float
    wilcoxon_statistic: float
    p_wilcoxon: float
    zero_method: str
    share_high_gt_low: float
    n_distinct_high: int | None = None
    n_distinct_low: int | None = None
    n_clusters: int | None = None
    design_effect: float | None = None
    df_t: float | None = None
    mean_diff_ci_low: float | None = None
    mean_diff_ci_high: float | None = None
    _diff: np.ndarray | None = dataclasses.field(default=None, repr=False, compare=False)
    _n_boot: int = dataclasses.field(default=2000, repr=False, compare=False)
    _seed: int = dataclasses.field(default=0, repr=False, compare=False)
    _codes: np.ndarray | None = dataclasses.field(default=None, repr=False, compare=False)
    _ddof: int = dataclasses.field(default=1, repr=False, compare=False)

    def confidence_interval(self, confidence_level: float = 0.95) -> ConfidenceInterval:
        """Confidence interval for ``d_z`` at another level, by the same method and alternative.

        Parameters
        ----------
        confidence_level : float, default 0.95
            In (0, 1).

        Returns
        -------
        ConfidenceInterval
            ``low``, ``high``; NaN when ``d_z`` is undefined. A BCa interval is recomputed from the stored
            differences (and clusters) with the same seed, so it is reproducible.
        """
        level = check_open_unit("confidence_level", confidence_level)
        if not math.isfinite(self.d_z) or self._diff is None:
            return ConfidenceInterval(math.nan, math.nan)
        return _dz_interval(self._diff, self._codes, self.d_z, self.design_effect, level, self.ci_method,
                            self.alternative, self._n_boot, self._seed, self._ddof)


def paired_contrast(
    high: Any,
    low: Any,
    *,
    alpha: float = 0.05,
    ci: CIMethod = "analytic",
    n_boot: int = 2000,
    seed: int | None = 0,
    alternative: Alternative = "two-sided",
    zero_method: ZeroMethod = "wilcox",
    high_expert: Any = None,
    low_expert: Any = None,
    cluster: Any = None,
    ddof: int = 1,
) -> PairedContrastResult:
    r"""Paired contrast of two matched effect samples: effect size d_z, its CI, paired t and Wilcoxon tests.

    Parameters
    ----------
    high, low : array_like, shape (n,)
        Matched effects, e.g. ΔNLL (nats) of ablating the highest- and the lowest-ranked expert of the
        same token's active set. NaN marks a missing value: the whole pair is dropped and counted.
    alpha : float, default 0.05
        In (0, 1); the interval has level ``1 - alpha``.
    ci : {"analytic", "bca"}, default "analytic"
        ``"analytic"``: normal interval with the large-sample SE of d_z (see Notes). ``"bca"``:
        bias-corrected and accelerated bootstrap of d_z (:func:`scipy.stats.bootstrap`) resampling pairs.
    n_boot : int, default 2000
        Bootstrap resamples for ``ci="bca"``; at least 100.
    seed : int or None, default 0
        Seed of the bootstrap; None draws a fresh one (recorded so ``confidence_interval`` reproduces it).
    alternative : {"two-sided", "greater", "less"}, default "two-sided"
        ``"greater"`` tests high > low. Applies to both tests and to the interval (one-sided intervals, as
        in scipy).
    zero_method : {"wilcox", "pratt", "zsplit"}, default "wilcox"
        Treatment of zero differences in the Wilcoxon test, passed to :func:`scipy.stats.wilcoxon`.
    high_expert, low_expert : array_like of int, shape (n,), optional
        Expert ids picked as high and low at each pair; give both to get ``n_distinct_high/low``.
    cluster : array_like, shape (n,), optional
        One label per pair (the document or window of the token). Pairs of one cluster may be correlated;
        the tests and intervals then treat clusters, not pairs, as independent (see Notes). None (default)
        treats pairs as independent, exactly as before this option existed.
    ddof : {0, 1}, default 1
        Delta degrees of freedom of ``sd_diff`` and hence of ``d_z`` and its intervals. 1 is the sample sd;
        0 is numpy's default, which the paper's released scripts used (``diffs.mean() / diffs.std()``), for
        replaying their tables. The tests do not depend on it.

    Returns
    -------
    PairedContrastResult
        Fields ``n``, ``n_dropped``, ``mean_diff``, ``sd_diff``, ``d_z``, ``ci_low``, ``ci_high``,
        ``confidence_level``, ``ci_method``, ``alternative``, ``t_statistic``, ``p_t``,
        ``wilcoxon_statistic``, ``p_wilcoxon``, ``zero_method``, ``share_high_gt_low``,
        ``n_distinct_high``, ``n_distinct_low``, and with ``cluster`` also ``n_clusters``, ``design_effect``,
        ``df_t``, ``mean_diff_ci_low``, ``mean_diff_ci_high``; method ``confidence_interval(confidence_level)``.

    Warns
    -----
    DegenerateInputWarning
        (a :class:`RuntimeWarning`) when n < 2, ``sd_diff == 0`` or every difference is zero; the fields
        that cannot be computed are NaN — never a stand-in such as p = 1.

    Notes
    -----
    With ``diff_i = high_i - low_i``, i = 1..n:

    .. math::

        d_z = \bar{d} / s_d, \qquad s_d^2 = \frac{1}{n-1}\sum_i (d_i - \bar{d})^2,

        \mathrm{SE}(d_z) \approx \sqrt{1/n + d_z^2 / (2n)}, \qquad
        \mathrm{CI} = d_z \pm z_{1-\alpha/2}\,\mathrm{SE}(d_z).

    The paper's scripts mixed ``ddof=0`` and ``ddof=1``; moeaudit uses ``ddof=1`` unless told otherwise. The analytic
    interval reproduces the paper's reported CI (d_z = 0.231, n = 200 → [0.09, 0.37]) [1]_. The paired t
    statistic equals ``d_z * sqrt(n)``.

    The Wilcoxon default ``zero_method="wilcox"`` is scipy's default and what the paper's scripts used: zero
    differences are discarded before ranking (so they count for neither side). ``"pratt"`` ranks them and
    then drops their ranks, which is more conservative when many pairs tie; with exactly-zero ΔNLL on both
    sides being rare in floating point the two agree in practice. When every difference is zero the test is
    undefined and ``p_wilcoxon`` is NaN (scipy would return p = 1).

    A significant two-sided result with ``d_z < 0`` means the metric's *lowest* pick mattered more.

    **Clustered pairs.** A census measures many tokens per document, and they are correlated, so the
    independent-pairs tests above are anti-conservative. With ``cluster`` the point estimates
    (``mean_diff``, ``sd_diff``, ``d_z``, ``share_high_gt_low``) are unchanged and the inference changes:

    - ``t_statistic``, ``p_t``: the cluster-robust t, :math:`\bar d / \widehat{\mathrm{SE}}_\text{CR2}`
      against Student's t with the Bell–McCaffrey ``df_t`` (:func:`moeaudit.stats.cluster_robust_mean`);
    - ``p_wilcoxon``: the signed-rank test of the cluster means of ``diff`` (one observation per cluster,
      valid for independent clusters whose means are symmetric about 0 under the null) [4]_;
    - ``ci_low``, ``ci_high``: ``"analytic"`` uses the interval above with :math:`n` replaced by the
      effective sample size :math:`n / \mathrm{deff}`, :math:`\mathrm{deff} =
      \widehat V_\text{CR2}(\bar d)/(s_d^2/n)`; ``"bca"`` bootstraps d_z resampling whole clusters
      (:func:`moeaudit.stats.cluster_bootstrap_ci`);
    - ``mean_diff_ci_low/high``: the cluster-bootstrap percentile interval of ``mean_diff``.

    With one pair per cluster every one of these equals its unclustered value up to rounding (deff = 1,
    df = n − 1, the cluster means are the differences, the bootstrap draws the same resamples).

    References
    ----------
    .. [1] Engmann, Medeiros Adriano, Giese, "From Observation to Intervention: A Causal Audit of Expert
       Importance in Mixture-of-Experts Models", arXiv:2606.10703 (2026), per-token routing-weight control.
    .. [2] Lakens, "Calculating and reporting effect sizes to facilitate cumulative science",
       Frontiers in Psychology 4:863 (2013), d_z.
    .. [3] Efron, "Better bootstrap confidence intervals", JASA 82(397):171-185 (1987), BCa.
    .. [4] Larocque, "An affine-invariant multivariate sign test for cluster correlated data", Canadian
       Journal of Statistics 31(4):437-455 (2003), tests on cluster summaries.

    Examples
    --------
    >>> import numpy as np
    >>> from moeaudit.stats import paired_contrast
    >>> rng = np.random.default_rng(0)
    >>> low = rng.exponential(0.05, size=200)
    >>> high = low + rng.normal(0.02, 0.05, size=200)
    >>> res = paired_contrast(high, low)
    >>> res.n, round(res.d_z, 2) > 0, res.p_t < 0.05
    (200, True, True)
    >>> ci90 = res.confidence_interval(0.90)
    >>> res.ci_low < ci90.low < res.d_z < ci90.high < res.ci_high
    True
    """
    high_arr, low_arr, ids, codes, seed = _validate_paired_contrast(
        high, low, alpha, ci, n_boot, seed, alternative, zero_method, high_expert, low_expert, cluster, ddof
    )
    keep = ~(np.isnan(high_arr) | np.isnan(low_arr))
    diff = high_arr[keep] - low_arr[keep]
    if codes is not None:
        codes = pd.factorize(codes[keep], sort=False)[0]
    n = int(diff.size)
    n_dropped = int(keep.size - n)
    level = 1.0 - alpha
    nan = math.nan

    n_distinct_high = n_distinct_low = None
    if ids is not None:
        n_distinct_high = int(np.unique(ids[0][keep]).size)
        n_distinct_low = int(np.unique(ids[1][keep]).size)

    mean_diff = float(diff.mean()) if n >= 1 else nan
    share = float(np.mean(diff > 0)) if n >= 1 else nan
    sd_diff = float(diff.std(ddof=ddof)) if n >= 2 else nan
    d_z = ci_low = ci_high = t_stat = p_t = w_stat = p_w = nan
    fit = cr2(diff, codes) if codes is not None else None
    clustered: dict[str, Any] = {}
    if fit is not None:
        clustered = dict(n_clusters=fit.n_clusters, design_effect=fit.design_effect,
                         df_t=fit.df, mean_diff_ci_low=nan, mean_diff_ci_high=nan)

    problems = []
    if n < 2:
        problems.append(f"n = {n} complete pairs (need at least 2)")
    elif fit is not None and fit.n_clusters < 2:
        problems.append(f"{fit.n_clusters} cluster(s) (need at least 2 for clustered inference)")
    else:
        if sd_diff == 0.0:
            problems.append("the differences have zero variance (d_z, its CI and p_t are NaN)")
        else:
            d_z = mean_diff / sd_diff
            if fit is None:
                t_res = sps.ttest_rel(high_arr[keep], low_arr[keep], alternative=alternative)
                t_stat, p_t = float(t_res.statistic), float(t_res.pvalue)
            else:
                t_stat, p_t = t_test(mean_diff, math.sqrt(fit.variance), fit.df, 0.0, alternative)
                boot = bootstrap_clusters(diff, codes, "mean", level, alternative, n_boot, seed, "percentile")
                clustered.update(mean_diff_ci_low=boot.low, mean_diff_ci_high=boot.high)
            interval = _dz_interval(diff, codes, d_z, fit.design_effect if fit is not None else None, level, ci,
                                    alternative, n_boot, seed, ddof)
            ci_low, ci_high = float(interval.low), float(interval.high)
        ranked = diff if codes is None else cluster_means(diff, codes)
        if not np.any(ranked != 0):
            problems.append("every difference is zero (p_wilcoxon is NaN)")
        else:
            w_res = sps.wilcoxon(ranked, zero_method=zero_method, alternative=alternative)
            w_stat, p_w = float(w_res.statistic), float(w_res.pvalue)
    if problems:
        warn_degenerate("paired_contrast: " + "; ".join(problems) + ".")

    return PairedContrastResult(
        n=n,
        n_dropped=n_dropped,
        mean_diff=mean_diff,
        sd_diff=sd_diff,
        d_z=d_z,
        ci_low=ci_low,
        ci_high=ci_high,
        confidence_level=level,
        ci_method=ci,
        alternative=alternative,
        t_statistic=t_stat,
        p_t=p_t,
        wilcoxon_statistic=w_stat,
        p_wilcoxon=p_w,
        zero_method=zero_method,
        share_high_gt_low=share,
        n_distinct_high=n_distinct_high,
        n_distinct_low=n_distinct_low,
        **clustered,
        _diff=diff,
        _n_boot=n_boot,
        _seed=seed,
        _codes=codes,
        _ddof=ddof,
    )


def _validate_paired_contrast(
    high: Any,
    low: Any,
    alpha: Any,
    ci: Any,
    n_boot: Any,
    seed: Any,
    alternative: Any,
    zero_method: Any,
    high_expert: Any,
    low_expert: Any,
    cluster: Any,
    ddof: Any,
) -> tuple[np.ndarray, np.ndarray, tuple[np.ndarray, np.ndarray] | None, np.ndarray | None, int]:
    high_arr = as_1d_float("high", high)
    low_arr = as_1d_float("low", low)
    check_same_length(("high", "low"), high_arr, low_arr)
    check_open_unit("alpha", alpha)
    check_choice("ci", ci, _CI_METHODS)
    check_int("n_boot", n_boot, _MIN_BOOT)
    seed = resolve_seed(check_seed("seed", seed))
    check_choice("alternative", alternative, ALTERNATIVES)
    check_choice("zero_method", zero_method, _ZERO_METHODS)
    if isinstance(ddof, bool) or ddof not in (0, 1):
        raise invalid("ddof", "0 or 1", ddof)
    if (high_expert is None) != (low_expert is None):
        given, missing = ("high_expert", "low_expert") if low_expert is None else ("low_expert", "high_expert")
        raise InvalidParameterError(f"`{missing}` must be given together with `{given}`; got None.")
    ids = None
    if high_expert is not None:
        ids = (_as_ids("high_expert", high_expert), _as_ids("low_expert", low_expert))
        check_same_length(("high", "high_expert"), high_arr, ids[0])
        check_same_length(("high", "low_expert"), high_arr, ids[1])
    codes = as_cluster_codes("cluster", cluster, high_arr.size) if cluster is not None else None
    return high_arr, low_arr, ids, codes, seed


def _as_ids(name: str, values: Any) -> np.ndarray:
    arr = np.asarray(values)
    if arr.ndim != 1 or not (np.issubdtype(arr.dtype, np.integer) or arr.size == 0):
        raise InvalidParameterError(
            f"`{name}` must be a 1-D array of integer expert ids; got dtype {arr.dtype}, shape {arr.shape}."
        )
    return arr


def _dz_statistic(diff: np.ndarray, axis: int = -1, ddof: int = 1) -> np.ndarray:
    """d_z along ``axis`` (vectorised for :func:`scipy.stats.bootstrap`)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.mean(diff, axis=axis) / np.std(diff, axis=axis, ddof=ddof)


def _dz_interval(diff: np.ndarray, codes: np.ndarray | None, d_z: float, design_effect: float | None, level: float,
                 ci: str, alternative: str, n_boot: int, seed: int, ddof: int = 1) -> ConfidenceInterval:
    """The CI of d_z: analytic or BCa; with clusters at the effective n, or resampling clusters."""
    if codes is None:
        if ci == "bca":
            return _bca_ci(diff, level, alternative, n_boot, seed, ddof)
        return _analytic_ci(d_z, diff.size, level, alternative)
    if ci == "bca":
        return bootstrap_clusters(diff, codes, "d_z", level, alternative, n_boot, seed, "bca", ddof)
    return _analytic_ci(d_z, diff.size / design_effect, level, alternative)


def _analytic_ci(d_z: float, n: float, level: float, alternative: str) -> ConfidenceInterval:
    se = math.sqrt(1.0 / n + d_z**2 / (2.0 * n))
    if alternative == "two-sided":
        half = float(sps.norm.ppf(0.5 + level / 2.0)) * se
        return ConfidenceInterval(d_z - half, d_z + half)
    half = float(sps.norm.ppf(level)) * se
    if alternative == "greater":
        return ConfidenceInterval(d_z - half, math.inf)
    return ConfidenceInterval(-math.inf, d_z + half)


def _bca_ci(diff: np.ndarray, level: float, alternative: str, n_boot: int, seed: int,
            ddof: int = 1) -> ConfidenceInterval:
    # Resampling the differences is resampling whole (high, low) pairs: the paired bootstrap.
    with warnings.catch_warnings():
        warnings.simplefilter("error", sps.DegenerateDataWarning)
        try:
            res = sps.bootstrap(
                (diff,),
                functools.partial(_dz_statistic, ddof=ddof),
                n_resamples=n_boot,
                vectorized=True,
                confidence_level=level,
                alternative=alternative,
                method="BCa",
                **rng_kwargs(sps.bootstrap, seed),
            )
        except sps.DegenerateDataWarning as exc:
            warn_degenerate(f"paired_contrast: the BCa interval is undefined ({exc}); ci_low/ci_high are NaN.", 4)
            return ConfidenceInterval(math.nan, math.nan)
    return ConfidenceInterval(float(res.confidence_interval.low), float(res.confidence_interval.high))
