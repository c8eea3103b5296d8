"""The three answers the report gives first, in words, computed from a run's tables.

1. :func:`metric_answer` — does any observational metric predict what removing an expert does
   (``tests.parquet``, the paired design)?
2. :func:`redundancy_answer` — which layers are redundant under progressive ablation (the progressive rows of
   ``effects.parquet`` summarised by :func:`moeaudit.audit.stage.redundancy_table`)?
3. :func:`pruning_answer` — does any pruning criterion beat random pruning, and by how much
   (``pruning.parquet`` summarised by :func:`moeaudit.prune.summary.summary`)?

Each function takes the table (or None when the run has none) and returns an :class:`Answer` whose ``text`` is
plain prose; a missing or empty table gives one sentence saying so and naming the command that adds it.
:func:`setting_differences` names the settings in which several runs of one report differ.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import numpy as np
import pandas as pd

from moeaudit.report import _pruning
from moeaudit.report._load import compress_layers
from moeaudit.stats.redundancy import CLIFF_THRESHOLD_NATS

#: The three questions, in the order the report answers them.
QUESTIONS: tuple[str, ...] = (
    "Does any metric predict removal effects here?",
    "Which layers are redundant?",
    "Does any pruning criterion beat random pruning?",
)
#: What a run without progressive ablation lacks, and how to add it (the answer and the section say it).
NO_PROGRESSIVE = ("this run has no progressive ablation (rows of `effects.parquet` with selection = progressive); "
                  "`moeaudit intervene RUN_DIR` with progressive = true adds them.")
#: Significant cells named one by one before "and N more".
MAX_CELLS_NAMED = 4


@dataclass(frozen=True)
class Answer:
    """One answer at the top of the report.

    Attributes
    ----------
    question : str
        One of :data:`QUESTIONS`.
    verdict : {"yes", "no", "unknown"}
        The short answer; ``unknown`` when the run lacks the table (``text`` says which and how to add it).
    text : str
        Plain prose (no markup): the answer with its numbers. Names of tables and commands are in backticks.
    """

    question: str
    verdict: str
    text: str


def _plural(n: int, word: str, plural: str | None = None) -> str:
    return f"{n} {word if n == 1 else (plural or word + 's')}"


def _join(items: list[str]) -> str:
    if len(items) < 2:
        return "".join(items)
    return ", ".join(items[:-1]) + " and " + items[-1]


def nice_ceiling(value: float) -> float:
    """The smallest number > ``value`` with one significant digit (0.055 -> 0.06, 0.0049 -> 0.005, 0.04 -> 0.05).

    Parameters
    ----------
    value : float
        Positive and finite.

    Returns
    -------
    float
    """
    step = 10.0 ** math.floor(math.log10(value))
    return round((math.floor(value / step + 1e-9) + 1) * step, 12)


# ---------------------------------------------------------------------------------------------- 1. metrics
def metric_answer(tests: pd.DataFrame | None, *, correction: str | None = None,
                  alpha: float | None = None) -> Answer:
    """Whether any metric × layer cell of the paired design passed the corrected test, and which.

    Parameters
    ----------
    tests : DataFrame or None
        ``tests.parquet`` (columns ``design``, ``metric``, ``layer``, ``effect`` = d_z, ``ci_low``, ``ci_high``,
        ``verdict``); None when the run has no audit.
    correction, alpha : optional
        The audit's multiple-comparison correction and level, named in the sentence when given.

    Returns
    -------
    Answer
        ``yes`` when at least one tested cell is significant: the sentence counts significant cells out of
        tested ones (untestable cells are counted apart), names the metrics and layers and the cells with the
        largest |d_z| with their 95 % CIs; ``no`` names the largest |d_z| seen.
    """
    question = QUESTIONS[0]
    if tests is None:
        return Answer(question, "unknown", "Not known yet: this run has no `tests.parquet` (the statistical audit); "
                                           "`moeaudit audit RUN_DIR` adds it.")
    paired = tests[tests["design"] == "paired"]
    tested = paired[np.isfinite(paired["effect"].to_numpy(dtype=float))]
    if tested.empty:
        return Answer(question, "unknown", "Not known: the audit in `tests.parquet` has no testable paired-contrast "
                                           "cell (metric × layer).")
    untestable = len(paired) - len(tested)
    rule = f"{correction + '-' if correction else ''}corrected dual test" + (f" at α = {alpha:g}" if alpha else "")
    extra = f" ({_plural(untestable, 'more cell')} untestable: too few usable tokens)" if untestable else ""
    sig = tested[tested["verdict"] == "significant"]
    order = sig.assign(size=sig["effect"].abs()).sort_values("size", ascending=False)
    if sig.empty:
        top = tested.loc[tested["effect"].abs().idxmax()]
        return Answer(question, "no",
                      f"No: none of the {len(tested)} tested metric × layer cells predicts which active expert's "
                      f"removal costs more ({rule}){extra}. The largest effect, d_z = {top['effect']:+.2f} "
                      f"[{top['ci_low']:+.2f}, {top['ci_high']:+.2f}] ({top['metric']}, layer {int(top['layer'])}), "
                      "did not survive the correction.")
    metrics = list(dict.fromkeys(order["metric"]))
    layers = sorted({int(x) for x in sig["layer"]})
    cells = [f"{r.metric} at layer {int(r.layer)} (d_z = {r.effect:+.2f} [{r.ci_low:+.2f}, {r.ci_high:+.2f}])"
             for r in order.head(MAX_CELLS_NAMED).itertuples()]
    more = f" and {len(order) - MAX_CELLS_NAMED} more" if len(order) > MAX_CELLS_NAMED else ""
    positive, negative = int((sig["effect"] > 0).sum()), int((sig["effect"] < 0).sum())
    direction = ("in each the metric's favourite mattered more" if not negative else
                 "in each the metric's favourite mattered less (the ranking is reversed)" if not positive else
                 f"{positive} with the metric's favourite mattering more, {negative} reversed")
    return Answer(question, "yes",
                  f"Yes, in {len(sig)} of {len(tested)} tested metric × layer cells ({rule}){extra}: "
                  f"{_plural(len(metrics), 'metric')} ({_join(metrics)}) at "
                  f"{'layer' if len(layers) == 1 else 'layers'} {compress_layers(layers)}; "
                  f"{direction}. Largest significant: {'; '.join(cells)}{more}.")


# ---------------------------------------------------------------------------------------------- 2. redundancy
def redundancy_answer(progressive: pd.DataFrame | None, top_k: Callable[[int], int | None] | Mapping[int, int],
                      *, threshold: float = CLIFF_THRESHOLD_NATS) -> Answer:
    """Which layers absorb the removal of most of a token's active experts.

    Parameters
    ----------
    progressive : DataFrame or None
        Progressive ablation per layer and j (:func:`moeaudit.audit.stage.redundancy_table`: ``layer``, ``j``,
        ``n``, ``mean``, ``median``, ``p95``, ``cliff``); None or empty when the run has none.
    top_k : callable or mapping
        The number of active experts k of a layer (``RunData.top_k``); None or absent when unknown.
    threshold : float
        The cliff threshold in nats (the paper's 0.1), named in the sentence.

    Returns
    -------
    Answer
        ``yes`` when some layer has no cliff: its largest j, k and the mean ΔNLL there bounded from above,
        layers with the same (j, k) and bound grouped, e.g. "removing 3 of 4 active experts at layers 1–2 costs
        < 0.06 nats"; the other layers with the j of their cliff. ``no`` when every layer has a cliff.
    """
    question = QUESTIONS[1]
    if progressive is None or progressive.empty:
        return Answer(question, "unknown", f"Not known: {NO_PROGRESSIVE}")
    k_of = top_k if callable(top_k) else (lambda layer: top_k.get(layer))
    worst: dict[tuple[int, str], dict[int, float]] = {}  # (largest j, k) -> {layer: largest mean ΔNLL}
    cliffs: list[tuple[int, int]] = []
    for layer, part in progressive.groupby("layer"):
        part = part[part["n"] > 0].sort_values("j") if "n" in part else part.sort_values("j")
        if part.empty:
            continue
        cliff = pd.to_numeric(part["cliff"], errors="coerce").dropna()
        if len(cliff):
            cliffs.append((int(layer), int(cliff.iloc[0])))
            continue
        k = k_of(int(layer))
        worst.setdefault((int(part["j"].iloc[-1]), "?" if k is None else str(int(k))), {})[int(layer)] = \
            float(part["mean"].max())
    if not worst and not cliffs:
        return Answer(question, "unknown", "Not known: the progressive ablation has no measured token.")
    phrases = []
    for (j, k), by_layer in sorted(worst.items(), key=lambda item: min(item[1])):
        largest = max(by_layer.values())
        cost = f"costs < {nice_ceiling(largest):g} nats" if largest > 0 else "does not raise the loss"
        phrases.append(f"removing {j} of {k} active experts at {'layer' if len(by_layer) == 1 else 'layers'} "
                       f"{compress_layers(list(by_layer))} {cost}")
    cliff_text = ", ".join(f"layer {layer} at j = {j}" for layer, j in sorted(cliffs))
    mean = f"mean ΔNLL over the tokens, cliff threshold {threshold:g} nats"
    if not phrases:
        return Answer(question, "no", f"None: every layer's mean loss passes {threshold:g} nats as its "
                                      f"highest-gated active experts are removed ({cliff_text}).")
    text = "; ".join(phrases)
    text = f"{text[0].upper()}{text[1:]} ({mean})."
    if cliffs:
        text += f" Not redundant: {cliff_text} (the first j whose mean loss exceeds {threshold:g} nats)."
    return Answer(question, "yes", text)


# ---------------------------------------------------------------------------------------------- 3. pruning
def pruning_answer(pruning: pd.DataFrame | None) -> Answer:
    """Whether a pruning criterion's held-out loss falls below the random band, and by how much, per ratio.

    Parameters
    ----------
    pruning : DataFrame or None
        ``pruning.parquet``; None when pruning was not run.

    Returns
    -------
    Answer
        Per ratio (whole model pruned; numbers from :func:`moeaudit.prune.summary.summary`): how many metric
        criteria fall below the random draws' 5 % quantile, and the best one's held-out value against the random
        median (absolute and relative difference) with its percentile among the draws. Oracle criteria (which
        rank experts by their measured removal effects) are named apart as a reference. ``yes`` when some metric
        criterion is below the band at some ratio.
    """
    question = QUESTIONS[2]
    if pruning is None:
        return Answer(question, "unknown", "Not known: pruning was not run for this run (no `pruning.parquet`); "
                                           "`moeaudit prune RUN_DIR` adds it.")
    column = _pruning.value_column(pruning)
    stats = _pruning.summary(_pruning.whole_model(pruning)) if column else pd.DataFrame()
    if stats.empty:
        return Answer(question, "unknown", "Not known: `pruning.parquet` has no whole-model held-out loss.")
    label, unit = ("perplexity", "") if column == "heldout_ppl" else ("NLL", " nats")
    stats = stats[stats["ratio"] > 0]
    oracle_names = oracles(pruning)
    criteria = stats[~stats["criterion"].isin([_pruning.RANDOM, *oracle_names])]
    random = stats[stats["criterion"] == _pruning.RANDOM]
    if criteria.empty or random.empty:
        return Answer(question, "unknown", "Not known: `pruning.parquet` has no "
                      + ("metric criterion" if criteria.empty else "random pruning to compare against") + ".")
    n_random = int(random["seeds"].max())

    band = f"the random band (5–95% of {_plural(n_random, 'random pruning')})"

    def versus(row) -> str:
        gain = row["value"] - row["random_median"]
        relative = f", {gain / row['random_median']:+.1%}" if row["random_median"] else ""
        rank = (f"better than all {n_random} random draws" if row["random_percentile"] == 0 else
                f"percentile {row['random_percentile']:.0f} of the random draws")
        return (f"{row['value']:.4g}{unit} against the random median {row['random_median']:.4g}{unit} "
                f"({gain:+.3g}{unit}{relative}; {rank})")

    sentences, beats = [], False
    for ratio, at in criteria.groupby("ratio"):
        at = at.sort_values("value")
        below = at[at["value"] < at["random_q05"]]
        beats |= not below.empty
        names = list(below["criterion"])
        shown = _join(names[:MAX_CELLS_NAMED] + ([f"{len(names) - MAX_CELLS_NAMED} more"]
                                                 if len(names) > MAX_CELLS_NAMED else []))
        best = at.iloc[0]
        text = (f"With {ratio:.0%} of routed experts pruned per layer, "
                + (f"none of the {len(at)} metric criteria falls below {band}"
                   if below.empty else f"{len(below)} of {len(at)} metric criteria ({shown}) fall below {band}")
                + f". The best, {best['criterion']}, reaches held-out {label} {versus(best)}")
        ref = stats[(stats["ratio"] == ratio) & stats["criterion"].isin(oracle_names)].sort_values("value")
        if len(ref):
            oracle = ref.iloc[0]
            text += (f"; the best oracle (ranking by measured removal effects), {oracle['criterion']}, reaches "
                     f"{oracle['value']:.4g}{unit} ({(oracle['value'] - oracle['random_median']):+.3g}{unit})")
        sentences.append(text + ".")
    return Answer(question, "yes" if beats else "no", ("Yes. " if beats else "No. ") + " ".join(sentences))


def oracles(pruning: pd.DataFrame) -> list[str]:
    """The criteria of ``pruning.parquet`` that rank experts by their measured removal effects (``criterion_kind == "oracle"``)."""
    if "criterion_kind" in pruning:
        return sorted(set(pruning.loc[pruning["criterion_kind"] == "oracle", "criterion"]))
    from moeaudit.prune.criteria import ORACLES

    return [c for c in ORACLES if c in set(pruning["criterion"])]


# ---------------------------------------------------------------------------------------------- several runs
def setting_differences(settings: Mapping[str, Mapping[str, Any]], *,
                        ignore: tuple[str, ...] = ("model",)) -> dict[str, dict[str, Any]]:
    """The settings in which runs differ.

    Parameters
    ----------
    settings : mapping of run name -> mapping of setting -> value
        Each run's settings by flat name (:meth:`moeaudit.config.AuditConfig.fingerprint_fields`: those that
        decide the numbers).
    ignore : tuple of str
        Settings expected to differ between compared runs (by default the model).

    Returns
    -------
    dict
        ``{setting: {run: value}}`` for every setting whose value is not the same in all runs (a setting a run
        lacks counts as None), in name order; empty for one run or identical settings.

    Examples
    --------
    >>> setting_differences({"a": {"model": "x", "alpha": 0.05}, "b": {"model": "y", "alpha": 0.01}})
    {'alpha': {'a': 0.05, 'b': 0.01}}
    """
    if len(settings) < 2:
        return {}
    names = sorted(set().union(*(set(s) for s in settings.values())) - set(ignore))
    out = {}
    for name in names:
        values = {run: s.get(name) for run, s in settings.items()}
        if len({repr(v) for v in values.values()}) > 1:
            out[name] = values
    return out
