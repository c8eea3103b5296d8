"""Power and equivalence for paired designs: what a null result can and cannot rule out."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats as sps
from statsmodels.stats.power import TTestPower

from moeaudit.options import Alternative  # noqa: F401 (the annotations)
from moeaudit.stats._common import (
    ALTERNATIVES,
    ResultMixin,
    as_1d_float,
    check_choice,
    check_finite,
    check_int,
    check_open_unit,
    warn_degenerate,
)
from moeaudit.stats.cluster import as_cluster_codes, cr2, t_test

__all__ = ["TostResult", "min_detectable_dz", "power_dz", "tost_paired"]

# statsmodels spells the one-sided alternatives differently from scipy.
_STATSMODELS_ALTERNATIVE = {"two-sided": "two-sided", "greater": "larger", "less": "smaller"}


def min_detectable_dz(
    n: int,
    *,
    alpha: float = 0.05,
    power: float = 0.8,
    alternative: Alternative = "two-sided",
) -> float:
    r"""Smallest paired effect d_z that a t-test on n pairs detects with the given power.

    Parameters
    ----------
    n : int
        Number of pairs, at least 2.
    alpha : float, default 0.05
        Significance level in (0, 1) — for an audit cell, the *corrected* level (e.g. 0.05 / 20).
    power : float, default 0.8
        Target power in (0, 1).
    alternative : {"two-sided", "greater", "less"}, default "two-sided"

    Returns
    -------
    float
        The minimal detectable d_z (negative for ``alternative="less"``).

    Notes
    -----
    Solves :math:`1 - \beta = P(|T| > t_{1-\alpha/2, n-1})` for :math:`d_z`, where T follows a noncentral
    t with n - 1 degrees of freedom and noncentrality :math:`d_z \sqrt{n}` (the one-sample t-test on the
    differences), via :meth:`statsmodels.stats.power.TTestPower.solve_power`. Read a null audit cell
    against it: a cell with n = 200 at the paper's alpha = 0.05/20 cannot see effects much below
    d_z ≈ 0.28, so "not significant" there is not "no effect" — use :func:`tost_paired` for that.

    References
    ----------
    .. [1] Cohen, *Statistical Power Analysis for the Behavioral Sciences*, 2nd ed. (1988), ch. 2.
    .. [2] arXiv:2606.10703 (2026): n = 200 per cell, Bonferroni alpha = 0.05/20, all |d_z| < 0.23.

    Examples
    --------
    >>> from moeaudit.stats import min_detectable_dz
    >>> round(min_detectable_dz(200), 3)
    0.199
    >>> round(min_detectable_dz(200, alpha=0.05 / 20), 3)
    0.276
    """
    n, alpha, power, alternative = _validate_min_detectable_dz(n, alpha, power, alternative)
    value = TTestPower().solve_power(
        effect_size=None, nobs=n, alpha=alpha, power=power, alternative=_STATSMODELS_ALTERNATIVE[alternative]
    )
    return float(np.asarray(value).reshape(-1)[0])


def _validate_min_detectable_dz(n: Any, alpha: Any, power: Any, alternative: Any) -> tuple[int, float, float, str]:
    return (
        check_int("n", n, 2),
        check_open_unit("alpha", alpha),
        check_open_unit("power", power),
        check_choice("alternative", alternative, ALTERNATIVES),
    )


def power_dz(
    d_z: float,
    n: int,
    alpha: float = 0.05,
    *,
    alternative: Alternative = "two-sided",
) -> float:
    r"""Power of a paired t-test on n pairs to detect a true effect d_z.

    Parameters
    ----------
    d_z : float
        True standardised paired effect mean(diff) / sd(diff).
    n : int
        Number of pairs, at least 2.
    alpha : float, default 0.05
        Significance level in (0, 1).
    alternative : {"two-sided", "greater", "less"}, default "two-sided"

    Returns
    -------
    float
        Probability of rejecting the null, in [0, 1].

    Notes
    -----
    :meth:`statsmodels.stats.power.TTestPower.power` with noncentrality :math:`d_z\sqrt{n}` and n - 1
    degrees of freedom; the inverse of :func:`min_detectable_dz`.

    References
    ----------
    .. [1] Cohen (1988), ch. 2; arXiv:2606.10703 (2026) for the audit's n and alpha.

    Examples
    --------
    >>> from moeaudit.stats import power_dz
    >>> round(power_dz(0.231, 200, alpha=0.01), 2)
    0.75
    """
    d_z, n, alpha, alternative = _validate_power_dz(d_z, n, alpha, alternative)
    value = TTestPower().power(
        effect_size=d_z, nobs=n, alpha=alpha, alternative=_STATSMODELS_ALTERNATIVE[alternative]
    )
    return float(value)


def _validate_power_dz(d_z: Any, n: Any, alpha: Any, alternative: Any) -> tuple[float, int, float, str]:
    return (
        check_finite("d_z", d_z),
        check_int("n", n, 2),
        check_open_unit("alpha", alpha),
        check_choice("alternative", alternative, ALTERNATIVES),
    )


@dataclasses.dataclass(frozen=True)
class TostResult(ResultMixin):
    """Result of :func:`tost_paired`.

    Attributes
    ----------
    n : int
        Differences used (NaN dropped).
    d_z : float
        Observed mean / sd (``ddof=1``).
    bound_dz : float
        Equivalence margin in d_z units.
    bound_low, bound_high : float
        The margin in raw units (nats): ``∓ bound_dz * sd(diff)`` with the *sample* sd.
    p_lower : float
        p-value of H0: mean <= bound_low (one-sided t-test, alternative "greater").
    p_upper : float
        p-value of H0: mean >= bound_high (one-sided t-test, alternative "less").
    p : float
        ``max(p_lower, p_upper)``, the TOST p-value.
    alpha : float
    equivalent : bool
        ``p <= alpha``: the effect is shown to lie within ±bound. False when p is NaN (not shown).
    """

    n: int
    d_z: float
    bound_dz: float
    bound_low: float
    bound_high: float
    p_lower: float
    p_upper: float
    p: float
    alpha: float
    equivalent: bool


def tost_paired(diff: Any, *, bound_dz: float = 0.2, alpha: float = 0.05, cluster: Any = None) -> TostResult:
    r"""Equivalence test (two one-sided tests) that a paired effect lies within ±bound_dz, in d_z units.

    Parameters
    ----------
    diff : array_like, shape (n,)
        Paired differences, e.g. ΔNLL_high - ΔNLL_low of one audit cell. NaN entries are dropped.
    bound_dz : float, default 0.2
        Equivalence margin in d_z units, > 0 (0.2 is Cohen's "small").
    alpha : float, default 0.05
        Level of each one-sided test, in (0, 1).
    cluster : array_like, shape (n,), optional
        One label per difference (document or window); the one-sided tests then use the cluster-robust
        standard error and degrees of freedom of :func:`moeaudit.stats.cluster_robust_mean`.

    Returns
    -------
    TostResult
        Fields ``n``, ``d_z``, ``bound_dz``, ``bound_low``, ``bound_high``, ``p_lower``, ``p_upper``, ``p``,
        ``alpha``, ``equivalent``.

    Warns
    -----
    DegenerateInputWarning
        When n < 2 or the differences have zero variance; p-values NaN, ``equivalent`` False.

    Notes
    -----
    With :math:`s` the sample sd (``ddof=1``) and :math:`b = \text{bound\_dz}\cdot s`:

    .. math::

        p_\text{lower} = P\big(T_{n-1} \ge (\bar d + b)/(s/\sqrt n)\big), \quad
        p_\text{upper} = P\big(T_{n-1} \le (\bar d - b)/(s/\sqrt n)\big), \quad
        p = \max(p_\text{lower}, p_\text{upper}),

    computed with :func:`scipy.stats.ttest_1samp` (``popmean = ∓b``); it equals
    :func:`statsmodels.stats.weightstats.ttost_paired` with the same raw bounds. With ``cluster``,
    :math:`s/\sqrt n` becomes the CR2 standard error and :math:`n - 1` the Bell–McCaffrey degrees of
    freedom (a census's tokens of one document are not independent).

    **Caveat.** The raw-unit bounds use the *sample* sd, so the margin is estimated from the same data.
    The two statistics are then :math:`t \pm \text{bound\_dz}\sqrt n` with :math:`t` the ordinary paired
    t statistic, compared with central-t quantiles; the exact test of the standardised hypothesis
    :math:`|\delta/\sigma| < \text{bound\_dz}` uses the noncentral t instead (Wellek 2010, ch. 5). The
    two agree closely at the audit's n (hundreds) but this TOST is only approximately level alpha for the
    standardised hypothesis. Give margins in nats (a raw-unit test) when a fixed threshold is what matters.

    References
    ----------
    .. [1] Schuirmann, "A comparison of the two one-sided tests procedure...", J. Pharmacokin. Biopharm.
       15:657-680 (1987).
    .. [2] Lakens, "Equivalence tests", Soc. Psychol. Personal. Sci. 8(4):355-362 (2017).
    .. [3] arXiv:2606.10703 (2026) reports null cells (all |d_z| < 0.23) without an equivalence test.

    Examples
    --------
    >>> import numpy as np
    >>> from moeaudit.stats import tost_paired
    >>> diff = np.random.default_rng(0).normal(0.0, 1.0, size=400)
    >>> res = tost_paired(diff, bound_dz=0.2)
    >>> res.equivalent, res.p < 0.05
    (True, True)
    """
    d, bound_dz, alpha, codes = _validate_tost_paired(diff, bound_dz, alpha, cluster)
    keep = ~np.isnan(d)
    d = d[keep]
    fit = cr2(d, pd.factorize(codes[keep], sort=False)[0]) if codes is not None and d.size else None
    n = int(d.size)
    nan = math.nan
    sd = float(d.std(ddof=1)) if n >= 2 else nan
    d_z = bound_low = bound_high = p_lower = p_upper = p = nan
    if n < 2:
        warn_degenerate(f"tost_paired: n = {n} differences (need at least 2).")
    elif sd == 0.0:
        warn_degenerate("tost_paired: the differences have zero variance, so the d_z margin is undefined.")
    elif fit is not None and fit.n_clusters < 2:
        warn_degenerate(f"tost_paired: {fit.n_clusters} cluster(s) (need at least 2 for clustered inference).")
    else:
        d_z = float(d.mean() / sd)
        bound_low, bound_high = -bound_dz * sd, bound_dz * sd
        if fit is None:
            p_lower = float(sps.ttest_1samp(d, bound_low, alternative="greater").pvalue)
            p_upper = float(sps.ttest_1samp(d, bound_high, alternative="less").pvalue)
        else:
            se = math.sqrt(fit.variance)
            p_lower = t_test(fit.mean, se, fit.df, bound_low, "greater")[1]
            p_upper = t_test(fit.mean, se, fit.df, bound_high, "less")[1]
        p = max(p_lower, p_upper)
    return TostResult(
        n=n,
        d_z=d_z,
        bound_dz=bound_dz,
        bound_low=bound_low,
        bound_high=bound_high,
        p_lower=p_lower,
        p_upper=p_upper,
        p=p,
        alpha=alpha,
        equivalent=bool(p <= alpha),
    )


def _validate_tost_paired(
    diff: Any, bound_dz: Any, alpha: Any, cluster: Any
) -> tuple[np.ndarray, float, float, np.ndarray | None]:
    arr = as_1d_float("diff", diff)
    return (
        arr,
        check_finite("bound_dz", bound_dz, positive=True),
        check_open_unit("alpha", alpha),
        as_cluster_codes("cluster", cluster, arr.size) if cluster is not None else None,
    )
