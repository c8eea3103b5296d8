"""The report's figures, one function per figure, each returning a matplotlib ``Figure`` (or None: nothing to draw).

Figures are built with the object-oriented API on the Agg canvas (no pyplot, no global state), so they can
be made in a library call, a notebook or a test without a display. :func:`save` writes PNG and SVG with
fixed metadata so that the same run gives the same files.
"""

from __future__ import annotations

import base64
import io
import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from moeaudit.report import _pruning

#: Style shared by every figure: DejaVu Sans ships with matplotlib, so no system or web font is needed.
STYLE: dict[str, Any] = {
    "font.family": "DejaVu Sans", "font.size": 8.5, "axes.titlesize": 9, "axes.labelsize": 8.5,
    "xtick.labelsize": 7.5, "ytick.labelsize": 7.5, "legend.fontsize": 7.5, "axes.spines.top": False,
    "axes.spines.right": False, "axes.grid": True, "grid.alpha": 0.25, "grid.linewidth": 0.6,
    "svg.hashsalt": "moeaudit", "figure.dpi": 100, "savefig.dpi": 110, "savefig.bbox": "tight",
}
PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf", "#bcbd22",
           "#7f7f7f"]
DEAD, DOMINANT, NORMAL = "#d62728", "#ff7f0e", "#4c72b0"
WIDTH = 7.2  # inches; ~790 px at savefig.dpi: readable without scaling down in an 800 px wide window


def style():
    """Context manager applying :data:`STYLE`; build and save figures inside it (rcParams stay untouched)."""
    import matplotlib

    return matplotlib.rc_context(STYLE)


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def _grid(n: int, max_cols: int = 4) -> tuple[int, int]:
    cols = min(max_cols, max(1, n))
    return math.ceil(n / cols), cols


def save(fig, stem: Path) -> tuple[Path, Path, str]:
    """Write ``stem.png`` and ``stem.svg``; return both paths and the PNG as a base64 string."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", metadata={"Software": None})
    png = buffer.getvalue()
    png_path, svg_path = stem.with_suffix(".png"), stem.with_suffix(".svg")
    png_path.write_bytes(png)
    fig.savefig(svg_path, format="svg", metadata={"Date": None, "Creator": None})
    return png_path, svg_path, base64.b64encode(png).decode("ascii")


# ---------------------------------------------------------------------------------------------- routing load
def load_bars(metrics: pd.DataFrame, load: pd.DataFrame, dominant_factor: float):
    """Per layer: frequency of each expert, the uniform share k/E dashed, dead experts red, dominant orange."""
    layers = sorted(int(x) for x in metrics["layer"].unique())
    n_rows, n_cols = _grid(len(layers))
    fig = _figure(WIDTH, 1.75 * n_rows + 0.3)
    axes = np.atleast_1d(fig.subplots(n_rows, n_cols, squeeze=False, sharey=True)).ravel()
    info = load.set_index("layer")
    for ax, layer in zip(axes, layers):
        group = metrics[metrics["layer"] == layer].sort_values("expert")
        freq = group["frequency"].to_numpy(dtype=float)
        row = info.loc[layer]
        uniform = (row["top_k"] / row["experts"]) if pd.notna(row["top_k"]) else float(np.mean(freq))
        count = group["count"].to_numpy() if "count" in group else freq
        colors = np.where(count == 0, DEAD, np.where(freq >= dominant_factor * uniform, DOMINANT, NORMAL))
        ax.bar(group["expert"], freq, color=colors, width=0.85)
        dead = group["expert"].to_numpy()[count == 0]
        if len(dead):
            ax.plot(dead, np.zeros(len(dead)), "x", color=DEAD, markersize=5, clip_on=False)
        ax.axhline(uniform, color="black", linestyle="--", linewidth=0.8)
        ax.set_title(f"layer {layer}\n{int(row['dead'])} dead, {int(row['dominant'])} dominant, "
                     f"H={row['load_entropy']:.2f}", loc="left", fontsize=7.5)
        ax.set_xlim(-0.8, len(freq) - 0.2)
        ax.grid(axis="x", visible=False)
    for ax in axes[len(layers):]:
        ax.set_visible(False)
    for ax in axes[::n_cols]:
        ax.set_ylabel("frequency")
    for ax in axes[max(0, len(layers) - n_cols):len(layers)]:
        ax.set_xlabel("expert")
    return fig


def domain_heatmap(by_domain: pd.DataFrame, metrics: pd.DataFrame, *, max_layers: int = 12):
    """Per layer: log2 of an expert's frequency on a domain over its overall frequency (domain × expert)."""
    from matplotlib.colors import TwoSlopeNorm

    layers = sorted(int(x) for x in by_domain["layer"].unique())
    if len(layers) > max_layers:
        layers = [layers[i] for i in np.unique(np.linspace(0, len(layers) - 1, max_layers).round().astype(int))]
    domains = sorted(str(d) for d in by_domain["domain"].dropna().unique())
    n_rows, n_cols = _grid(len(layers), max_cols=2)
    fig = _figure(WIDTH, (0.17 * len(domains) + 0.9) * n_rows + 0.6)
    axes = np.atleast_1d(fig.subplots(n_rows, n_cols, squeeze=False)).ravel()
    overall = metrics.set_index(["layer", "expert"])["frequency"]
    norm = TwoSlopeNorm(vmin=-2, vcenter=0, vmax=2)
    image = None
    for ax, layer in zip(axes, layers):
        part = by_domain[by_domain["layer"] == layer]
        grid = part.pivot_table(index="domain", columns="expert", values="frequency", aggfunc="mean")
        grid = grid.reindex(index=domains)
        base = overall.loc[layer].reindex(grid.columns).to_numpy(dtype=float)
        with np.errstate(divide="ignore", invalid="ignore"):
            lift = np.log2(grid.to_numpy(dtype=float) / base[None, :])
        lift = np.clip(np.where(np.isneginf(lift), -2, lift), -2, 2)
        image = ax.imshow(lift, aspect="auto", cmap="RdBu_r", norm=norm, interpolation="nearest")
        ax.set_yticks(range(len(domains)), domains)
        step = max(1, math.ceil(len(grid.columns) / 8))
        ax.set_xticks(range(0, len(grid.columns), step), [str(int(c)) for c in grid.columns[::step]])
        ax.set_title(f"layer {layer}", loc="left")
        ax.set_xlabel("expert")
        ax.grid(False)
    for ax in axes[len(layers):]:
        ax.set_visible(False)
    if image is not None:
        bar = fig.colorbar(image, ax=axes[:len(layers)].tolist(), shrink=0.8, aspect=30, pad=0.01)
        bar.set_label("log2(domain freq / overall freq)")
    return fig


# ---------------------------------------------------------------------------------------------- audit
def metric_scatter(metrics: pd.DataFrame, expert_effects: pd.DataFrame, tests: pd.DataFrame | None,
                   metric_names: Sequence[str], layers: Sequence[int]):
    """Rows = metrics, columns = layers: each expert's metric value vs its mean ΔNLL when removed."""
    joined = metrics.merge(expert_effects, on=["layer", "expert"], how="inner")
    rho = {}
    if tests is not None:
        level = tests[tests["design"] == "expert_level"]
        rho = {(r.metric, int(r.layer)): (r.effect, r.verdict) for r in level.itertuples()}
    n_rows, n_cols = len(metric_names), len(layers)
    fig = _figure(WIDTH, 1.55 * n_rows + 0.4)
    axes = fig.subplots(n_rows, n_cols, squeeze=False)
    for i, metric in enumerate(metric_names):
        for j, layer in enumerate(layers):
            ax = axes[i, j]
            part = joined[joined["layer"] == layer]
            ax.scatter(part[metric], part["mean_delta_nll"], s=9, color=PALETTE[i % len(PALETTE)], alpha=0.8,
                       linewidths=0)
            effect, verdict = rho.get((metric, layer), (np.nan, None))
            if np.isfinite(effect):
                ax.text(0.03, 0.95, f"ρ={effect:+.2f}{'*' if verdict == 'significant' else ''}",
                        transform=ax.transAxes, va="top", fontsize=7.5,
                        fontweight="bold" if verdict == "significant" else "normal")
            if i == 0:
                ax.set_title(f"layer {layer}")
            if j == 0:
                ax.set_ylabel("mean ΔNLL (nats)")
            ax.set_xlabel(metric, fontsize=7, labelpad=1)
            ax.tick_params(labelsize=6.5)
            ax.xaxis.get_offset_text().set_fontsize(6)
    return fig


#: Marker colours of the audit forest plot: significant with d_z > 0, significant with d_z < 0, not significant.
FOREST_POS, FOREST_NEG, FOREST_NS = "#2e7d32", "#c05a12", "#6b7280"


def audit_forest(paired: pd.DataFrame, max_cols: int = 4):
    """d_z with its 95 % CI per metric × layer (one row each), one panel per layer, metrics on the y axis.

    Parameters
    ----------
    paired : DataFrame
        The ``paired`` rows of ``tests.parquet``: ``metric``, ``layer``, ``effect`` (d_z), ``ci_low``,
        ``ci_high``, ``verdict``.
    max_cols : int
        Panels per figure row.

    Returns
    -------
    matplotlib.figure.Figure or None
        None when there is no row. Every panel lists every metric of the table, in table order, so that a
        row is one metric × layer cell; a filled marker passed the corrected test (green: the metric's
        favourite mattered more, orange: reversed), a hollow grey one did not, and an untestable cell is
        written out at zero.
    """
    if paired.empty:
        return None
    metrics = [str(m) for m in paired["metric"].drop_duplicates()]
    layers = sorted(int(x) for x in paired["layer"].unique())
    n_rows, n_cols = _grid(len(layers), max_cols)
    fig = _figure(WIDTH, n_rows * (0.17 * len(metrics) + 0.75) + 0.35)
    axes = np.atleast_1d(fig.subplots(n_rows, n_cols, squeeze=False, sharex=True)).ravel()
    finite = paired[np.isfinite(paired["effect"].to_numpy(dtype=float))]
    bound = float(np.nanmax(np.abs(finite[["ci_low", "ci_high", "effect"]].to_numpy(dtype=float)))) \
        if len(finite) else 1.0
    bound = 1.08 * bound if np.isfinite(bound) and bound > 0 else 1.0
    y_of = {metric: i for i, metric in enumerate(metrics)}
    for index, (ax, layer) in enumerate(zip(axes, layers)):
        cells = paired[paired["layer"] == layer]
        for row in cells.itertuples():
            y = y_of[str(row.metric)]
            if not np.isfinite(row.effect):
                ax.text(0, y, "untestable", ha="center", va="center", fontsize=6.5, color=FOREST_NS,
                        style="italic")
                continue
            significant = row.verdict == "significant"
            color = (FOREST_POS if row.effect > 0 else FOREST_NEG) if significant else FOREST_NS
            if np.isfinite(row.ci_low) and np.isfinite(row.ci_high):
                ax.plot([row.ci_low, row.ci_high], [y, y], color=color, linewidth=1.3 if significant else 1.0)
            ax.plot([row.effect], [y], "o", markersize=4.5 if significant else 4, color=color,
                    markerfacecolor=color if significant else "white", zorder=3)
        ax.axvline(0, color="black", linewidth=0.7)
        ax.set_yticks(range(len(metrics)), metrics)
        ax.tick_params(axis="y", labelleft=index % n_cols == 0, length=0)
        if index % n_cols == 0:
            ax.set_ylabel("metric")
        ax.set_ylim(len(metrics) - 0.5, -0.5)
        ax.set_xlim(-bound, bound)
        ax.grid(axis="y", visible=False)
        ax.set_title(f"layer {layer}", loc="left")
        if index >= len(layers) - n_cols:
            ax.set_xlabel("d_z (unitless)")
    for ax in axes[len(layers):]:
        ax.set_visible(False)
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], marker="o", color=FOREST_POS, label="significant, d_z > 0 (favourite matters more)"),
               Line2D([], [], marker="o", color=FOREST_NEG, label="significant, d_z < 0 (reversed)"),
               Line2D([], [], marker="o", color=FOREST_NS, markerfacecolor="white", label="not significant"),
               ]
    fig.legend(handles=handles, loc="outside lower center", ncols=3, frameon=False, fontsize=7,
               title="line: 95% CI of d_z of ΔNLL(metric's highest) − ΔNLL(its lowest)", title_fontsize=7)
    return fig


def control_forest(tests: pd.DataFrame):
    """d_z with 95 % CI per layer for the routing-weight control and the random-pair null."""
    designs = [("routing_weight", "token gate (routing-weight control)", PALETTE[0]),
               ("random_pair", "random pair (null)", "#888888")]
    layers = sorted(int(x) for x in tests.loc[tests["design"].isin([d for d, _, _ in designs]), "layer"].unique())
    fig = _figure(WIDTH * 0.62, 0.32 * len(layers) + 1.2)
    ax = fig.subplots()
    offsets = {"routing_weight": -0.12, "random_pair": 0.12}
    for design, label, color in designs:
        cells = tests[tests["design"] == design].sort_values("layer")
        if cells.empty:
            continue
        y = np.array([layers.index(int(x)) for x in cells["layer"]]) + offsets[design]
        significant = (cells["verdict"] == "significant").to_numpy()
        ax.errorbar(cells["effect"], y, xerr=[cells["effect"] - cells["ci_low"], cells["ci_high"] - cells["effect"]],
                    fmt="none", ecolor=color, elinewidth=1.2, capsize=2)
        ax.scatter(cells["effect"][~significant], y[~significant], color="white", edgecolors=color, zorder=3, s=22,
                   label=f"{label}")
        ax.scatter(cells["effect"][significant], y[significant], color=color, zorder=3, s=26,
                   label=f"{label}, significant" if significant.any() else None)
    ax.axvline(0, color="black", linewidth=0.8)
    ax.set_yticks(range(len(layers)), [f"layer {layer}" for layer in layers])
    ax.invert_yaxis()
    ax.set_xlabel("d_z of ΔNLL(high gate) − ΔNLL(low gate)   (> 0: the higher-gated expert matters more)")
    ax.legend(loc="best", frameon=False)
    return fig


def progressive(redundancy: pd.DataFrame, threshold: float = 0.1):
    """Mean and median ΔNLL after removing the top-j experts by gate, one line per layer, cliff marked."""
    layers = sorted(int(x) for x in redundancy["layer"].unique())
    fig = _figure(WIDTH, 3.1)
    ax_mean, ax_median = fig.subplots(1, 2)
    cmap = _layer_colors(len(layers))
    for i, layer in enumerate(layers):
        part = redundancy[redundancy["layer"] == layer].sort_values("j")
        ax_mean.plot(part["j"], part["mean"], "-o", color=cmap[i], markersize=3, label=f"layer {layer}")
        ax_median.plot(part["j"], part["median"], "-o", color=cmap[i], markersize=3, label=f"layer {layer}")
        if "p95" in part:
            ax_median.fill_between(part["j"], part["median"], part["p95"], color=cmap[i], alpha=0.08, linewidth=0)
        cliff = part["cliff"].dropna()
        if len(cliff):
            j = int(cliff.iloc[0])
            at = part.loc[part["j"] == j, "mean"]
            if len(at):
                ax_mean.plot([j], [float(at.iloc[0])], marker="v", markersize=10, color=cmap[i],
                             markeredgecolor="black", zorder=4)
    for ax in (ax_mean, ax_median):
        ax.axhline(threshold, color=DEAD, linestyle=":", linewidth=1)
        ax.set_xlabel("experts removed from the active set (top-j by gate)")
        ax.xaxis.get_major_locator().set_params(integer=True)
    for ax, column in ((ax_mean, "mean"), (ax_median, "median")):
        values = redundancy[column].to_numpy(dtype=float)
        values = values[np.isfinite(values)]
        if len(values) and values.min() > 0:
            ax.set_yscale("log")
        elif len(values):  # ΔNLL can be negative (an expert that hurt this token): symlog, no empty margin
            ax.set_yscale("symlog", linthresh=0.01)
            ax.set_ylim(bottom=min(0.0, float(values.min()) * 1.2))
    ax_mean.set_ylabel("mean ΔNLL (nats)")
    ax_mean.set_title(f"mean; ▼ = cliff (first j with mean > {threshold:g} nats, dotted)", loc="left")
    ax_median.set_ylabel("median ΔNLL (nats)")
    ax_median.set_title("median, shaded up to the 95th percentile", loc="left")
    ax_mean.legend(frameon=False, ncols=2 if len(layers) > 6 else 1)
    return fig


def gap_depth(layer_effects: pd.DataFrame):
    """Per layer: median gap norm ‖y − y^(−e)‖ with quartiles, and mean ΔNLL / KL of one-expert removals."""
    frame = layer_effects.sort_values("layer")
    fig = _figure(WIDTH, 2.9)
    ax_gap, ax_loss = fig.subplots(1, 2)
    x = frame["layer"].to_numpy()
    if frame["gap_median"].notna().any():
        ax_gap.fill_between(x, frame["gap_q25"], frame["gap_q75"], color=PALETTE[0], alpha=0.2, linewidth=0,
                            label="quartiles")
        ax_gap.plot(x, frame["gap_median"], "-o", color=PALETTE[0], markersize=4, label="median")
        if frame["compensation_cos"].notna().any():
            twin = ax_gap.twinx()
            twin.plot(x, frame["compensation_cos"], "--s", color=PALETTE[4], markersize=3,
                      label="mean compensation cos")
            twin.set_ylabel("cos(gap, remaining output)", color=PALETTE[4])
            twin.grid(False)
            twin.spines["right"].set_visible(True)
    ax_gap.set_ylabel("gap norm ‖y − y^(−e)‖ (hidden-state units)")
    ax_gap.set_xlabel("layer")
    ax_gap.set_title("the hole one removed expert leaves in the MoE output", loc="left")
    ax_gap.legend(frameon=False, loc="upper left")
    ax_loss.plot(x, frame["mean_delta_nll"], "-o", color=PALETTE[1], markersize=4, label="mean ΔNLL")
    ax_loss.plot(x, frame["median_delta_nll"], "--o", color=PALETTE[1], markersize=3, alpha=0.6,
                 label="median ΔNLL")
    if frame["mean_kl"].notna().any():
        ax_loss.plot(x, frame["mean_kl"], "-^", color=PALETTE[3], markersize=4, label="mean KL")
    ax_loss.axhline(0, color="black", linewidth=0.6)
    ax_loss.set_xlabel("layer")
    ax_loss.set_ylabel("nats")
    ax_loss.set_title("how much of it reaches the next-token prediction", loc="left")
    ax_loss.legend(frameon=False)
    for ax in (ax_gap, ax_loss):
        ax.set_xticks(x)
    return fig


# ---------------------------------------------------------------------------------------------- pruning
#: Pruning plot: a criterion below the random band (better than 95 % of random prunings), inside it, above it.
BELOW_BAND, IN_BAND, ABOVE_BAND = "#2e7d32", "#6b7280", "#c62828"


def pruning_plot(whole: pd.DataFrame, layer_rows: pd.DataFrame, value_label: str, baseline: float | None = None,
                 *, oracles: Sequence[str] = (), max_cols: int = 2):
    """Held-out loss per criterion against the random band, each criterion labelled directly.

    Parameters
    ----------
    whole : DataFrame
        Whole-model prunings (:func:`moeaudit.prune.summary.whole_model`: ``criterion``, ``ratio``, ``seed``,
        ``value``).
    layer_rows : DataFrame
        Single-layer prunings (:func:`moeaudit.prune.summary.per_layer`); may be empty.
    value_label : str
        The x axis label of the held-out value, with its unit.
    baseline : float, optional
        The unpruned model's value (a dotted line).
    oracles : sequence of str
        Criteria drawn as diamonds (they rank experts by measured removal effects).
    max_cols : int
        Ratio panels per figure row.

    Returns
    -------
    matplotlib.figure.Figure or None
        One panel per pruning ratio: criteria on the y axis (best at the top, named by their tick labels), their
        held-out value as a dot, green below the random draws' 5–95 % band (grey), grey inside, red above it, the
        random median dashed. With single-layer rows a heat map follows: per criterion and layer pruned alone at
        the largest ratio, the criterion's percentile among that layer's random prunings (0: better than all).
        None when there is nothing to draw.
    """
    stats = _pruning.summary(whole) if not whole.empty else pd.DataFrame()
    if stats.empty:
        return None
    stats = stats[stats["ratio"] > 0]
    ratios = sorted(stats["ratio"].unique())
    criteria = [c for c in _pruning.criteria_order(whole[whole["ratio"] > 0]) if c != _pruning.RANDOM]
    layer_stats = pd.DataFrame()
    if not layer_rows.empty:
        largest = max(layer_rows["ratio"])
        at = layer_rows[layer_rows["ratio"] == largest]
        layer_stats = pd.concat([_pruning.summary(group).assign(layer=int(layer))
                                 for layer, group in at.groupby("layer")], ignore_index=True)
        layer_stats = layer_stats[layer_stats["criterion"] != _pruning.RANDOM]
    n_rows, n_cols = _grid(len(ratios), max_cols)
    panel_height = 0.19 * len(criteria) + 0.9
    layers = sorted(int(x) for x in layer_stats["layer"].unique()) if len(layer_stats) else []
    heat_height = 0.19 * len(criteria) + 1.0 if layers else 0.0
    fig = _figure(WIDTH, panel_height * n_rows + heat_height + 0.5)
    grid = fig.add_gridspec(n_rows + (1 if layers else 0), n_cols,
                            height_ratios=[panel_height] * n_rows + ([heat_height] if layers else []))
    for index, ratio in enumerate(ratios):
        ax = fig.add_subplot(grid[index // n_cols, index % n_cols])
        at = stats[stats["ratio"] == ratio].set_index("criterion")
        shown = [c for c in criteria if c in at.index]
        order = sorted(shown, key=lambda c: at.loc[c, "value"])
        y = np.arange(len(order))
        random = at.loc[_pruning.RANDOM] if _pruning.RANDOM in at.index else None
        if random is not None:
            ax.axvspan(random["random_q05"], random["random_q95"], color="#bbbbbb", alpha=0.55, linewidth=0)
            ax.axvline(random["random_median"], color="#444444", linestyle="--", linewidth=1)
        if baseline is not None:
            ax.axvline(baseline, color="black", linestyle=":", linewidth=1)
        for i, criterion in enumerate(order):
            row = at.loc[criterion]
            color = IN_BAND
            if np.isfinite(row["random_q05"]) and row["value"] < row["random_q05"]:
                color = BELOW_BAND
            elif np.isfinite(row["random_q95"]) and row["value"] > row["random_q95"]:
                color = ABOVE_BAND
            ax.plot([row["value"]], [i], "D" if criterion in oracles else "o", color=color, markersize=5, zorder=3)
        ax.set_yticks(y, order)
        ax.set_ylim(len(order) - 0.5, -0.5)
        ax.grid(axis="y", visible=False)
        ax.set_xlabel(value_label)
        if index % n_cols == 0:
            ax.set_ylabel("criterion (best first)")
        ax.set_title(f"{ratio:.0%} of routed experts pruned in every layer", loc="left")
        if random is not None:
            ax.text(0.99, 0.01, f"{int(random['seeds'])} random draws", transform=ax.transAxes, ha="right",
                    va="bottom", fontsize=6.5, color="#444444")
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    handles = [Patch(color="#bbbbbb", alpha=0.55, label="random 5–95%"),
               Line2D([], [], color="#444444", linestyle="--", label="random median"),
               Line2D([], [], color="black", linestyle=":", label="unpruned"),
               Line2D([], [], marker="o", linestyle="", color=BELOW_BAND, label="below the band (beats random)"),
               Line2D([], [], marker="o", linestyle="", color=IN_BAND, label="inside the band"),
               Line2D([], [], marker="o", linestyle="", color=ABOVE_BAND, label="above the band (worse)")]
    if any(c in oracles for c in criteria):
        handles.append(Line2D([], [], marker="D", linestyle="", color=IN_BAND, label="oracle (uses measured effects)"))
    fig.legend(handles=handles, loc="outside upper center", ncols=4, frameon=False, fontsize=6.5)
    if layers:
        ax = fig.add_subplot(grid[n_rows, :])
        grid_values = layer_stats.pivot_table(index="criterion", columns="layer", values="random_percentile")
        grid_values = grid_values.reindex(index=[c for c in criteria if c in grid_values.index], columns=layers)
        image = ax.imshow(grid_values.to_numpy(dtype=float), aspect="auto", cmap="RdYlGn_r", vmin=0, vmax=100,
                          interpolation="nearest")
        ax.set_yticks(range(len(grid_values.index)), list(grid_values.index))
        ax.set_xticks(range(len(layers)), [str(layer) for layer in layers])
        ax.set_xlabel(f"layer pruned alone ({largest:.0%} of its routed experts)")
        ax.set_title("one layer pruned alone: the criterion's percentile among random prunings of that layer "
                     "(0 = better than all)", loc="left")
        ax.set_ylabel("criterion")
        ax.grid(False)
        if len(layers) <= 16:
            for (a, b), value in np.ndenumerate(grid_values.to_numpy(dtype=float)):
                if np.isfinite(value):
                    ax.text(b, a, f"{value:.0f}", ha="center", va="center", fontsize=6.5,
                            color="white" if value < 15 or value > 85 else "black")
        bar = fig.colorbar(image, ax=ax, shrink=0.9, aspect=25, pad=0.01)
        bar.set_label("percentile among\nrandom prunings (%)", fontsize=7)
    return fig


def jaccard(matrices: dict[float, pd.DataFrame]):
    """Mean Jaccard overlap of the dropped sets between criteria (over layers), one matrix per ratio."""
    ratios = sorted(matrices)[:3]
    size = max(len(matrices[r]) for r in ratios)
    fig = _figure(min(WIDTH, 0.4 * size * len(ratios) + 2.0), 0.32 * size + 1.4)
    axes = np.atleast_1d(fig.subplots(1, len(ratios), squeeze=False)).ravel()
    image = None
    for ax, ratio in zip(axes, ratios):
        matrix = matrices[ratio]
        image = ax.imshow(matrix.to_numpy(dtype=float), vmin=0, vmax=1, cmap="viridis", interpolation="nearest")
        names = [str(n) for n in matrix.index]
        ax.set_xticks(range(len(names)), names, rotation=60, ha="right")
        ax.set_yticks(range(len(names)), names if ax is axes[0] else [""] * len(names))
        ax.set_title(f"ratio {ratio:g}" if np.isfinite(ratio) else "all ratios", loc="left")
        ax.grid(False)
        if size <= 12:
            for (a, b), value in np.ndenumerate(matrix.to_numpy(dtype=float)):
                if np.isfinite(value):
                    ax.text(b, a, f"{value:.2f}", ha="center", va="center", fontsize=6,
                            color="white" if value < 0.6 else "black")
    if image is not None:
        fig.colorbar(image, ax=axes.tolist(), shrink=0.8, label="Jaccard of dropped sets")
    return fig


def calibration(table: pd.DataFrame):
    """Calibration sensitivity per metric: bootstrap τ (left: mean over layers, line down to the worst layer's
    5th percentile) and the learning curve (right: mean τ over layers against calibration tokens)."""
    if table is None or table.empty:
        return None
    metrics = list(dict.fromkeys(table["metric"]))
    target = float(table["tau_target"].iloc[0])
    fig = _figure(WIDTH, max(2.8, 0.2 * len(metrics) + 1.2))
    left, right = fig.subplots(1, 2)
    y = np.arange(len(metrics))
    groups = [table[table["metric"] == m] for m in metrics]
    mean = np.array([g["tau_mean"].mean() for g in groups], dtype=float)
    low = np.array([g["tau_p05"].min() for g in groups], dtype=float)
    left.hlines(y, low, mean, color="#888888", linewidth=1.2, label="worst layer's 5th percentile")
    left.plot(mean, y, "o", color=PALETTE[0], markersize=4, label="mean τ (over layers)")
    left.axvline(target, color="black", linestyle=":", linewidth=1)
    left.set_yticks(y, metrics)
    left.invert_yaxis()
    left.set_xlabel("Kendall τ to the full ranking\n(bootstrap resamples)")
    left.legend(frameon=False, fontsize=7, loc="lower left")
    drawn = False
    for i, (metric, group) in enumerate(zip(metrics, groups)):
        curves = [(np.asarray(t, dtype=float), np.asarray(v, dtype=float))
                  for t, v in zip(group["curve_tokens"], group["curve_tau"]) if len(v)]
        if not curves:
            continue
        tokens = np.mean([c[0] for c in curves], axis=0)
        stacked = np.stack([c[1] for c in curves])
        defined = np.isfinite(stacked).sum(axis=0)
        tau = np.where(defined > 0, np.nansum(stacked, axis=0) / np.maximum(defined, 1), np.nan)
        right.plot(tokens, tau, "-o", color=PALETTE[i % len(PALETTE)], markersize=3, label=metric)
        drawn = True
    right.axhline(target, color="black", linestyle=":", linewidth=1, label=f"τ = {target:g}")
    right.set_xlabel("calibration tokens\n(nested subsets, up to half the split)")
    right.set_ylabel("mean τ to the full ranking")
    if drawn:
        right.set_xscale("log")
        right.set_ylim(top=1.02)
        right.legend(frameon=False, fontsize=6.5, loc="center left", bbox_to_anchor=(1.01, 0.5))
    else:
        right.text(0.5, 0.5, "no learning curve: fewer than 2 calibration units", ha="center", va="center",
                   transform=right.transAxes, color="#5b6472")
    return fig


def _layer_colors(n: int) -> list:
    from matplotlib import colormaps

    cmap = colormaps["viridis"]
    return [cmap(0.9 * i / max(1, n - 1)) for i in range(n)]


def _criterion_colors(criteria: Sequence[str]) -> dict[str, str]:
    return {c: PALETTE[i % len(PALETTE)] for i, c in enumerate(criteria)}


def interaction_heatmaps(pairs: pd.DataFrame, num_experts: dict[int, int], *, max_layers: int = 6):
    """Mean pairwise interaction (nats) of each expert pair where both are active, one panel per MoE layer.

    Pairs never active together are grey; each panel has its own colour scale, symmetric around 0 (red:
    removing both costs more than the two apart; blue: less) and clipped at the layer's 95th percentile of
    |mean interaction|, since interactions shrink by orders of magnitude over depth. At most ``max_layers``
    layers are drawn, spread over depth (first and last included).
    """
    from matplotlib import colormaps

    from moeaudit.interactions.summary import interaction_matrix

    if pairs is None or pairs.empty:
        return None
    layers = sorted(int(layer) for layer in pairs["layer"].unique())
    if len(layers) > max_layers:
        pick = np.unique(np.linspace(0, len(layers) - 1, max_layers).round().astype(int))
        layers = [layers[i] for i in pick]
    rows, cols = _grid(len(layers), 3)
    fig = _figure(WIDTH, 3.0 * rows + 0.3)
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
    cmap = colormaps["RdBu_r"].with_extremes(bad="#c8c8c8")
    for ax, layer in zip(axes, layers):
        size = num_experts.get(layer) or int(pairs[["expert_a", "expert_b"]].to_numpy().max()) + 1
        matrix = interaction_matrix(pairs, layer, size)[0]
        finite = np.abs(matrix[np.isfinite(matrix)])
        limit = float(np.quantile(finite, 0.95)) if len(finite) else 0.0
        limit = limit if limit > 0 else 1e-6
        image = ax.imshow(np.ma.masked_invalid(matrix), cmap=cmap, vmin=-limit, vmax=limit, interpolation="nearest")
        ax.set_title(f"layer {layer}")
        ax.set_xlabel("expert")
        ax.set_ylabel("expert")
        ax.grid(False)
        bar = fig.colorbar(image, ax=ax, shrink=0.85)
        bar.set_label("mean interaction (nats)")
    for ax in axes[len(layers):]:
        ax.set_visible(False)
    return fig
