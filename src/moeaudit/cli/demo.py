"""``moeaudit demo``: the whole pipeline on the built-in models and corpus, offline, in minutes."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from moeaudit.cli.common import QUIET_OPTION, StagePrinter, print_frame, print_note

# Window counts sized for the budget on 2 CPU cores: about 5.5 minutes for all three models (5 min 32 s measured,
# with the calibration and interactions analyses and the clustered tests' mixed models), 36 s quick. Each document gives
# its first window only (`truncate`), so a split's windows come from as many documents: the audit's tests treat
# documents as the independent units, and consecutive windows of 3 documents would leave them 3 units. The calibration
# analysis of the full demo draws 100 resamples and 5 curve orders (the defaults, 200 and 10, take about twice as
# long); --quick keeps the defaults. The interactions stage removes every subset of the active set at 300 (quick: 200)
# held-out tokens per layer (default 500).
FULL = dict(max_len=128, max_windows=64, batch_size=16, truncate=True, resamples=100, curve_repeats=5,
            interactions_n=300)
QUICK = dict(max_len=64, max_windows=12, batch_size=12, truncate=True, interactions_n=200)
# Pruning evaluates every criterion x ratio x random seed on the held-out windows; the demo prunes all layers
# at once (per-layer pruning: `moeaudit prune RUN_DIR`) with a 10-seed random distribution.
PRUNE_FULL = dict(ratios=(0.125, 0.25, 0.5), random_seeds=10, single_layer=False)
PRUNE_QUICK = dict(ratios=(0.25,), random_seeds=5, single_layer=False)


def demo_command(
    out: Path = typer.Option(Path("moeaudit-demo"), "--out", help="Directory for the run directories."),
    quick: bool = typer.Option(False, "--quick", help="One model and a few windows (about 35 s on 2 cores)."),
    models: Optional[str] = typer.Option(None, "--models", help="Comma-separated built-in models (default: all three)."),
    quiet: bool = QUIET_OPTION,
) -> None:
    """Run the pipeline on the built-in tiny models and corpus and summarise what it found."""
    import time

    import pandas as pd

    from moeaudit.calibration import run_calibration
    from moeaudit.cli.calibration import print_calibration
    from moeaudit.cli.interactions import print_interactions
    from moeaudit.config import AuditConfig
    from moeaudit.errors import invalid
    from moeaudit.interactions import run_interactions
    from moeaudit.models import builtin
    from moeaudit.models.loading import model_from_config, tokenizer_for
    from moeaudit.observe.stage import build_corpus
    from moeaudit.pipeline import run_pipeline
    from moeaudit.rundir import RunDir

    names = [m.strip() for m in models.split(",")] if models else (
        list(builtin.BUILTIN_MODELS[:1]) if quick else list(builtin.BUILTIN_MODELS))
    for name in names:
        if name not in builtin.BUILTIN_MODELS:
            raise invalid("--models", "built-in model names: " + ", ".join(builtin.BUILTIN_MODELS), name)
    sizes = QUICK if quick else FULL
    corpus = None
    summary = []
    for name in names:
        started = time.perf_counter()
        config = AuditConfig(model=name, corpus="builtin", **sizes)
        run = RunDir(out / name, config, overwrite=True)
        moe = model_from_config(config)
        if corpus is None:  # the built-in models share one tokenizer, so one corpus serves all three
            corpus = build_corpus(config, tokenizer_for(config.model, moe))
        typer.echo()
        print_note(f"== {name} ({moe.family}: {len(moe.layers)} MoE layers, {moe.layers[0].num_experts} experts, "
                   f"top-{moe.layers[0].top_k}) ==", bold=True)
        with StagePrinter(quiet, prefix=f"{name} ", on_finished=_printers(name, run)) as printer:
            result = run_pipeline(run, moe=moe, corpus=corpus, prune_options=PRUNE_QUICK if quick else PRUNE_FULL,
                                  report=False, on_progress=printer)
        # how much the metric rankings depend on the calibration documents (no model run; issue 16)
        calibration = run_calibration(run, corpus=corpus)
        print_calibration(run.read("calibration"), calibration)
        # experts removed together: pairwise interactions, Shapley values, pruned sets (issue 17)
        print_interactions(run, run_interactions(run, moe=moe), title_prefix=f"{name}: ")
        observed, intervened, audited = result["observe"], result["intervene"], result["audit"]
        metrics = run.read("expert_metrics")
        summary.append({"model": name, "tokens": observed["tokens"], "mean NLL": observed["mean_nll"],
                        "dead experts": int((metrics["count"] == 0).sum()),
                        "interventions": intervened["interventions"],
                        "significant cells": f"{audited['significant']}/{audited['cells']}",
                        "seconds": time.perf_counter() - started})
    print_frame(pd.DataFrame(summary), "demo summary")
    from moeaudit.report import write_report

    report = write_report([out / name for name in names], out / "report.html")
    print_note(f"run directories: {', '.join(str(out / name) for name in names)} "
               "(manifest.json and Parquet tables, e.g. pandas.read_parquet(DIR + '/tests.parquet'))")
    print_note(f"report: {report}")


def _printers(name: str, run) -> dict:
    """What the demo prints after each stage of one model's run (tables read back from ``run``)."""
    import pandas as pd

    from moeaudit.cli.stages import print_audit, print_pruning
    from moeaudit.intervene.stage import effects_summary
    from moeaudit.metrics.stage import layer_summary
    from moeaudit.prune import pruning_summary

    def metrics(record) -> None:
        print_frame(layer_summary(run.read("expert_metrics")), f"{name}: expert load per layer (calibration split)")

    def intervene(record) -> None:
        print_frame(effects_summary(run.read("effects")),
                    f"{name}: removing one active expert at one held-out token (zero, token scope; "
                    f"{record['interventions']:,} exact interventions, noise floor "
                    f"{record['noise_floor']:.1e} nats)")

    def audit(record) -> None:
        print_audit(run.read("tests"), record)
        if run.has("redundancy"):
            redundancy = run.read("redundancy")
            cliffs = redundancy.groupby("layer")["cliff"].first()
            print_frame(redundancy.pivot(index="layer", columns="j", values="mean")
                        .rename(columns=lambda j: f"j={j}").reset_index()
                        .assign(cliff=[("none" if pd.isna(c) else str(int(c))) for c in cliffs.values]),
                        f"{name}: mean ΔNLL after removing the top-j experts by gate (cliff: first j > 0.1 nats)")

    def prune(record) -> None:
        print_note(f"{name}: held-out perplexity after pruning, by criterion (percentile in the random "
                   "distribution; low = better than random)", bold=True)
        print_pruning(pruning_summary(run.read("pruning"), run.read("jaccard")))

    return {"metrics": metrics, "intervene": intervene, "audit": audit, "prune": prune}


def register(app: typer.Typer) -> None:
    app.command("demo")(demo_command)
