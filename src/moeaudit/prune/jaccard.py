"""Interchangeability of criteria: Jaccard overlap of the experts they drop.

If criteria are interchangeable because the layers are redundant (the paper's explanation for why pruning
"works"), their dropped sets may still differ; if they drop the same experts, they agree for another
reason. The reference is two independent uniform draws, whose expected overlap is exact
(:func:`expected_random_jaccard`).
"""

from __future__ import annotations

import itertools
from typing import Iterable, Mapping, Sequence

import numpy as np
import pandas as pd
from scipy.stats import hypergeom

from moeaudit.options import RANDOM
from moeaudit.tables import JACCARD_COLUMNS


def jaccard(a: Iterable[int], b: Iterable[int]) -> float:
    """|A ∩ B| / |A ∪ B|; 1 for two empty sets."""
    a, b = set(a), set(b)
    union = a | b
    return len(a & b) / len(union) if union else 1.0


def expected_random_jaccard(num_experts: int, n_dropped: int, groups: int = 1) -> float:
    r"""Expected Jaccard overlap of two independent uniform ``n_dropped``-subsets of ``num_experts``; with
    ``groups`` > 1, of two group-balanced ones (``n_dropped / groups`` uniform from each of ``groups`` equal
    groups, :func:`moeaudit.prune.criteria.dropped_experts`' ``groups``).

    Notes
    -----
    The intersection X of two uniform d-subsets of E items is hypergeometric (E, d, d), and
    :math:`J = X / (2d - X)`, so :math:`E[J] = \sum_x P(X = x)\, x / (2d - x)` (exact; 1 when d = E). Two
    group-balanced draws intersect independently in each group, so X is the sum of ``groups`` hypergeometric
    (E/g, d/g, d/g) variables: its pmf is their convolution.
    """
    d, g = int(n_dropped), max(int(groups), 1)
    if d <= 0:
        return 1.0
    if g == 1 or d % g or num_experts % g:
        x = np.arange(max(0, 2 * d - num_experts), d + 1)
        pmf = hypergeom.pmf(x, num_experts, d, d)
    else:
        per, share = num_experts // g, d // g
        one = hypergeom.pmf(np.arange(share + 1), per, share, share)  # overlap within one group, 0..share
        pmf = np.ones(1)
        for _ in range(g):
            pmf = np.convolve(pmf, one)
        x = np.arange(len(pmf))  # 0..d
    return float(np.sum(pmf * x / (2 * d - x)))


def jaccard_table(dropped: Mapping[tuple[str, float, int | None], Mapping[int, Sequence[int]]],
                  num_experts: Mapping[int, int], groups: Mapping[int, int] | None = None) -> pd.DataFrame:
    """Per (ratio, layer): Jaccard of the dropped sets of every pair of criteria, and of each vs random.

    Parameters
    ----------
    dropped : mapping (criterion, ratio, seed) -> {layer: dropped experts}
        Deterministic criteria have seed None; ``random`` has one entry per seed.
    num_experts : mapping layer -> int
    groups : mapping layer -> int, optional
        The expert groups of a group-balanced selection (the random draws' reference is then two
        group-balanced draws).

    Returns
    -------
    DataFrame
        ``criterion_a``, ``criterion_b``, ``ratio``, ``layer``, ``jaccard``, ``n_pairs``,
        ``expected_random``, ``n_dropped``, ``num_experts``. One row per unordered pair of deterministic
        criteria (a before b in the order given, diagonal included: 1 by definition), one row
        (a, ``random``) per criterion with the mean over seeds, and (``random``, ``random``) with the mean
        over pairs of distinct seeds; ``expected_random`` is the exact expectation for two uniform draws
        (group-balanced ones with ``groups``).
    """
    criteria = list(dict.fromkeys(c for c, _, _ in dropped if c != RANDOM))
    ratios = sorted({r for _, r, _ in dropped})
    rows = []
    for ratio in ratios:
        fixed = {c: dropped[(c, r, s)] for (c, r, s) in dropped if r == ratio and c != RANDOM}
        draws = [dropped[(c, r, s)] for (c, r, s) in sorted(dropped, key=lambda k: (k[0], k[1], k[2] or 0))
                 if r == ratio and c == RANDOM]
        layers = sorted({l for sets in list(fixed.values()) + draws for l in sets})
        for layer in layers:
            sizes = {len(sets[layer]) for sets in list(fixed.values()) + draws if layer in sets}
            d = max(sizes) if sizes else 0
            base = dict(ratio=float(ratio), layer=int(layer), expected_random=expected_random_jaccard(
                num_experts[layer], d, (groups or {}).get(layer, 1)), n_dropped=d,
                num_experts=int(num_experts[layer]))
            present = [c for c in criteria if c in fixed and layer in fixed[c]]
            for i, a in enumerate(present):
                for b in present[i:]:
                    rows.append(dict(base, criterion_a=a, criterion_b=b, n_pairs=1,
                                     jaccard=jaccard(fixed[a][layer], fixed[b][layer])))
                layer_draws = [sets[layer] for sets in draws if layer in sets]
                if layer_draws:
                    values = [jaccard(fixed[a][layer], s) for s in layer_draws]
                    rows.append(dict(base, criterion_a=a, criterion_b=RANDOM, n_pairs=len(values),
                                     jaccard=float(np.mean(values))))
            layer_draws = [sets[layer] for sets in draws if layer in sets]
            if len(layer_draws) > 1:
                values = [jaccard(x, y) for x, y in itertools.combinations(layer_draws, 2)]
                rows.append(dict(base, criterion_a=RANDOM, criterion_b=RANDOM, n_pairs=len(values),
                                 jaccard=float(np.mean(values))))
    return pd.DataFrame(rows, columns=list(JACCARD_COLUMNS))


def layer_jaccard_summary(table: pd.DataFrame) -> pd.DataFrame:
    """Per (ratio, layer): how much the deterministic criteria agree, against the random expectation.

    Returns
    -------
    DataFrame
        ``ratio``, ``layer``, ``n_criteria``, ``mean_jaccard`` / ``min_jaccard`` / ``max_jaccard`` over
        distinct pairs of deterministic criteria, ``mean_jaccard_vs_random`` (criteria against random
        draws), ``expected_random``.
    """
    out = []
    for (ratio, layer), group in table.groupby(["ratio", "layer"], sort=True):
        pairs = group[(group.criterion_a != group.criterion_b) & (group.criterion_a != RANDOM)
                      & (group.criterion_b != RANDOM)]
        vs_random = group[(group.criterion_b == RANDOM) & (group.criterion_a != RANDOM)]
        names = set(group.loc[group.criterion_a != RANDOM, "criterion_a"])
        out.append(dict(ratio=float(ratio), layer=int(layer), n_criteria=len(names),
                        mean_jaccard=float(pairs.jaccard.mean()) if len(pairs) else np.nan,
                        min_jaccard=float(pairs.jaccard.min()) if len(pairs) else np.nan,
                        max_jaccard=float(pairs.jaccard.max()) if len(pairs) else np.nan,
                        mean_jaccard_vs_random=float(vs_random.jaccard.mean()) if len(vs_random) else np.nan,
                        expected_random=float(group.expected_random.iloc[0])))
    return pd.DataFrame(out)
