"""Report: the run directory as a self-contained HTML page, paper-style tables, and SQL over its tables.

- :func:`write_report` — one HTML file for one or more runs (inline CSS, embedded figures, no network),
  with the figures also written as PNG and SVG beside it.
- :func:`moeaudit.report.tables.render` — audit / metrics / pruning tables as Markdown, booktabs LaTeX or CSV.
- :func:`query` — DuckDB SQL over a run's Parquet tables, each a view named after its file.

Examples
--------
>>> from moeaudit.report import write_report, query, tables            # doctest: +SKIP
>>> write_report("runs/olmoe", "runs/olmoe/report.html")                # doctest: +SKIP
>>> print(tables.render("runs/olmoe", "audit", "latex"))                # doctest: +SKIP
>>> query("runs/olmoe", "SELECT layer, avg(delta_nll) FROM effects GROUP BY layer")  # doctest: +SKIP
"""

from __future__ import annotations

from moeaudit.report import tables
from moeaudit.report.html import SECTIONS, write_report
from moeaudit.report.query import QueryError, query

__all__ = ["SECTIONS", "QueryError", "query", "tables", "write_report"]
