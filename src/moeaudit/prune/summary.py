"""Summaries of ``pruning.parquet`` (and ``jaccard.parquet``): one computation for the report, the tables and
the terminal. Torch-free: the report imports this module.

Contract read here (the prune stage's tables, :mod:`moeaudit.prune.stage`): ``pruning.parquet`` has
``criterion``, ``ratio``, ``seed`` (null for deterministic criteria), a held-out column (``heldout_ppl``
preferred, else ``heldout_nll``) and ``mode``: ``all_layers`` rows are the layers of one whole-model pruning,
each carrying the whole model's held-out value; ``single_layer`` rows prune only ``layer``. Without a ``mode``
column, rows whose ``layer`` is null or negative are whole-model rows and the others single-layer ones (or, if
there are no such rows, every row is read as one layer of a whole-model pruning). ``unpruned_ppl`` /
``unpruned_nll`` give the unpruned reference. The criterion ``random`` is drawn with many seeds and forms the
reference band. ``jaccard.parquet`` (``criterion_a``, ``criterion_b``, ``ratio``, ``layer``, ``jaccard``) gives
the overlap of dropped sets; without it they are computed from the per-layer ``kept`` lists.

:func:`whole_model`, :func:`per_layer` and :func:`summary` are the computation; :func:`pruning_summary`
arranges their result for a terminal (:class:`PruningSummary`, tables of text for the CLI's printer) and
:mod:`moeaudit.report.tables` for the report. :func:`kept_from_table` reads one pruning's kept sets back.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Callable, NamedTuple

import numpy as np
import pandas as pd

from moeaudit.errors import InvalidParameterError, invalid
from moeaudit.options import RANDOM
from moeaudit.prune.jaccard import layer_jaccard_summary

#: The random draws' band: their 5 % and 95 % quantiles.
BAND = (0.05, 0.95)
#: The two pruning modes of ``pruning.parquet``: every MoE layer at once, or one layer alone.
ALL_LAYERS, SINGLE_LAYER = "all_layers", "single_layer"


def value_column(pruning: pd.DataFrame) -> str | None:
    for column in ("heldout_ppl", "heldout_nll"):
        if column in pruning and pruning[column].notna().any():
            return column
    return None


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


# ---------------------------------------------------------------------------------------------- the terminal
@dataclass(frozen=True)
class PruningSummary:
    """What the demo and ``moeaudit prune`` print: held-out perplexity by criterion × ratio against the random
    band, per-layer agreement. Every number comes from :func:`summary` / :func:`per_layer`, as in the report.

    Attributes
    ----------
    perplexity : DataFrame
        Index criterion (deterministic), columns ratio: held-out perplexity with all layers pruned.
    percentile : DataFrame
        Same shape: the criterion's percentile in the random distribution (low = better than random).
    random : DataFrame
        Index ratio: ``median``, ``p05``, ``p95`` of the random draws' perplexity, ``n_seeds``.
    unpruned_ppl : float
    layers : DataFrame
        Per (ratio, layer): Jaccard agreement of the criteria (:func:`layer_jaccard_summary`) and, from
        single-layer pruning, the range of the criteria's perplexity and the random 5–95 % band.
    selection : str
        ``global`` or ``group_balanced`` (``pruning.parquet``'s ``selection``: how every criterion chose).
    """

    perplexity: pd.DataFrame
    percentile: pd.DataFrame
    random: pd.DataFrame
    unpruned_ppl: float
    layers: pd.DataFrame
    selection: str = "global"

    def frames(self, digits: int = 2) -> list[SummaryTable]:
        """The summary as tables of text: criteria × ratios, then (when there are any) the per-layer rows.

        Every cell is text formatted here (``digits`` decimals for perplexities, two for Jaccard overlaps), so
        that any printer shows the same numbers: ``moeaudit prune`` and the demo print them with
        :func:`moeaudit.cli.common.print_frame`.
        """

        def number(value: float, spec: str = f".{digits}f") -> str:
            return format(value, spec) if np.isfinite(value) else "-"

        ratios = list(self.perplexity.columns) or list(self.random.index)
        rows = []
        for criterion, values in self.perplexity.iterrows():
            cells = []
            for ratio in ratios:
                pct = self.percentile.loc[criterion, ratio] if ratio in self.percentile.columns else np.nan
                cells.append(f"{values[ratio]:.{digits}f}" + (f" ({pct:.0f}%)" if np.isfinite(pct) else ""))
            rows.append([str(criterion), *cells])
        if len(self.random):
            rows.append(["random median [5-95%]", *[
                (f"{self.random.loc[r, 'median']:.{digits}f} [{self.random.loc[r, 'p05']:.{digits}f}, "
                 f"{self.random.loc[r, 'p95']:.{digits}f}]") if r in self.random.index else "" for r in ratios]])
        draws = f"{int(self.random['n_seeds'].max())} random draws per ratio" if len(self.random) else None
        out = [SummaryTable(
            f"held-out perplexity, all MoE layers pruned (unpruned {self.unpruned_ppl:.{digits}f})"
            + ("; the same number of experts dropped from each expert group" if self.selection == "group_balanced"
               else "") + "; "
            "(percentile of the random draws: low = better than random)",
            pd.DataFrame(rows, columns=["criterion", *[f"ratio {ratio:g}" for ratio in ratios]]),
            f"({draws})" if draws else None, key=1, left=("criterion",))]
        if len(self.layers):
            rows = []
            for _, row in self.layers.iterrows():
                get = lambda column: float(row.get(column, np.nan))  # noqa: E731 (a column may be absent)
                jaccard = (f"{get('mean_jaccard'):.2f} [{get('min_jaccard'):.2f}, {get('max_jaccard'):.2f}]"
                           if np.isfinite(get("mean_jaccard")) else "-")
                crit = (f"[{get('crit_ppl_min'):.{digits}f}, {get('crit_ppl_max'):.{digits}f}]"
                        if np.isfinite(get("crit_ppl_min")) else "-")
                rand = (f"[{get('random_ppl_p05'):.{digits}f}, {get('random_ppl_p95'):.{digits}f}]"
                        if np.isfinite(get("random_ppl_p05")) else "-")
                rows.append([f"{row['ratio']:g}", str(int(row["layer"])), jaccard,
                             number(get("mean_jaccard_vs_random"), ".2f"), number(get("expected_random"), ".2f"),
                             crit, rand])
            out.append(SummaryTable(
                "per layer: Jaccard of the dropped sets between criteria (mean [min, max]) vs random expectation; "
                "single-layer pruning: criteria's perplexity [min, max] vs random [5%, 95%]",
                pd.DataFrame(rows, columns=["ratio", "layer", "Jaccard criteria", "vs random", "E[random]",
                                            "criteria ppl", "random ppl"]),
                None, key=2, left=("ratio", "Jaccard criteria")))
        return out


class SummaryTable(NamedTuple):
    """One table of :meth:`PruningSummary.frames`: text cells, and how to print them.

    Attributes
    ----------
    title : str
    frame : DataFrame
        Text cells; the column names are the headers.
    caption : str or None
    key : int
        Leading columns that label a row (repeated when a printer splits the columns).
    left : tuple of str
        Columns justified left.
    """

    title: str
    frame: pd.DataFrame
    caption: str | None
    key: int = 1
    left: tuple[str, ...] = ()


def selection_of(table: pd.DataFrame) -> str:
    """``pruning.parquet``'s ``selection`` (``global`` for a table written before that column existed)."""
    if "selection" not in table or not len(table):
        return "global"
    return str(table["selection"].iloc[0])


def pruning_summary(table: pd.DataFrame, jaccard: pd.DataFrame | None = None) -> PruningSummary:
    """Summarise ``pruning.parquet`` (and ``jaccard.parquet``) for printing.

    Parameters
    ----------
    table : DataFrame
        ``pruning.parquet`` as written by :func:`moeaudit.prune.run_prune`.
    jaccard : DataFrame, optional
        ``jaccard.parquet``; without it the per-layer summary has only the single-layer columns.

    Returns
    -------
    PruningSummary

    Examples
    --------
    >>> summary = pruning_summary(run.read("pruning"), run.read("jaccard"))  # doctest: +SKIP
    >>> [table.title for table in summary.frames()]  # doctest: +SKIP
    """
    rows = table[table["mode"] == ALL_LAYERS].drop_duplicates(["criterion", "ratio", "seed"])
    stats = summary(whole_model(rows))
    if stats.empty:
        stats = pd.DataFrame(columns=["criterion", "ratio", "seeds", "value", "random_median", "random_q05",
                                      "random_q95", "random_percentile"])
    fixed = stats[stats["criterion"] != RANDOM]
    order = list(dict.fromkeys(rows.loc[rows["criterion"] != RANDOM, "criterion"]))
    perplexity = fixed.pivot(index="criterion", columns="ratio", values="value").reindex(order)
    percentile = fixed.pivot(index="criterion", columns="ratio", values="random_percentile").reindex(order)
    draws = stats[stats["criterion"] == RANDOM]
    random = pd.DataFrame({"median": draws["random_median"].to_numpy(dtype=float),
                           "p05": draws["random_q05"].to_numpy(dtype=float),
                           "p95": draws["random_q95"].to_numpy(dtype=float),
                           "n_seeds": draws["seeds"].to_numpy(dtype=int)},
                          index=pd.Index(draws["ratio"].to_numpy(dtype=float), name="ratio"))
    unpruned = baseline(table) if len(table) else None
    layers = layer_jaccard_summary(jaccard) if jaccard is not None and len(jaccard) else pd.DataFrame(
        columns=["ratio", "layer"])
    single = per_layer(table)
    if len(single):
        bands = []
        for (ratio, layer), group in single.groupby(["ratio", "layer"]):
            crit = group.loc[group["criterion"] != RANDOM, "value"]
            rand = group.loc[group["criterion"] == RANDOM, "value"].to_numpy(dtype=float)
            bands.append(dict(ratio=float(ratio), layer=int(layer),
                              crit_ppl_min=float(crit.min()) if len(crit) else np.nan,
                              crit_ppl_max=float(crit.max()) if len(crit) else np.nan,
                              random_ppl_median=float(np.median(rand)) if len(rand) else np.nan,
                              random_ppl_p05=float(np.quantile(rand, BAND[0])) if len(rand) else np.nan,
                              random_ppl_p95=float(np.quantile(rand, BAND[1])) if len(rand) else np.nan))
        bands = pd.DataFrame(bands)
        layers = bands if layers.empty else layers.merge(bands, on=["ratio", "layer"], how="outer")
    layers = layers.sort_values(["ratio", "layer"]).reset_index(drop=True) if len(layers) else layers
    return PruningSummary(perplexity, percentile, random, float("nan") if unpruned is None else unpruned, layers,
                          selection_of(table))


# ---------------------------------------------------------------------------------------------- reading back
def kept_from_table(table: pd.DataFrame, criterion: str, ratio: float, seed: int | None = None) -> dict[int, list[int]]:
    """The kept experts per layer of one all-layers pruning in ``pruning.parquet`` (e.g. to export it).

    ``seed`` is required for ``random`` and ignored otherwise.
    """
    rows = table[table["mode"] == ALL_LAYERS]
    criteria = list(dict.fromkeys(rows["criterion"]))
    if criterion not in criteria:
        raise InvalidParameterError(f"`criterion` must be one of {', '.join(criteria)} (criteria in "
                                    f"pruning.parquet); got {criterion!r}.")
    rows = rows[rows["criterion"] == criterion]
    ratios = sorted(set(rows["ratio"]))
    match = [r for r in ratios if abs(r - float(ratio)) < 1e-9]
    if not match:
        raise invalid("ratio", f"one of {ratios} (ratios pruned by {criterion})", ratio)
    rows = rows[rows["ratio"] == match[0]]
    if criterion == RANDOM:
        seeds = sorted(int(s) for s in rows["seed"].dropna().unique())
        if seed is None or int(seed) not in seeds:
            raise invalid("seed", f"one of the random seeds in pruning.parquet ({seeds[0]}..{seeds[-1]})", seed)
        rows = rows[rows["seed"] == int(seed)]
    return {int(l): [int(e) for e in kept] for l, kept in zip(rows["layer"], rows["kept"])}
