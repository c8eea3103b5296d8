"""Summaries of ``pruning.parquet`` (and ``jaccard.parquet``) shared by the report and the tables.

Contract read here (the prune stage's tables, ``moeaudit.prune.stage``): ``pruning.parquet`` has
``criterion``, ``ratio``, ``seed`` (null for deterministic criteria), a held-out column (``heldout_ppl``
preferred, else ``heldout_nll``) and ``mode``: ``all_layers`` rows are the layers of one whole-model pruning,
each carrying the whole model's held-out value; ``single_layer`` rows prune only ``layer``. Without a ``mode``
column, rows whose ``layer`` is null or negative are whole-model rows and the others single-layer ones (or, if
there are no such rows, every row is read as one layer of a whole-model pruning). ``unpruned_ppl`` /
``unpruned_nll`` give the unpruned reference. The criterion ``random`` is drawn with many seeds and forms the
reference band. ``jaccard.parquet`` (``criterion_a``, ``criterion_b``, ``ratio``, ``layer``, ``jaccard``) gives
the overlap of dropped sets; without it they are computed from the per-layer ``kept`` lists.
"""

from __future__ import annotations

import itertools
from typing import Callable

import numpy as np
import pandas as pd

from moeaudit.options import RANDOM

BAND = (0.05, 0.95)


def value_column(pruning: pd.DataFrame) -> str | None:
    for column in ("heldout_ppl", "heldout_nll"):
        if column in pruning and pruning[column].notna().any():
            return column
    return None


ALL_LAYERS, SINGLE_LAYER = "all_layers", "single_layer"


def _layer_mask(pruning: pd.DataFrame) -> pd.Series:
    """True for rows that describe one layer pruned alone (see the module docstring)."""
    if "mode" in pruning:
        return pruning["mode"] == SINGLE_LAYER
    if "layer" not in pruning:
        return pd.Series(False, index=pruning.index)
    layer = pd.to_numeric(pruning["layer"], errors="coerce")
    whole = layer.isna() | (layer < 0)
    if not whole.any():
        return pd.Series(False, index=pruning.index)
    return ~whole


def baseline(pruning: pd.DataFrame) -> float | None:
    """The unpruned model's held-out value in the same unit as :func:`value_column`, if recorded."""
    column = value_column(pruning)
    reference = {"heldout_ppl": "unpruned_ppl", "heldout_nll": "unpruned_nll"}.get(column or "")
    if reference in pruning and pruning[reference].notna().any():
        return float(pruning[reference].dropna().iloc[0])
    zero = pruning[pd.to_numeric(pruning["ratio"], errors="coerce") == 0] if column else pruning.iloc[:0]
    return float(zero[column].mean()) if len(zero) else None


def whole_model(pruning: pd.DataFrame) -> pd.DataFrame:
    """One row per (criterion, ratio, seed) with the whole-model held-out value ``value``."""
    column = value_column(pruning)
    if column is None:
        return pd.DataFrame(columns=["criterion", "ratio", "seed", "value"])
    rows = pruning[~_layer_mask(pruning)]
    seed = rows["seed"] if "seed" in rows else pd.Series(0, index=rows.index)
    frame = rows.assign(seed=seed.fillna(0)).groupby(["criterion", "ratio", "seed"], as_index=False)[column].mean()
    return frame.rename(columns={column: "value"})


def per_layer(pruning: pd.DataFrame) -> pd.DataFrame:
    """One row per (layer, criterion, ratio, seed) for layers pruned alone; empty when there are none."""
    column = value_column(pruning)
    mask = _layer_mask(pruning)
    if column is None or not mask.any():
        return pd.DataFrame(columns=["layer", "criterion", "ratio", "seed", "value"])
    rows = pruning[mask]
    seed = rows["seed"] if "seed" in rows else pd.Series(0, index=rows.index)
    frame = rows.assign(seed=seed.fillna(0), layer=rows["layer"].astype(int))
    frame = frame.groupby(["layer", "criterion", "ratio", "seed"], as_index=False)[column].mean()
    return frame.rename(columns={column: "value"})


def summary(frame: pd.DataFrame) -> pd.DataFrame:
    """Per criterion × ratio: mean value over seeds, and the random band (median, 5–95 %) with the criterion's
    percentile in it: the share of random draws with a lower held-out loss, ties counting half, in %
    (0 = better than every random draw; the prune stage's ``random_percentile``)."""
    out = []
    random = frame[frame["criterion"] == RANDOM]
    for (criterion, ratio), group in frame.groupby(["criterion", "ratio"], sort=True):
        draws = random.loc[random["ratio"] == ratio, "value"].to_numpy(dtype=float)
        value = float(group["value"].mean())
        row = {"criterion": criterion, "ratio": float(ratio), "seeds": int(group["seed"].nunique()), "value": value,
               "random_median": np.nan, "random_q05": np.nan, "random_q95": np.nan, "random_percentile": np.nan}
        if len(draws):
            row.update(random_median=float(np.median(draws)), random_q05=float(np.quantile(draws, BAND[0])),
                       random_q95=float(np.quantile(draws, BAND[1])))
            if criterion != RANDOM:
                row["random_percentile"] = float(100.0 * (np.mean(draws < value) + 0.5 * np.mean(draws == value)))
        out.append(row)
    return pd.DataFrame(out)


def criteria_order(frame: pd.DataFrame) -> list[str]:
    """Criteria sorted by their mean value at the largest ratio (best first), ``random`` last."""
    if frame.empty:
        return []
    top = frame[frame["ratio"] == frame["ratio"].max()].groupby("criterion")["value"].mean().sort_values()
    names = [c for c in top.index if c != RANDOM] + [c for c in frame["criterion"].unique() if c not in top.index]
    return names + ([RANDOM] if RANDOM in set(frame["criterion"]) else [])


def jaccard_matrices(pruning: pd.DataFrame | None, jaccard: pd.DataFrame | None,
                     num_experts: Callable[[int], int | None]) -> dict[float, pd.DataFrame]:
    """Per ratio, a criterion × criterion matrix of mean Jaccard overlap of the dropped sets (over layers)."""
    if jaccard is not None and not jaccard.empty:
        return _from_jaccard_table(jaccard)
    if pruning is None or "kept" not in pruning or "layer" not in pruning:
        return {}
    rows = pruning[~_layer_mask(pruning)] if "mode" in pruning else pruning
    rows = rows[pd.to_numeric(rows["layer"], errors="coerce").notna()]
    rows = rows[pd.to_numeric(rows["layer"], errors="coerce") >= 0]
    if rows.empty:
        return {}
    seed = rows["seed"] if "seed" in rows else pd.Series(0, index=rows.index)
    rows = rows.assign(seed=seed.fillna(0))
    out: dict[float, pd.DataFrame] = {}
    for ratio, at_ratio in rows.groupby("ratio"):
        if float(ratio) <= 0:
            continue
        criteria = [c for c in sorted(at_ratio["criterion"].unique()) if c != RANDOM]
        criteria += [RANDOM] if RANDOM in set(at_ratio["criterion"]) else []
        sums = pd.DataFrame(0.0, index=criteria, columns=criteria)
        counts = pd.DataFrame(0, index=criteria, columns=criteria)
        for layer, group in at_ratio.groupby("layer"):
            n_experts = num_experts(int(layer))
            if n_experts is None:
                n_experts = 1 + max(max(kept) for kept in group["kept"] if len(kept))
            universe = set(range(n_experts))
            dropped = {criterion: [universe - {int(e) for e in kept} for kept in sub.drop_duplicates("seed")["kept"]]
                       for criterion, sub in group.groupby("criterion")}
            for a, b in itertools.product(dropped, repeat=2):
                pairs = ([(x, y) for x, y in itertools.combinations(dropped[a], 2)] if a == b and len(dropped[a]) > 1
                         else [(x, y) for x in dropped[a] for y in dropped[b]])
                values = [len(x & y) / len(x | y) if (x | y) else 1.0 for x, y in pairs]
                if values:
                    sums.loc[a, b] += float(np.mean(values))
                    counts.loc[a, b] += 1
        out[float(ratio)] = sums / counts.where(counts > 0)
    return out


def _from_jaccard_table(jaccard: pd.DataFrame) -> dict[float, pd.DataFrame]:
    text = [c for c in jaccard.columns if jaccard[c].dtype == object or pd.api.types.is_string_dtype(jaccard[c])]
    value = "jaccard" if "jaccard" in jaccard else jaccard.select_dtypes("number").columns[-1]
    if len(text) < 2:
        return {}
    a, b = text[:2]
    ratios = jaccard.groupby("ratio") if "ratio" in jaccard else [(np.nan, jaccard)]
    out = {}
    for ratio, group in ratios:
        mean = group.groupby([a, b])[value].mean()
        # symmetric: fill (b, a) from (a, b) where only one direction is stored
        matrix = mean.unstack()
        names = sorted(set(matrix.index) | set(matrix.columns), key=lambda c: (c == RANDOM, c))
        matrix = matrix.reindex(index=names, columns=names)
        matrix = matrix.combine_first(matrix.T)
        for name in names:
            if pd.isna(matrix.loc[name, name]):
                matrix.loc[name, name] = 1.0
        out[float(ratio)] = matrix.reindex(index=names, columns=names)
    return out
