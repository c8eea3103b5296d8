"""``moeaudit calibration RUN_DIR``: how much each metric's expert ranking depends on the calibration data."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional

import typer

from moeaudit.cli.common import SET_OPTION, with_settings


def calibration_command(
    run_dir: Path = typer.Argument(..., help="A run directory after `moeaudit metrics`."),
    resamples: Optional[int] = typer.Option(None, "--resamples", help="Bootstrap resamples (default 200)."),
    unit: Optional[str] = typer.Option(None, "--unit", help="What is resampled: document (default) or window."),
    flip_ratio: Optional[float] = typer.Option(None, "--flip-ratio", help="Share of experts pruned when counting "
                                               "flipped prune/keep decisions (default 0.25)."),
    config_file: Optional[Path] = typer.Option(None, "--config", help="TOML file whose [calibration] table gives "
                                               "the settings (flags win)."),
    settings: Optional[list[str]] = SET_OPTION,
) -> None:
    """Resample the calibration documents: ranking stability, learning curve and per-domain agreement of every
    metric; writes calibration.parquet (the model is not run)."""
    from moeaudit.calibration import UNITS, run_calibration
    from moeaudit.cli.common import print_note, resolve_config
    from moeaudit.errors import invalid
    from moeaudit.rundir import RunDir

    if unit is not None and unit not in UNITS:
        raise invalid("--unit", " or ".join(UNITS), unit)
    run = RunDir(run_dir)
    overrides = with_settings(settings, dict(resamples=resamples, resample_unit=unit, flip_ratio=flip_ratio))
    if config_file is not None or any(v is not None for v in overrides.values()):
        run = RunDir(run_dir, resolve_config(run_dir, overrides, config_file))
    info = run_calibration(run)
    print_calibration(run.read("calibration"), info)
    print_note(f"calibration.parquet written to {run_dir} ({info['seconds']:.1f}s)")


def print_calibration(table, info: dict[str, Any], out=None) -> None:
    """The per-metric summary (over layers) as a table that fits the console, then the notes wrapped to its
    width; ``out``: a rich console to print to."""
    import pandas as pd

    from moeaudit.calibration import calibration_summary
    from moeaudit.cli.common import print_frame, print_note

    summary = calibration_summary(table)
    target = info["tau_target"]
    title = (f"ranking stability: {info['units']} calibration {info['unit']}s, {info['tokens']:,} tokens, "
             f"{info['resamples']} resamples (means over {len(info['layers'])} layers)")
    rows = [[row.metric, _num(row.tau), _num(row.tau_p05_min), _share(row.flips),
             f"{row.tokens_to_target:,.0f}" if math.isfinite(row.tokens_to_target) else f"never {row.reached}",
             _num(row.domain_tau), _num(row.domain_tau_min)] for row in summary.itertuples(index=False)]
    columns = ["metric", "τ mean", "τ p05", "flips", f"tokens τ≥{target:g}", "domain τ", "min"]
    print_frame(pd.DataFrame(rows, columns=columns), title, left=("metric",), out=out)
    notes = [f"τ: Kendall tau-b to the full-calibration ranking; τ p05: the worst layer's 5th percentile; flips: "
             f"prune/keep decisions that change at {info['flip_ratio']:.0%} pruned; tokens τ≥{target:g}: "
             f"calibration tokens from which the mean τ of nested subsets reaches {target:g} in every layer "
             "(never k/L: k of L layers reach it within half the split)"]
    if info.get("weight_only"):
        notes.append(f"not resampled: {', '.join(info['weight_only'])} (weight-only: independent of calibration "
                     "data)")
    notes += info.get("warnings", [])
    for note in notes:
        print_note(f"note: {note}", out=out)


def _num(value: float) -> str:
    return "–" if not math.isfinite(value) else f"{value:.2f}"


def _share(value: float) -> str:
    return "–" if not math.isfinite(value) else f"{value:.1%}"


def register(app: typer.Typer) -> None:
    app.command("calibration")(calibration_command)
