"""Every table and note the commands print fits an 80-column terminal and shows every digit and name in full
(issue 18): no line wider than the console, no "…", and each value of the underlying table whole."""

from __future__ import annotations

import io
import math
import re

import numpy as np
import pandas as pd
import pytest
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


def wide_tests() -> pd.DataFrame:
    """The synthetic run's tests over eight layers, with p-values as long as .2g writes them."""
    from tests.report.conftest import _tests

    base = _tests().query("layer == 0")
    frames = []
    for layer in range(8):
        frame = base.copy()
        frame["layer"] = layer
        frame["p_t"] = frame["p_t"] * (layer + 1) / 9.7
        frame["p_wilcoxon"] = frame["p_wilcoxon"] * (layer + 2) / 13.3
        frames.append(frame)
    return pd.concat(frames, ignore_index=True)


def test_print_audit_shows_every_digit_at_80_columns():
    from moeaudit.cli.stages import print_audit

    tests = wide_tests()
    out = recording()
    print_audit(tests, {"correction": "bonferroni", "alpha": 0.05, "n": 200}, out=out)
    from moeaudit.audit import PAPER_METRICS

    values = []
    for row in tests.itertuples():
        mark = "*" if row.verdict == "significant" else ""
        if row.design in ("paired", "routing_weight", "random_pair"):
            values.append(f"{row.effect:+.2f}{mark}" if math.isfinite(row.effect) else "untestable")  # compact
        if row.design in ("paired", "routing_weight") and row.metric in (*PAPER_METRICS, "token_gate"):
            values += ([f"{row.effect:+.3f}", f"[{row.ci_low:+.2f},", f"{row.ci_high:+.2f}]", f"{row.p_t:.2g}",
                        f"{row.p_wilcoxon:.2g}{mark}"] if math.isfinite(row.effect) else ["untestable"])
    values += [f"layer {layer}" for layer in range(8)] + list(tests["metric"].unique())
    assert_fits(printed(out), values)
    assert "cluster-robust" in printed(out)


def test_print_pruning_shows_every_number_at_80_columns(tmp_path):
    from moeaudit.cli.stages import print_pruning
    from moeaudit.prune import pruning_summary

    run = make_run(tmp_path / "run")
    summary = pruning_summary(pd.read_parquet(run / "pruning.parquet"))
    out = recording()
    print_pruning(summary, out=out)
    text = printed(out)
    values = [word for table in summary.frames() for column in table.frame
              for word in [column, *table.frame[column]]]
    assert len(summary.frames()) == 2 and values
    assert_fits(text, values)
    for ratio, row in summary.random.iterrows():  # the numbers are the summary's, as computed
        assert f"{row['median']:.2f}" in text and f"{row['p95']:.2f}]" in text
    for layer in summary.layers.itertuples():
        assert f"{layer.crit_ppl_max:.2f}]" in text and f"[{layer.random_ppl_p05:.2f}," in text


def test_print_calibration_shows_every_value_at_80_columns():
    from moeaudit.cli.calibration import print_calibration

    metrics = ["frequency", "mean_gate_active", "routing_entropy", "a_much_longer_metric_name"]
    rows = [{"metric": metric, "layer": layer, "tau_mean": 0.61 + 0.01 * i + 0.003 * layer, "tau_p05": 0.19 - 0.5 * i,
             "flip_share": 0.131 * (i + 1) / 3, "tokens_to_target": 12_288.0 * (i + 1) if i % 2 else np.nan,
             "domain_tau_mean": 0.07 * i, "domain_tau_min": -0.49 + 0.1 * i}
            for i, metric in enumerate(metrics) for layer in range(4)]
    info = {"tau_target": 0.9, "units": 12, "unit": "document", "tokens": 765, "resamples": 200,
            "layers": [0, 1, 2, 3], "flip_ratio": 0.25, "weight_only": ["aimer", "router_row_norm"],
            "warnings": ["tokens_to_tau: mean τ never reaches 0.9 on the curve for 8 cell(s); their size is NaN."]}
    out = recording()
    print_calibration(pd.DataFrame(rows), info, out=out)
    from moeaudit.calibration import calibration_summary

    summary = calibration_summary(pd.DataFrame(rows))
    values = list(summary["metric"]) + ["tokens τ≥0.9", "never", "0/4", "13.1%"]
    values += [f"{v:,.0f}" for v in summary["tokens_to_target"].dropna()] + ["24,576", "49,152"]
    values += [f"{v:.2f}" for column in ("tau", "tau_p05_min", "domain_tau", "domain_tau_min")
               for v in summary[column]]
    assert_fits(printed(out), values + info["warnings"])


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


def test_inspect_fits_80_columns(cli, monkeypatch):
    from moeaudit.models import builtin

    monkeypatch.setenv("COLUMNS", "80")
    code, out, err = cli("inspect", "--supported")
    assert code == 0, err
    from moeaudit.models.registry import family_support

    assert_fits(out, [word for row in family_support() for word in row])
    if not (builtin.builtin_path("tiny-olmoe") / "model.safetensors").exists():
        pytest.skip("built-in model weights not present")
    code, out, err = cli("inspect", "tiny-olmoe")
    assert code == 0, err
    assert_fits(out, ["393,216", "softmax_topk", "architecture=OlmoeForCausalLM", "total=2,902,144"])
