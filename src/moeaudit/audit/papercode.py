r"""The released scripts of arXiv 2606.10703 computed Cohen's d_z as ``diffs.mean() / diffs.std()``: numpy's
default ddof = 0 (github.com/callmeloui/observational_metrics, ``per_token_ablation_olmoe.py``).

moeaudit's audit uses ddof = 1 (:func:`moeaudit.stats.paired_contrast`); ``dz_ddof = 0`` replays the
scripts, and :func:`dz_ddof0` converts a reported d_z. The scripts' position sets are
:func:`moeaudit.data.positions.paper_code_positions` (re-exported here), replayed by
``position_sets = "paper_code"``.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike, NDArray

from moeaudit.data.positions import PAPER_CODE_DRAWS, paper_code_positions, run_position_sets
from moeaudit.errors import invalid

__all__ = ["PAPER_CODE_DRAWS", "dz_ddof0", "paper_code_positions", "run_position_sets"]


def dz_ddof0(d_z: ArrayLike, n: ArrayLike) -> NDArray[np.float64]:
    r"""The scripts' Cohen's d_z (sd with ddof = 0) from moeaudit's (ddof = 1).

    Parameters
    ----------
    d_z : array_like of float
        :math:`\bar d / s_1` with :math:`s_1` the sample sd (ddof = 1), as :func:`moeaudit.stats.paired_contrast`
        reports it.
    n : array_like of int
        Number of pairs, ≥ 2.

    Returns
    -------
    ndarray of float64
        :math:`\bar d / s_0 = d_z \sqrt{n / (n - 1)}`, since :math:`s_0 = s_1 \sqrt{(n-1)/n}`; NaN where
        ``d_z`` is NaN. The p-values do not change: ``scipy.stats.ttest_rel`` uses ddof = 1 either way.

    Examples
    --------
    >>> round(float(dz_ddof0(0.2305, 200)), 4)
    0.2311
    """
    d = np.asarray(d_z, dtype=np.float64)
    count = np.asarray(n, dtype=np.float64)
    if np.any(~np.isfinite(count)) or np.any(count < 2):
        raise invalid("n", "pair counts >= 2", np.asarray(n).tolist())
    return d * np.sqrt(count / (count - 1.0))
