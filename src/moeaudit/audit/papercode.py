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
ddof = 1 (:func:`moeaudit.stats.paired_contrast`). :func:`paper_code_positions` and :func:`dz_ddof0`
give the scripts' choices as pure functions.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from numpy.typing import ArrayLike, NDArray

from moeaudit.errors import invalid

__all__ = ["PAPER_CODE_DRAWS", "dz_ddof0", "paper_code_positions"]

#: Position sets the scripts draw per layer, one per metric, in this order (arXiv 2606.10703).
PAPER_CODE_DRAWS: tuple[str, ...] = ("utilization", "activation_norm", "mean_routing_weight_when_active",
                                     "activation_std")


def paper_code_positions(lengths: Mapping[int, int], n: int = 200, seed: int = 42,
                         draws: int = len(PAPER_CODE_DRAWS)) -> list[NDArray[np.int64]]:
    r"""The scripts' position sets: ``draws`` samples of ``n`` positions from numpy's legacy global stream.

    Parameters
    ----------
    lengths : mapping of int to int
        Token count of each window, by ``seq``. The windows, in ascending ``seq`` order, must be the
        scripts' tokenised texts in corpus order (one window per text, as ``first_docs`` + ``truncate``
        give), so that ``L = max(lengths)`` is the scripts' padded length.
    n : int
        Positions per set (the scripts: 200); all valid positions when fewer exist, as ``min(n, M)``.
    seed : int
        The seed of ``np.random.seed`` (the scripts: 42).
    draws : int
        Sets drawn in sequence (the scripts: 4, one per metric, in the order of :data:`PAPER_CODE_DRAWS`).

    Returns
    -------
    list of ndarray of int64, shape (min(n, M), 2)
        ``draws`` arrays of (seq, pos), each in the order drawn (not sorted).

    Notes
    -----
    With windows :math:`d = 0..D-1` (ascending ``seq``) of lengths :math:`\ell_d` and
    :math:`L = \max_d \ell_d`, the population is the ascending list
    :math:`\{dL + p : 0 \le p \le \ell_d - 2\}` (a position whose next token is real; padding and the
    last token are not). A ``numpy.random.RandomState(seed)`` draws from the same stream as the global
    generator after ``np.random.seed(seed)``, without touching the caller's global state, so the sets
    equal the scripts' when nothing else drew from the global generator first (the scripts draw nothing
    between the seed and the first choice).
    """
    if not isinstance(lengths, Mapping) or not lengths:
        raise invalid("lengths", "a non-empty mapping {seq: window length}", lengths)
    for name, value, low in (("n", n, 1), ("draws", draws, 1), ("seed", seed, 0)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
            raise invalid(name, f"an integer >= {low}", value)
    seqs = sorted(int(s) for s in lengths)
    sizes = [lengths[s] for s in seqs]
    if any(isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1 for v in sizes):
        raise invalid("lengths", "positive window lengths", sizes)
    padded = int(max(sizes))
    population = np.concatenate([d * padded + np.arange(size - 1, dtype=np.int64) for d, size in enumerate(sizes)])
    if population.size == 0:
        raise invalid("lengths", "windows with at least one position that has a next token", sizes)
    stream = np.random.RandomState(int(seed))
    out = []
    for _ in range(int(draws)):
        chosen = stream.choice(population, size=min(int(n), population.size), replace=False)
        doc, pos = np.divmod(chosen.astype(np.int64), padded)
        out.append(np.stack([np.asarray(seqs, dtype=np.int64)[doc], pos], axis=1))
    return out


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
