"""Criteria: directions, ordering, seeded random draws, ratio validation, budgets, guard, oracles."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from moeaudit.errors import InvalidParameterError
from moeaudit.models.hooks import Ablation
from moeaudit.prune import (
    DIRECTIONS,
    check_ratio,
    check_ratios,
    criterion_scores,
    drop_count,
    dropped_experts,
    layer_budgets,
    oracle_delta_nll,
    prune_order,
    random_order,
    reconstruction_errors,
    super_experts,
)
from moeaudit.prune.criteria import direction_of

from tests.prune.conftest import make_moe, metrics_table, windows


def test_directions_documented():
    assert DIRECTIONS["aimer"] == "high"  # the AIMER release prunes the highest scores
    assert DIRECTIONS["routing_gini"] == "high" and DIRECTIONS["routing_entropy"] == "low"
    assert all(DIRECTIONS[m] == "low" for m in ("frequency", "reap", "ean_sum", "max_act", "router_row_norm"))
    assert direction_of("my_metric") == "low"
    assert direction_of("frequency", {"frequency": "high"}) == "high"
    with pytest.raises(InvalidParameterError):
        direction_of("frequency", {"frequency": "up"})


def test_prune_order_low_high_nan_ties_and_guard():
    scores = np.array([0.5, np.nan, 0.1, 0.5, 0.9])
    assert prune_order(scores, "low").tolist() == [1, 2, 0, 3, 4]
    assert prune_order(scores, "high").tolist() == [1, 4, 0, 3, 2]
    assert prune_order(scores, "low", protected=[2]).tolist() == [1, 0, 3, 4, 2]


def test_random_order_seeded_reproducible_and_nested():
    a, b = random_order(16, seed=7, layer=3), random_order(16, seed=7, layer=3)
    assert np.array_equal(a, b) and sorted(a.tolist()) == list(range(16))
    assert not np.array_equal(a, random_order(16, seed=8, layer=3))
    assert not np.array_equal(a, random_order(16, seed=7, layer=4))
    guarded = random_order(16, seed=7, layer=3, protected=[0, 5])
    assert guarded[-2:].tolist() == [0, 5]
    scores = pd.DataFrame({"layer": 0, "expert": range(16), "x": 0.0})
    small = dropped_experts(scores, "random", {0: 2}, seed=1)[0]
    large = dropped_experts(scores, "random", {0: 8}, seed=1)[0]
    assert set(small) <= set(large)


@pytest.mark.parametrize("ratio, fragment", [
    (0.0, "in (0, 1)"), (-0.2, "in (0, 1)"), (1.0, "in (0, 1)"), (1.5, "in (0, 1)"), (float("nan"), "in (0, 1)"),
    ("half", "in (0, 1)"), (True, "in (0, 1)"), (0.01, "to drop one of 8"), (0.9, "keeps at least top_k = 2"),
])
def test_bad_ratios_refused_with_one_line(ratio, fragment):
    with pytest.raises(InvalidParameterError) as err:
        check_ratio(ratio, 8, 2, "tiny")
    message = str(err.value)
    assert "\n" not in message and message.startswith("`ratio` must be") and fragment in message
    assert "got" in message


def test_ratio_counts():
    assert [drop_count(r, 32) for r in (0.125, 0.25, 0.5)] == [4, 8, 16]
    assert drop_count(0.125, 60) == 8  # 7.5 rounds up
    assert check_ratio(0.75, 8, 2) == 6
    assert check_ratios([0.25, 0.25, 0.5], {0: 8, 1: 8}, {0: 2, 1: 2}) == (0.25, 0.5)
    with pytest.raises(InvalidParameterError, match="`ratios` must be a non-empty"):
        check_ratios([], {0: 8}, {0: 2})


def test_layer_budgets_uniform_weighted_and_guard():
    e, k = {0: 8, 1: 8, 2: 8}, {0: 2, 1: 2, 2: 2}
    assert layer_budgets(0.25, e, k) == {0: 2, 1: 2, 2: 2}
    weighted = layer_budgets(0.25, e, k, weights={0: 4, 1: 1, 2: 1})
    assert sum(weighted.values()) == 6 and weighted[0] == 4 and weighted[1] == weighted[2] == 1
    with pytest.raises(InvalidParameterError, match="`budget_weights` must be weights that can place 12"):
        layer_budgets(0.5, e, k, weights={0: 1})  # 12 to place, zero-weight layers take none, layer 0 holds 6
    with pytest.raises(InvalidParameterError, match="budget_weights"):
        layer_budgets(0.25, e, k, weights={0: -1})
    with pytest.raises(InvalidParameterError, match="guard"):
        layer_budgets(0.5, e, k, protected={0: range(5)})


def test_weighted_budget_spills_over_caps():
    budgets = layer_budgets(0.5, {0: 8, 1: 8, 2: 8}, {0: 2, 1: 2, 2: 2}, weights={0: 10, 1: 1, 2: 1})
    assert budgets[0] == 6 and sum(budgets.values()) == 12


def test_super_expert_guard():
    metrics = pd.DataFrame({"layer": [0] * 4 + [1] * 4, "expert": list(range(4)) * 2,
                            "max_act": [1, 50, 2, 3, 9, 1, 1, 8], "frequency": [0.0, 0.0, 1, 1, 0, 0, 1, 1]})
    assert super_experts(metrics, 1) == {0: [1], 1: [0]}
    assert super_experts(metrics, 0) == {}
    protected = super_experts(metrics, 1)
    dropped = dropped_experts(criterion_scores(metrics), "frequency", {0: 2, 1: 2}, protected=protected)
    assert dropped == {0: [0, 2], 1: [1, 2]}


def test_metric_criterion_drops_lowest():
    moe = make_moe()
    planted = np.tile(np.arange(8, dtype=float), (len(moe.layers), 1))
    metrics = metrics_table(moe, {"planted": planted})
    scores = criterion_scores(metrics)
    layers = [l.layer for l in moe.layers]
    assert dropped_experts(scores, "planted", {l: 3 for l in layers}) == {l: [0, 1, 2] for l in layers}
    assert dropped_experts(scores, "planted", {l: 3 for l in layers}, directions={"planted": "high"}) == {
        l: [5, 6, 7] for l in layers}
    with pytest.raises(InvalidParameterError, match="`criterion` must be one of random"):
        dropped_experts(scores, "nope", {0: 1})


def test_oracle_delta_nll_hand_worked():
    # layer 0: positions (0,0), (0,1), (1,0); expert 2 active at two of them, expert 5 at one
    effects = pd.DataFrame({
        "layer": [0, 0, 0, 0, 0], "seq": [0, 0, 0, 1, 1], "pos": [0, 0, 1, 0, 0], "expert": [2, 5, 2, 1, 2],
        "kind": "zero", "scope": "token", "delta_nll": [0.3, 0.6, 0.9, 0.2, 0.0],
        "estimate": False, "shared": False, "j": 1, "selection": "census"})
    extra = effects.iloc[:1].assign(selection="progressive", delta_nll=100.0)
    scores, info = oracle_delta_nll(pd.concat([effects, extra]), {0: 6})
    assert info["scope"] == "token" and info["kind"] == "zero" and info["positions"] == {0: 3}
    np.testing.assert_allclose(scores["oracle_delta_nll"], [0, 0.2 / 3, 1.2 / 3, 0, 0, 0.6 / 3])
    seq = effects.assign(scope="sequence", delta_nll=effects.delta_nll * 2)
    scores, info = oracle_delta_nll(pd.concat([effects, seq]), {0: 6})
    assert info["scope"] == "sequence"
    np.testing.assert_allclose(scores["oracle_delta_nll"].iloc[2], 2.4 / 3)


def test_reconstruction_errors_match_direct_computation():
    moe = make_moe("qwen2_moe")
    ids = windows(3, 10)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    table = reconstruction_errors(moe, ids, mask, batch_size=2)
    layer = moe.layers[0]
    assert set(table.layer) == {l.layer for l in moe.layers} and (table.oracle_reconstruction >= 0).all()
    # direct: the whole model with expert 3 rerouted away; compare layer outputs at real tokens
    with torch.no_grad():
        with moe.capture([layer.layer], keep_outputs=True) as clean:
            moe.model(input_ids=ids, attention_mask=mask)
        with moe.intervene([Ablation(layer.layer, experts=[3], kind="reroute")], capture=[layer.layer],
                           keep_outputs=True) as pruned:
            moe.model(input_ids=ids, attention_mask=mask)
    diff = (clean[layer.layer].moe_output - pruned[layer.layer].moe_output)[mask.bool()]  # [B, T, H] at real tokens
    expected = float(torch.sqrt((diff.double() ** 2).sum(-1).mean()))
    got = table[(table.layer == layer.layer) & (table.expert == 3)].oracle_reconstruction.item()
    assert got == pytest.approx(expected, rel=1e-4)


def test_a_metric_that_is_nan_throughout_is_no_criterion():
    from moeaudit.prune.criteria import metric_criteria

    table = pd.DataFrame({"layer": [0, 0, 0], "expert": [0, 1, 2], "frequency": [0.2, 0.5, 0.3],
                          "paper_code_utilization": [np.nan] * 3, "partly": [1.0, np.nan, 2.0]})
    assert metric_criteria(table) == ["frequency", "partly"]
