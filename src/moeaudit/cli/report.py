"""``moeaudit report``, ``moeaudit table`` and ``moeaudit query``: reading a run directory."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer


def report_command(
    run_dirs: List[Path] = typer.Argument(..., help="One or more run directories."),
    out: Optional[Path] = typer.Option(None, "-o", "--output", help="The HTML file to write (default: "
                                       "RUN_DIR/report.html); --out names a directory in every other command."),
) -> None:
    """Write one self-contained HTML report (figures also as PNG/SVG beside it)."""
    from moeaudit.cli.common import print_note
    from moeaudit.report import write_report

    path = write_report(run_dirs, out or run_dirs[0] / "report.html")
    print_note(f"report: {path}")


def table_command(
    run_dir: Path = typer.Argument(..., help="A run directory."),
    what: str = typer.Option("audit", "--what", help="audit, pruning or metrics."),
    fmt: str = typer.Option("markdown", "--format", help="markdown, latex (booktabs), csv or json."),
) -> None:
    """Print a paper-style table."""
    from moeaudit.errors import invalid
    from moeaudit.options import one_of
    from moeaudit.report.tables import FORMATS, WHATS, render

    if what not in WHATS:
        raise invalid("--what", one_of(WHATS), what)
    if fmt not in FORMATS:
        raise invalid("--format", one_of(FORMATS), fmt)
    typer.echo(render(run_dir, what, fmt), nl=False)


def query_command(
    run_dir: Path = typer.Argument(..., help="A run directory."),
    sql: str = typer.Argument(..., help="DuckDB SQL; each table is a view by its name, e.g. tests, effects."),
    allow_external: bool = typer.Option(False, "--allow-external", help="Run any statement and let it read and "
                                        "write files outside the run's tables (off: read-only SELECT/EXPLAIN on "
                                        "the run's tables only)."),
    fmt: str = typer.Option("table", "--format", help="table (fitted to the terminal), csv or json (a list of row "
                            "objects)."),
) -> None:
    """Run SQL over the run's Parquet tables and print the result."""
    from moeaudit.errors import invalid
    from moeaudit.options import one_of
    from moeaudit.report import query

    formats = ("table", "csv", "json")
    if fmt not in formats:
        raise invalid("--format", one_of(formats), fmt)  # before the query runs
    frame = query(run_dir, sql, allow_external=allow_external)
    if fmt == "csv":
        typer.echo(frame.to_csv(index=False, lineterminator="\n"), nl=False)
    elif fmt == "json":
        typer.echo(frame.to_json(orient="records", double_precision=15))
    else:  # as DataFrame.to_string prints each column, split over tables as narrow as the terminal
        from moeaudit.cli.common import print_frame

        print_frame(frame, float_format=None, key=0)


def status_command(
    run_dir: Path = typer.Argument(..., help="A run directory."),
    as_json: bool = typer.Option(False, "--json", help="Print machine-readable JSON."),
) -> None:
    """Show each stage's progress: done, running or interrupted, and its work units."""
    import json

    from moeaudit.cli.common import print_frame, print_note
    from moeaudit.rundir import RunDir
    from moeaudit.scale.units import lock_holder, run_status

    run = RunDir(run_dir)
    status = run_status(run)
    if as_json:
        stages = json.loads(status.to_json(orient="records"))
        typer.echo(json.dumps({"run": str(run_dir), "model": run.config.model, "corpus": run.config.corpus,
                               "in_use_by": lock_holder(run), "stages": stages}, indent=2))
        return
    print_frame(status.astype(object).where(status.notna(), "-"), f"{run_dir}: {run.config.model} on "
                f"{run.config.corpus}")
    holder = lock_holder(run)
    if holder:
        print_note(f"in use by {holder}")
    elif (status["state"] == "interrupted").any():
        print_note("interrupted: re-run the command that made it (same settings) to resume")


def register(app: typer.Typer) -> None:
    app.command("report")(report_command)
    app.command("table")(table_command)
    app.command("query")(query_command)
    app.command("status")(status_command)
