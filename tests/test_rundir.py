"""Run directory: atomic tables, config fingerprints, one-line errors."""

from __future__ import annotations

import errno

import pandas as pd
import pytest

from moeaudit.config import AuditConfig, build_config
from moeaudit.errors import InvalidParameterError, RunDirectoryError
from moeaudit.rundir import RunDir


def test_failed_write_leaves_no_partial_table(tmp_path):
    run = RunDir(tmp_path / "run", AuditConfig())
    with pytest.raises(RunDirectoryError, match="No space left on device; free disk space"):
        with run.writing("routing") as tmp:
            tmp.write_bytes(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
    assert not run.has("routing")
    assert [p.name for p in run.path.iterdir()] == ["manifest.json"]
    run.write_frame("routing", pd.DataFrame({"a": [1]}))
    assert run.read("routing").a.tolist() == [1]


def test_missing_directory_and_table(tmp_path):
    with pytest.raises(RunDirectoryError, match="is not a moeaudit run directory"):
        RunDir(tmp_path / "none")
    run = RunDir(tmp_path / "run", AuditConfig())
    with pytest.raises(RunDirectoryError, match="effects.parquet is missing"):
        run.read("effects")


def test_overwrite_replaces_config_and_tables(tmp_path):
    run = RunDir(tmp_path / "run", AuditConfig())
    run.write_frame("routing", pd.DataFrame({"a": [1]}))
    changed = AuditConfig(max_len=64)
    with pytest.raises(RunDirectoryError, match="differs in max_len"):
        RunDir(tmp_path / "run", changed)
    again = RunDir(tmp_path / "run", changed, overwrite=True)
    assert again.config.max_len == 64 and not again.has("routing")
    assert RunDir(tmp_path / "run", AuditConfig(max_len=64, batch_size=2)).config.batch_size == 2  # batching is free
    # so is how the run executes: a run can be resumed on Ray, with other units or the other exact engine
    how = dict(executor="ray", workers=3, unit_windows=4, engine="reference", device="cuda", ray_address="auto")
    assert RunDir(tmp_path / "run", AuditConfig(max_len=64, **how)).config.workers == 3
    again.write_frame("routing", pd.DataFrame({"a": [1]}))
    assert not RunDir(tmp_path / "run", AuditConfig(max_len=64), overwrite=True).has("routing")  # same config


@pytest.mark.parametrize("values, message", [
    ({"max_len": 1}, "`max_len` must be at least 2; got 1."),
    ({"dtype": "fp8"}, "`dtype` must be one of float32, bfloat16, float16; got 'fp8'."),
    ({"kind": "drop"}, "`kind` must be one of zero, renorm, reroute, mean; got 'drop'."),
    ({"alpha": 2}, "`alpha` must be less than 1.0; got 2."),
    ({"observe_splits": []}, "`observe_splits` must be a non-empty list of splits"),
    ({"colour": 1}, "unknown setting `colour`; allowed settings are: model, corpus"),
    ({"unit_windows": 0}, "`unit_windows` must be at least 1; got 0."),
    ({"executor": "slurm"}, "`executor` must be one of local, ray; got 'slurm'."),
    ({"workers": 0}, "`workers` must be at least 1; got 0."),
])
def test_config_errors_are_one_line(values, message):
    with pytest.raises(InvalidParameterError) as info:
        build_config(values)
    assert message in str(info.value) and "\n" not in str(info.value)


#: One bad value per configuration field (a test below checks that every field is listed).
BAD_VALUES = {
    "model": 3, "corpus": ["a"], "max_len": 1, "max_docs": 0, "split_seed": "x", "observe_splits": ["test"],
    "max_windows": 0, "layers": "0,4", "router_probs_layers": "some", "batch_size": 0, "dtype": "float64",
    "device": 3, "experts_implementation": "fast", "seed": 1.5, "kind": "drop", "scope": "global", "audit_n": 2,
    "correction": "sidak", "alpha": 0, "audit_metrics": "reap", "engine": "slow", "progressive": "maybe",
    "min_chars": -1, "first_docs": 0, "truncate": "maybe", "in_sample": "maybe", "intervene_n": 0, "preset": 3,
    "unit_windows": 0, "executor": "dask", "ray_address": 3, "workers": 0,
}


def test_every_configuration_field_has_a_bad_value_test():
    assert set(BAD_VALUES) == set(AuditConfig.model_fields)


@pytest.mark.parametrize("field", sorted(BAD_VALUES))
def test_every_field_refuses_a_bad_value_in_one_house_line(field):
    with pytest.raises(InvalidParameterError) as info:
        build_config({field: BAD_VALUES[field]})
    message = str(info.value)
    assert message.startswith(f"`{field}` must be ")  # the parameter, then what it allows
    assert f"; got {BAD_VALUES[field]!r}" in message or f"; got {BAD_VALUES[field][0]!r}" in message  # the bad value
    assert message.endswith("Change it on the command line or in the config file.")  # what to do
    assert "\n" not in message and "Input should" not in message and "input should" not in message


def test_config_from_toml_and_manifest(tmp_path):
    (tmp_path / "audit.toml").write_text('model = "tiny-deepseek"\nmax_len = 64\n')
    config = AuditConfig.from_toml(tmp_path / "audit.toml")
    assert (config.model, config.max_len) == ("tiny-deepseek", 64)
    run = RunDir(tmp_path / "run", config)
    assert AuditConfig.from_manifest(run.path / "manifest.json") == config
    (tmp_path / "bad.toml").write_text("max_len = [")
    with pytest.raises(InvalidParameterError, match="is not valid TOML"):
        AuditConfig.from_toml(tmp_path / "bad.toml")
