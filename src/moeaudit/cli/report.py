"""``moeaudit report``, ``moeaudit table`` and ``moeaudit query``: reading a run directory."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer


def report_command(
    run_dirs: List[Path] = typer.Argument(..., help="One or more run directories."),
    out: Optional[Path] = typer.Option(None, "--out", help="HTML file (default: RUN_DIR/report.html)."),
) -> None:
    """Write one self-contained HTML report (figures also as PNG/SVG beside it)."""
    from moeaudit.report import write_report

    path = write_report(run_dirs, out or run_dirs[0] / "report.html")
    typer.echo(f"report: {path}")


def table_command(
    run_dir: Path = typer.Argument(..., help="A run directory."),
    what: str = typer.Option("audit", "--what", help="audit, pruning or metrics."),
    fmt: str = typer.Option("markdown", "--format", help="markdown, latex (booktabs) or csv."),
) -> None:
    """Print a paper-style table."""
    from moeaudit.report.tables import render

    typer.echo(render(run_dir, what, fmt))


def query_command(
    run_dir: Path = typer.Argument(..., help="A run directory."),
    sql: str = typer.Argument(..., help="DuckDB SQL; each table is a view by its name, e.g. tests, effects."),
) -> None:
    """Run SQL over the run's Parquet tables and print the result."""
    from moeaudit.report import query

    frame = query(run_dir, sql)
    typer.echo(frame.to_string(index=False))


def register(app: typer.Typer) -> None:
    app.command("report")(report_command)
    app.command("table")(table_command)
    app.command("query")(query_command)
