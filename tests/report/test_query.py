"""DuckDB SQL over a run directory's Parquet tables."""

from __future__ import annotations

import pandas as pd
import pytest

from moeaudit.report import QueryError, query
from moeaudit.report.query import tables


def test_every_table_is_a_view(synthetic_run):
    assert tables(synthetic_run) == ["effects", "expert_metrics", "expert_metrics_by_domain", "pruning",
                                     "redundancy", "tests", "tokens"]
    for name in tables(synthetic_run):
        count = query(synthetic_run, f"SELECT count(*) AS n FROM {name}")["n"].iloc[0]
        assert count == len(pd.read_parquet(synthetic_run / f"{name}.parquet"))


def test_aggregate_equals_pandas(synthetic_run):
    got = query(synthetic_run, "SELECT layer, expert, avg(delta_nll) AS mean FROM effects "
                               "WHERE selection = 'census' GROUP BY ALL ORDER BY layer, expert")
    effects = pd.read_parquet(synthetic_run / "effects.parquet")
    want = (effects[effects["selection"] == "census"].groupby(["layer", "expert"])["delta_nll"].mean()
            .rename("mean").reset_index())
    pd.testing.assert_frame_equal(got, want, check_dtype=False)


def test_join_across_tables(synthetic_run):
    got = query(synthetic_run, "SELECT t.metric, t.layer, m.n_experts FROM tests t JOIN (SELECT layer, count(*) AS "
                               "n_experts FROM expert_metrics GROUP BY layer) m USING (layer) WHERE t.verdict = "
                               "'significant' ORDER BY t.layer, t.metric")
    assert got.values.tolist() == [["frequency", 0, 8], ["mean_gate_active", 0, 8], ["token_gate", 0, 8]]


def test_statement_without_result_runs_only_when_allowed(synthetic_run):
    with pytest.raises(QueryError, match="read-only statements .* got SET: pass --allow-external"):
        query(synthetic_run, "SET threads = 1")
    assert query(synthetic_run, "SET threads = 1", allow_external=True).empty


def test_query_cannot_read_or_write_outside_the_run_tables(synthetic_run, tmp_path):
    """By default a query reads the run's tables and nothing else, and writes nothing (issue: COPY over the
    run's own table with USE_TMP_FILE false used to succeed; read_csv('/etc/passwd') too)."""
    outside = tmp_path / "outside.parquet"
    pd.DataFrame({"secret": [42]}).to_parquet(outside)
    effects = (synthetic_run / "effects.parquet").read_bytes()
    for sql in (f"SELECT * FROM read_parquet('{outside}')", "SELECT * FROM read_csv('/etc/passwd')",
                f"SELECT * FROM read_text('{outside}')"):
        with pytest.raises(QueryError, match="file system operations are disabled|Permission"):
            query(synthetic_run, sql)
    for sql in (f"COPY (SELECT 1 AS a) TO '{synthetic_run / 'effects.parquet'}' (USE_TMP_FILE false)",
                f"ATTACH '{tmp_path / 'x.db'}'", "INSTALL httpfs", "CREATE TABLE t AS SELECT 1"):
        with pytest.raises(QueryError, match="read-only statements") as err:
            query(synthetic_run, sql)
        assert "\n" not in str(err.value)
    assert (synthetic_run / "effects.parquet").read_bytes() == effects and not (tmp_path / "x.db").exists()
    # a SELECT cannot lift the lock either (the configuration is locked after the views are made)
    with pytest.raises(QueryError):
        query(synthetic_run, "SELECT * FROM duckdb_settings() WHERE name = 'x'; SET enable_external_access = true")
    assert query(synthetic_run, f"SELECT * FROM read_parquet('{outside}')", allow_external=True)["secret"].item() == 42


def test_a_crafted_file_name_is_not_registered(synthetic_run, tmp_path, monkeypatch):
    """A Parquet file whose name is SQL is not one of moeaudit's tables: never made a view, never executed."""
    monkeypatch.chdir(tmp_path)
    target = tmp_path / "pwned.csv"
    crafted = "x\" AS SELECT 1; COPY (SELECT 1) TO 'pwned.csv'; CREATE VIEW \"y"
    pd.DataFrame({"a": [1]}).to_parquet(synthetic_run / f"{crafted}.parquet")
    try:
        assert crafted not in tables(synthetic_run)
        assert query(synthetic_run, "SELECT count(*) AS n FROM tests")["n"].item() > 0
        assert not target.exists()
    finally:
        (synthetic_run / f"{crafted}.parquet").unlink()


def test_errors_are_one_line(synthetic_run):
    with pytest.raises(QueryError) as err:
        query(synthetic_run, "SELECT * FROM nonexistent")
    message = str(err.value)
    assert "\n" not in message and "nonexistent" in message and "tables: effects, expert_metrics" in message
    with pytest.raises(QueryError, match="syntax error"):
        query(synthetic_run, "SELEC 1")
