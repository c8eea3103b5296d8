"""The self-contained HTML audit report: one file, inline CSS, figures embedded as PNG data URIs.

The page makes no network request: no scripts, no web fonts (a system font stack), no external images.
Every figure is also written beside the report as ``figures/<run>-<name>.png`` and ``.svg`` for papers.
"""

from __future__ import annotations

import datetime as _dt
import html
import logging

from moeaudit.errors import MoeAuditError
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd

from moeaudit import __version__
from moeaudit.audit.designs import clustering_summary
from moeaudit.report import _pruning, figures, tables
from moeaudit.report._load import DOMINANT_FACTOR, RunData, compress_layers
from moeaudit.rundir import RunDir

logger = logging.getLogger(__name__)

#: Section headings, in page order; each run gets every one (with a sentence when its input is missing).
SECTIONS: tuple[str, ...] = (
    "Provenance", "Routing load", "Domain specialisation", "Metric-vs-effect audit",
    "Metric value vs removal effect", "Routing-weight control", "Progressive ablation", "Gap norm over depth",
    "Pruning", "Calibration sensitivity",
)
#: One sentence per section: what it shows and how to read it.
LEDES: dict[str, str] = {
    "Provenance": "Where these numbers come from — model, corpus, configuration, software and the intervention "
                  "engine's noise floor — so that the run can be reproduced and its smallest effects judged.",
    "Routing load": "How often each expert is chosen per MoE layer: bars are the share of tokens routed to an "
                    "expert, the dashed line is the uniform share k/E, red marks dead experts (never chosen) and "
                    f"orange dominant ones (at least {DOMINANT_FACTOR:g}× uniform); H is the load entropy "
                    "normalised to 1 for perfectly even routing.",
    "Domain specialisation": "Which experts prefer which kind of text: each cell is log2 of an expert's routing "
                             "frequency on one domain over its overall frequency, red meaning used more on that "
                             "domain and blue less (clipped at 4× either way).",
    "Metric-vs-effect audit": "Whether an observational metric predicts what removing an expert does: each cell "
                              "ablates, at the same token, the active expert the metric ranks highest and the one "
                              "it ranks lowest and reports d_z of ΔNLL(high) − ΔNLL(low) with its 95% CI and the "
                              "t / Wilcoxon p-values; a coloured cell passed the corrected dual test, green when "
                              "the metric's favourite mattered more.",
    "Metric value vs removal effect": "The question pruning asks, per expert: each dot is one expert, placed by "
                                      "its metric value (x) and the mean ΔNLL of removing it where it is active "
                                      "(y); ρ is the expert-level Spearman correlation, * where significant "
                                      "after correction.",
    "Routing-weight control": "The same paired contrast with high and low chosen by the token's own gate instead "
                              "of a population metric — the paper's control; a point right of zero with a CI "
                              "clear of it means the router's per-token weight predicts which expert matters, "
                              "the grey random-pair points show what no signal looks like.",
    "Progressive ablation": "How much redundancy each layer has: the curves show ΔNLL after removing the j "
                            "highest-gated experts of a token's active set at once, and ▼ marks the cliff — the "
                            "first j whose mean loss exceeds 0.1 nats (none means the layer absorbs every "
                            "partial removal).",
    "Gap norm over depth": "How big a hole one removed expert leaves in the MoE layer's output at each depth "
                           "(left, with the cosine between that hole and what the remaining experts still "
                           "produce) and how much of it survives to the next-token loss (right).",
    "Pruning": "What happens when experts are actually pruned: held-out loss by criterion and pruning ratio "
               "against the band of random prunings (a criterion inside the grey band is no better than chance), "
               "and how much the criteria agree on which experts to drop (Jaccard overlap).",
    "Calibration sensitivity": "How much each metric's expert ranking depends on the calibration data: Kendall τ "
                               "between the ranking on bootstrap resamples of the calibration documents and on "
                               "all of them (1 = the same order), the share of prune/keep decisions at the "
                               "pruning ratio that such a resample flips, the calibration size from which nested "
                               "subsets reach the target τ, and τ between rankings computed on single domains.",
}
#: The command that writes each table, for the "not available" sentences.
PRODUCER = {"tokens": "observe", "routing": "observe", "expert_metrics": "metrics",
            "expert_metrics_by_domain": "metrics", "effects": "intervene", "tests": "audit",
            "redundancy": "audit", "pruning": "prune", "jaccard": "prune", "calibration": "calibration"}
SCATTER_METRICS = ("frequency", "ean_mean", "mean_gate_active", "act_std", "reap", "ean_sum", "gate_mass", "msan")
MAX_SCATTER_METRICS = 6
MAX_SCATTER_LAYERS = 6


def write_report(run_dirs: Sequence[str | Path | RunDir] | str | Path | RunDir, out_html: str | Path, *,
                 title: str | None = None) -> Path:
    """Write one self-contained HTML report covering one or more run directories.

    Parameters
    ----------
    run_dirs : path, RunDir, or a sequence of them
        Run directories (a ``manifest.json`` plus Parquet tables). Sections whose table is missing say so in
        one sentence and name the command that adds it.
    out_html : path
        The report file. Figures are also written to ``out_html.parent / "figures"`` as PNG and SVG, named
        ``<run>-<figure>``.
    title : str, optional
        Page title (default: "moeaudit report: " and the model names).

    Returns
    -------
    Path
        ``out_html``.

    Notes
    -----
    The page is one file: inline CSS, figures embedded as base64 PNG, no script, no web font, no URL that a
    browser would fetch. It opens offline and can be mailed or attached to a paper's supplement.

    Examples
    --------
    >>> write_report(["runs/olmoe", "runs/qwen"], "runs/report.html")  # doctest: +SKIP
    """
    if isinstance(run_dirs, (str, Path, RunDir)):
        run_dirs = [run_dirs]
    runs = [RunData(r) for r in run_dirs]
    for data in runs:  # a damaged table: one line naming it and the stage that rebuilds it, before any drawing
        data.run.check_tables()
    out_html = Path(out_html)
    out_html.parent.mkdir(parents=True, exist_ok=True)
    figure_dir = out_html.parent / "figures"
    slugs = _unique_slugs([r.path.name or r.name for r in runs])
    title = title or "moeaudit report: " + ", ".join(r.name for r in runs)
    bodies = []
    with figures.style():
        for data, slug in zip(runs, slugs):
            bodies.append(_run_html(data, _Context(slug, figure_dir, out_html.parent)))
    page = _page(title, runs, slugs, bodies)
    from moeaudit.rundir import atomic_write_text

    atomic_write_text(out_html, page)
    logger.info("wrote %s (%d bytes, %d runs)", out_html, out_html.stat().st_size, len(runs))
    return out_html


# ---------------------------------------------------------------------------------------------- plumbing
@dataclass
class _Context:
    slug: str
    figure_dir: Path
    report_dir: Path
    figures: list[Path] = field(default_factory=list)

    def figure(self, fig, name: str, alt: str) -> str:
        """Save ``fig`` as PNG + SVG and return the <figure> element embedding the PNG."""
        if fig is None:
            return ""
        png, svg, data = figures.save(fig, self.figure_dir / f"{self.slug}-{name}")
        self.figures += [png, svg]
        rel = lambda p: p.relative_to(self.report_dir).as_posix() if p.is_relative_to(self.report_dir) else str(p)
        return (f'<figure><img src="data:image/png;base64,{data}" alt="{_e(alt)}">'
                f'<figcaption>{_e(alt)} Files: <code>{_e(rel(png))}</code>, <code>{_e(rel(svg))}</code>.'
                f"</figcaption></figure>")


def _e(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _unique_slugs(names: list[str]) -> list[str]:
    slugs, seen = [], {}
    for name in names:
        slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "run"
        seen[slug] = seen.get(slug, 0) + 1
        slugs.append(slug if seen[slug] == 1 else f"{slug}-{seen[slug]}")
    return slugs


def _section_id(slug: str, heading: str) -> str:
    return f"{slug}-{re.sub(r'[^a-z0-9]+', '-', heading.lower()).strip('-')}"


def _absent(data: RunData, *names: str) -> str:
    missing = [n for n in names if not data.has(n)]
    commands = sorted({PRODUCER.get(n, "run") for n in missing})
    return (f'<p class="absent">Not available for this run: it has no '
            f"{' or '.join(f'<code>{_e(n)}.parquet</code>' for n in missing)}; "
            f"{' and '.join(f'<code>moeaudit {c} RUN_DIR</code>' for c in commands)} "
            f"{'adds' if len(commands) == 1 else 'add'} it.</p>")


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]], *, classes: str = "",
           row_header: bool = True) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = []
    for row in rows:
        cells = [f"<th>{_e(row[0])}</th>" if row_header else f"<td>{_e(row[0])}</td>"]
        cells += [f"<td>{_e(c)}</td>" for c in row[1:]]
        body.append("<tr>" + "".join(cells) + "</tr>")
    return (f'<div class="scroll"><table class="{classes}"><thead><tr>{head}</tr></thead>'
            f'<tbody>{"".join(body)}</tbody></table></div>')


def _count(value: Any) -> str:
    return f"{value:,}" if isinstance(value, (int, np.integer)) else ("?" if value is None else str(value))


def _near_ties_text(intervene: dict) -> str:
    """How many clean routing decisions rounding could flip (intervene stats ``near_ties``)."""
    ties = {int(layer): int(count) for layer, count in intervene["near_ties"].items()}
    positions = int(intervene.get("near_tie_positions") or 0)
    total = sum(ties.values())
    worst = ", ".join(f"layer {layer}: {count}" for layer, count in sorted(ties.items(), key=lambda kv: -kv[1])[:3]
                      if count)
    share = f" ({total / (positions * len(ties)):.2%})" if positions and ties else ""
    return (f"{total} of {positions * len(ties):,} routing decisions{share} are within rounding of choosing other "
            "experts" + (f" ({worst})" if worst else "") + "; a later layer's routing that flips there after an "
            "intervention may be rounding, not an effect")


def _fmt(value: Any, spec: str = ".3g") -> str:
    if value is None:
        return "–"
    if isinstance(value, (float, np.floating)):
        return "–" if not np.isfinite(value) else format(float(value), spec)
    return str(value)


# ---------------------------------------------------------------------------------------------- one run
def _run_html(data: RunData, ctx: _Context) -> str:
    builders: dict[str, Callable[[RunData, _Context], str]] = {
        "Provenance": _provenance, "Routing load": _routing_load, "Domain specialisation": _domains,
        "Metric-vs-effect audit": _audit, "Metric value vs removal effect": _scatter,
        "Routing-weight control": _control, "Progressive ablation": _progressive,
        "Gap norm over depth": _gap, "Pruning": _pruning_section, "Calibration sensitivity": _calibration_section,
    }
    links = " · ".join(f'<a href="#{_section_id(ctx.slug, h)}">{_e(h)}</a>' for h in SECTIONS)
    parts = [f'<section class="run" id="{ctx.slug}"><h2>{_e(data.name)} '
             f'<span class="path">{_e(data.path)}</span></h2><p class="toc">{links}</p>']
    for heading in SECTIONS:
        try:
            body = builders[heading](data, ctx)
        except MoeAuditError as err:  # a damaged or missing table: its one line, no traceback
            logger.warning("report section %r of %s not drawn: %s", heading, data.path, err)
            body = f'<p class="absent">This section could not be drawn: {_e(err)}</p>'
        except Exception as err:  # one broken section must not cost the reader the whole report
            logger.exception("report section %r failed for %s", heading, data.path)
            body = f'<p class="absent">This section could not be drawn: {_e(type(err).__name__)}: {_e(err)}</p>'
        parts.append(f'<section class="part" id="{_section_id(ctx.slug, heading)}"><h3>{_e(heading)}</h3>'
                     f'<p class="lede">{_e(LEDES[heading])}</p>{body}</section>')
    parts.append("</section>")
    return "\n".join(parts)


def _protocol_text(config: dict[str, Any]) -> str:
    """The preset a run follows, and every setting in which it departs from it."""
    preset = config.get("preset")
    if not preset:
        return "custom settings (no preset)"
    overrides = config.get("preset_overrides") or {}
    if not overrides:
        return f"preset {preset}, followed exactly"
    changes = "; ".join(f"{name} = {change.get('used')!r} (preset: {change.get('preset')!r})"
                        for name, change in overrides.items())
    return f"preset {preset}, departing from it in {len(overrides)} setting(s): {changes}"


def _provenance(data: RunData, ctx: _Context) -> str:
    m = data.manifest
    model, corpus, config = m.get("model", {}), m.get("corpus", {}), data.config
    observe, intervene, audit = data.stage("observe"), data.stage("intervene"), data.stage("audit")
    experts = sorted({int(v) for v in model.get("num_experts", {}).values()})
    top_k = sorted({int(v) for v in model.get("top_k", {}).values()})
    fingerprint = corpus.get("fingerprint")
    counters = corpus.get("counters", {})
    facts = [
        ("model", f"{model.get('name', config.get('model', '?'))} ({model.get('family', '?')}), "
                  f"fingerprint {model.get('fingerprint', '?')}"),
        ("MoE layers", f"{compress_layers(model.get('moe_layers', []))}; "
                       f"{'/'.join(map(str, experts)) or '?'} routed experts, top-{'/'.join(map(str, top_k)) or '?'}"),
        ("protocol", _protocol_text(config)),
        ("corpus", f"{config.get('corpus', '?')}; fingerprint {fingerprint[:16] + '…' if fingerprint else '?'}"
                   + (f" (observed windows {corpus['fingerprint_observed']})" if corpus.get("fingerprint_observed") else "")),
        ("corpus size", ", ".join(f"{k.replace('tokens_', '')} {v:,} tokens" for k, v in counters.items()
                                  if k.startswith("tokens_")) or "–"),
        ("observed", f"{_count(observe.get('tokens'))} tokens in {_count(observe.get('windows'))} windows, mean NLL "
                     f"{_fmt(observe.get('mean_nll'), '.3f')} nats" if observe else "–"),
        ("intervention", (f"{intervene.get('kind', config.get('kind'))} / {intervene.get('scope', config.get('scope'))} "
                          f"on the {intervene.get('split', '?')} split; {_count(intervene.get('interventions'))} exact "
                          f"interventions ({', '.join(intervene.get('selections', [])) or '?'})") if intervene else "–"),
        ("engine", (f"{intervene.get('engine', config.get('engine', '?'))}"
                    + (f" (fell back: {intervene['fallback_reason']})" if intervene.get("fallback_reason") else "")
                    + (f", {intervene['interventions_per_second']:,.0f} interventions/s"
                       if intervene.get("interventions_per_second") else "")) if intervene else "–"),
        ("noise floor", (f"{_fmt(intervene.get('noise_floor'), '.2g')} nats — the |ΔNLL| of interventions that "
                         "change nothing; smaller effects are numerical noise") if intervene.get("noise_floor") is not None
         else "–"),
        ("near ties", _near_ties_text(intervene) if intervene.get("near_ties") else "–"),
        ("audit", (f"n = {audit.get('n', 'census')} positions per cell, {audit.get('correction', '?')} at "
                   f"α = {audit.get('alpha', '?')}; {audit.get('significant', '?')} of {audit.get('cells', '?')} "
                   "cells significant") if audit else "–"),
        ("created", f"{m.get('created', '?')}; config fingerprint {m.get('config_fingerprint', '?')}"),
        ("software", ", ".join(f"{k} {v}" for k, v in m.get("versions", {}).items())),
    ]
    rows = "".join(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in facts)
    stages = [(name, info.get("finished", "?"), _fmt(info.get("seconds"), ".1f"))
              for name, info in m.get("stages", {}).items()]
    config_rows = [(k, v if not isinstance(v, (list, dict)) else str(v)) for k, v in config.items()]
    tables_present = ", ".join(sorted(p.stem for p in data.path.glob("*.parquet") if not p.name.startswith("."))) or "none"
    return (f'<table class="facts">{rows}</table>'
            f"<p class=\"note\">Tables in the run directory: {_e(tables_present)}.</p>"
            f"<details><summary>Stages ({len(stages)})</summary>"
            f"{_table(['stage', 'finished', 'seconds'], stages)}</details>"
            f"<details><summary>Full configuration ({len(config_rows)} settings)</summary>"
            f"{_table(['setting', 'value'], config_rows)}</details>")


def _routing_load(data: RunData, ctx: _Context) -> str:
    metrics = data.table("expert_metrics")
    if metrics is None or data.load is None:
        return _absent(data, "expert_metrics")
    table = tables.metrics_table(data)
    split = data.stage("metrics").get("split", "calibration")
    fig = figures.load_bars(metrics, data.load, DOMINANT_FACTOR)
    return (ctx.figure(fig, "routing-load", f"Expert frequency per MoE layer ({split} split).")
            + _table(table.header, table.rows, classes="num"))


def _domains(data: RunData, ctx: _Context) -> str:
    by_domain, metrics = data.table("expert_metrics_by_domain"), data.table("expert_metrics")
    if by_domain is None or metrics is None:
        return _absent(data, "expert_metrics_by_domain", "expert_metrics")
    domains = by_domain["domain"].dropna().unique()
    if len(domains) < 2:
        return (f'<p class="absent">Not available for this run: its corpus has '
                f"{'one domain' if len(domains) else 'no domain labels'}, so there is nothing to compare.</p>")
    n_layers = by_domain["layer"].nunique()
    fig = figures.domain_heatmap(by_domain, metrics)
    note = f" ({min(n_layers, 12)} of {n_layers} layers, evenly spaced)" if n_layers > 12 else ""
    overall = metrics.set_index(["layer", "expert"])["frequency"].rename("overall")
    lift = by_domain.join(overall, on=["layer", "expert"])
    lift = lift[(lift["overall"] > 0) & (lift["frequency"] > 0)]
    min_count = 20 if "count" in lift and (lift["count"] >= 20).sum() >= 8 else 1
    if "count" in lift:
        lift = lift[lift["count"] >= min_count]
    lift = lift.assign(ratio=lift["frequency"] / lift["overall"]).nlargest(8, "ratio")
    rows = [(f"layer {int(r.layer)}, expert {int(r.expert)}", r.domain, f"{r.ratio:.2f}×",
             f"{r.frequency:.3f}", f"{r.overall:.3f}", str(int(r.count)) if "count" in lift else "–")
            for r in lift.itertuples()]
    return (ctx.figure(fig, "domains", f"Domain × expert routing lift per layer{note}.")
            + f"<p class=\"note\">Most specialised experts (at least {min_count} routed tokens on the domain):</p>"
            + _table(["expert", "domain", "lift", "domain freq", "overall freq", "tokens"], rows, classes="num"))


def _verdict_class(row) -> str:
    if not np.isfinite(row.effect):
        return "v-untestable"
    if row.verdict == "significant":
        return "v-pos" if row.effect > 0 else "v-neg"
    equivalent = getattr(row, "equivalent", None)
    if isinstance(equivalent, (bool, np.bool_)) and bool(equivalent):
        return "v-equiv"
    return "v-ns"


def _cell(row, *, kind: str = "d_z") -> str:
    if not np.isfinite(row.effect):
        return '<td class="v-untestable" title="too few usable tokens">untestable</td>'
    extra = []
    for name, label in (("p_adjusted", "corrected p"), ("mde_dz", "minimum detectable |d_z| at 80% power"),
                        ("p_tost", "TOST p (|d_z| < bound)")):
        value = getattr(row, name, np.nan)
        if value is not None and np.isfinite(value):
            extra.append(f"{label} {value:.3g}")
    extra.extend(_cluster_notes(row))
    title = f"{kind} = {row.effect:+.4f}, n = {int(row.n)}; " + "; ".join(extra) + f"; verdict: {row.verdict}"
    ci = (f"<small>[{row.ci_low:+.2f}, {row.ci_high:+.2f}]</small>"
          if np.isfinite(row.ci_low) and np.isfinite(row.ci_high) else "")
    p_w = f" / {row.p_wilcoxon:.2g}" if np.isfinite(row.p_wilcoxon) and row.p_wilcoxon != row.p_t else ""
    mark = "*" if row.verdict == "significant" else ""
    clusters = _finite(row, "n_clusters")
    design = (f'<small class="clusters">{int(clusters)} {_e(row.cluster)}s · deff {row.design_effect:.2g}</small>'
              if clusters is not None and _finite(row, "design_effect") is not None else "")
    return (f'<td class="{_verdict_class(row)}" title="{_e(title)}"><b>{row.effect:+.3f}{mark}</b>{ci}'
            f"<small>p {row.p_t:.2g}{p_w}</small>{design}</td>")


def _finite(row, name: str) -> float | None:
    """``row.name`` as a float when the column exists and holds a finite number, else None."""
    value = getattr(row, name, None)
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if np.isfinite(value) else None


def _cluster_notes(row) -> list[str]:
    """What a cell's hover text says about its clusters, its two intervals in nats and its degeneracy."""
    notes = []
    if _finite(row, "n_clusters") is not None:
        notes.append(f"{int(row.n_clusters)} {row.cluster}s as independent units, design effect "
                     f"{row.design_effect:.3g}, df {row.df_t:.3g}")
    low, high = _finite(row, "mean_diff_ci_low"), _finite(row, "mean_diff_ci_high")
    if low is not None and high is not None:
        notes.append(f"mean ΔNLL difference {row.mean_diff:+.4f} nats, cluster bootstrap [{low:+.4f}, {high:+.4f}]")
    mixed = [_finite(row, name) for name in ("mixed_mean_diff", "mixed_ci_low", "mixed_ci_high")]
    if all(value is not None for value in mixed):
        notes.append(f"mixed model {mixed[0]:+.4f} [{mixed[1]:+.4f}, {mixed[2]:+.4f}]")
    distinct = [_finite(row, name) for name in ("n_distinct_high", "n_distinct_low")]
    if all(value is not None for value in distinct):
        notes.append(f"distinct experts picked high/low {int(distinct[0])}/{int(distinct[1])}")
    return notes


def _degeneracy_text(cells: pd.DataFrame) -> str:
    """The paper's "degeneracy": how many distinct experts the cells' high and low picks were."""
    if not {"n_distinct_high", "n_distinct_low"} <= set(cells.columns) or cells["n_distinct_high"].isna().all():
        return ""
    def span(values: pd.Series) -> str:
        low, high = int(values.min()), int(values.max())
        return str(low) if low == high else f"{low}–{high}"

    return (f" A cell's high picks came from {span(cells['n_distinct_high'].dropna())} distinct experts and its low "
            f"picks from {span(cells['n_distinct_low'].dropna())} (hover a cell for its own counts).")


def _clustering_text(cells: pd.DataFrame) -> str:
    text = clustering_summary(cells)
    return " " + _e(text) if text else ""


def _design_table(cells: pd.DataFrame, layers: list[int], *, kind: str = "d_z", label: str = "metric") -> str:
    head = f"<th>{_e(label)}</th>" + "".join(f"<th>layer {layer}</th>" for layer in layers)
    body = []
    for metric in cells["metric"].drop_duplicates():
        by_layer = {int(r.layer): r for r in cells[cells["metric"] == metric].itertuples()}
        tds = "".join(_cell(by_layer[layer], kind=kind) if layer in by_layer else "<td></td>" for layer in layers)
        body.append(f"<tr><th>{_e(metric)}</th>{tds}</tr>")
    return (f'<div class="scroll"><table class="audit"><thead><tr>{head}</tr></thead>'
            f'<tbody>{"".join(body)}</tbody></table></div>')


LEGEND = ('<p class="legend"><span class="v-pos">significant, d_z &gt; 0 (the metric\'s high expert matters more)'
          '</span> <span class="v-neg">significant, d_z &lt; 0 (reversed)</span> <span class="v-equiv">equivalent to '
          'zero (TOST)</span> <span class="v-ns">not significant</span> <span class="v-untestable">untestable'
          '</span> — hover a cell for n, corrected p and the minimum detectable effect.</p>')


def _audit(data: RunData, ctx: _Context) -> str:
    tests = data.table("tests")
    if tests is None:
        return _absent(data, "tests")
    layers = sorted(int(x) for x in tests["layer"].unique())
    paired = tests[tests["design"] == "paired"]
    info = data.stage("audit")
    if paired.empty:
        main = '<p class="absent">This run\'s audit has no paired-contrast cells.</p>'
    else:
        significant = int((paired["verdict"] == "significant").sum())
        ns = paired["n"]
        mde = paired["mde_dz"].dropna() if "mde_dz" in paired else pd.Series(dtype=float)
        summary = (f"<p class=\"note\"><b>{significant} of {len(paired)}</b> metric × layer cells significant "
                   f"({info.get('correction', data.config.get('correction', '?'))}-corrected dual test at "
                   f"α = {info.get('alpha', data.config.get('alpha', '?'))}); n = "
                   f"{int(ns.min()) if ns.min() == ns.max() else f'{int(ns.min())}–{int(ns.max())}'} token positions "
                   f"per cell" + (f"; smallest detectable |d_z| ≈ {mde.median():.2f}" if len(mde) else "")
                   + f"; intervention {data.config.get('kind', '?')} / {data.config.get('scope', '?')}."
                   + _clustering_text(paired) + _degeneracy_text(paired) + "</p>")
        main = summary + LEGEND + _design_table(paired, layers)
    extra = []
    names = {"within_token": ("Within-token Spearman ρ (all active experts of a token, averaged)", "mean ρ"),
             "expert_level": ("Expert-level Spearman ρ (mean ΔNLL per expert vs metric, permutation p)", "ρ"),
             "random_pair": ("Random pair (null reference)", "d_z")}
    for design, (caption, kind) in names.items():
        cells = tests[tests["design"] == design]
        if not cells.empty:
            sig = int((cells["verdict"] == "significant").sum())
            extra.append(f"<details><summary>{_e(caption)}: {sig} of {len(cells)} significant</summary>"
                         f"{_design_table(cells, layers, kind=kind)}</details>")
    return main + "".join(extra)


def _scatter(data: RunData, ctx: _Context) -> str:
    metrics = data.table("expert_metrics")
    if metrics is None or not data.has("effects"):
        return _absent(data, "expert_metrics", "effects")
    effects = data.expert_effects
    if effects is None or effects.empty:
        return '<p class="absent">Not available for this run: it has no exact single-expert removals.</p>'
    tests = data.table("tests")
    tested = list(tests.loc[tests["design"].isin(["paired", "expert_level"]), "metric"].drop_duplicates()) \
        if tests is not None else []
    candidates = [m for m in SCATTER_METRICS if m in metrics and metrics[m].notna().any()]
    chosen = [m for m in candidates if not tested or m in tested][:MAX_SCATTER_METRICS]
    all_layers = sorted(int(x) for x in effects["layer"].unique())
    layers = all_layers
    if len(layers) > MAX_SCATTER_LAYERS:
        layers = [all_layers[i] for i in np.unique(np.linspace(0, len(all_layers) - 1, MAX_SCATTER_LAYERS)
                                                   .round().astype(int))]
    fig = figures.metric_scatter(metrics, effects, tests, chosen, layers)
    note = "" if layers == all_layers else f" ({len(layers)} of {len(all_layers)} layers, evenly spaced)"
    return ctx.figure(fig, "metric-vs-effect",
                      f"Metric value vs mean ΔNLL per expert for {', '.join(chosen)}{note}.")


def _control(data: RunData, ctx: _Context) -> str:
    tests = data.table("tests")
    if tests is None:
        return _absent(data, "tests")
    control = tests[tests["design"] == "routing_weight"]
    if control.empty:
        return '<p class="absent">Not available for this run: its audit did not include the routing-weight design.</p>'
    layers = sorted(int(x) for x in tests["layer"].unique())
    fig = figures.control_forest(tests)
    sig = control[control["verdict"] == "significant"]
    headline = (f"<p class=\"note\"><b>{len(sig)} of {len(control)}</b> layers significant"
                + (": " + ", ".join(f"layer {int(r.layer)} (d_z = {r.effect:+.3f} [{r.ci_low:+.2f}, {r.ci_high:+.2f}])"
                                    for r in sig.itertuples()) if len(sig) else "") + ".</p>")
    rows = pd.concat([control, tests[tests["design"] == "random_pair"]])
    rows = rows.assign(metric=rows["design"].map(tables.CONTROL_ROWS))
    return (headline + ctx.figure(fig, "routing-weight-control", "d_z with 95% CI per layer.")
            + LEGEND + _design_table(rows, layers, label="contrast"))


def _progressive(data: RunData, ctx: _Context) -> str:
    redundancy = data.table("redundancy")
    if redundancy is None or redundancy.empty:
        return _absent(data, "redundancy") if redundancy is None else \
            '<p class="absent">Not available for this run: its redundancy table is empty.</p>'
    fig = figures.progressive(redundancy)
    rows = []
    for layer, part in redundancy.groupby("layer"):
        part = part.sort_values("j")
        cliff = part["cliff"].dropna()
        last = part.iloc[-1]
        rows.append((f"layer {int(layer)}", "none" if cliff.empty else f"j = {int(cliff.iloc[0])}",
                     f"{int(last['j'])}", f"{last['mean']:.3f}", f"{last['median']:.3f}",
                     f"{last['p95']:.3f}" if "p95" in part else "–", f"{int(last['n'])}" if "n" in part else "–"))
    return (ctx.figure(fig, "progressive", "ΔNLL after removing the top-j experts by gate.")
            + _table(["layer", "cliff", "largest j", "mean ΔNLL", "median", "95th pct", "n"], rows, classes="num"))


def _gap(data: RunData, ctx: _Context) -> str:
    if not data.has("effects"):
        return _absent(data, "effects")
    frame = data.layer_effects
    if frame is None or frame.empty:
        return '<p class="absent">Not available for this run: it has no exact single-expert removals.</p>'
    fig = figures.gap_depth(frame)
    rows = [(f"layer {int(r.layer)}", f"{int(r.n):,}", _fmt(r.gap_median, ".3g"), _fmt(r.compensation_cos, ".3f"),
             _fmt(r.mean_delta_nll, ".4f"), _fmt(r.median_delta_nll, ".4f"), _fmt(r.mean_kl, ".4f"))
            for r in frame.itertuples()]
    return (ctx.figure(fig, "gap-norm", "Gap norm and loss of one-expert removals per layer.")
            + _table(["layer", "removals", "median gap norm", "mean compensation cos", "mean ΔNLL", "median ΔNLL",
                      "mean KL"], rows, classes="num"))


def _pruning_section(data: RunData, ctx: _Context) -> str:
    if not data.has("pruning"):
        return ('<p class="absent">Pruning was not run for this run (no <code>pruning.parquet</code>); '
                "<code>moeaudit prune RUN_DIR</code> adds it.</p>")
    pruning = data.table("pruning")
    column = _pruning.value_column(pruning)
    if column is None:
        return '<p class="absent">pruning.parquet has no held-out loss column (heldout_ppl or heldout_nll).</p>'
    label = "held-out perplexity" if column == "heldout_ppl" else "held-out NLL (nats)"
    parts = [ctx.figure(figures.pruning_lines(_pruning.whole_model(pruning), _pruning.per_layer(pruning), label,
                                              _pruning.baseline(pruning)),
                        "pruning", f"{label[0].upper() + label[1:]} by criterion and ratio against random pruning.")]
    table = tables.pruning_table(data)
    parts.append(_table(table.header, table.rows, classes="num") + f'<p class="note">{_e(table.caption)}</p>')
    matrices = _pruning.jaccard_matrices(pruning, data.table("jaccard"), data.num_experts)
    if matrices:
        parts.append(ctx.figure(figures.jaccard(matrices), "jaccard",
                                "Mean Jaccard overlap of the dropped expert sets between criteria, over layers."))
    else:
        parts.append('<p class="absent">No Jaccard matrix: the run has neither <code>jaccard.parquet</code> nor '
                     "per-layer kept sets in <code>pruning.parquet</code>.</p>")
    return "".join(parts)


def _calibration_section(data: RunData, ctx: _Context) -> str:
    table = data.table("calibration")
    if table is None:
        return _absent(data, "calibration")
    if table.empty:
        return '<p class="absent">calibration.parquet has no rows.</p>'
    from moeaudit.calibration.stage import calibration_summary

    first = table.iloc[0]
    target, ratio = float(first["tau_target"]), float(first["flip_ratio"])
    summary = calibration_summary(table)
    rows = []
    for row in summary.itertuples(index=False):
        group = table[table["metric"] == row.metric]
        worst = group.loc[group["domain_tau_min"].idxmin()] if group["domain_tau_min"].notna().any() else None
        tokens = (f"{row.tokens_to_target:,.0f}" if np.isfinite(row.tokens_to_target)
                  else f"not reached ({row.reached} layers)")
        rows.append((row.metric, _fmt(row.tau, ".2f"), _fmt(row.tau_p05_min, ".2f"),
                     "–" if not np.isfinite(row.flips) else f"{row.flips:.1%}", tokens,
                     _fmt(row.domain_tau, ".2f"), _fmt(row.domain_tau_min, ".2f"),
                     "–" if worst is None else f"{worst['domain_pair_min']} (layer {int(worst['layer'])})"))
    header = ["metric", "τ mean", "τ p05 (worst layer)", f"flips at {ratio:.0%} pruned", f"tokens to τ ≥ {target:g}",
              "domain τ mean", "domain τ min", "least concordant domains"]
    layers = table["layer"].nunique()
    note = (f"{int(first['n_units'])} calibration {_e(first['unit'])}s, {int(first['n_tokens']):,} tokens, "
            f"{int(table['n_resamples'].max())} bootstrap resamples (seed {int(first['seed'])}); values are means "
            f"over {layers} layer{'s' if layers != 1 else ''} (per layer: <code>calibration.parquet</code>). Tokens to "
            f"τ ≥ {target:g}: the smallest nested subset (at most half the split) whose mean τ reaches it in every "
            "layer; not reached means more calibration data than half of this split would be needed to show it. "
            "Weight-only metrics do not depend on calibration data and are not listed.")
    return (ctx.figure(figures.calibration(table), "calibration",
                       "Bootstrap τ per metric and learning curves over calibration size.")
            + _table(header, rows, classes="num") + f'<p class="note">{note}</p>')


# ---------------------------------------------------------------------------------------------- the page
def _summary_rows(data: RunData) -> list[str]:
    tests, load, redundancy = data.table("tests"), data.load, data.table("redundancy")
    model = data.manifest.get("model", {})
    experts = "/".join(str(v) for v in sorted({int(v) for v in model.get("num_experts", {}).values()})) or "?"
    top_k = "/".join(str(v) for v in sorted({int(v) for v in model.get("top_k", {}).values()})) or "?"

    def share(design: str) -> str:
        if tests is None:
            return "–"
        cells = tests[tests["design"] == design]
        return f"{int((cells['verdict'] == 'significant').sum())} / {len(cells)}" if len(cells) else "–"

    cliffs = "–"
    if redundancy is not None and not redundancy.empty:
        found = redundancy.dropna(subset=["cliff"]).groupby("layer")["cliff"].first()
        cliffs = ", ".join(f"{int(l)} (j={int(c)})" for l, c in found.items()) or "none"
    intervene = data.stage("intervene")
    return [data.name, model.get("family", "?"), compress_layers(model.get("moe_layers", [])) or "?",
            f"{experts} / top-{top_k}", str(int(load["dead"].sum())) if load is not None else "–",
            _count(intervene.get("interventions")) if intervene else "–", share("paired"), share("routing_weight"),
            cliffs, "yes" if data.has("pruning") else "not run"]


def _headline(data: RunData) -> str:
    tests = data.table("tests")
    if tests is None:
        return f"{data.name}: no audit yet."
    paired, control = tests[tests["design"] == "paired"], tests[tests["design"] == "routing_weight"]
    sig = paired[paired["verdict"] == "significant"]
    largest = paired.loc[paired["effect"].abs().idxmax()] if paired["effect"].notna().any() else None
    text = (f"{data.name}: {len(sig)} of {len(paired)} metric × layer cells predict the removal effect "
            "significantly")
    if largest is not None:
        text += f" (largest |d_z| = {abs(largest['effect']):.2f}, {largest['metric']} at layer {int(largest['layer'])})"
    if len(control):
        text += (f"; the routing-weight control is significant in {int((control['verdict'] == 'significant').sum())} "
                 f"of {len(control)} layers")
    return text + "."


def _page(title: str, runs: list[RunData], slugs: list[str], bodies: list[str]) -> str:
    generated = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    header = ["run", "family", "MoE layers", "experts", "dead", "interventions", "paired cells sig.",
              "routing-weight sig.", "cliff (layer, j)", "pruning"]
    rows = []
    for data, slug in zip(runs, slugs):
        cells = _summary_rows(data)
        rows.append(f'<tr><th><a href="#{slug}">{_e(cells[0])}</a></th>'
                    + "".join(f"<td>{_e(c)}</td>" for c in cells[1:]) + "</tr>")
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    headlines = "".join(f"<li>{_e(_headline(d))}</li>" for d in runs)
    nav = " ".join(f'<a href="#{slug}">{_e(d.name)}</a>' for d, slug in zip(runs, slugs))
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="generator" content="moeaudit {_e(__version__)}">
<title>{_e(title)}</title>
<style>{CSS}</style></head>
<body>
<nav class="top"><b>moeaudit</b> {nav} <a href="#summary">summary</a></nav>
<main>
<header><h1>{_e(title)}</h1>
<p class="sub">Observational expert metrics against token-level interventions · generated {generated} by moeaudit
{_e(__version__)} · {len(runs)} run{'s' if len(runs) != 1 else ''}</p></header>
<section id="summary"><h2>At a glance</h2>
<p class="lede">One line per run: does any observational metric predict what removing an expert does, does the
router's own per-token weight, and where does removing several active experts start to hurt?</p>
<ul class="headlines">{headlines}</ul>
<div class="scroll"><table class="summary"><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table></div>
</section>
{chr(10).join(bodies)}
<footer>Definitions: the docstrings of moeaudit (<code>moeaudit.metrics</code>, <code>moeaudit.stats</code>); protocol of the audit: Engmann, Medeiros Adriano, Giese, arXiv 2606.10703.
Cells and figures are computed from the Parquet tables in each run directory; <code>moeaudit query RUN_DIR "SQL"</code>
reads them directly.</footer>
</main></body></html>
"""


CSS = """
:root { --fg:#1d2330; --muted:#5b6472; --line:#dde1e7; --bg:#ffffff; --panel:#f6f7f9;
  --pos:#b7e4b0; --neg:#f9c59a; --equiv:#d6e6f5; --ns:#f1f2f4; --accent:#2c5d9e; }
* { box-sizing: border-box; }
html { font-size: 15px; }
body { margin:0; color:var(--fg); background:var(--bg); line-height:1.45;
  font-family: system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; }
main { max-width: 1180px; margin: 0 auto; padding: 0 22px 40px; }
nav.top { position: sticky; top: 0; z-index: 5; background: #1d2330; color: #fff; padding: 7px 22px;
  font-size: 0.9rem; }
nav.top a { color: #cfe0ff; margin-left: 14px; text-decoration: none; }
h1 { font-size: 1.6rem; margin: 22px 0 4px; }
h2 { font-size: 1.3rem; margin: 34px 0 6px; padding-top: 10px; border-top: 3px solid var(--fg); }
h2 .path { font-size: 0.8rem; font-weight: normal; color: var(--muted); margin-left: 8px; }
h3 { font-size: 1.08rem; margin: 26px 0 4px; color: var(--accent); }
p.sub, p.toc, .note { color: var(--muted); font-size: 0.88rem; }
p.toc a { color: var(--accent); text-decoration: none; }
p.lede { margin: 2px 0 10px; max-width: 70em; }
p.absent { background: var(--panel); border-left: 4px solid #b0b6bf; padding: 8px 12px; color: var(--muted); }
ul.headlines { padding-left: 20px; } ul.headlines li { margin: 3px 0; }
.scroll { overflow-x: auto; max-width: 100%; }
table { border-collapse: collapse; font-size: 0.84rem; margin: 6px 0 12px; }
th, td { border: 1px solid var(--line); padding: 4px 7px; vertical-align: top; text-align: left; }
thead th { background: var(--panel); position: sticky; top: 0; }
table.num td { text-align: right; font-variant-numeric: tabular-nums; }
table.facts th { width: 11em; background: var(--panel); font-weight: 600; }
table.facts td { font-family: ui-monospace, "SFMono-Regular", Menlo, Consolas, monospace; font-size: 0.8rem; }
table.audit td { text-align: center; min-width: 8.5em; font-variant-numeric: tabular-nums; }
table.audit td b { display: block; font-size: 0.95rem; }
table.audit td small { display: block; color: #39404b; font-size: 0.74rem; }
.v-pos { background: var(--pos); } .v-neg { background: var(--neg); } .v-equiv { background: var(--equiv); }
.v-ns { background: var(--ns); } .v-untestable { background: #fff; color: #8a919c; font-style: italic; }
p.legend span { display: inline-block; padding: 1px 7px; margin: 2px 4px 2px 0; border: 1px solid var(--line);
  font-size: 0.78rem; }
figure { margin: 8px 0 14px; }
figure img { max-width: 100%; height: auto; border: 1px solid var(--line); }
figcaption { font-size: 0.78rem; color: var(--muted); }
details { margin: 6px 0; } summary { cursor: pointer; color: var(--accent); font-size: 0.9rem; }
code { font-family: ui-monospace, "SFMono-Regular", Menlo, Consolas, monospace; font-size: 0.85em; }
footer { margin-top: 40px; padding-top: 10px; border-top: 1px solid var(--line); color: var(--muted);
  font-size: 0.8rem; }
@media print { nav.top { display: none; } h2 { page-break-before: always; } }
"""
