"""The engmann2026 preset: the paper's layers and protocol, and `moeaudit run --preset` end to end."""

from __future__ import annotations

import json
import sys

import pandas as pd
import pytest

from moeaudit.presets import evenly_spaced, preset_values


def test_paper_layers_per_checkpoint():
    assert preset_values("engmann2026", "allenai/OLMoE-1B-7B-0924", list(range(16)))["layers"] == [0, 4, 7, 11, 15]
    assert preset_values("engmann2026", "Qwen/Qwen1.5-MoE-A2.7B", list(range(24)))["layers"] == [0, 6, 12, 18, 23]
    deepseek = preset_values("engmann2026", "deepseek-ai/DeepSeek-V2-Lite", list(range(1, 27)))
    assert deepseek["layers"] == [1, 7, 13, 20, 26] and deepseek["dtype"] == "float16"
    assert evenly_spaced(list(range(1, 27))) == [1, 7, 13, 20, 26]  # the paper chose the same for DeepSeek
    assert evenly_spaced([0, 1, 2]) == [0, 1, 2]
    values = preset_values("engmann2026", "some/other-moe", list(range(48)))
    assert values["layers"] == [0, 12, 24, 35, 47] and "dtype" not in values
    assert (values["audit_n"], values["seed"], values["scope"], values["kind"]) == (200, 42, "sequence", "zero")
    assert values["audit_metrics"] == ["frequency", "ean_mean", "mean_gate_active", "act_std"]
    from moeaudit.errors import InvalidParameterError

    with pytest.raises(InvalidParameterError, match="`preset` must be one of engmann2026"):
        preset_values("paper", "x", [0])


@pytest.mark.slow
def test_run_with_preset_end_to_end(tmp_path, monkeypatch, capsys):
    from transformers import AutoTokenizer

    from moeaudit.cli import main
    from moeaudit.models import builtin
    from moeaudit.models.testing import tiny_model

    model_dir = tmp_path / "model"
    tiny_model("olmoe", seed=1, weight_std=0.05, vocab_size=8192).save_pretrained(model_dir)
    AutoTokenizer.from_pretrained(builtin.tokenizer_path()).save_pretrained(model_dir)
    texts = [f"Text number {i}: " + "the quick brown fox jumps over the lazy dog. " * (2 + i % 4) for i in range(120)]
    texts[3] = "too short"  # <= 50 characters: dropped, as in the paper
    pd.DataFrame({"text": texts}).to_json(tmp_path / "corpus.jsonl", orient="records", lines=True)
    run_dir = tmp_path / "run"
    monkeypatch.setattr(sys, "argv", ["moeaudit", "run", "--preset", "engmann2026", "--model", str(model_dir),
                                      "--corpus", str(tmp_path / "corpus.jsonl"), "--out", str(run_dir), "--quiet"])
    from tests.cli.conftest import restored_logging

    with restored_logging():
        try:
            main()
        except SystemExit as exit_:
            assert not exit_.code, capsys.readouterr().err
    manifest = json.loads((run_dir / "manifest.json").read_text())
    config = manifest["config"]
    assert config["preset"] == "engmann2026" and config["observe"]["layers"] == [0, 1, 2] and config["observe"]["in_sample"]
    tokens = pd.read_parquet(run_dir / "tokens.parquet")
    assert tokens.seq.nunique() == 100  # first 100 texts longer than 50 characters, one window each
    assert tokens.groupby("seq").pos.min().eq(0).all()
    effects = pd.read_parquet(run_dir / "effects.parquet")
    assert set(effects.scope) == {"sequence"} and set(effects.selection) == {"sample"}
    assert effects.groupby("layer")[["seq", "pos"]].apply(lambda f: len(f.drop_duplicates())).eq(200).all()
    tests = pd.read_parquet(run_dir / "tests.parquet")
    paired = tests[tests.design == "paired"]
    assert len(paired) == 12 and set(paired.metric) == {"frequency", "ean_mean", "mean_gate_active", "act_std"}
    assert paired.n.max() <= 200
    assert manifest["stages"]["metrics"]["split"] == "in_sample"
    assert "token_gate" in capsys.readouterr().out


def test_departing_from_records_every_changed_setting_once():
    from moeaudit.config import AuditConfig, build_config

    preset = build_config(preset_values("engmann2026", "some/other-moe", list(range(8))))
    assert preset.departing_from(preset).preset_overrides == {}
    changed = preset.model_copy(update={"intervene": preset.intervene.model_copy(update={"kind": "reroute"}),
                                        "execution": preset.execution.model_copy(update={"batch_size": 1})})
    first = changed.departing_from(preset)
    assert first.preset_overrides == {"kind": {"preset": "zero", "used": "reroute"}}  # execution is not a departure
    # a later change keeps the preset's value; going back to it removes the override
    again = first.model_copy(update={"intervene": first.intervene.model_copy(update={"kind": "renorm"})})
    assert again.departing_from(first).preset_overrides == {"kind": {"preset": "zero", "used": "renorm"}}
    back = first.model_copy(update={"intervene": first.intervene.model_copy(update={"kind": "zero"})})
    assert back.departing_from(first).preset_overrides == {}
    assert AuditConfig(kind="reroute").departing_from(AuditConfig()).preset_overrides == {}  # no preset: no record
    # derived from the other settings: not part of the fingerprint
    assert "preset_overrides" not in first.fingerprint_fields()


def test_preset_flags_and_file_are_recorded_as_departures(tmp_path):
    from moeaudit.cli.stages import preset_config
    from moeaudit.models.testing import tiny_model
    from moeaudit.report.html import _protocol_text

    model_dir = tmp_path / "model"
    tiny_model("olmoe", seed=1).save_pretrained(model_dir)
    toml = tmp_path / "settings.toml"
    toml.write_text("[audit]\nalpha = 0.01\n")
    flags = dict(model=str(model_dir), kind="reroute", batch_size=2)
    config = preset_config("engmann2026", flags, tmp_path / "run", toml)
    assert config.preset == "engmann2026" and config.kind == "reroute" and config.alpha == 0.01
    assert config.preset_overrides == {"alpha": {"preset": 0.05, "used": 0.01},
                                       "kind": {"preset": "zero", "used": "reroute"}}
    text = _protocol_text(config.flat())
    assert text.startswith("preset engmann2026, departing from it in 2 setting(s)") and "kind = 'reroute'" in text
    plain = preset_config("engmann2026", dict(model=str(model_dir)), tmp_path / "run", None)
    assert plain.preset_overrides == {} and _protocol_text(plain.flat()) == "preset engmann2026, followed exactly"


def test_paper_code_preset_loads_validates_and_differs_from_engmann2026():
    from moeaudit.config import build_config
    from moeaudit.errors import InvalidParameterError
    from moeaudit.metrics import list_metrics
    from moeaudit.metrics.registry import check_audit_metrics
    from moeaudit.rundir import config_fingerprint

    olmoe = "allenai/OLMoE-1B-7B-0924"
    code = build_config(preset_values("engmann2026-code", olmoe, list(range(16))))
    corrected = build_config(preset_values("engmann2026", olmoe, list(range(16))))
    assert code.audit_metrics == ["paper_code_utilization", "ean_mean", "paper_code_mean_weight_active", "act_std"]
    assert code.router_logits_layers == "all" and corrected.router_logits_layers is None
    check_audit_metrics(code.audit_metrics)  # every metric is registered
    assert set(code.audit_metrics) <= set(list_metrics())
    assert config_fingerprint(code) != config_fingerprint(corrected)
    differing = {k for k, v in code.fingerprint_fields().items() if corrected.fingerprint_fields()[k] != v}
    assert differing == {"preset", "audit_metrics", "router_logits_layers", "dz_ddof",
                         "position_sets", "paper_code_padding"}  # the rest is the same protocol
    assert code.audit.dz_ddof == 0 and corrected.audit.dz_ddof == 1
    # DeepSeek's script counted routed tokens and averaged top-k weights: moeaudit's own columns
    deepseek = preset_values("engmann2026-code", "deepseek-ai/DeepSeek-V2-Lite", list(range(1, 27)))
    assert deepseek["audit_metrics"] == ["frequency", "ean_mean", "mean_gate_active", "act_std"]
    assert preset_values("engmann2026-code", "some/other-moe", [0, 1])["audit_metrics"] == code.audit_metrics
    with pytest.raises(InvalidParameterError, match="`preset` must be engmann2026 for Qwen/Qwen1.5-MoE-A2.7B"):
        preset_values("engmann2026-code", "Qwen/Qwen1.5-MoE-A2.7B", list(range(24)))
    with pytest.raises(InvalidParameterError, match="one of engmann2026, engmann2026-code"):
        preset_values("engmann2026-kode", olmoe, [0])
    with pytest.raises(InvalidParameterError, match="`router_logits_layers` must be"):
        build_config(dict(preset_values("engmann2026-code", olmoe, list(range(16))), router_logits_layers="some"))
