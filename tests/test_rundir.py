"""Run directory: atomic tables, config fingerprints, one-line errors."""

from __future__ import annotations

import errno
import json

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
    ({"dtype": "fp8"}, "`dtype` must be one of float32, bfloat16, float16, auto; got 'fp8'."),
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


#: One bad value per configuration setting (a test below checks that every setting of the tree is listed).
BAD_VALUES = {
    "model": 3, "corpus": ["a"], "seed": 1.5, "preset": 3, "preset_overrides": {"kind": "zero"},
    # observe
    "max_len": 1, "max_docs": 0, "split_seed": "x", "observe_splits": ["test"], "max_windows": 0, "layers": "0,4",
    "router_probs_layers": "some", "router_logits_layers": "some", "dtype": "float64",
    "experts_implementation": "fast", "min_chars": -1,
    "first_docs": 0, "truncate": "maybe", "in_sample": "maybe", "text_field": "", "domain_field": 3,
    # intervene
    "kind": "drop", "scope": "global", "intervene_n": 0, "intervene_layers": "7", "intervene_windows": 0, "progressive": "maybe", "noise_positions": -1,
    # audit
    "audit_n": 2, "correction": "sidak", "alpha": 0, "audit_metrics": "reap", "designs": ["pairs"], "ci": "boot", "audit_cluster": "token", "audit_mixed": "pair", "dz_ddof": 2, "position_sets": "global", "reap_gate": "signed", "paper_code_padding": "sometimes",
    "equivalence_bound": 0, "n_permutations": 0,
    # prune
    "ratios": [1.5], "criteria": "reap", "random_seeds": -1, "single_layer": "maybe", "group_balanced": "maybe", "guard": -1,
    "budget_weights": "flat", "directions": {"reap": "up"},
    # calibration
    "resamples": 1, "flip_ratio": 1.0, "tau_target": 0, "curve_points": 0, "curve_repeats": 0,
    "resample_unit": "token",
    # interactions
    "interactions_n": 0, "interactions_layers": "first", "interactions_kind": "drop", "shapley_exact_players": 11,
    "shapley_permutations": 1,
    # execution
    "batch_size": 0, "device": 3, "unit_windows": 0, "executor": "dask", "ray_address": 3, "workers": 0,
    "engine": "slow", "rows_per_call": 0, "reference_batch": 0, "max_logit_elements": 0, "max_state_bytes": 0,
}


def test_every_configuration_setting_has_a_bad_value_test():
    from moeaudit.config import FLAT_PATHS, ROOT_FIELDS

    assert set(BAD_VALUES) == set(ROOT_FIELDS) | set(FLAT_PATHS)


def _shown(value) -> list:
    """The bad value as a message may show it: whole, or the first bad item of a list or table."""
    items = list(value.values()) if isinstance(value, dict) else list(value) if isinstance(value, list) else []
    return [value, *items]


@pytest.mark.parametrize("field", sorted(BAD_VALUES))
def test_every_setting_refuses_a_bad_value_in_one_house_line(field):
    from moeaudit.config import FLAT_PATHS

    for values, name in (({field: BAD_VALUES[field]}, field),  # flat, as from the command line
                         ({FLAT_PATHS[field]: {field: BAD_VALUES[field]}}, f"{FLAT_PATHS[field]}.{field}")
                         if field in FLAT_PATHS else ({field: BAD_VALUES[field]}, field)):  # nested, as in TOML
        with pytest.raises(InvalidParameterError) as info:
            build_config(values)
        message = str(info.value)
        assert message.startswith(f"`{name}` must be ")  # the parameter, then what it allows
        assert any(f"; got {v!r}." in message for v in _shown(BAD_VALUES[field]))  # the bad value
        assert message.endswith("Change it on the command line or in the config file.")  # what to do
        assert "\n" not in message and "nput should" not in message


def test_the_tree_reads_flat_and_nested_settings_alike(tmp_path):
    flat = AuditConfig(max_len=64, kind="reroute", batch_size=2, ratios=[0.5])
    nested = build_config({"observe": {"max_len": 64}, "intervene": {"kind": "reroute"},
                           "execution": {"batch_size": 2}, "prune": {"ratios": [0.5]}})
    assert flat == nested and flat.max_len == flat.observe.max_len == 64 and flat.execution.batch_size == 2
    (tmp_path / "tree.toml").write_text('model = "tiny-qwen-moe"\n[observe]\nmax_len = 64\n[audit]\nalpha = 0.01\n')
    (tmp_path / "flat.toml").write_text('model = "tiny-qwen-moe"\nmax_len = 64\nalpha = 0.01\n')
    (tmp_path / "old.toml").write_text('[audit]\nmodel = "tiny-qwen-moe"\nmax_len = 64\nalpha = 0.01\n')
    configs = [AuditConfig.from_toml(tmp_path / f"{name}.toml") for name in ("tree", "flat", "old")]
    assert configs[0] == configs[1] == configs[2]
    assert (configs[0].model, configs[0].observe.max_len, configs[0].audit.alpha) == ("tiny-qwen-moe", 64, 0.01)
    # the manifest holds the whole tree; execution and prune settings do not change the fingerprint
    run = RunDir(tmp_path / "run", flat)
    stored = json.loads((run.path / "manifest.json").read_text())["config"]
    assert stored["observe"]["max_len"] == 64 and stored["prune"]["ratios"] == [0.5]
    assert set(stored) == {"model", "corpus", "seed", "preset", "preset_overrides", "observe", "intervene", "audit", "prune",
                           "calibration", "interactions", "execution"}
    assert RunDir(tmp_path / "run", flat.replace(workers=3, ratios=[0.25], engine="reference")).config.workers == 3
    assert RunDir(tmp_path / "run", flat.replace(resamples=50, resample_unit="window")).config.resamples == 50
    assert RunDir(tmp_path / "run", flat.replace(interactions_n=7)).config.interactions_n == 7
    # a run that computed nothing yet (stopped by bad input, say) takes the corrected settings ...
    assert RunDir(tmp_path / "run", flat.replace(alpha=0.02)).config.alpha == 0.02
    # ... one that holds work refuses them
    RunDir(tmp_path / "run", flat).record_stage("observe", {"tokens": 1})
    with pytest.raises(RunDirectoryError, match="differs in alpha"):
        RunDir(tmp_path / "run", flat.replace(alpha=0.01))
    # ... but not settings outside the fingerprint (each such stage rewrites its own tables)
    assert RunDir(tmp_path / "run", flat.replace(interactions_n=9, resamples=20)).config.interactions_n == 9


def test_the_tree_defaults_are_the_library_defaults():
    """The parts mirror the library's own settings objects; their defaults must agree."""
    import dataclasses

    from moeaudit.audit import AuditSettings
    from moeaudit.intervene import InterveneConfig

    config = AuditConfig()
    audit = {f.name: f.default for f in dataclasses.fields(AuditSettings)}
    assert (config.audit_n, config.correction, config.alpha, config.ci, config.equivalence_bound,
            config.n_permutations, tuple(config.designs), config.seed) == (
        audit["n"], audit["correction"], audit["alpha"], audit["ci"], audit["equivalence_bound"],
        audit["n_permutations"], tuple(audit["designs"]), audit["seed"])
    engine = InterveneConfig()
    assert (config.engine, config.rows_per_call, config.reference_batch, config.max_logit_elements,
            config.max_state_bytes, config.noise_positions) == (
        engine.engine, engine.rows_per_call, engine.reference_batch, engine.max_logit_elements,
        engine.max_state_bytes, engine.noise_positions)


def test_config_from_toml_and_manifest(tmp_path):
    (tmp_path / "audit.toml").write_text('model = "tiny-deepseek"\nmax_len = 64\n')
    config = AuditConfig.from_toml(tmp_path / "audit.toml")
    assert (config.model, config.max_len) == ("tiny-deepseek", 64)
    run = RunDir(tmp_path / "run", config)
    assert AuditConfig.from_manifest(run.path / "manifest.json") == config
    (tmp_path / "bad.toml").write_text("max_len = [")
    with pytest.raises(InvalidParameterError, match="is not valid TOML"):
        AuditConfig.from_toml(tmp_path / "bad.toml")


def test_windows_rebuild_the_observed_matrices(tmp_path):
    import numpy as np

    run = RunDir(tmp_path / "run", AuditConfig())
    windows = {0: ([5, 6, 7, 8], "calibration", "code"), 1: ([9, 10], "heldout", None),
               2: ([11, 12, 13], "heldout", "news"), 3: ([14], "heldout", "news")}
    rows = [dict(seq=seq, pos=pos, token_id=tok, split=split, domain=domain)
            for seq, (ids, split, domain) in windows.items() for pos, tok in enumerate(ids)]
    run.write_frame("tokens", pd.DataFrame(rows).sample(frac=1.0, random_state=0))  # rows in any order

    held = run.windows("heldout", pad_id=-1)
    assert held.seqs.tolist() == [1, 2, 3]
    assert held.token_ids.tolist() == [[9, 10, -1], [11, 12, 13], [14, -1, -1]]
    assert held.attention_mask.tolist() == [[1, 1, 0], [1, 1, 1], [1, 0, 0]]
    assert held.domains.tolist() == [[None, None, None], ["news", "news", "news"], ["news", None, None]]
    assert held.token_ids.dtype == held.attention_mask.dtype == np.int64
    every = run.windows()
    assert every.seqs.tolist() == [0, 1, 2, 3] and every.token_ids[0].tolist() == [5, 6, 7, 8]
    assert run.windows("train") is None
    with pytest.raises(InvalidParameterError, match="`split` must be one of train, calibration, heldout"):
        run.windows("test")


def test_a_read_only_run_directory_is_read_and_refused_in_one_line(tmp_path, monkeypatch):
    """Simulated read-only file system (root ignores chmod): status reads the lock without writing, a stage
    says it cannot write, and a failed write's clean-up does not mask the reason."""
    import builtins
    import os
    from pathlib import Path

    from moeaudit.scale.units import LOCK_FILE, exclusive, lock_holder

    run = RunDir(tmp_path / "run", AuditConfig())
    (run.path / LOCK_FILE).write_text("moeaudit pid 1 (observe)")
    real_open = builtins.open

    def read_only_open(file, mode="r", *args, **kwargs):
        if str(file).startswith(str(run.path)) and any(c in mode for c in "wax+"):
            raise OSError(errno.EROFS, "Read-only file system")
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", read_only_open)
    assert lock_holder(run) is None  # nobody holds it; found without opening it for writing
    with pytest.raises(RunDirectoryError, match="cannot write to .*Read-only file system.*make it writable"):
        with exclusive(run, "observe"):
            pass

    def refuse(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(os, "replace", refuse)
    monkeypatch.setattr(Path, "unlink", refuse)  # the clean-up fails too
    with pytest.raises(RunDirectoryError, match="could not write .*Read-only file system"):
        run.write_frame("routing", pd.DataFrame({"a": [1]}))
