"""Grouped reductions shared by the metric functions (private).

Every routing-based metric is a reduction of one value per routing row (one row = one token's use of
one expert) grouped by expert. These helpers do that reduction with ``np.bincount`` so that a layer of
a million rows reduces in milliseconds.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike, NDArray


def as_expert_index(expert: ArrayLike) -> NDArray[np.int64]:
    """Return ``expert`` as a 1-D int64 array (the row's expert id)."""
    return np.asarray(expert, dtype=np.int64).reshape(-1)


def as_values(values: ArrayLike, n_rows: int, name: str) -> NDArray[np.float64]:
    """Return ``values`` as a 1-D float64 array with one entry per routing row."""
    out = np.asarray(values, dtype=np.float64).reshape(-1)
    if out.shape[0] != n_rows:
        raise ValueError(f"`{name}` must have one value per routing row ({n_rows}); got {out.shape[0]}.")
    return out


def group_count(expert: NDArray[np.int64], num_experts: int) -> NDArray[np.int64]:
    """Number of rows per expert, shape ``[num_experts]``."""
    return np.bincount(expert, minlength=num_experts).astype(np.int64, copy=False)


def group_sum(expert: NDArray[np.int64], values: NDArray[np.float64], num_experts: int) -> NDArray[np.float64]:
    """Sum of ``values`` per expert, shape ``[num_experts]``; 0 for experts with no rows."""
    return np.bincount(expert, weights=values, minlength=num_experts).astype(np.float64, copy=False)


def group_mean(expert: NDArray[np.int64], values: NDArray[np.float64], num_experts: int) -> NDArray[np.float64]:
    """Mean of ``values`` per expert over its rows; NaN for experts with no rows."""
    count = group_count(expert, num_experts)
    total = group_sum(expert, values, num_experts)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / np.maximum(count, 1), np.nan)
