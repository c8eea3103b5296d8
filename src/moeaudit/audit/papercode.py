r"""Replays of two sampling and statistics choices of arXiv 2606.10703's released scripts.

The OLMoE and DeepSeek-V2-Lite scripts (github.com/callmeloui/observational_metrics,
``per_token_ablation_olmoe.py``, ``per_token_ablation_deepseek.py``) run once per layer in a fresh process.
Each seeds numpy's global generator (``np.random.seed(42)``), tokenises the texts padded to the longest
one, numbers every position of the padded batch ``g = doc * L + pos`` (L the padded length), keeps the
positions with a real next token, and then, for each of its four metrics in turn (utilisation,
activation norm, mean routing weight when active, activation std), draws
``np.random.choice(valid_positions, size=200, replace=False)`` from that one global stream. Every layer
therefore tests metric i on the same i-th position set, and the four sets differ. Cohen's d_z is
``diffs.mean() / diffs.std()``: numpy's default ddof = 0.

moeaudit's audit draws one set per layer for every metric, from ``default_rng([seed, layer])``, and uses
ddof = 1 (:func:`moeaudit.stats.paired_contrast`). The scripts' sets are
:func:`moeaudit.data.positions.paper_code_positions` (re-exported here), replayed by
``position_sets = "paper_code"``; their d_z is ``dz_ddof = 0``, and :func:`dz_ddof0` converts a reported one.
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
