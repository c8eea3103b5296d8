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
