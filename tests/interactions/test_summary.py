"""Summaries of the interaction tables against hand-computed values on planted tables."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from moeaudit.audit import AuditSettings, audit
from moeaudit.interactions import interaction_matrix, interaction_summary, set_summary, shapley_tests
from moeaudit.interactions.summary import set_layer_table


def planted_pairs_and_shapley():
    # layer 0: two tokens, k = 2 (one pair each); layer 1: one token, k = 3 (three pairs)
    pairs = pd.DataFrame({
        "layer": [0, 0, 1, 1, 1], "seq": [0, 0, 0, 0, 0], "pos": [0, 1, 0, 0, 0],
        "expert_a": [1, 1, 0, 0, 2], "expert_b": [2, 3, 2, 3, 3],
        "interaction": [0.5, -0.2, 1e-7, 0.3, -0.4],
    })
    shapley = pd.DataFrame({
        "layer": [0, 0, 0, 0, 1, 1, 1], "seq": [0] * 7, "pos": [0, 0, 1, 1, 0, 0, 0],
        "expert": [1, 2, 1, 3, 2, 0, 3], "gate_rank": [0, 1, 0, 1, 0, 1, 2],
        "delta_nll_single": [0.1, 0.2, 0.4, 0.3, 0.5, 0.1, 0.2],
        "shapley": [0.35, 0.45, 0.3, 0.2, -0.6, 0.3, 0.5],
        "delta_nll_all": [0.8, 0.8, 0.5, 0.5, 0.2, 0.2, 0.2],
        "n_players": [2, 2, 2, 2, 3, 3, 3], "estimate": [False] * 6 + [True],
    })
    return pairs, shapley


def test_interaction_summary_by_hand():
    pairs, shapley = planted_pairs_and_shapley()
    summary = interaction_summary(pairs, shapley).set_index("layer")
    zero, one = summary.loc[0], summary.loc[1]
    assert zero["tokens"] == 2 and zero["k"] == 2 and zero["pairs"] == 2
    assert zero["mean_interaction"] == pytest.approx(0.15)
    assert zero["share_positive"] == 0.5 and zero["share_negative"] == 0.5
    assert zero["mean_delta_all"] == pytest.approx(0.65)
    assert zero["mean_sum_single"] == pytest.approx((0.3 + 0.7) / 2)
    assert zero["excess_all"] == pytest.approx(0.65 - 0.5)
    assert zero["top_gate_share"] == pytest.approx((0.35 + 0.3) / (0.35 + 0.45 + 0.3 + 0.2))
    assert not zero["estimated"]
    # layer 1: the 1e-7 interaction is additive (inside the tolerance); |φ| shares never leave [0, 1]
    assert one["share_positive"] == pytest.approx(1 / 3) and one["share_negative"] == pytest.approx(1 / 3)
    assert one["top_gate_share"] == pytest.approx(0.6 / 1.4)
    assert one["estimated"]
    assert one["spearman_single_shapley"] == pytest.approx(-0.5)


def test_interaction_matrix_is_the_symmetric_mean_over_co_active_tokens():
    pairs, _ = planted_pairs_and_shapley()
    extra = pd.DataFrame({"layer": [0], "seq": [1], "pos": [0], "expert_a": [1], "expert_b": [2],
                          "interaction": [0.1]})
    mean, count = interaction_matrix(pd.concat([pairs, extra]), 0, 4)
    assert mean[1, 2] == mean[2, 1] == pytest.approx(0.3) and count[1, 2] == 2
    assert mean[1, 3] == pytest.approx(-0.2) and count[3, 1] == 1
    assert np.isnan(mean[0, 1]) and count[0, 1] == 0 and np.isnan(mean[0, 0])


def test_set_summary_pools_random_seeds_per_layer():
    rows = []
    for layer, base in ((0, 1.0), (1, 0.1)):
        for seed in range(20):  # random: mean joint = base + seed / 100 at each layer
            for pos in range(2):
                rows.append(dict(criterion="random", ratio=0.5, seed=seed, layer=layer, seq=0, pos=pos, kind="zero",
                                 n_removed=pos, delta_nll_joint=(base + seed / 100) * 2 * pos,
                                 delta_nll_sum=base * 2 * pos))
        for pos in range(2):
            rows.append(dict(criterion="freq", ratio=0.5, seed=None, layer=layer, seq=0, pos=pos, kind="zero",
                             n_removed=2 * pos, delta_nll_joint=4.0 * pos * base, delta_nll_sum=3.0 * pos * base))
    summary = set_summary(pd.DataFrame(rows)).set_index(["criterion", "layer"])
    random0, random1 = summary.loc[("random", 0)], summary.loc[("random", 1)]
    assert random0["seeds"] == 20 and random0["tokens"] == 2 and random0["share_hit"] == 0.5
    means0 = 1.0 + np.arange(20) / 100
    assert random0["mean_joint"] == pytest.approx(means0.mean())
    assert random0["joint_p05"] == pytest.approx(np.quantile(means0, 0.05))
    assert random1["joint_p95"] == pytest.approx(np.quantile(0.1 + np.arange(20) / 100, 0.95))
    assert random0["excess"] == pytest.approx(means0.mean() - 1.0)
    freq = summary.loc[("freq", 1)]
    assert freq["seeds"] == 1 and np.isnan(freq["joint_p05"]) and freq["mean_removed"] == 1.0
    assert freq["mean_joint"] == pytest.approx(0.2) and freq["excess"] == pytest.approx(0.05)
    table = set_layer_table(summary.reset_index()).set_index("layer")
    assert table.loc[0, "joint_min"] == table.loc[0, "joint_max"] == pytest.approx(2.0)
    assert table.loc[0, "inside_random"] == 0  # 2.0 is far above the random band 1.00-1.19
    assert table.loc[1, "inside_random"] == 1  # 0.2 lies in 0.10-0.29
    assert table.loc[1, "random_p05"] == pytest.approx(np.quantile(0.1 + np.arange(20) / 100, 0.05))


def test_shapley_tests_run_the_audit_on_each_outcome_as_its_own_family():
    rng = np.random.default_rng(0)
    rows = []
    for pos in range(60):
        experts = rng.choice(8, size=3, replace=False)
        for rank, expert in enumerate(experts):
            single = rng.normal()
            rows.append(dict(layer=0, seq=pos % 30, pos=pos, expert=int(expert), gate_rank=rank,
                             raw_gate=float(rng.uniform()), delta_nll_single=single,
                             shapley=float(expert) + 0.1 * rng.normal()))  # φ follows the expert id
    shapley = pd.DataFrame(rows)
    metrics = pd.DataFrame({"layer": 0, "expert": range(8), "planted": np.arange(8.0), "noise": rng.normal(size=8)})
    settings = AuditSettings(metrics=["planted", "noise"], designs=("paired",), n=10, seed=0)
    tests = shapley_tests(shapley, metrics, settings)
    assert set(tests["outcome"]) == {"single", "shapley"}
    assert set(tests["design"]) == {"paired", "expert_level"}
    cell = tests.set_index(["outcome", "design", "metric"])
    assert cell.loc[("shapley", "paired", "planted"), "verdict"] == "significant"
    assert cell.loc[("shapley", "paired", "planted"), "n"] == 60  # every token, not settings.n
    assert cell.loc[("single", "paired", "planted"), "verdict"] == "not significant"
    # the same numbers as the audit itself on that outcome (its own family: 2 metrics x 1 layer per design)
    direct = audit(shapley.assign(delta_nll=shapley["shapley"]), metrics,
                   AuditSettings(metrics=["planted", "noise"], designs=("paired", "expert_level"), n=None, seed=0,
                                 mixed="none")).tests
    mine = tests[tests["outcome"] == "shapley"].reset_index(drop=True)
    assert np.allclose(mine["p_adjusted"], direct["p_adjusted"]) and np.allclose(mine["effect"], direct["effect"])
