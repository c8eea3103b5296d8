"""The self-contained HTML audit report: one file, inline CSS, figures embedded as PNG data URIs.

The page makes no network request: no scripts, no web fonts (a system font stack), no external images.
Every figure is also written beside the report as ``figures/<run>-<name>.png`` and ``.svg`` for papers.

The HTML comes from the Jinja2 templates in ``templates/`` (autoescaped): ``report.html.j2`` is the page,
``answers.html.j2`` its top (:mod:`moeaudit.report.answers`), ``run.html.j2`` one run, and ``sections/*.html.j2``
one template per section. Each section is a :class:`SectionSpec`: a builder here turns a run's tables into the
values its template shows (numbers formatted, figures saved), or an :class:`Absent` sentence. Adding a section is
one entry in :data:`SECTION_SPECS` and one template.
"""

from __future__ import annotations

import datetime as _dt
import functools
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd

from moeaudit import __version__
from moeaudit.audit.designs import clustering_summary
from moeaudit.errors import MoeAuditError
from moeaudit.report import _pruning, answers, figures, tables
from moeaudit.report._load import DOMINANT_FACTOR, RunData, compress_layers
from moeaudit.rundir import RunDir

logger = logging.getLogger(__name__)

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
                              "t / Wilcoxon p-values (the forest plot draws each d_z with its CI, filled where "
                              "significant); a coloured cell passed the corrected dual test, green when the "
                              "metric's favourite mattered more.",
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
               "against the band of random prunings (a criterion inside the grey band is no better than chance; "
               "green dots beat 95% of the random draws), per layer pruned alone the criterion's percentile among "
               "random prunings, and how much the criteria agree on which experts to drop (Jaccard overlap).",
    "Experts removed together": "How the experts of a token's active set combine when removed together, beyond "
                                "the paper's one-at-a-time removal: each heat-map cell is the mean interaction of "
                                "an expert pair at the tokens where both are active (red: removing both costs more "
                                "than the two removals apart; blue: less; grey: never active together), the table "
                                "gives each layer's distribution and how the Shapley values of the active set split "
                                "its cost, and the pruned sets removed together are set against random sets of the "
                                "same size.",
    "Calibration sensitivity": "How much each metric's expert ranking depends on the calibration data: Kendall τ "
                               "between the ranking on bootstrap resamples of the calibration documents and on "
                               "all of them (1 = the same order), the share of prune/keep decisions at the "
                               "pruning ratio that such a resample flips, the calibration size from which nested "
                               "subsets reach the target τ, and τ between rankings computed on single domains.",
}
#: The command that writes each table, for the "not available" sentences.
PRODUCER = {"tokens": "observe", "routing": "observe", "expert_metrics": "metrics",
            "expert_metrics_by_domain": "metrics", "effects": "intervene", "tests": "audit",
            "redundancy": "audit", "pruning": "prune", "jaccard": "prune", "calibration": "calibration",
            "interactions": "interactions", "shapley": "interactions"}
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
    browser would fetch. It opens offline and can be mailed or attached to a paper's supplement. It opens with
    three answers per run in words (:mod:`moeaudit.report.answers`) and, when it covers several runs, names
    the settings other than the model in which they differ.

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
    with figures.style():
        views = [_run_view(data, _Context(slug, figure_dir, out_html.parent)) for data, slug in zip(runs, slugs)]
    labels = _run_labels(runs, slugs)
    differences = answers.setting_differences({label: data.settings for label, data in zip(labels, runs)})
    for view, label in zip(views, labels):
        view["label"] = label
        view["differs"] = [name for name, values in differences.items() if _odd_one(values, label)]
    page = render_page(title, views, differences)
    from moeaudit.rundir import atomic_write_text

    atomic_write_text(out_html, page)
    logger.info("wrote %s (%d bytes, %d runs)", out_html, out_html.stat().st_size, len(runs))
    return out_html


# ---------------------------------------------------------------------------------------------- templates
_CODE = re.compile(r"`([^`]+)`")


def _codes(text: Any):
    """Jinja filter: escape ``text`` and set its `backticked` spans (table and command names) as <code>."""
    from markupsafe import Markup, escape

    return Markup(_CODE.sub(r"<code>\1</code>", str(escape(text))))


@functools.lru_cache(maxsize=1)
def environment():
    """The Jinja2 environment of the report: templates from ``moeaudit/report/templates``, autoescape on, an
    undefined name an error (:class:`jinja2.StrictUndefined`), and the ``codes`` filter."""
    import jinja2

    env = jinja2.Environment(loader=jinja2.FileSystemLoader(Path(__file__).with_name("templates")),
                             autoescape=True, undefined=jinja2.StrictUndefined, trim_blocks=False,
                             keep_trailing_newline=True)
    env.filters["codes"] = _codes
    return env


def render_page(title: str, runs: list[dict[str, Any]], differences: dict[str, dict[str, Any]]) -> str:
    """Render ``report.html.j2``.

    Parameters
    ----------
    title : str
    runs : list of dict
        One view per run (:func:`_run_view`): ``name``, ``slug``, ``path``, ``answers``, ``headline``,
        ``summary`` cells, ``label`` (its name in the settings comparison), ``differs`` (the settings in which it
        departs from the other runs) and ``sections``.
    differences : dict
        ``{setting: {run name: value}}`` (:func:`setting_differences`).

    Returns
    -------
    str
        The page; every value is HTML-escaped by the templates.
    """
    generated = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return environment().get_template("report.html.j2").render(
        title=title, runs=runs, differences=differences, generated=generated, version=__version__,
        summary={"header": SUMMARY_HEADER + (["settings"] if len(runs) > 1 else [])})


def _run_labels(runs: list[RunData], slugs: list[str]) -> list[str]:
    """How the page names each run when comparing settings: its model, or its directory where two share one."""
    names = [r.name for r in runs]
    return names if len(set(names)) == len(names) else list(slugs)


def _odd_one(values: dict[str, Any], label: str) -> bool:
    """Whether run ``label``'s value of a setting is not the one most runs share (every run, on a tie)."""
    counts: dict[str, int] = {}
    for value in values.values():
        counts[repr(value)] = counts.get(repr(value), 0) + 1
    return counts[repr(values[label])] < max(counts.values()) or len(set(counts.values())) == 1


# ---------------------------------------------------------------------------------------------- plumbing
@dataclass
class _Context:
    slug: str
    figure_dir: Path
    report_dir: Path
    figures: list[Path] = field(default_factory=list)

    def figure(self, fig, name: str, alt: str) -> dict[str, str] | None:
        """Save ``fig`` as PNG + SVG; return what the ``figure`` macro shows (None: nothing drawn)."""
        if fig is None:
            return None
        png, svg, data = figures.save(fig, self.figure_dir / f"{self.slug}-{name}")
        self.figures += [png, svg]
        rel = lambda p: p.relative_to(self.report_dir).as_posix() if p.is_relative_to(self.report_dir) else str(p)
        return {"data": data, "alt": alt, "png": rel(png), "svg": rel(svg)}


@dataclass(frozen=True)
class Absent:
    """A section's one sentence instead of its content; `backticked` names are set as code."""

    text: str


@dataclass(frozen=True)
class SectionSpec:
    """One section of a run: heading, lede, the builder of its template's values, and its template."""

    heading: str
    build: Callable[[RunData, "_Context"], "dict[str, Any] | Absent"]
    template: str


def _unique_slugs(names: list[str]) -> list[str]:
    slugs, seen = [], {}
    for name in names:
        slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "run"
        seen[slug] = seen.get(slug, 0) + 1
        slugs.append(slug if seen[slug] == 1 else f"{slug}-{seen[slug]}")
    return slugs


def _section_id(slug: str, heading: str) -> str:
    return f"{slug}-{re.sub(r'[^a-z0-9]+', '-', heading.lower()).strip('-')}"


def _absent(data: RunData, *names: str) -> Absent:
    missing = [n for n in names if not data.has(n)]
    commands = sorted({PRODUCER.get(n, "run") for n in missing})
    return Absent(f"Not available for this run: it has no {' or '.join(f'`{n}.parquet`' for n in missing)}; "
                  f"{' and '.join(f'`moeaudit {c} RUN_DIR`' for c in commands)} "
                  f"{'adds' if len(commands) == 1 else 'add'} it.")


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]], *, classes: str = "",
           row_header: bool = True) -> dict[str, Any]:
    """What the ``table`` macro shows: the header, the rows as strings (first cell a row header)."""
    return {"header": [str(h) for h in header], "rows": [[str(c) for c in row] for row in rows],
            "classes": classes, "row_header": row_header}


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
def _run_view(data: RunData, ctx: _Context) -> dict[str, Any]:
    """Everything the templates show of one run: its answers, summary row and every section."""
    sections = []
    for spec in SECTION_SPECS:
        part = {"heading": spec.heading, "id": _section_id(ctx.slug, spec.heading), "lede": LEDES[spec.heading],
                "template": spec.template, "body": None, "absent": None, "error": None}
        try:
            body = spec.build(data, ctx)
        except MoeAuditError as err:  # a damaged or missing table: its one line, no traceback
            logger.warning("report section %r of %s not drawn: %s", spec.heading, data.path, err)
            part["error"] = str(err)
        except Exception as err:  # one broken section must not cost the reader the whole report
            logger.exception("report section %r failed for %s", spec.heading, data.path)
            part["error"] = f"{type(err).__name__}: {err}"
        else:
            if isinstance(body, Absent):
                part["absent"] = body.text
            else:
                part["body"] = body
        sections.append(part)
    return {"name": data.name, "slug": ctx.slug, "path": str(data.path), "answers": run_answers(data),
            "headline": _headline(data), "summary": _summary_rows(data), "label": data.name, "differs": [],
            "sections": sections}


def run_answers(data: RunData) -> list[answers.Answer]:
    """The three answers at the top of the report for one run (:mod:`moeaudit.report.answers`)."""
    info = data.stage("audit")
    return [answers.metric_answer(data.table("tests"), correction=info.get("correction", data.config.get("correction")),
                                  alpha=info.get("alpha", data.config.get("alpha"))),
            answers.redundancy_answer(data.progressive, data.top_k),
            answers.pruning_answer(data.table("pruning"))]


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


def _provenance(data: RunData, ctx: _Context) -> dict[str, Any]:
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
    stages = [(name, info.get("finished", "?"), _fmt(info.get("seconds"), ".1f"))
              for name, info in m.get("stages", {}).items()]
    config_rows = [(k, v if not isinstance(v, (list, dict)) else str(v)) for k, v in config.items()]
    tables_present = ", ".join(sorted(p.stem for p in data.path.glob("*.parquet") if not p.name.startswith("."))) or "none"
    return {"facts": [(k, str(v)) for k, v in facts], "tables_present": tables_present,
            "stages": _table(["stage", "finished", "seconds"], stages),
            "config": _table(["setting", "value"], config_rows)}


def _routing_load(data: RunData, ctx: _Context) -> dict[str, Any] | Absent:
    metrics = data.table("expert_metrics")
    if metrics is None or data.load is None:
        return _absent(data, "expert_metrics")
    table = tables.metrics_table(data)
    split = data.stage("metrics").get("split", "calibration")
    fig = figures.load_bars(metrics, data.load, DOMINANT_FACTOR)
    return {"figure": ctx.figure(fig, "routing-load", f"Expert frequency per MoE layer ({split} split)."),
            "table": _table(table.header, table.rows, classes="num")}


def _domains(data: RunData, ctx: _Context) -> dict[str, Any] | Absent:
    by_domain, metrics = data.table("expert_metrics_by_domain"), data.table("expert_metrics")
    if by_domain is None or metrics is None:
        return _absent(data, "expert_metrics_by_domain", "expert_metrics")
    domains = by_domain["domain"].dropna().unique()
    if len(domains) < 2:
        return Absent(f"Not available for this run: its corpus has "
                      f"{'one domain' if len(domains) else 'no domain labels'}, so there is nothing to compare.")
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
    return {"figure": ctx.figure(fig, "domains", f"Domain × expert routing lift per layer{note}."),
            "min_count": min_count,
            "table": _table(["expert", "domain", "lift", "domain freq", "overall freq", "tokens"], rows,
                            classes="num")}


def _verdict_class(row) -> str:
    if not np.isfinite(row.effect):
        return "v-untestable"
    if row.verdict == "significant":
        return "v-pos" if row.effect > 0 else "v-neg"
    equivalent = getattr(row, "equivalent", None)
    if isinstance(equivalent, (bool, np.bool_)) and bool(equivalent):
        return "v-equiv"
    return "v-ns"


def _cell(row, *, kind: str = "d_z") -> dict[str, Any]:
    """What the ``cell`` macro shows of one tests.parquet row: class, hover text, d_z, CI, p-values, clusters."""
    if not np.isfinite(row.effect):
        return {"untestable": True}
    extra = []
    for name, label in (("p_adjusted", "corrected p"), ("mde_dz", "minimum detectable |d_z| at 80% power"),
                        ("p_tost", "TOST p (|d_z| < bound)")):
        value = getattr(row, name, np.nan)
        if value is not None and np.isfinite(value):
            extra.append(f"{label} {value:.3g}")
    extra.extend(_cluster_notes(row))
    title = f"{kind} = {row.effect:+.4f}, n = {int(row.n)}; " + "; ".join(extra) + f"; verdict: {row.verdict}"
    ci = (f"[{row.ci_low:+.2f}, {row.ci_high:+.2f}]" if np.isfinite(row.ci_low) and np.isfinite(row.ci_high)
          else "")
    p_w = f" / {row.p_wilcoxon:.2g}" if np.isfinite(row.p_wilcoxon) and row.p_wilcoxon != row.p_t else ""
    mark = "*" if row.verdict == "significant" else ""
    clusters = _finite(row, "n_clusters")
    design = (f"{int(clusters)} {row.cluster}s · deff {row.design_effect:.2g}"
              if clusters is not None and _finite(row, "design_effect") is not None else "")
    return {"untestable": False, "cls": _verdict_class(row), "title": title, "effect": f"{row.effect:+.3f}{mark}",
            "ci": ci, "p": f"{row.p_t:.2g}{p_w}", "clusters": design}


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
    return " " + text if text else ""


def _design_table(cells: pd.DataFrame, layers: list[int], *, kind: str = "d_z", label: str = "metric") -> dict[str, Any]:
    """What the ``design_table`` macro shows: one row per metric (or contrast), one cell per layer."""
    rows = []
    for metric in cells["metric"].drop_duplicates():
        by_layer = {int(r.layer): r for r in cells[cells["metric"] == metric].itertuples()}
        rows.append({"name": str(metric),
                     "cells": [_cell(by_layer[layer], kind=kind) if layer in by_layer else None for layer in layers]})
    return {"label": label, "layers": layers, "rows": rows}


def _audit(data: RunData, ctx: _Context) -> dict[str, Any] | Absent:
    tests = data.table("tests")
    if tests is None:
        return _absent(data, "tests")
    layers = sorted(int(x) for x in tests["layer"].unique())
    paired = tests[tests["design"] == "paired"]
    info = data.stage("audit")
    out: dict[str, Any] = {"summary": None, "forest": None, "table": None, "extra": []}
    if not paired.empty:
        ns = paired["n"]
        mde = paired["mde_dz"].dropna() if "mde_dz" in paired else pd.Series(dtype=float)
        text = (f"metric × layer cells significant ({info.get('correction', data.config.get('correction', '?'))}"
                f"-corrected dual test at α = {info.get('alpha', data.config.get('alpha', '?'))}); n = "
                f"{int(ns.min()) if ns.min() == ns.max() else f'{int(ns.min())}–{int(ns.max())}'} token positions "
                f"per cell" + (f"; smallest detectable |d_z| ≈ {mde.median():.2f}" if len(mde) else "")
                + f"; intervention {data.config.get('kind', '?')} / {data.config.get('scope', '?')}."
                + _clustering_text(paired) + _degeneracy_text(paired))
        out["summary"] = {"significant": int((paired["verdict"] == "significant").sum()), "cells": len(paired),
                          "text": text}
        out["forest"] = ctx.figure(figures.audit_forest(paired), "audit-forest",
                                   "d_z with its 95% CI per metric × layer (paired design); filled: significant "
                                   "after correction.")
        out["table"] = _design_table(paired, layers)
    names = {"within_token": ("Within-token Spearman ρ (all active experts of a token, averaged)", "mean ρ"),
             "expert_level": ("Expert-level Spearman ρ (mean ΔNLL per expert vs metric, permutation p)", "ρ"),
             "random_pair": ("Random pair (null reference)", "d_z")}
    for design, (caption, kind) in names.items():
        cells = tests[tests["design"] == design]
        if not cells.empty:
            out["extra"].append({"caption": caption, "significant": int((cells["verdict"] == "significant").sum()),
                                 "cells": len(cells), "table": _design_table(cells, layers, kind=kind)})
    return out


def _scatter(data: RunData, ctx: _Context) -> dict[str, Any] | Absent:
    metrics = data.table("expert_metrics")
    if metrics is None or not data.has("effects"):
        return _absent(data, "expert_metrics", "effects")
    effects = data.expert_effects
    if effects is None or effects.empty:
        return Absent("Not available for this run: it has no exact single-expert removals.")
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
    return {"figure": ctx.figure(fig, "metric-vs-effect",
                                 f"Metric value vs mean ΔNLL per expert for {', '.join(chosen)}{note}.")}


def _control(data: RunData, ctx: _Context) -> dict[str, Any] | Absent:
    tests = data.table("tests")
    if tests is None:
        return _absent(data, "tests")
    control = tests[tests["design"] == "routing_weight"]
    if control.empty:
        return Absent("Not available for this run: its audit did not include the routing-weight design.")
    layers = sorted(int(x) for x in tests["layer"].unique())
    fig = figures.control_forest(tests)
    sig = control[control["verdict"] == "significant"]
    rows = pd.concat([control, tests[tests["design"] == "random_pair"]])
    rows = rows.assign(metric=rows["design"].map(tables.CONTROL_ROWS))
    return {"significant": len(sig), "cells": len(control),
            "named": [f"layer {int(r.layer)} (d_z = {r.effect:+.3f} [{r.ci_low:+.2f}, {r.ci_high:+.2f}])"
                      for r in sig.itertuples()],
            "figure": ctx.figure(fig, "routing-weight-control", "d_z with 95% CI per layer."),
            "table": _design_table(rows, layers, label="contrast")}


def _progressive(data: RunData, ctx: _Context) -> dict[str, Any] | Absent:
    redundancy = data.progressive
    if redundancy is None:
        return Absent(f"Not available: {answers.NO_PROGRESSIVE}")
    fig = figures.progressive(redundancy)
    rows = []
    for layer, part in redundancy.groupby("layer"):
        part = part.sort_values("j")
        cliff = pd.to_numeric(part["cliff"], errors="coerce").dropna()
        last = part.iloc[-1]
        rows.append((f"layer {int(layer)}", "none" if cliff.empty else f"j = {int(cliff.iloc[0])}",
                     f"{int(last['j'])}", f"{last['mean']:.3f}", f"{last['median']:.3f}",
                     f"{last['p95']:.3f}" if "p95" in part else "–", f"{int(last['n'])}" if "n" in part else "–"))
    return {"figure": ctx.figure(fig, "progressive", "ΔNLL after removing the top-j experts by gate."),
            "table": _table(["layer", "cliff", "largest j", "mean ΔNLL", "median", "95th pct", "n"], rows,
                            classes="num")}


def _gap(data: RunData, ctx: _Context) -> dict[str, Any] | Absent:
    if not data.has("effects"):
        return _absent(data, "effects")
    frame = data.layer_effects
    if frame is None or frame.empty:
        return Absent("Not available for this run: it has no exact single-expert removals.")
    fig = figures.gap_depth(frame)
    rows = [(f"layer {int(r.layer)}", f"{int(r.n):,}", _fmt(r.gap_median, ".3g"), _fmt(r.compensation_cos, ".3f"),
             _fmt(r.mean_delta_nll, ".4f"), _fmt(r.median_delta_nll, ".4f"), _fmt(r.mean_kl, ".4f"))
            for r in frame.itertuples()]
    return {"figure": ctx.figure(fig, "gap-norm", "Gap norm and loss of one-expert removals per layer."),
            "table": _table(["layer", "removals", "median gap norm", "mean compensation cos", "mean ΔNLL",
                             "median ΔNLL", "mean KL"], rows, classes="num")}


def _pruning_section(data: RunData, ctx: _Context) -> dict[str, Any] | Absent:
    if not data.has("pruning"):
        return Absent("Pruning was not run for this run (no `pruning.parquet`); `moeaudit prune RUN_DIR` adds it.")
    pruning = data.table("pruning")
    column = _pruning.value_column(pruning)
    if column is None:
        return Absent("pruning.parquet has no held-out loss column (heldout_ppl or heldout_nll).")
    label = ("held-out perplexity (exp of mean nats per token)" if column == "heldout_ppl"
             else "held-out NLL (nats per token)")
    fig = figures.pruning_plot(_pruning.whole_model(pruning), _pruning.per_layer(pruning), label,
                               _pruning.baseline(pruning), oracles=answers.oracles(pruning))
    table = tables.pruning_table(data)
    matrices = _pruning.jaccard_matrices(pruning, data.table("jaccard"), data.num_experts)
    return {"figure": ctx.figure(fig, "pruning", f"{label[0].upper() + label[1:]} by criterion and ratio against "
                                                 "random pruning."),
            "table": _table(table.header, table.rows, classes="num"), "caption": table.caption,
            "jaccard": ctx.figure(figures.jaccard(matrices), "jaccard",
                                  "Mean Jaccard overlap of the dropped expert sets between criteria, over layers.")
            if matrices else None}


def _calibration_section(data: RunData, ctx: _Context) -> dict[str, Any] | Absent:
    table = data.table("calibration")
    if table is None:
        return _absent(data, "calibration")
    if table.empty:
        return Absent("calibration.parquet has no rows.")
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
    note = (f"{int(first['n_units'])} calibration {first['unit']}s, {int(first['n_tokens']):,} tokens, "
            f"{int(table['n_resamples'].max())} bootstrap resamples (seed {int(first['seed'])}); values are means "
            f"over {layers} layer{'s' if layers != 1 else ''} (per layer: `calibration.parquet`). Tokens to "
            f"τ ≥ {target:g}: the smallest nested subset (at most half the split) whose mean τ reaches it in every "
            "layer; not reached means more calibration data than half of this split would be needed to show it. "
            "Weight-only metrics do not depend on calibration data and are not listed.")
    return {"figure": ctx.figure(figures.calibration(table), "calibration",
                                 "Bootstrap τ per metric and learning curves over calibration size."),
            "table": _table(header, rows, classes="num"), "note": note}


def _interactions_section(data: RunData, ctx: _Context) -> dict[str, Any] | Absent:
    pairs, shapley = data.table("interactions"), data.table("shapley")
    if pairs is None or shapley is None:
        return _absent(data, "interactions", "shapley")
    if shapley.empty:
        return Absent("shapley.parquet has no rows.")
    from moeaudit.interactions import interaction_summary, set_summary
    from moeaudit.interactions.summary import set_layer_table

    summary = interaction_summary(pairs, shapley)
    rows = [(int(r.layer), f"{r.tokens:,}", int(r.k), _fmt(r.mean_interaction, "+.3g"),
             f"{_fmt(r.p05_interaction, '+.2g')} … {_fmt(r.p95_interaction, '+.2g')}",
             _fmt(100 * r.share_positive, ".0f") + " %", _fmt(100 * r.share_negative, ".0f") + " %",
             _fmt(r.mean_delta_all, ".3g"), _fmt(r.mean_sum_single, ".3g"), _fmt(100 * r.top_gate_share, ".0f") + " %",
             _fmt(r.spearman_single_shapley, ".2f")) for r in summary.itertuples(index=False)]
    header = ["layer", "tokens", "k", "mean interaction (nats)", "5–95 %", "> 0", "< 0", "ΔNLL all removed",
              "Σ single ΔNLL", "top-gate Shapley share", "ρ(single, Shapley)"]
    stage = data.stage("interactions")
    sizes = {layer: data.num_experts(layer) for layer in summary["layer"]}
    body: dict[str, Any] = {
        "figure": ctx.figure(figures.interaction_heatmaps(pairs, sizes), "interactions",
                             "Mean pairwise interaction of each expert pair per layer (nats)."),
        "table": _table(header, rows, classes="num"),
        "note": (f"{stage.get('kind', '?')} removals at token scope, {stage.get('removals', 0):,} of them through the "
                 f"{stage.get('engine', '?')} engine (noise floor {_fmt(stage.get('noise_floor'), '.1e')} nats), at "
                 f"sampled `{stage.get('split', 'heldout')}` tokens. Interaction = ΔNLL(both) − ΔNLL(a) − ΔNLL(b) for "
                 "each pair of a token's active experts: > 0 when removing both costs more than the two apart (each "
                 "expert covers for the other), < 0 when one removal already costs most of what both do. The "
                 "Shapley values of a token's active experts add up to the cost of removing all of them; the "
                 "top-gate share is the share of their absolute values held by the expert with the largest gate "
                 "(1/k without information)" + ("; some are permutation estimates (`shapley_se`)."
                                                 if summary["estimated"].any() else ".")),
        "sets": None, "tests": None,
    }
    sets = data.table("interaction_sets")
    if sets is not None and not sets.empty:
        table = set_layer_table(set_summary(sets))
        set_rows = [(f"{r.ratio:g}", int(r.layer), f"{_fmt(r.joint_min, '+.3g')} … {_fmt(r.joint_max, '+.3g')}",
                     f"{_fmt(r.random_p05, '+.3g')} … {_fmt(r.random_p95, '+.3g')}", f"{r.inside_random}/{r.criteria}",
                     _fmt(r.excess, "+.3g"), _fmt(r.random_excess, "+.3g")) for r in table.itertuples(index=False)]
        body["sets"] = _table(["ratio", "layer", "criteria: mean joint ΔNLL", "random 5–95 %", "criteria in band",
                               "joint − Σ single (criteria)", "joint − Σ single (random)"], set_rows, classes="num")
    tests = data.table("shapley_tests")
    if tests is not None and not tests.empty:
        counts = tests.groupby(["design", "outcome"])["verdict"].agg(
            lambda v: f"{int((v == 'significant').sum())} of {len(v)}")
        body["tests"] = (
            "Does a metric predict Shapley values better than single-expert effects? Significant metric × layer "
            "cells (each outcome corrected as its own family): "
            + "; ".join(f"{design}: {counts.get((design, 'single'), '–')} on single effects, "
                        f"{counts.get((design, 'shapley'), '–')} on Shapley values"
                        for design in ("paired", "expert_level")) + " (`shapley_tests.parquet`).")
    return body


#: The sections of a run, in page order: heading, builder, template (under ``templates/``).
SECTION_SPECS: tuple[SectionSpec, ...] = (
    SectionSpec("Provenance", _provenance, "sections/provenance.html.j2"),
    SectionSpec("Routing load", _routing_load, "sections/routing_load.html.j2"),
    SectionSpec("Domain specialisation", _domains, "sections/domains.html.j2"),
    SectionSpec("Metric-vs-effect audit", _audit, "sections/audit.html.j2"),
    SectionSpec("Metric value vs removal effect", _scatter, "sections/scatter.html.j2"),
    SectionSpec("Routing-weight control", _control, "sections/control.html.j2"),
    SectionSpec("Progressive ablation", _progressive, "sections/progressive.html.j2"),
    SectionSpec("Gap norm over depth", _gap, "sections/gap.html.j2"),
    SectionSpec("Pruning", _pruning_section, "sections/pruning.html.j2"),
    SectionSpec("Calibration sensitivity", _calibration_section, "sections/calibration.html.j2"),
    SectionSpec("Experts removed together", _interactions_section, "sections/interactions.html.j2"),
)
#: Section headings, in page order; each run gets every one (with a sentence when its input is missing).
SECTIONS: tuple[str, ...] = tuple(spec.heading for spec in SECTION_SPECS)


# ---------------------------------------------------------------------------------------------- the page
SUMMARY_HEADER = ["run", "family", "MoE layers", "experts", "dead", "interventions", "paired cells sig.",
                  "routing-weight sig.", "cliff (layer, j)", "pruning"]


def _summary_rows(data: RunData) -> list[str]:
    tests, load, redundancy = data.table("tests"), data.load, data.progressive
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
        cliff = pd.to_numeric(redundancy["cliff"], errors="coerce")
        found = redundancy.assign(cliff=cliff).dropna(subset=["cliff"]).groupby("layer")["cliff"].first()
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
