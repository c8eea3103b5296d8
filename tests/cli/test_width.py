"""Every table and note the commands print fits an 80-column terminal and shows every digit and name in full
(issue 18): no line wider than the console, no "…", and each value of the underlying table whole."""

from __future__ import annotations

import io
import re

import numpy as np
import pandas as pd
from rich.console import Console

from tests.report.conftest import make_run

#: Box-drawing characters rich frames tables with; the words of a cell lie between them.
BOX = re.compile(r"[\u2500-\u257f]")


def recording(width: int = 80) -> Console:
    return Console(file=io.StringIO(), width=width, record=True, color_system=None)


def printed(out: Console) -> str:
    return out.export_text(styles=False, clear=False)


def assert_fits(text: str, values, width: int = 80) -> None:
    """No line of ``text`` is wider than ``width``, nothing is elided, and every word of every value in
    ``values`` appears whole (a cell may wrap at its spaces, never inside a word)."""
    lines = text.splitlines()
    assert max(len(line) for line in lines) <= width, max(lines, key=len)
    assert "…" not in text
    words = set(BOX.sub(" ", text).split())
    missing = [word for value in values for word in str(value).split() if word not in words]
    assert not missing, missing[:10]


def test_print_frame_splits_columns_that_do_not_fit_and_repeats_the_key():
    from moeaudit.cli.common import print_frame

    frame = pd.DataFrame({"model": ["tiny-deepseek", "tiny-qwen-moe"], "tokens": [1533, 24576],
                          "mean NLL": [5.0671, 4.25], "dead experts": [0, 3], "interventions": [14496, 1234567],
                          "significant cells": ["7/164", "12/164"], "seconds": [73.105, 1.5],
                          "a rather long header name": ["0.00042/0.00049*", "x"]})
    out = recording()
    print_frame(frame, "demo summary with a title long enough to wrap over more than one line of the table",
                out=out)
    text = printed(out)
    assert_fits(text, ["5.067", "4.250", "73.105", "1.500", *frame.columns,
                       *[v for column in frame if frame[column].dtype != float for v in frame[column]]])
    tables = text.count("┏")
    assert tables >= 2 and text.count("tiny-deepseek") == tables  # the key column in every part


def test_print_frame_folds_only_a_word_wider_than_the_console():
    from moeaudit.cli.common import print_frame

    out = recording(40)
    print_frame(pd.DataFrame({"path": ["/" + "x" * 60]}), None, out=out)
    text = printed(out)
    assert max(len(line) for line in text.splitlines()) <= 40 and "…" not in text
    assert "".join(BOX.sub("", text).split()).count("x") == 60


def test_print_frame_float_format_none_prints_what_to_string_prints():
    from moeaudit.cli.common import print_frame

    frame = pd.DataFrame({"effect": [-0.098686, 0.1], "p": [1.3e-09, np.nan], "flag": [True, None]})
    out = recording()
    print_frame(frame, float_format=None, key=0, out=out)
    expected = frame.to_string(index=False).split()
    assert_fits(printed(out), expected)


def test_print_note_wraps_at_the_console_width():
    from moeaudit.cli.common import print_note

    out = recording()
    text = ("Tokens of one document are correlated, so 52 of 52 cells treat 12 documents, not tokens, as the "
            "independent units (cluster-robust t and signed-rank test of document means); median design effect "
            "1.1, up to 3.4.")
    print_note(text, out=out)
    assert_fits(printed(out), [text])
    assert printed(out).split() == text.split()


def test_query_status_and_table_commands_fit_80_columns(tmp_path, cli, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    run = make_run(tmp_path / "run")
    from moeaudit.report import query

    code, out, err = cli("query", str(run), "SELECT * FROM tests")
    assert code == 0, err
    assert_fits(out, query(run, "SELECT * FROM tests").to_string(index=False).split())
    code, out, err = cli("status", str(run))
    assert code == 0, err
    assert_fits(out, ["observe", "intervene", "2026-01-01T00:00:03+00:00"])
