"""Paper-style tables against golden files made from the synthetic run (tests/report/conftest.py).

Regenerate after an intended change with ``MOEAUDIT_UPDATE_GOLDEN=1 pytest tests/report/test_tables.py`` and
read the diff before committing it.
"""

from __future__ import annotations

import io
import os
import re
from pathlib import Path

import pandas as pd
import pytest

from moeaudit.errors import InvalidParameterError, RunDirectoryError
from moeaudit.report import tables

GOLDEN = Path(__file__).parent / "golden"
EXTENSION = {"markdown": "md", "latex": "tex", "csv": "csv", "json": "json"}


@pytest.mark.parametrize("fmt", tables.FORMATS)
@pytest.mark.parametrize("what", tables.WHATS)
def test_matches_golden(synthetic_run, what, fmt):
    text = tables.render(synthetic_run, what, fmt)
    golden = GOLDEN / f"{what}.{EXTENSION[fmt]}"
    if os.environ.get("MOEAUDIT_UPDATE_GOLDEN"):
        golden.parent.mkdir(exist_ok=True)
        golden.write_text(text)
    assert golden.exists(), f"missing {golden}; run with MOEAUDIT_UPDATE_GOLDEN=1 once"
    assert text == golden.read_text()


@pytest.mark.parametrize("what", tables.WHATS)
def test_latex_is_booktabs_with_escaped_text(synthetic_run, what):
    text = tables.render(synthetic_run, what, "latex")
    body = [line for line in text.splitlines() if not line.startswith("%")]
    assert body[0].startswith("\\begin{tabular}") and body[1] == "\\toprule" and body[3] == "\\midrule"
    assert body[-2:] == ["\\bottomrule", "\\end{tabular}"]
    for line in body:
        assert not re.search(r"(?<!\\)_", line), line  # every underscore escaped
    columns = re.match(r"\\begin\{tabular\}\{(\w+)\}", body[0]).group(1)
    for line in body[4:-2]:
        if line != "\\midrule":
            assert line.count(" & ") == len(columns) - 1, line


def test_audit_cells(synthetic_run):
    markdown = tables.render(synthetic_run, "audit", "markdown")
    assert "| frequency | +0.251 [+0.11, +0.39] 0.00042/0.0011* |" in markdown
    assert "untestable" in markdown and "token gate (control)" in markdown and "random pair (null)" in markdown
    numbers = pd.read_csv(io.StringIO(tables.render(synthetic_run, "audit", "csv")))
    assert list(numbers["design"].unique()) == ["paired", "routing_weight", "random_pair"]
    assert numbers.loc[numbers["verdict"] == "significant", "d_z"].round(4).tolist() == [0.2512, -0.3101, 0.2314]


def test_metrics_counts_dead_and_dominant(synthetic_run):
    numbers = pd.read_csv(io.StringIO(tables.render(synthetic_run, "metrics", "csv")))
    assert numbers[["layer", "dead", "dominant"]].values.tolist() == [[0, 0, 0], [1, 1, 1]]
    assert numbers["max_load"].round(2).tolist() == [1.2, 2.2]


def test_pruning_percentiles_and_band(synthetic_run):
    numbers = pd.read_csv(io.StringIO(tables.render(synthetic_run, "pruning", "csv")))
    reap = numbers[(numbers["criterion"] == "reap") & (numbers["ratio"] == 0.5)].iloc[0]
    assert reap["value"] == pytest.approx(28.0) and reap["random_percentile"] == 0.0
    frequency = numbers[(numbers["criterion"] == "frequency") & (numbers["ratio"] == 0.25)].iloc[0]
    assert frequency["random_percentile"] == pytest.approx(70.0)  # 26.5 among 25, 25.5, ..., 27: 3 lower, 1 tie
    assert numbers.loc[numbers["criterion"] == "random", "seeds"].tolist() == [5, 5]


def test_bad_arguments_are_one_line(synthetic_run):
    with pytest.raises(InvalidParameterError, match=r"^`what` must be one of audit, pruning, metrics; got 'x'\.$"):
        tables.render(synthetic_run, "x", "csv")
    with pytest.raises(InvalidParameterError, match=r"^`fmt` must be one of markdown, latex, csv, json; got 'html'\.$"):
        tables.render(synthetic_run, "audit", "html")


def test_missing_table_names_the_fix(synthetic_run_no_pruning, tmp_path):
    with pytest.raises(RunDirectoryError, match="pruning.parquet is missing"):
        tables.render(synthetic_run_no_pruning, "pruning", "markdown")
    with pytest.raises(RunDirectoryError, match="not a moeaudit run directory"):
        tables.render(tmp_path, "audit", "markdown")
