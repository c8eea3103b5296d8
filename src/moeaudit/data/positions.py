r"""The position sets of arXiv 2606.10703's released scripts, replayed for ``position_sets = "paper_code"``.

The OLMoE and DeepSeek-V2-Lite scripts (github.com/callmeloui/observational_metrics,
``per_token_ablation_olmoe.py``, ``per_token_ablation_deepseek.py``) run once per layer in a fresh process.
Each seeds numpy's global generator (``np.random.seed(42)``), tokenises the texts padded to the longest
one, numbers every position of the padded batch ``g = doc * L + pos`` (L the padded length), keeps the
positions with a real next token, and then, for each of its four metrics in turn (utilisation,
activation norm, mean routing weight when active, activation std), draws
``np.random.choice(valid_positions, size=200, replace=False)`` from that one global stream. Every layer
therefore tests metric i on the same i-th position set, and the four sets differ.

The intervene stage intervenes at the union of the sets and the audit tests metric i on set i; both take
them from :func:`run_position_sets`, which is why it sits below both. moeaudit's own default draws one set
per layer for every metric from ``default_rng([seed, layer])``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from numpy.typing import NDArray

from moeaudit.errors import invalid

__all__ = ["PAPER_CODE_DRAWS", "paper_code_positions", "run_position_sets"]

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


def run_position_sets(config: Any, tokens: Any) -> list[NDArray[np.int64]] | None:
    """A run's position sets when its ``position_sets`` is ``paper_code`` (else None): one per audit metric,
    in the order of ``audit_metrics``, over the windows of ``tokens`` (the intervened ones,
    :meth:`moeaudit.rundir.RunDir.intervened_tokens`), ``intervene_n`` positions each, seeded with ``seed``.

    Raises the one-line :class:`moeaudit.errors.InvalidParameterError` when the run cannot have them: no
    ``intervene_n`` or no ``audit_metrics`` to pair the sets with.
    """
    if config.position_sets != "paper_code":
        return None
    if config.intervene_n is None:
        raise invalid("intervene_n", "a number of positions per set with position_sets = \"paper_code\"", None)
    if not config.audit_metrics:
        raise invalid("audit_metrics", "the metrics, in the order their sets are drawn, with position_sets = "
                      "\"paper_code\"", config.audit_metrics)
    lengths = {int(seq): int(size) for seq, size in tokens.groupby("seq").size().items()}
    return paper_code_positions(lengths, n=config.intervene_n, seed=config.seed, draws=len(config.audit_metrics))
