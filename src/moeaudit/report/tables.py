"""Paper-style tables from a run directory, as Markdown, booktabs LaTeX or CSV.

``render(run_dir, "audit", "latex")`` gives the table a paper prints; Markdown is for READMEs and issues;
CSV carries the same cells as plain numbers, one row per cell, for spreadsheets and plotting.

Tables
------
``audit``
    Metric × layer: d_z of ΔNLL(highest) − ΔNLL(lowest) with its 95 % CI and p_t / p_W, ``*`` where the
    corrected dual test is significant (design ``paired``), followed by the routing-weight control
    (``token gate``) and the random-pair null (``random pair``).
``metrics``
    Per MoE layer: experts, top-k, dead and dominant experts, the largest load relative to the uniform
    share k / E, normalised load entropy, mean routing entropy and the top experts by REAP.
``pruning``
    Criterion × pruning ratio: held-out perplexity (or NLL) of the whole pruned model (all MoE layers at the
    ratio), with its percentile in the random-pruning distribution; the ``random`` row gives that
    distribution's median and 5–95 % band.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd

from moeaudit.errors import invalid
from moeaudit.report import _pruning
from moeaudit.report._load import DOMINANT_FACTOR, RunData
from moeaudit.rundir import RunDir

What = Literal["audit", "pruning", "metrics"]
Format = Literal["markdown", "latex", "csv", "json"]
WHATS: tuple[str, ...] = ("audit", "pruning", "metrics")
FORMATS: tuple[str, ...] = ("markdown", "latex", "csv", "json")

#: Row labels of the two reference designs in the audit table.
CONTROL_ROWS = {"routing_weight": "token gate (control)", "random_pair": "random pair (null)"}


@dataclass
class Table:
    """A formatted table: plain cells (Markdown), LaTeX cells, a caption, and the numbers behind it (CSV)."""

    header: list[str]
    rows: list[list[str]]
    latex_rows: list[list[str]]
    caption: str
    numbers: pd.DataFrame
    align: str = ""
    midrules: list[int] = field(default_factory=list)  # row indices before which LaTeX draws \midrule


def render(run_dir: str | Path | RunDir, what: What, fmt: Format = "markdown") -> str:
    """Render one paper-style table of a run.

    Parameters
    ----------
    run_dir : path or RunDir
    what : {"audit", "pruning", "metrics"}
    fmt : {"markdown", "latex", "csv", "json"}

    Returns
    -------
    str
        The table, ending with a newline. Markdown and LaTeX carry a one-line caption (LaTeX as ``%``
        comments above a booktabs ``tabular``); CSV has a header row and full-precision numbers; JSON is a
        list of row objects with the same numbers (NaN as ``null``).

    Raises
    ------
    InvalidParameterError
        ``what`` or ``fmt`` is not one of the allowed values.
    RunDirectoryError
        The run directory or the table the request needs is missing.

    Examples
    --------
    >>> print(render("runs/olmoe", "audit", "latex"))  # doctest: +SKIP
    """
    if what not in WHATS:
        raise invalid("what", "one of " + ", ".join(WHATS), what)
    if fmt not in FORMATS:
        raise invalid("fmt", "one of " + ", ".join(FORMATS), fmt)
    data = RunData(run_dir)
    table = {"audit": audit_table, "metrics": metrics_table, "pruning": pruning_table}[what](data)
    if fmt == "json":
        return table.numbers.to_json(orient="records", double_precision=15) + "\n"
    if fmt == "csv":
        buffer = io.StringIO()
        table.numbers.to_csv(buffer, index=False, float_format="%.6g", lineterminator="\n")
        return buffer.getvalue()
    if fmt == "markdown":
        return to_markdown(table)
    return to_latex(table)


# ---------------------------------------------------------------------------------------------- writers
def to_markdown(table: Table) -> str:
    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    align = table.align or "l" * len(table.header)
    rule = ["---:" if a == "r" else ":---:" if a == "c" else "---" for a in align]
    lines = [line(table.header), "| " + " | ".join(rule) + " |"] + [line(r) for r in table.rows]
    return "\n".join(lines) + f"\n\n{table.caption}\n"


def to_latex(table: Table) -> str:
    align = table.align or "l" * len(table.header)
    lines = [f"% {part}" for part in table.caption.split("\n")]
    lines += [f"\\begin{{tabular}}{{{align}}}", "\\toprule",
              " & ".join(latex_escape(h) for h in table.header) + " \\\\", "\\midrule"]
    for i, row in enumerate(table.latex_rows):
        if i in table.midrules:
            lines.append("\\midrule")
        lines.append(" & ".join(row) + " \\\\")
    lines += ["\\bottomrule", "\\end{tabular}"]
    return "\n".join(lines) + "\n"


_LATEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                  "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}


def latex_escape(text: str) -> str:
    """Escape LaTeX's special characters in plain text (``mean_gate`` -> ``mean\\_gate``)."""
    return "".join(_LATEX_SPECIAL.get(ch, ch) for ch in str(text)).replace("α", r"$\alpha$").replace(
        "Δ", r"$\Delta$").replace("–", "--")


def latex_number(value: float, digits: int = 2) -> str:
    """A p-value style number for LaTeX math: 0.034, 1.3\\times10^{-5}."""
    if not np.isfinite(value):
        return r"\text{--}"
    text = f"{value:.{digits}g}"
    if "e" in text:
        mantissa, exponent = text.split("e")
        return f"{mantissa}\\times10^{{{int(exponent)}}}"
    return text


# ---------------------------------------------------------------------------------------------- audit
def _audit_cells(cells: pd.DataFrame, layers: list[int]) -> tuple[list[str], list[str]]:
    """Plain and LaTeX cells of one row (one metric), in layer order."""
    by_layer = {int(r.layer): r for r in cells.itertuples()}
    plain, latex = [], []
    for layer in layers:
        row = by_layer.get(layer)
        if row is None:
            plain.append("")
            latex.append("")
            continue
        if not np.isfinite(row.effect):
            plain.append("untestable")
            latex.append(r"\textit{untestable}")
            continue
        significant = row.verdict == "significant"
        mark = "*" if significant else ""
        plain.append(f"{row.effect:+.3f} [{row.ci_low:+.2f}, {row.ci_high:+.2f}] "
                     f"{row.p_t:.2g}/{row.p_wilcoxon:.2g}{mark}")
        effect = f"\\mathbf{{{row.effect:+.3f}}}^{{*}}" if significant else f"{row.effect:+.3f}"
        latex.append(f"${effect}$ {{\\footnotesize $[{row.ci_low:+.2f}, {row.ci_high:+.2f}]$ "
                     f"${latex_number(row.p_t)}/{latex_number(row.p_wilcoxon)}$}}")
    return plain, latex


def audit_table(data: RunData) -> Table:
    tests = data.run.read("tests")
    paired = tests[tests["design"] == "paired"]
    layers = sorted(int(x) for x in tests["layer"].unique())
    header = ["metric"] + [f"layer {layer}" for layer in layers]
    rows, latex_rows, midrules = [], [], []
    for metric in paired["metric"].drop_duplicates():
        plain, latex = _audit_cells(paired[paired["metric"] == metric], layers)
        rows.append([metric] + plain)
        latex_rows.append([latex_escape(metric)] + latex)
    for design, label in CONTROL_ROWS.items():
        cells = tests[tests["design"] == design]
        if cells.empty:
            continue
        if design == "routing_weight":
            midrules.append(len(rows))
        plain, latex = _audit_cells(cells, layers)
        rows.append([label] + plain)
        latex_rows.append([latex_escape(label)] + latex)
    audit_info = data.stage("audit")
    ns = tests.loc[tests["design"].isin(["paired", *CONTROL_ROWS]) & np.isfinite(tests["effect"]), "n"]
    n_text = (f"n = {int(ns.min())}" if ns.min() == ns.max() else f"n = {int(ns.min())}–{int(ns.max())}") if len(ns) else "n = 0"
    caption = (f"Cells: d_z of ΔNLL(highest) − ΔNLL(lowest) [95% CI] p_t/p_W; * = significant (t and Wilcoxon both "
               f"pass {audit_info.get('correction', data.config.get('correction', 'the correction'))} at "
               f"α = {audit_info.get('alpha', data.config.get('alpha', 0.05))}); {n_text} token positions per cell; "
               f"{data.name}, intervention {data.config.get('kind', '?')}/{data.config.get('scope', '?')}.")
    keep = ["layer", "metric", "design", "n", "effect", "ci_low", "ci_high", "p_t", "p_wilcoxon", "p_adjusted",
            "verdict"]
    numbers = tests[tests["design"].isin(["paired", *CONTROL_ROWS])]
    numbers = numbers[[c for c in keep if c in numbers]].rename(columns={"effect": "d_z"})
    order = {d: i for i, d in enumerate(["paired", *CONTROL_ROWS])}
    numbers = numbers.sort_values("design", key=lambda s: s.map(order), kind="stable").reset_index(drop=True)
    return Table(header, rows, latex_rows, caption, numbers, align="l" + "l" * len(layers), midrules=midrules)


# ---------------------------------------------------------------------------------------------- metrics
def metrics_table(data: RunData) -> Table:
    metrics = data.run.read("expert_metrics")
    load = data.load
    if load is None:
        load = pd.DataFrame({"layer": sorted(metrics["layer"].unique())})
    top = {}
    if "reap" in metrics:
        for layer, group in metrics.groupby("layer"):
            top[int(layer)] = ", ".join(str(int(e)) for e in group.nlargest(3, "reap")["expert"])
    numbers = load.assign(top_reap=[top.get(int(layer), "") for layer in load["layer"]])
    header = ["layer", "experts", "top-k", "dead", "dominant", "max load", "load entropy", "routing entropy",
              "top experts by REAP"]

    def fmt(value, spec: str) -> str:
        return "–" if value is None or (isinstance(value, float) and not math.isfinite(value)) else format(value, spec)

    def integer(value) -> str:
        return "–" if value is None or (isinstance(value, float) and not math.isfinite(value)) else str(int(value))

    rows = [[str(int(r.layer)), integer(r.experts), integer(r.top_k), str(int(r.dead)), str(int(r.dominant)), fmt(r.max_load, ".2f") + "×", fmt(r.load_entropy, ".3f"),
             fmt(r.routing_entropy, ".3f"), r.top_reap] for r in numbers.itertuples()]
    latex_rows = [[latex_escape(c).replace("×", r"$\times$") for c in row] for row in rows]
    caption = (f"Expert load per MoE layer of {data.name} ({data.stage('metrics').get('split', 'calibration')} split): "
               f"dead = never routed; dominant = frequency ≥ {DOMINANT_FACTOR:g}× the uniform share k/E; max load = "
               "largest frequency / (k/E); load entropy = entropy of the load distribution / log E (1 = uniform).")
    return Table(header, rows, latex_rows, caption, numbers.reset_index(drop=True), align="rrrrrrrrl")


# ---------------------------------------------------------------------------------------------- pruning
def pruning_table(data: RunData) -> Table:
    pruning = data.run.read("pruning")
    column = _pruning.value_column(pruning)
    whole = _pruning.whole_model(pruning)
    stats = _pruning.summary(whole)
    label = "perplexity" if column == "heldout_ppl" else "NLL"
    ratios = sorted(r for r in stats["ratio"].unique()) if not stats.empty else []
    pruned = [r for r in ratios if r > 0]
    baseline = _pruning.baseline(pruning)
    header = ["criterion"] + [f"{r:.1%}".replace(".0%", "%") for r in pruned]
    rows, latex_rows, midrules = [], [], []
    order = _pruning.criteria_order(whole[whole["ratio"] > 0]) if not whole.empty else []
    for criterion in order:
        cells, latex_cells = [], []
        for ratio in pruned:
            hit = stats[(stats["criterion"] == criterion) & (stats["ratio"] == ratio)]
            if hit.empty:
                cells.append("")
                latex_cells.append("")
                continue
            r = hit.iloc[0]
            if criterion == _pruning.RANDOM:
                text = f"{r.random_median:.3f} [{r.random_q05:.3f}, {r.random_q95:.3f}]"
                latex = f"{r.random_median:.3f} {{\\footnotesize [{r.random_q05:.3f}, {r.random_q95:.3f}]}}"
            elif np.isfinite(r.random_percentile):
                text = f"{r.value:.3f} (p{r.random_percentile:.0f})"
                latex = f"{r.value:.3f} {{\\footnotesize (p{r.random_percentile:.0f})}}"
            else:
                text = latex = f"{r.value:.3f}"
            cells.append(text)
            latex_cells.append(latex)
        if criterion == _pruning.RANDOM:
            midrules.append(len(rows))
        rows.append([criterion] + cells)
        latex_rows.append([latex_escape(criterion)] + latex_cells)
    base = f" Unpruned: {baseline:.3f}." if baseline is not None else ""
    n_random = int(whole.loc[whole["criterion"] == _pruning.RANDOM, "seed"].nunique()) if not whole.empty else 0
    caption = (f"Held-out {label} of {data.name} with the given share of routed experts pruned per layer (masked "
               f"out of routing); (pNN) = share of the {n_random} random prunings with a lower held-out loss, ties "
               f"half (p0: better than every random draw); random = median [5%, 95%] of those draws.{base}"
               + (" Every selection dropped as many experts from each expert group of the group-limited routing "
                  "(group-balanced), so each configuration exports as evaluated."
                  if _pruning.selection_of(pruning) == "group_balanced" else ""))
    return Table(header, rows, latex_rows, caption, stats, align="l" + "r" * len(pruned), midrules=midrules)
