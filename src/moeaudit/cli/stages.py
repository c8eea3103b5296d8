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


def register(app: typer.Typer) -> None:
    app.command("observe")(observe_command)
    app.command("metrics")(metrics_command)
