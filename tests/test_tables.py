"""The table schemas are what the stages write, and single-expert rows are one definition (pandas and SQL)."""

from __future__ import annotations

from importlib import import_module

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from moeaudit import tables


@pytest.fixture(scope="module")
def moe():
    import torch

    from moeaudit.models import wrap_model
    from moeaudit.models.testing import tiny_model

    torch.set_num_threads(1)
    return wrap_model(tiny_model("olmoe", seed=5), name="olmoe")


def test_observe_writes_the_declared_schemas(moe, tmp_path):
    from moeaudit.observe import WindowInput, observe

    gen = np.random.default_rng(0)
    windows = [WindowInput(seq=i, token_ids=gen.integers(3, 96, n), domain="d", split="calibration")
               for i, n in enumerate([7, 5])]
    paths = {name: tmp_path / f"{name}.parquet" for name in ("tokens", "routing", "router_probs")}
    observe(moe, windows, tokens_path=paths["tokens"], routing_path=paths["routing"],
            router_probs_path=paths["router_probs"], router_probs_layers="all", batch_size=2)
    expected = {"tokens": tables.TOKENS_SCHEMA, "routing": tables.ROUTING_SCHEMA,
                "router_probs": tables.router_probs_schema(moe.layers[0].num_experts)}
    for name, schema in expected.items():
        assert pq.read_schema(paths[name]).remove_metadata().equals(schema), name


def test_intervene_writes_the_effect_columns(moe):
    import torch

    from moeaudit.intervene import compute_effects

    ids = torch.randint(3, 96, (1, 6), generator=torch.Generator().manual_seed(0))
    assert list(compute_effects(moe, ids).effects.columns) == list(tables.EFFECT_COLUMNS)


def test_every_writer_uses_the_schema_objects():
    from moeaudit.intervene import engine
    from moeaudit.observe import forward, stage as observe_stage  # noqa: F401 (imports the stage's schemas)
    downstream, jaccard, prune_stage, units = (import_module(f"moeaudit.prune.{name}")  # `prune.jaccard`: a function
                                               for name in ("downstream", "jaccard", "stage", "units"))

    assert forward.TOKENS_SCHEMA is tables.TOKENS_SCHEMA and forward.ROUTING_SCHEMA is tables.ROUTING_SCHEMA
    assert forward.router_probs_schema is tables.router_probs_schema
    assert engine.EFFECT_COLUMNS is tables.EFFECT_COLUMNS and engine.single_expert_rows is tables.single_expert_rows
    assert prune_stage.PRUNING_COLUMNS is tables.PRUNING_COLUMNS is units.PRUNING_COLUMNS
    assert units.EVALS_SCHEMA is tables.EVALS_SCHEMA
    assert jaccard.JACCARD_COLUMNS is tables.JACCARD_COLUMNS
    assert downstream.DOWNSTREAM_COLUMNS is tables.DOWNSTREAM_COLUMNS
    assert [f.name for f in tables.EVALS_SCHEMA] == [name for name, _ in tables.EVALS_SCHEMA_FIELDS]


def planted_effects() -> pd.DataFrame:
    """One exact single-expert row per (kind, scope), and one row each that the filter must drop."""
    base = dict(layer=1, seq=0, pos=2, delta_nll=0.5, estimate=False, shared=False, j=1, selection="census")
    rows = [dict(base, expert=e, kind=kind, scope=scope, keep=True)
            for e, (kind, scope) in enumerate([("zero", "token"), ("zero", "sequence"), ("reroute", "token")])]
    rows += [
        dict(base, expert=10, kind="zero", scope="token", estimate=True, keep=False),  # gradient estimate
        dict(base, expert=11, kind="zero", scope="token", shared=True, keep=False),  # shared expert
        dict(base, expert=12, kind="zero", scope="token", j=2, selection="progressive", keep=False),
        dict(base, expert=13, kind="zero", scope="token", selection="progressive", keep=False),
        dict(base, expert=14, kind="zero", scope="token", j=3, keep=False),
    ]
    return pd.DataFrame(rows)


def test_single_expert_rows_on_a_planted_frame():
    effects = planted_effects()
    kept = tables.single_expert_rows(effects.drop(columns="keep"))
    assert kept.index.tolist() == effects.index[effects["keep"]].tolist()
    assert list(kept.columns) == [c for c in effects.columns if c != "keep"]
    # A table without the flag columns (written by another tool): nothing to filter on, nothing dropped.
    bare = effects[["layer", "seq", "pos", "expert", "kind", "scope", "delta_nll"]]
    assert tables.single_expert_rows(bare).equals(bare)


def test_single_expert_sql_keeps_the_same_rows():
    duckdb = pytest.importorskip("duckdb")
    effects = planted_effects()
    con = duckdb.connect()
    con.register("effects", effects)
    where, params = tables.single_expert_sql(effects.columns)
    assert params == []
    got = con.execute(f"SELECT expert FROM effects WHERE {where} ORDER BY expert", params).df()["expert"]
    assert got.tolist() == tables.single_expert_rows(effects)["expert"].tolist()
    where, params = tables.single_expert_sql(effects.columns, kind="zero", scope="token")
    assert params == ["zero", "token"]
    got = con.execute(f"SELECT expert FROM effects WHERE {where}", params).df()["expert"]
    assert got.tolist() == [0]
    assert tables.single_expert_sql(["layer", "delta_nll"], kind="zero") == ("TRUE", [])
