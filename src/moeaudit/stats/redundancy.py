"""Summaries of progressive ablation: how much a token loses as its active experts are removed one by one."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd

from moeaudit.errors import InvalidParameterError
from moeaudit.stats._common import as_1d_float, check_finite, warn_degenerate

__all__ = ["cliff", "progressive_summary"]

CLIFF_THRESHOLD_NATS = 0.1
"""The paper's cliff threshold: first j with mean ΔNLL above 0.1 nats (arXiv:2606.10703, progressive ablation)."""


def cliff(mean_by_j: Any, threshold: float = CLIFF_THRESHOLD_NATS) -> int | None:
    """The first number of removed experts j whose mean ΔNLL exceeds a threshold.

    Parameters
    ----------
    mean_by_j : array_like, shape (J,)
        Mean ΔNLL (nats) after removing the top-j active experts, j = 1..J in order (e.g. the ``mean``
        column of :func:`progressive_summary`). NaN entries never count as crossing.
    threshold : float, default 0.1
        Finite threshold in nats.

    Returns
    -------
    int or None
        The 1-based j of the first entry strictly greater than ``threshold``; None when none is — the layer
        is redundant over the whole range.

    Notes
    -----
    The first crossing, not the last: a non-monotone curve (possible with few tokens) reports its first
    excursion. Means are driven by a heavy tail (the paper's medians are ≈ 0), so read the cliff with the
    ``p95`` column of :func:`progressive_summary`.

    References
    ----------
    .. [1] arXiv:2606.10703 (2026), progressive ablation on OLMoE: layer 15 passes 0.1 nats at j = 2;
       layers 0-9 never do (< 0.09 nats at j = 7).

    Examples
    --------
    >>> from moeaudit.stats import cliff
    >>> cliff([0.02, 0.12, 0.2, 0.43])
    2
    >>> cliff([0.01, 0.03, 0.09]) is None
    True
    """
    means, threshold = _validate_cliff(mean_by_j, threshold)
    above = np.flatnonzero(means > threshold)  # NaN > x is False
    return int(above[0]) + 1 if above.size else None


def _validate_cliff(mean_by_j: Any, threshold: Any) -> tuple[np.ndarray, float]:
    return as_1d_float("mean_by_j", mean_by_j), check_finite("threshold", threshold)


def progressive_summary(delta_nll_by_j: Any) -> pd.DataFrame:
    """Per number of removed experts j: how many tokens, and the mean, median and 95th percentile of ΔNLL.

    Parameters
    ----------
    delta_nll_by_j : array_like of shape (n_tokens, J), or mapping {j: array_like}
        ΔNLL (nats) at each token after removing its top-j active experts (by gate, cumulatively). A 2-D
        array has column j - 1 for j = 1..J; a mapping gives j explicitly (positive integers). NaN marks a
        missing measurement and is excluded per j.

    Returns
    -------
    pandas.DataFrame
        Index ``j`` (ascending), columns ``n`` (int), ``mean``, ``median``, ``p95`` (float; NaN where a j has
        no value).

    Warns
    -----
    DegenerateInputWarning
        When some j has no non-NaN value.

    Notes
    -----
    ``p95`` is :func:`numpy.percentile` with linear interpolation (``method="linear"``). Report it with
    the mean: the paper found medians ≈ 0 with a heavy tail driving the means.

    References
    ----------
    .. [1] arXiv:2606.10703 (2026), progressive ablation (OLMoE, n = 500 positions, layers 0, 1, 7, 8, 9, 15).

    Examples
    --------
    >>> import numpy as np
    >>> from moeaudit.stats import progressive_summary, cliff
    >>> delta = np.array([[0.0, 0.01, 0.3], [0.0, 0.02, 0.1], [0.01, 0.5, 0.9]])
    >>> summary = progressive_summary(delta)
    >>> summary["n"].tolist(), summary["median"].tolist()
    ([3, 3, 3], [0.0, 0.02, 0.3])
    >>> cliff(summary["mean"])
    2
    """
    columns = _validate_progressive_summary(delta_nll_by_j)
    rows = []
    empty = []
    for j, values in columns.items():
        values = values[~np.isnan(values)]
        if values.size == 0:
            empty.append(j)
            rows.append((j, 0, np.nan, np.nan, np.nan))
            continue
        rows.append((j, int(values.size), float(values.mean()), float(np.median(values)),
                     float(np.percentile(values, 95, method="linear"))))
    if empty:
        warn_degenerate(f"progressive_summary: no values for j = {empty}; their mean, median and p95 are NaN.")
    frame = pd.DataFrame(rows, columns=["j", "n", "mean", "median", "p95"]).set_index("j")
    frame["n"] = frame["n"].astype(int)
    return frame


def _validate_progressive_summary(delta_nll_by_j: Any) -> dict[int, np.ndarray]:
    if isinstance(delta_nll_by_j, Mapping):
        columns: dict[int, np.ndarray] = {}
        for j in sorted(delta_nll_by_j, key=lambda key: (not isinstance(key, (int, np.integer)), key)):
            if isinstance(j, bool) or not isinstance(j, (int, np.integer)) or j < 1:
                raise InvalidParameterError(f"`delta_nll_by_j` keys must be integers j >= 1; got {j!r}.")
            columns[int(j)] = as_1d_float(f"delta_nll_by_j[{j}]", delta_nll_by_j[j])
        return columns
    try:
        arr = np.asarray(delta_nll_by_j, dtype=float)
    except (TypeError, ValueError):
        raise InvalidParameterError(
            f"`delta_nll_by_j` must be a 2-D array (tokens × j) or a mapping {{j: values}}; "
            f"got {type(delta_nll_by_j).__name__}."
        ) from None
    if arr.ndim != 2:
        raise InvalidParameterError(
            f"`delta_nll_by_j` must be a 2-D array (tokens × j) or a mapping {{j: values}}; got shape {arr.shape}."
        )
    if np.isinf(arr).any():
        raise InvalidParameterError("`delta_nll_by_j` must be finite (NaN marks a missing value); got inf.")
    return {j + 1: arr[:, j] for j in range(arr.shape[1])}
