"""The calibration stage on a real run of the built-in model: the table, the manifest, the documents found by
rebuilding the corpus, exactness against the stored expert_metrics, and the one-line refusals."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from moeaudit.calibration import run_calibration
from moeaudit.calibration.sensitivity import _setup
from moeaudit.calibration.stage import calibration_summary, calibration_windows
from moeaudit.errors import RunDirectoryError
from moeaudit.rundir import RunDir
from moeaudit.tables import CALIBRATION_SCHEMA
from tests.calibration.conftest import HAS_BUILTIN, copy_run

pytestmark = pytest.mark.skipif(not HAS_BUILTIN, reason="built-in model weights not present")


@pytest.fixture(scope="module")
def calibrated(observed_run, tmp_path_factory):
    run = RunDir(copy_run(observed_run, tmp_path_factory.mktemp("stage") / "run"))
    info = run_calibration(run)
    return run, info


def test_the_stage_writes_the_table_and_records_its_settings(calibrated):
    run, info = calibrated
    assert pq.read_schema(run.table_path("calibration")).remove_metadata() == CALIBRATION_SCHEMA
    table = run.read("calibration")
    layers = sorted(run.read("expert_metrics")["layer"].unique())
    assert sorted(table["layer"].unique()) == layers and len(table) == len(info["metrics"]) * len(layers)
    assert "aimer" not in info["metrics"] and info["weight_only"] == ["aimer", "router_row_norm"]
    assert {"reap", "frequency", "routing_entropy"} <= set(info["metrics"])
    assert info["unit"] == "document" and info["units"] == info["windows"] == 16  # truncate: a window per document
    assert (table["n_resamples"] == 40).all() and (table["seed"] == 0).all() and (table["n_domains"] > 1).all()
    assert table["tau_mean"].between(-1, 1).all() and table["flip_share"].between(0, 1).all()
    manifest = json.loads((run.path / "manifest.json").read_text())
    assert manifest["stages"]["calibration"]["resamples"] == 40
    summary = calibration_summary(table)
    assert summary["metric"].tolist() == info["metrics"]


def test_the_stored_metrics_are_the_identity_resample_bit_for_bit(calibrated):
    from moeaudit.observe.forward import read_router_probs

    run, _ = calibrated
    stored = run.read("expert_metrics")
    seqs, _ = calibration_windows(run)
    routing = run.read("routing").astype({"layer": "int64", "seq": "int64", "pos": "int64", "expert": "int64"})
    num_experts = stored.groupby("layer").size().to_dict()
    probs = read_router_probs(run.table_path("router_probs"))
    setup = _setup(routing, num_experts, probs, None, seqs, None, "combine", None)
    identity = setup.values(np.ones(setup.pool.n_units, dtype=np.int64))
    for mi, metric in enumerate(setup.metrics):
        for li, layer in enumerate(setup.layers):
            expected = stored.loc[stored["layer"] == layer, metric].to_numpy(dtype=np.float64)
            assert np.array_equal(identity[li, mi, :len(expected)], expected, equal_nan=True), (metric, layer)


def test_windows_as_units_need_no_corpus(observed_run, tmp_path):
    run = RunDir(copy_run(observed_run, tmp_path / "run"))
    run = RunDir(run.path, run.config.replace(resample_unit="window", resamples=10, curve_repeats=1))
    info = run_calibration(run)
    assert info["unit"] == "window" and set(run.read("calibration")["unit"]) == {"window"}


def test_missing_stages_are_one_line_before_anything_is_written(observed_run, tmp_path):
    run = RunDir(copy_run(observed_run, tmp_path / "run"))
    del run.manifest["stages"]["metrics"]
    run.save()
    with pytest.raises(RunDirectoryError, match=r"no finished metrics stage; run `moeaudit metrics .*` first"):
        run_calibration(RunDir(run.path))
    (run.path / "routing.parquet").unlink()
    with pytest.raises(RunDirectoryError, match=r"no finished observe stage \(routing.parquet missing\)"):
        run_calibration(RunDir(run.path))
    assert not run.has("calibration")


def test_a_changed_corpus_is_refused(observed_run, tmp_path):
    run = RunDir(copy_run(observed_run, tmp_path / "run"))
    run.manifest["corpus"]["fingerprint_observed"] = "0" * 16
    run.save()
    # windows.parquet names each window's document: the corpus is not rebuilt, so its fingerprint is not read
    documents = RunDir(run.path).read("windows")
    info = run_calibration(RunDir(run.path))
    assert info["unit"] == "document" and info["units"] == documents[documents.split == "calibration"].doc_id.nunique()
    (run.path / "calibration.parquet").unlink()
    # a run observed before windows.parquet existed: the corpus is rebuilt and must match
    (run.path / "windows.parquet").unlink()
    with pytest.raises(RunDirectoryError, match="cannot be matched to its observed windows.*--unit window"):
        run_calibration(RunDir(run.path))
    assert not run.has("calibration")


def test_one_calibration_document_is_refused(observed_run, tmp_path, monkeypatch):
    import moeaudit.calibration.stage as stage

    run = RunDir(copy_run(observed_run, tmp_path / "run"))
    monkeypatch.setattr(stage, "_documents", lambda run, seqs, corpus: {int(s): "one" for s in seqs})
    with pytest.raises(RunDirectoryError, match="come from 1 document; resampling needs at least 2: observe more "
                                                r"calibration windows \(--max-windows, a larger corpus\); pass --unit window"):
        run_calibration(run)
    assert not run.has("calibration")
