"""The three answers at the top of the report, against small planted tables with a known outcome."""

from __future__ import annotations

import pandas as pd
import pytest

from moeaudit.report import answers
from moeaudit.report._load import RunData
from tests.report.conftest import _pruning as synthetic_pruning, make_run

NAN = float("nan")


def _tests(rows) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=["design", "metric", "layer", "effect", "ci_low", "ci_high", "verdict"])


# ---------------------------------------------------------------------------------------------- 1. metrics
def test_metric_answer_names_the_significant_cells():
    tests = _tests([
        ("paired", "reap", 0, 0.42, 0.20, 0.64, "significant"),
        ("paired", "reap", 1, 0.05, -0.1, 0.2, "not significant"),
        ("paired", "frequency", 0, -0.31, -0.5, -0.1, "significant"),
        ("paired", "frequency", 1, NAN, NAN, NAN, "untestable"),
        ("routing_weight", "token_gate", 0, 0.9, 0.8, 1.0, "significant"),  # another design: not counted
    ])
    answer = answers.metric_answer(tests, correction="bonferroni", alpha=0.05)
    assert answer.verdict == "yes"
    assert answer.text.startswith("Yes, in 2 of 3 tested metric × layer cells (bonferroni-corrected dual test at "
                                  "α = 0.05) (1 more cell untestable")
    assert "2 metrics (reap and frequency) at layer 0" in answer.text
    assert "1 with the metric's favourite mattering more, 1 reversed" in answer.text
    assert "reap at layer 0 (d_z = +0.42 [+0.20, +0.64]); frequency at layer 0 (d_z = -0.31" in answer.text


def test_metric_answer_no_gives_the_largest_effect():
    tests = _tests([("paired", "reap", 0, 0.12, -0.02, 0.26, "not significant"),
                    ("paired", "frequency", 3, -0.25, -0.45, -0.05, "not significant")])
    answer = answers.metric_answer(tests)
    assert answer.verdict == "no"
    assert answer.text.startswith("No: none of the 2 tested metric × layer cells")
    assert "d_z = -0.25 [-0.45, -0.05] (frequency, layer 3)" in answer.text


def test_metric_answer_without_tests():
    answer = answers.metric_answer(None)
    assert answer.verdict == "unknown" and "`tests.parquet`" in answer.text and "`moeaudit audit RUN_DIR`" in answer.text
    assert answers.metric_answer(_tests([("random_pair", "random", 0, 0.1, 0, 0.2, "ns")])).verdict == "unknown"


# ---------------------------------------------------------------------------------------------- 2. redundancy
def _progressive(means: dict[int, list[float]], cliffs: dict[int, int | None]) -> pd.DataFrame:
    rows = []
    for layer, values in means.items():
        for j, mean in enumerate(values, start=1):
            rows.append({"layer": layer, "j": j, "n": 100, "mean": mean, "median": mean / 2, "p95": mean * 4,
                         "cliff": cliffs.get(layer) if cliffs.get(layer) is not None else pd.NA})
    return pd.DataFrame(rows)


def test_redundancy_answer_groups_redundant_layers():
    table = _progressive({0: [0.5, 0.9, 1.3], 1: [0.01, 0.02, 0.031], 2: [0.02, 0.04, 0.055],
                          3: [0.03, 0.05, 0.05], 4: [0.08, 0.2, 0.3]}, {0: 1, 4: 2})
    answer = answers.redundancy_answer(table, {layer: 4 for layer in range(5)})
    assert answer.verdict == "yes"
    assert answer.text.startswith("Removing 3 of 4 active experts at layers 1–3 costs < 0.06 nats")
    assert "Not redundant: layer 0 at j = 1, layer 4 at j = 2" in answer.text


def test_redundancy_answer_none_redundant_and_missing():
    table = _progressive({0: [0.5, 0.9], 1: [0.2, 0.4]}, {0: 1, 1: 1})
    answer = answers.redundancy_answer(table, lambda layer: 3)
    assert answer.verdict == "no" and answer.text.startswith("None: every layer's mean loss passes 0.1 nats")
    for missing in (None, pd.DataFrame()):
        answer = answers.redundancy_answer(missing, {})
        assert answer.verdict == "unknown" and "no progressive ablation" in answer.text


def test_progressive_is_computed_from_the_effects_rows(synthetic_run):
    # conftest: progressive rows (j = 2) with ΔNLL 0.5 in both layers; redundancy.parquet says otherwise (j = 1)
    table = RunData(synthetic_run).progressive
    assert table["j"].tolist() == [2, 2] and table["mean"].tolist() == pytest.approx([0.5, 0.5])
    answer = answers.redundancy_answer(table, {0: 2, 1: 2})
    assert answer.verdict == "no" and answer.text.startswith("None: every layer's mean loss passes 0.1 nats")


def test_progressive_falls_back_to_the_redundancy_table(tmp_path):
    run = make_run(tmp_path / "no-effects", effects=False)
    table = RunData(run).progressive
    assert table["j"].tolist() == [1, 1]
    assert answers.redundancy_answer(table, {0: 2, 1: 2}).text.startswith(
        "Removing 1 of 2 active experts at layer 1 costs < 0.04 nats")


@pytest.mark.parametrize(("value", "bound"), [(0.055, 0.06), (0.04, 0.05), (0.0049, 0.005), (1.3, 2.0)])
def test_nice_ceiling(value, bound):
    assert answers.nice_ceiling(value) == pytest.approx(bound)


# ---------------------------------------------------------------------------------------------- 3. pruning
def test_pruning_answer_planted():
    # conftest: random = 20 (1 + r) + 0.5 seed (5 seeds); reap 20 (1 + 0.8 r) is below the band, frequency
    # 20 (1 + 1.3 r) above it
    answer = answers.pruning_answer(synthetic_pruning())
    assert answer.verdict == "yes"
    assert ("With 25% of routed experts pruned per layer, 1 of 2 metric criteria (reap) fall below the random band "
            "(5–95% of 5 random prunings). The best, reap, reaches held-out perplexity 24 against the random median "
            "26 (-2, -7.7%; better than all 5 random draws).") in answer.text
    assert "With 50% of routed experts pruned per layer, 1 of 2" in answer.text


def test_pruning_answer_no_criterion_beats_random():
    frame = synthetic_pruning()
    frame = frame[frame["criterion"] != "reap"]
    answer = answers.pruning_answer(frame)
    assert answer.verdict == "no"
    assert "none of the 1 metric criteria falls below the random band" in answer.text
    assert "frequency, reaches held-out perplexity 26.5 against the random median 26 (+0.5, +1.9%; percentile 70" \
        in answer.text


def test_pruning_answer_sets_oracles_apart():
    frame = synthetic_pruning()
    oracle = frame[frame["criterion"] == "reap"].assign(criterion="oracle_delta_nll", heldout_ppl=1.0)
    answer = answers.pruning_answer(pd.concat([frame, oracle], ignore_index=True))
    assert "1 of 2 metric criteria (reap)" in answer.text
    assert "the best oracle (ranking by measured removal effects), oracle_delta_nll, reaches 1 (-25)" in answer.text


def test_pruning_answer_missing():
    answer = answers.pruning_answer(None)
    assert answer.verdict == "unknown" and "`moeaudit prune RUN_DIR` adds it" in answer.text
    no_random = synthetic_pruning()
    no_random = no_random[no_random["criterion"] != "random"]
    assert "no random pruning" in answers.pruning_answer(no_random).text


# ---------------------------------------------------------------------------------------------- several runs
def test_setting_differences_name_the_settings():
    same = {"a": {"model": "x", "alpha": 0.05, "kind": "zero"}, "b": {"model": "y", "alpha": 0.05, "kind": "zero"}}
    assert answers.setting_differences(same) == {}
    differ = {"a": {"model": "x", "alpha": 0.05, "kind": "zero"}, "b": {"model": "y", "alpha": 0.01},
              "c": {"model": "z", "alpha": 0.05, "kind": "zero"}}
    assert answers.setting_differences(differ) == {"alpha": {"a": 0.05, "b": 0.01, "c": 0.05},
                                                   "kind": {"a": "zero", "b": None, "c": "zero"}}
    assert answers.setting_differences({"a": {"alpha": 1}}) == {}
