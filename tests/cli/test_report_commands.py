"""`moeaudit table` and `moeaudit query` as a script uses them: machine-readable formats, flag-named errors."""

from __future__ import annotations

import io
import json

import pandas as pd
import pytest

from moeaudit.report.tables import render
from tests.report.conftest import make_run


@pytest.fixture
def run_dir(tmp_path):
    return make_run(tmp_path / "run")


def test_table_json_carries_the_csv_numbers(cli, run_dir):
    code, out, _ = cli("table", str(run_dir), "--what", "audit", "--format", "json")
    assert code == 0
    rows = pd.DataFrame(json.loads(out))
    from_csv = pd.read_csv(io.StringIO(render(run_dir, "audit", "csv")))
    assert list(rows.columns) == list(from_csv.columns) and len(rows) == len(from_csv)
    pd.testing.assert_frame_equal(rows, from_csv, check_dtype=False, rtol=1e-5)


@pytest.mark.parametrize("args, flag", [(("table", "--format", "jsonl"), "--format"),
                                        (("table", "--what", "effects"), "--what"),
                                        (("query", "SELECT 1", "--format", "xml"), "--format")])
def test_a_bad_format_names_the_flag(cli, run_dir, args, flag):
    code, out, err = cli(args[0], str(run_dir), *args[1:])
    assert code == 2 and f"`{flag}` must be one of" in err and "`fmt`" not in err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("fmt", ["csv", "json"])
def test_query_formats(cli, run_dir, fmt):
    sql = "SELECT layer, metric, effect FROM tests WHERE design = 'paired' ORDER BY layer, metric"
    code, out, _ = cli("query", str(run_dir), sql, "--format", fmt)
    assert code == 0
    got = pd.read_csv(io.StringIO(out)) if fmt == "csv" else pd.DataFrame(json.loads(out))
    tests = pd.read_parquet(run_dir / "tests.parquet")
    want = tests[tests.design == "paired"].sort_values(["layer", "metric"])[["layer", "metric", "effect"]]
    pd.testing.assert_frame_equal(got.reset_index(drop=True), want.reset_index(drop=True), check_dtype=False)


def test_status_and_audit_json(cli, tmp_path):
    from moeaudit.config import AuditConfig
    from moeaudit.rundir import RunDir
    from tests.audit.test_clustering import correlated

    effects, metrics, documents = correlated()
    run = RunDir(tmp_path / "run", AuditConfig(model="tiny-olmoe", audit={"audit_metrics": ["score"],
                                                                          "designs": ["paired"]}))
    run.write_frame("effects", effects.assign(kind="zero", scope="token", selection="census", estimate=False,
                                              shared=False, j=1))
    run.write_frame("expert_metrics", metrics)
    run.write_frame("windows", pd.DataFrame({"seq": documents.index, "doc_id": documents.to_numpy()}))
    code, out, _ = cli("audit", str(run.path), "--json")
    assert code == 0
    answer = json.loads(out)
    written = pd.read_parquet(run.path / "tests.parquet")
    assert len(answer["tests"]) == len(written) and answer["tests"][0]["p_t"] == pytest.approx(written.p_t[0])
    assert answer["audit"]["cluster_by"] == "document" and answer["tests"][0]["n_clusters"] == 12
    code, out, _ = cli("status", str(run.path), "--json")
    status = json.loads(out)
    assert code == 0 and status["model"] == "tiny-olmoe" and status["in_use_by"] is None
    assert {s["stage"]: s["state"] for s in status["stages"]}["audit"] == "done"


def test_log_records_carry_stage_counters_as_fields(tmp_path):
    import logging

    from moeaudit.cli import JsonLogFormatter, TextLogFormatter
    from moeaudit.config import AuditConfig
    from moeaudit.rundir import RunDir

    captured = []

    class Keep(logging.Handler):
        def emit(self, record):
            captured.append(record)

    logger = logging.getLogger("moeaudit.rundir")
    handler, level = Keep(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        RunDir(tmp_path / "run", AuditConfig(model="tiny-olmoe")).record_stage("audit", {"cells": 3, "alpha": 0.05})
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    record = next(r for r in captured if r.getMessage().startswith("stage audit finished"))
    entry = json.loads(JsonLogFormatter().format(record))
    assert entry["stage"] == "audit" and entry["counters"] == {"cells": 3, "alpha": 0.05}
    assert entry["message"] == f"stage audit finished in {tmp_path / 'run'}"
    assert TextLogFormatter().format(record).endswith(': {"cells": 3, "alpha": 0.05}')


def test_report_writes_the_file_given_with_output(cli, run_dir, tmp_path):
    target = tmp_path / "reports" / "mine.html"
    code, out, _ = cli("report", str(run_dir), "-o", str(target))
    assert code == 0 and target.is_file() and target.stat().st_size > 10_000 and str(target) in out
    code, _, err = cli("report", str(run_dir), "--out", str(target))  # --out is a directory everywhere else
    assert code == 2 and "--out" in err
