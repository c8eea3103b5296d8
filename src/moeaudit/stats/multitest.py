"""Multiple-testing correction and the dual-test verdict over a family of audit cells."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
from statsmodels.stats.multitest import multipletests

from moeaudit.errors import InvalidParameterError
from moeaudit.options import CORRECTIONS, Correction
from moeaudit.stats._common import check_choice, check_open_unit

__all__ = ["VERDICTS", "adjust", "dual_verdict", "verdicts_for_family"]

AdjustMethod = Correction

_METHODS = CORRECTIONS
_STATSMODELS_NAME = {"bonferroni": "bonferroni", "holm": "holm", "bh": "fdr_bh"}

SIGNIFICANT = "significant"
NOT_SIGNIFICANT = "not significant"
UNTESTABLE = "untestable"
VERDICTS = (SIGNIFICANT, NOT_SIGNIFICANT, UNTESTABLE)
"""The three verdict strings, in the order: both tests pass, at least one fails, a p-value is NaN."""


def adjust(pvalues: Any, method: AdjustMethod) -> np.ndarray:
    """Adjust a family of p-values for multiple testing.

    Parameters
    ----------
    pvalues : array_like of float, any shape
        Raw p-values in [0, 1]; NaN marks an untestable cell.
    method : {"bonferroni", "holm", "bh"}
        Bonferroni, Holm's step-down, or Benjamini-Hochberg (false discovery rate).

    Returns
    -------
    numpy.ndarray of float, same shape as ``pvalues``
        Adjusted p-values, capped at 1; NaN where the input was NaN.

    Notes
    -----
    The family is the non-NaN entries: with m of them, Bonferroni gives ``min(1, m p)``; Holm and BH are
    the step-down and step-up procedures of :func:`statsmodels.stats.multitest.multipletests` (methods
    ``"holm"`` and ``"fdr_bh"``), which this function calls. NaN p-values are passed through and do not
    count in m, so an untestable cell neither passes nor makes the others harder to pass. Compare an
    adjusted p with the unadjusted alpha (``p_adj <= alpha``, the rule statsmodels uses to reject).

    References
    ----------
    .. [1] Holm, "A simple sequentially rejective multiple test procedure", Scand. J. Statist. 6:65-70 (1979).
    .. [2] Benjamini, Hochberg, "Controlling the false discovery rate", JRSS B 57(1):289-300 (1995).
    .. [3] arXiv:2606.10703 (2026): Bonferroni over 20 cells per model (alpha = 0.05/20).

    Examples
    --------
    >>> from moeaudit.stats import adjust
    >>> adjust([0.01, 0.02, float("nan"), 0.5], "bonferroni")
    array([0.03, 0.06,  nan, 1.  ])
    >>> adjust([0.01, 0.02, 0.04], "holm")
    array([0.03, 0.04, 0.04])
    """
    p = _validate_adjust(pvalues, method)
    out = np.full(p.shape, np.nan)
    flat_p, flat_out = p.reshape(-1), out.reshape(-1)
    ok = ~np.isnan(flat_p)
    if ok.any():
        corrected = multipletests(flat_p[ok], method=_STATSMODELS_NAME[method])[1]
        flat_out[ok] = np.minimum(corrected, 1.0)
    return out


def _validate_adjust(pvalues: Any, method: Any) -> np.ndarray:
    check_choice("method", method, _METHODS)
    p = _as_pvalues("pvalues", pvalues)
    return p


def _as_pvalues(name: str, values: Any) -> np.ndarray:
    try:
        p = np.asarray(values, dtype=float)
    except (TypeError, ValueError):
        raise InvalidParameterError(f"`{name}` must be an array of p-values; got {type(values).__name__}.") from None
    bad = ~np.isnan(p) & ((p < 0.0) | (p > 1.0))
    if bad.any():
        raise InvalidParameterError(f"`{name}` must be in [0, 1] or NaN; got {p[bad].reshape(-1)[0]!r}.")
    return p


def dual_verdict(p_t_adjusted: Any, p_w_adjusted: Any, alpha: float) -> np.ndarray:
    """The dual-test verdict: a cell is significant only when both the t-test and the Wilcoxon test pass.

    Parameters
    ----------
    p_t_adjusted, p_w_adjusted : array_like of float
        Adjusted p-values of the paired t-test and of the Wilcoxon signed-rank test, broadcastable to one
        shape; NaN marks an untestable cell.
    alpha : float
        Family-wise (or FDR) level in (0, 1) to compare adjusted p-values against.

    Returns
    -------
    numpy.ndarray of str (object dtype), broadcast shape
        ``"significant"`` where both ``p <= alpha``, ``"untestable"`` where either p is NaN,
        ``"not significant"`` otherwise (see :data:`VERDICTS`).

    Notes
    -----
    Equivalent to one test with p = max(p_t_adj, p_w_adj). The verdict is direction-free under a two-sided
    alternative: read the sign from ``d_z``.

    References
    ----------
    .. [1] arXiv:2606.10703 v2 (2026), the "dual test" (our reading: both tests pass the Bonferroni alpha).

    Examples
    --------
    >>> from moeaudit.stats import dual_verdict
    >>> dual_verdict([0.001, 0.001, 0.2, float("nan")], [0.004, 0.09, 0.001, 0.001], 0.01).tolist()
    ['significant', 'not significant', 'not significant', 'untestable']
    """
    p_t, p_w = _validate_dual_verdict(p_t_adjusted, p_w_adjusted, alpha)
    p_t, p_w = np.broadcast_arrays(p_t, p_w)
    out = np.full(p_t.shape, NOT_SIGNIFICANT, dtype=object)
    out[(p_t <= alpha) & (p_w <= alpha)] = SIGNIFICANT
    out[np.isnan(p_t) | np.isnan(p_w)] = UNTESTABLE
    return out


def _validate_dual_verdict(p_t: Any, p_w: Any, alpha: Any) -> tuple[np.ndarray, np.ndarray]:
    check_open_unit("alpha", alpha)
    p_t_arr = _as_pvalues("p_t_adjusted", p_t)
    p_w_arr = _as_pvalues("p_w_adjusted", p_w)
    try:
        np.broadcast_shapes(p_t_arr.shape, p_w_arr.shape)
    except ValueError:
        raise InvalidParameterError(
            f"`p_t_adjusted` and `p_w_adjusted` must have broadcastable shapes; got {p_t_arr.shape} and "
            f"{p_w_arr.shape}."
        ) from None
    return p_t_arr, p_w_arr


def verdicts_for_family(
    cells: Any,
    *,
    method: AdjustMethod = "bonferroni",
    alpha: float = 0.05,
    by: str | Sequence[str] | None = None,
) -> pd.DataFrame:
    """Adjust both tests of every cell within its family and give each cell its dual-test verdict.

    Parameters
    ----------
    cells : pandas.DataFrame, or sequence of PairedContrastResult or of mappings
        One entry per cell with ``p_t`` and ``p_wilcoxon`` (NaN allowed: untestable). A DataFrame keeps its
        other columns (``layer``, ``metric``, ...); objects and mappings contribute all their fields
        (``to_dict()`` is used when present).
    method : {"bonferroni", "holm", "bh"}, default "bonferroni"
        Correction applied to the t-test p-values and, separately, to the Wilcoxon p-values.
    alpha : float, default 0.05
        Level in (0, 1).
    by : str or sequence of str, optional
        Column(s) whose values define separate families (e.g. ``"model"``: the paper corrects over the 20
        cells of each model). Default: all rows form one family.

    Returns
    -------
    pandas.DataFrame
        The cells (same row order and index) plus ``p_t_adjusted``, ``p_wilcoxon_adjusted``,
        ``p_adjusted`` = max of the two (the dual test's adjusted p; NaN if either is) and ``verdict``.

    Notes
    -----
    Each test is adjusted over the family's testable cells with :func:`adjust`; a cell is
    ``"significant"`` iff ``p_adjusted <= alpha`` (see :func:`dual_verdict`).

    References
    ----------
    .. [1] arXiv:2606.10703 (2026), Bonferroni family of 20 cells per model, dual test (v2).

    Examples
    --------
    >>> import pandas as pd
    >>> from moeaudit.stats import verdicts_for_family
    >>> cells = pd.DataFrame({"model": ["a", "a", "b"], "p_t": [0.001, 0.3, 0.02],
    ...                       "p_wilcoxon": [0.002, 0.4, 0.03]})
    >>> verdicts_for_family(cells, alpha=0.05, by="model")["verdict"].tolist()
    ['significant', 'not significant', 'significant']
    """
    frame, by_cols = _validate_verdicts_for_family(cells, method, alpha, by)
    p_t = frame["p_t"].to_numpy(dtype=float)
    p_w = frame["p_wilcoxon"].to_numpy(dtype=float)
    p_t_adj = np.full(len(frame), np.nan)
    p_w_adj = np.full(len(frame), np.nan)
    if by_cols:
        positions = frame.reset_index(drop=True).groupby(by_cols, sort=False, dropna=False).indices.values()
    else:
        positions = [np.arange(len(frame))]
    for rows in positions:
        p_t_adj[rows] = adjust(p_t[rows], method)
        p_w_adj[rows] = adjust(p_w[rows], method)
    out = frame.copy()
    out["p_t_adjusted"] = p_t_adj
    out["p_wilcoxon_adjusted"] = p_w_adj
    out["p_adjusted"] = np.where(np.isnan(p_t_adj) | np.isnan(p_w_adj), np.nan, np.fmax(p_t_adj, p_w_adj))
    out["verdict"] = dual_verdict(p_t_adj, p_w_adj, alpha)
    return out


def _validate_verdicts_for_family(
    cells: Any, method: Any, alpha: Any, by: Any
) -> tuple[pd.DataFrame, list[str]]:
    check_choice("method", method, _METHODS)
    check_open_unit("alpha", alpha)
    if isinstance(cells, pd.DataFrame):
        frame = cells
    elif isinstance(cells, Sequence) and not isinstance(cells, str):
        rows = []
        for cell in cells:
            if hasattr(cell, "to_dict") and not isinstance(cell, Mapping):
                rows.append(cell.to_dict())
            elif isinstance(cell, Mapping):
                rows.append(dict(cell))
            else:
                raise InvalidParameterError(
                    "`cells` must be a DataFrame or a sequence of results/mappings with p_t and p_wilcoxon; "
                    f"got an item of type {type(cell).__name__}."
                )
        frame = pd.DataFrame(rows)
    else:
        raise InvalidParameterError(
            f"`cells` must be a DataFrame or a sequence of results/mappings; got {type(cells).__name__}."
        )
    missing = [c for c in ("p_t", "p_wilcoxon") if c not in frame.columns]
    if missing and len(frame):
        raise InvalidParameterError(f"`cells` must have columns p_t and p_wilcoxon; missing {missing}.")
    if not len(frame):
        frame = frame.assign(p_t=pd.Series(dtype=float), p_wilcoxon=pd.Series(dtype=float))
    by_cols = [] if by is None else [by] if isinstance(by, str) else list(by)
    absent = [c for c in by_cols if c not in frame.columns]
    if absent:
        raise InvalidParameterError(f"`by` must name columns of `cells`; got {absent!r}.")
    _as_pvalues("cells['p_t']", frame["p_t"].to_numpy(dtype=float))
    _as_pvalues("cells['p_wilcoxon']", frame["p_wilcoxon"].to_numpy(dtype=float))
    return frame, by_cols
