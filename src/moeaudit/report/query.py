"""DuckDB SQL over a run directory's Parquet tables, each table a view named after its file."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from moeaudit.errors import MoeAuditError
from moeaudit.report._load import connect
from moeaudit.rundir import RunDir


class QueryError(MoeAuditError):
    """The SQL could not be run on the run directory (a syntax error, an unknown table or column)."""


def tables(run_dir: str | Path | RunDir) -> list[str]:
    """Names of the Parquet tables in a run directory (``effects``, ``tests``, …), sorted."""
    run = run_dir if isinstance(run_dir, RunDir) else RunDir(run_dir)
    return sorted(p.stem for p in run.path.glob("*.parquet") if not p.name.startswith("."))


def query(run_dir: str | Path | RunDir, sql: str) -> pd.DataFrame:
    """Run DuckDB SQL over a run's tables; every ``NAME.parquet`` is a view ``NAME``.

    Parameters
    ----------
    run_dir : path or RunDir
    sql : str
        One DuckDB SQL statement. Views are lazy: DuckDB streams the Parquet files, so aggregates over a
        census ``effects`` table do not load it into memory.

    Returns
    -------
    pandas.DataFrame
        The statement's result (empty for statements without one).

    Raises
    ------
    RunDirectoryError
        ``run_dir`` is not a run directory.
    QueryError
        DuckDB refused the statement; the message is its first line and the tables that exist.

    Examples
    --------
    >>> query("runs/olmoe", "SELECT layer, avg(delta_nll) AS mean FROM effects GROUP BY layer")  # doctest: +SKIP
    """
    import duckdb

    run = run_dir if isinstance(run_dir, RunDir) else RunDir(run_dir)
    names = tables(run)
    con = connect(run, names)
    try:
        try:
            result = con.execute(sql)
        except duckdb.Error as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise QueryError(f"SQL failed on {run.path}: {first} (tables: {', '.join(names) or 'none'})") from None
        if result.description is None:
            return pd.DataFrame()
        return result.df()
    finally:
        con.close()
