"""``moeaudit observe RUN_DIR`` and ``moeaudit metrics RUN_DIR``: one command per pipeline stage."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from moeaudit.cli.common import parse_int_list, print_frame, progress_bar, resolve_config


def observe_command(
    run_dir: Path = typer.Argument(..., help="Run directory (created if missing)."),
    model: Optional[str] = typer.Option(None, "--model", help="Built-in name, checkpoint directory or hub id."),
    corpus: Optional[str] = typer.Option(None, "--corpus", help="builtin, a .txt/.jsonl/.parquet file, or a hub dataset."),
    max_len: Optional[int] = typer.Option(None, "--max-len", help="Window length in tokens."),
    max_windows: Optional[int] = typer.Option(None, "--max-windows", help="Cap on windows per observed split."),
    layers: Optional[str] = typer.Option(None, "--layers", help="MoE layers to observe, e.g. 0,4,7 (default all)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Windows per forward pass."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="float32, bfloat16 or float16."),
    device: Optional[str] = typer.Option(None, "--device", help="cpu, cuda, ..."),
    config_file: Optional[Path] = typer.Option(None, "--config", help="TOML file with the same settings."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a run made with another configuration."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bars."),
) -> None:
    """Run the clean model over the corpus and write tokens.parquet and routing.parquet."""
    from moeaudit.observe.stage import run_observe
    from moeaudit.rundir import RunDir

    config = resolve_config(run_dir, dict(model=model, corpus=corpus, max_len=max_len, max_windows=max_windows,
                                          layers=parse_int_list(layers, "--layers"), batch_size=batch_size,
                                          dtype=dtype, device=device), config_file)
    run = RunDir(run_dir, config, overwrite=overwrite)
    with progress_bar("observe", quiet) as update:
        info = run_observe(run, on_batch=update)
    typer.echo(f"observed {info['windows']} windows, {info['tokens']:,} tokens, {info['routing_rows']:,} routing rows "
               f"in {info['seconds']:.1f}s (mean NLL {info['mean_nll']:.3f} nats) -> {run_dir}")


def metrics_command(
    run_dir: Path = typer.Argument(..., help="A run directory with routing.parquet."),
) -> None:
    """Compute every observational metric per (layer, expert) into expert_metrics.parquet."""
    from moeaudit.metrics.stage import layer_summary, run_metrics
    from moeaudit.rundir import RunDir

    run = RunDir(run_dir)
    info = run_metrics(run)
    print_frame(layer_summary(run.read("expert_metrics")), f"experts per layer ({info['split']} split)")


def intervene_command(
    run_dir: Path = typer.Argument(..., help="A run directory with tokens.parquet (after `moeaudit observe`)."),
    engine: Optional[str] = typer.Option(None, "--engine", help="fast (default) or reference; both exact."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bars."),
) -> None:
    """Remove every active expert at every held-out position (exactly) and write effects.parquet."""
    from moeaudit.intervene.stage import effects_summary, run_intervene
    from moeaudit.rundir import RunDir

    run = RunDir(run_dir)
    if engine is not None:
        run = RunDir(run_dir, resolve_config(run_dir, {"engine": engine}, None))
    with progress_bar("intervene", quiet) as update:
        info = run_intervene(run, on_batch=update)
    print_frame(effects_summary(run.read("effects")), f"effects of removing one expert ({info['kind']}, "
                f"{info['scope']} scope, {info['split']} windows)")
    typer.echo(f"{info['interventions']:,} exact interventions in {info['seconds']:.1f}s with the {info['engine']} "
               f"engine; noise floor {info['noise_floor']:.1e} nats")


def audit_command(
    run_dir: Path = typer.Argument(..., help="A run directory with effects.parquet and expert_metrics.parquet."),
) -> None:
    """Test whether each metric predicts the causal effect: writes tests.parquet and redundancy.parquet."""
    from moeaudit.audit.stage import run_audit
    from moeaudit.rundir import RunDir

    run = RunDir(run_dir)
    info = run_audit(run)
    tests = run.read("tests")
    print_audit(tests, info)


def print_audit(tests, info) -> None:
    import pandas as pd

    from moeaudit.audit import paper_table

    table = pd.concat([paper_table(tests, "paired", compact=True),
                       paper_table(tests, "routing_weight", compact=True),
                       paper_table(tests, "random_pair", compact=True)], ignore_index=True)
    print_frame(table, f"d_z of ΔNLL(highest) − ΔNLL(lowest) per token, n={info['n']} positions per cell "
                f"(* = significant: t and Wilcoxon both pass {info['correction']} at α={info['alpha']}); "
                "full cells with CIs and p-values: tests.parquet")


def register(app: typer.Typer) -> None:
    app.command("observe")(observe_command)
    app.command("metrics")(metrics_command)
    app.command("intervene")(intervene_command)
    app.command("audit")(audit_command)
