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


def test_statement_without_result(synthetic_run):
    assert query(synthetic_run, "SET threads = 1").empty


def test_errors_are_one_line(synthetic_run):
    with pytest.raises(QueryError) as err:
        query(synthetic_run, "SELECT * FROM nonexistent")
    message = str(err.value)
    assert "\n" not in message and "nonexistent" in message and "tables: effects, expert_metrics" in message
    with pytest.raises(QueryError, match="syntax error"):
        query(synthetic_run, "SELEC 1")
