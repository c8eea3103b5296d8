"""DuckDB SQL over a run directory's Parquet tables, each table a view named after its file."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from moeaudit.errors import MoeAuditError, first_line
from moeaudit.report._load import connect
from moeaudit.rundir import TABLES, RunDir


class QueryError(MoeAuditError):
    """The SQL could not be run on the run directory (a syntax error, an unknown table or column)."""


#: Statements ``query`` runs on a run directory unless ``allow_external`` (they read, never write).
READ_ONLY_STATEMENTS = ("SELECT", "EXPLAIN")


def tables(run_dir: str | Path | RunDir) -> list[str]:
    """Names of the Parquet tables in a run directory (``effects``, ``tests``, …), sorted: the tables moeaudit
    writes (:data:`moeaudit.rundir.TABLES`); other Parquet files there are not registered."""
    run = run_dir if isinstance(run_dir, RunDir) else RunDir(run_dir)
    return sorted(p.stem for p in run.path.glob("*.parquet") if p.stem in TABLES)


def query(run_dir: str | Path | RunDir, sql: str, *, allow_external: bool = False) -> pd.DataFrame:
    """Run DuckDB SQL over a run's tables; every ``NAME.parquet`` moeaudit wrote is a view ``NAME``.

    Parameters
    ----------
    run_dir : path or RunDir
    sql : str
        One DuckDB SQL statement. Views are lazy: DuckDB streams the Parquet files, so aggregates over a
        census ``effects`` table do not load it into memory.
    allow_external : bool
        By default only read-only statements (:data:`READ_ONLY_STATEMENTS`) run, and they can read the run's
        tables and no other file (:func:`moeaudit.report._load.connect`): a query can neither write (``COPY``
        over a table, ``ATTACH``, ``INSTALL``) nor read outside the run directory. ``True`` lifts both (the
        CLI's ``--allow-external``).

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
    if not allow_external:
        try:
            statements = duckdb.extract_statements(sql)
        except duckdb.Error as err:
            raise QueryError(f"SQL failed on {run.path}: {first_line(err)}") from None
        kinds = [statement.type.name for statement in statements]
        refused = next((kind for kind in kinds if kind not in READ_ONLY_STATEMENTS), None)
        if refused is not None:
            raise QueryError(f"`moeaudit query` runs read-only statements (SELECT, EXPLAIN) on {run.path}; got "
                             f"{refused}: pass --allow-external (allow_external=True) to run it")
    con = connect(run, names, locked=not allow_external)
    try:
        try:
            result = con.execute(sql)
        except duckdb.Error as err:
            raise QueryError(f"SQL failed on {run.path}: {first_line(err)} (tables: {', '.join(names) or 'none'})"
                             ) from None
        if result.description is None:
            return pd.DataFrame()
        return result.df()
    finally:
        con.close()
