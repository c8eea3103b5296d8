"""`moeaudit calibration RUN_DIR` in process: the table it prints (80 columns), what it writes, bad input."""

from __future__ import annotations

import pandas as pd
import pytest

from tests.calibration.conftest import HAS_BUILTIN, copy_run, observed_run  # noqa: F401 (a session fixture)
from tests.conftest import one_line_error

pytestmark = pytest.mark.skipif(not HAS_BUILTIN, reason="built-in model weights not present")


@pytest.fixture
def run_dir(observed_run, tmp_path):
    return copy_run(observed_run, tmp_path / "run")


def test_prints_a_table_that_fits_80_columns_and_writes_the_table(run_dir, cli, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    code, out, err = cli("calibration", str(run_dir), "--resamples", "30")
    assert code == 0, err
    lines = out.splitlines()
    written = next(i for i, line in enumerate(lines) if line.startswith("calibration.parquet written to"))
    assert written >= len(lines) - 3  # the last note, wrapped; it names the (long) path
    assert max(len(line) for line in lines[:written]) <= 80 and "…" not in out
    assert "ranking stability: 16 calibration documents" in out and "30 resamples" in out
    for metric in ("frequency", "reap", "ean_mean", "routing_entropy", "max_act"):
        assert any(line.startswith(f"│ {metric} ") for line in lines), metric
    assert "not resampled: aimer, router_row_norm" in out and "calibration.parquet written" in out
    table = pd.read_parquet(run_dir / "calibration.parquet")
    assert (table["n_resamples"] == 30).all() and set(table["unit"]) == {"document"}


def test_flags_and_config_file_set_the_calibration_part(run_dir, cli, tmp_path):
    config = tmp_path / "calibration.toml"
    config.write_text("[calibration]\nresamples = 12\nflip_ratio = 0.5\ncurve_points = 2\n")
    code, out, err = cli("calibration", str(run_dir), "--config", str(config), "--unit", "window")
    assert code == 0, err
    table = pd.read_parquet(run_dir / "calibration.parquet")
    assert (table["n_resamples"] == 12).all() and (table["flip_ratio"] == 0.5).all()
    assert set(table["unit"]) == {"window"} and table["curve_units"].map(len).max() <= 2


@pytest.mark.parametrize("args, fragments", [
    (["--unit", "token"], ["`--unit` must be document or window; got 'token'."]),
    (["--resamples", "1"], ["`calibration.resamples` must be at least 2; got 1."]),
    (["--flip-ratio", "1"], ["`calibration.flip_ratio` must be less than 1"]),
])
def test_bad_flags_are_one_line_before_anything_is_written(run_dir, cli, args, fragments):
    code, _, err = cli("calibration", str(run_dir), *args)
    one_line_error(code, err, *fragments)
    assert not (run_dir / "calibration.parquet").exists()


def test_a_run_without_metrics_is_one_line_naming_the_stage(run_dir, cli):
    (run_dir / "expert_metrics.parquet").unlink()
    code, _, err = cli("calibration", str(run_dir))
    one_line_error(code, err, "no finished metrics stage (expert_metrics.parquet missing)", "moeaudit metrics")
    assert not (run_dir / "calibration.parquet").exists()


def test_not_a_run_directory_is_one_line(tmp_path, cli):
    code, _, err = cli("calibration", str(tmp_path / "nothing"))
    one_line_error(code, err, "is not a moeaudit run directory")
