"""`--set NAME=VALUE`: every configuration setting from the command line, by its TOML name."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from moeaudit.cli.common import parse_settings, with_settings
from moeaudit.config import FLAT_PATHS, ROOT_FIELDS, build_config
from moeaudit.errors import InvalidParameterError
from tests.calibration.conftest import HAS_BUILTIN, copy_run, observed_run  # noqa: F401 (a session fixture)
from tests.conftest import one_line_error

COMMANDS = ("observe", "intervene", "audit", "run", "prune", "calibration", "interactions")


def test_values_are_read_as_toml_or_bare_text():
    assert parse_settings(["alpha=0.01", "truncate=true", 'designs=["paired", "expert_level"]', "correction=holm",
                           "audit_n = 5", 'text_field="body"', "directions={reap = \"high\"}"]) == {
        "alpha": 0.01, "truncate": True, "designs": ["paired", "expert_level"], "correction": "holm",
        "audit_n": 5, "text_field": "body", "directions": {"reap": "high"}}
    assert with_settings(["alpha=0.01", "max_len=8"], {"max_len": 16, "kind": None}) == {"alpha": 0.01, "max_len": 16}
    for bad in ("alpha", "=3", "alpha="):
        with pytest.raises(InvalidParameterError, match="`--set` must be NAME=VALUE"):
            parse_settings([bad])


def test_a_bare_none_unsets_a_setting_that_may_be_unset(tmp_path):
    """TOML has no null: ``--set NAME=none`` (or ``null``) unsets a setting whose type admits None, overriding a
    stored run's value; a setting with a "none" choice of its own keeps it, a quoted "none" is the string, and a
    setting that cannot be unset gets the string (and then its own one-line error)."""
    from moeaudit.cli.common import resolve_config
    from moeaudit.config import UNSET

    assert parse_settings(["intervene_n=none", "text_field=NULL", "cluster_by=none", 'domain_field="none"']) == {
        "intervene_n": UNSET, "text_field": UNSET, "cluster_by": "none", "domain_field": "none"}
    base = build_config({"model": "tiny-olmoe", "intervene_n": 5, "text_field": "body", "max_docs": 3})
    config = resolve_config(tmp_path, with_settings(["intervene_n=none", "max_docs=null"], {}), None, base=base)
    assert config.intervene.intervene_n is None and config.observe.max_docs is None
    assert config.observe.text_field == "body"  # not given: kept
    with pytest.raises(InvalidParameterError, match="max_len"):
        resolve_config(tmp_path, with_settings(["max_len=none"], {}), None, base=base)


def test_every_setting_can_be_given_by_name():
    """Each setting, given through --set with a valid value of its own type, lands in its part."""
    from moeaudit.config import AuditConfig

    defaults = AuditConfig().flat()
    examples = {"model": "tiny-qwen-moe", "corpus": "other.jsonl", "preset": "engmann2026", "max_docs": 7,
                "intervene_n": 9, "audit_n": 11, "intervene_layers": [1], "intervene_windows": 2,
                "interactions_n": 3, "interactions_layers": [2], "interactions_kind": "renorm", "layers": [0, 1],
                "audit_metrics": ["reap"], "min_chars": 5, "first_docs": 4, "ray_address": "auto", "workers": 2,
                "router_logits_layers": [0], "budget_weights": {"0": 2.0}, "directions": {"reap": "high"},
                "max_windows": 5, "experts_implementation": "eager", "criteria": ["reap", "random"],
                "text_field": "body", "domain_field": "topic", "max_state_bytes": 1 << 30}
    skipped = {"preset_overrides"}  # derived, never set
    for name in [*ROOT_FIELDS, *FLAT_PATHS]:
        if name in skipped:
            continue
        value = examples.get(name, defaults[name])
        if name not in examples and isinstance(value, bool):
            value = not value
        text = json.dumps(value) if not isinstance(value, dict) else \
            "{" + ", ".join(f'"{k}" = {json.dumps(v)}' for k, v in value.items()) + "}"
        settings = parse_settings([f"{name}={text}"])
        config = build_config(settings)
        got = config.flat()[name]
        assert got == value or (isinstance(value, dict) and {str(k): v for k, v in got.items()} == value), name


@pytest.mark.parametrize("command", COMMANDS)
def test_every_config_command_takes_set(cli, command):
    code, out, _ = cli(command, "--help")
    assert code == 0 and "--set" in out


def test_an_unknown_name_suggests_the_closest_before_anything_is_written(cli, tmp_path):
    code, _, err = cli("run", "--out", str(tmp_path / "new"), "--model", "tiny-olmoe", "--set", "alfa=0.01")
    one_line_error(code, err, "unknown setting `alfa`; did you mean `alpha`?")
    assert not (tmp_path / "new").exists()


@pytest.mark.skipif(not HAS_BUILTIN, reason="built-in model weights not present")
def test_set_reaches_the_stage(cli, observed_run, tmp_path):
    run_dir = copy_run(observed_run, tmp_path / "run")
    code, _, err = cli("calibration", str(run_dir), "--set", "curve_points=2", "--set", "resamples=12",
                       "--resamples", "14")
    assert code == 0, err
    table = pd.read_parquet(run_dir / "calibration.parquet")
    assert (table["n_resamples"] == 14).all()  # the flag wins over --set
    assert table["curve_units"].map(len).max() <= 2  # --set reached a setting without a flag
    code, _, err = cli("interactions", str(run_dir), "--set", "interactions_n=4", "--set", "interactions_layers=[1]",
                       "--json")
    assert code == 0, err
    assert pd.read_parquet(run_dir / "shapley.parquet")["layer"].unique().tolist() == [1]
