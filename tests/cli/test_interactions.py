"""`moeaudit interactions RUN_DIR` in process: the tables it prints (80 columns), flags, JSON, bad input."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from moeaudit.rundir import RunDir
from tests.calibration.conftest import HAS_BUILTIN, copy_run
from tests.conftest import one_line_error
from tests.interactions.test_stage import observed, write_pruning  # noqa: F401,F811 (a module fixture)

pytestmark = pytest.mark.skipif(not HAS_BUILTIN, reason="built-in model weights not present")


@pytest.fixture
def run_dir(observed, tmp_path):  # noqa: F811
    return copy_run(observed, tmp_path / "run")


def test_cli_prints_80_columns_and_writes(run_dir, cli, monkeypatch):
    write_pruning(run_dir)
    monkeypatch.setenv("COLUMNS", "80")
    code, out, err = cli("interactions", str(run_dir), "--n", "12", "--layers", "0,3")
    assert code == 0, err
    lines = out.splitlines()
    flat = " ".join(out.split())
    assert ("interactions.parquet, shapley.parquet, interaction_sets.parquet, shapley_tests.parquet written to "
            f"{run_dir}") in flat
    assert max(len(line) for line in lines) <= 80 and "…" not in out
    assert "pairs of active experts removed together (zero, token scope, 384 exact" in out
    assert "pruned sets removed together at a token, ratio 0.25" in out
    assert "significant metric cells (each outcome its own family)" in out
    summary = [line for line in lines if line.startswith("│     0 ") or line.startswith("│     3 ")]
    assert len(summary) == 4  # layers 0 and 3 in both tables
    stored = RunDir(run_dir).manifest["stages"]["interactions"]
    assert stored["settings"]["interactions_n"] == 12 and stored["layers"] == [0, 3]


def test_cli_json_and_every_token(run_dir, cli):
    code, out, err = cli("interactions", str(run_dir), "--every-token", "--layers", "1", "--kind", "renorm", "--json")
    assert code == 0, err
    info = json.loads(out)
    tokens = pd.read_parquet(run_dir / "tokens.parquet")
    heldout = tokens[tokens["split"] == "heldout"]
    expected = int((heldout.groupby("seq")["pos"].transform("max") > heldout["pos"]).sum())  # with a next token
    assert info["tokens"] == {"1": expected} and info["kind"] == "renorm" and info["n"] is None
    assert set(pd.read_parquet(run_dir / "shapley.parquet")["kind"]) == {"renorm"}


@pytest.mark.parametrize("args, fragments", [
    (["--kind", "drop"], ["`--kind` must be one of zero, renorm, reroute, mean; got 'drop'."]),
    (["--layers", "9"], ["`interactions_layers` must be observed MoE layers"]),
    (["--n", "0"], ["`interactions.interactions_n` must be at least 1; got 0."]),
    (["--exact-players", "11"], ["`interactions.shapley_exact_players` must be at most 10"]),
    (["--every-token", "--n", "5"], ["`--every-token` must be not given together with --n"]),
])
def test_bad_flags_are_one_line_before_anything_is_written(run_dir, cli, args, fragments):
    code, _, err = cli("interactions", str(run_dir), *args)
    one_line_error(code, err, *fragments)
    assert not (run_dir / "shapley.parquet").exists()
    assert "interactions" not in json.loads((run_dir / "manifest.json").read_text())["stages"]


def test_a_directory_without_observe_is_one_line(tmp_path, cli):
    code, _, err = cli("interactions", str(tmp_path / "nothing"))
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "nothing").exists()
