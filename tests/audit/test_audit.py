"""Audit designs on effects tables with known answers: planted truth, nulls, scipy equality, determinism."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps

from moeaudit.audit import AuditSettings, audit, high_low, paper_table

E, K = 8, 4
# A ranking of the experts whose highest-vs-lowest choice has expected v-difference exactly 0 over all
# C(8, 4) active sets (found by enumeration): the "unrelated" metric carries no causal signal by construction.
NULL_RANKING = np.array([0, 4, 5, 7, 6, 2, 3, 1], dtype=float)


def synthetic(n_tokens=300, layers=(0, 1), seed=0, planted_scale=0.2, gate_scale=0.0, noise=0.05):
    """Effects where ΔNLL = planted_scale·v_e (+ gate_scale·gate) + noise; `planted` metric = v_e.

    Tokens are independent draws, 50 to a window: the tests of the independent-token analysis say
    ``cluster="none"`` (with "auto" the 6 windows would be the units).
    """
    rng = np.random.default_rng(seed)
    rows, metric_rows = [], []
    for layer in layers:
        order = rng.permutation(E)  # expert order[i] has planted value i / (E - 1)
        v = np.empty(E)
        v[order] = np.linspace(0, 1, E)
        unrelated = np.empty(E)
        unrelated[order] = NULL_RANKING
        for e in range(E):
            metric_rows.append(dict(layer=layer, expert=e, planted=v[e], unrelated=unrelated[e]))
        for t in range(n_tokens):
            active = rng.choice(E, size=K, replace=False)
            gates = np.sort(rng.dirichlet(np.ones(K)))[::-1]
            for rank, (e, g) in enumerate(zip(active, gates)):
                rows.append(dict(layer=layer, seq=t // 50, pos=t % 50, expert=int(e), raw_gate=g, gate_rank=rank,
                                 delta_nll=planted_scale * v[e] + gate_scale * g + rng.normal(0, noise)))
    return pd.DataFrame(rows), pd.DataFrame(metric_rows)


def test_planted_metric_found_unrelated_not():
    effects, metrics = synthetic()
    tests = audit(effects, metrics, AuditSettings(n=200, n_permutations=999, cluster="none")).tests
    paired = tests[tests.design == "paired"].set_index(["metric", "layer"])
    for layer in (0, 1):
        assert paired.loc[("planted", layer), "verdict"] == "significant"
        assert paired.loc[("planted", layer), "effect"] > 1.0
        assert paired.loc[("unrelated", layer), "verdict"] != "significant" or abs(
            paired.loc[("unrelated", layer), "effect"]) < paired.loc[("planted", layer), "effect"]
    within = tests[tests.design == "within_token"].set_index(["metric", "layer"])
    assert within.loc[("planted", 0), "effect"] > 0.5 and within.loc[("planted", 0), "verdict"] == "significant"
    level = tests[tests.design == "expert_level"].set_index(["metric", "layer"])
    assert level.loc[("planted", 0), "effect"] > 0.9
    rand = tests[tests.design == "random_pair"]
    assert (rand.verdict != "significant").all()
    assert set(tests.columns) >= {"layer", "metric", "design", "n", "effect", "ci_low", "ci_high", "p_t",
                                  "p_wilcoxon", "p_adjusted", "verdict"}


def test_routing_weight_control_detects_gate_effect():
    effects, metrics = synthetic(planted_scale=0.0, gate_scale=0.5)
    tests = audit(effects, metrics, AuditSettings(designs=("routing_weight", "paired"), cluster="none")).tests
    control = tests[tests.design == "routing_weight"]
    assert (control.verdict == "significant").all() and (control.effect > 1).all()
    assert (tests[tests.design == "paired"].verdict != "significant").all()


def test_paired_equals_hand_computation_and_scipy():
    effects, metrics = synthetic(n_tokens=60, layers=(0,), seed=3)
    tests = audit(effects, metrics, AuditSettings(n=None, designs=("paired",), metrics=["unrelated"], cluster="none")).tests
    row = tests.iloc[0]
    frame = effects.join(metrics.set_index("expert")[["unrelated"]], on="expert")
    diffs = []
    for _, token in frame.groupby(["seq", "pos"]):
        hi = token.loc[token.unrelated.idxmax(), "delta_nll"]
        lo = token.loc[token.unrelated.idxmin(), "delta_nll"]
        diffs.append(hi - lo)
    diffs = np.array(diffs)
    assert row.n == len(diffs) == 60
    assert row.effect == pytest.approx(diffs.mean() / diffs.std(ddof=1), rel=1e-10)
    assert row.p_t == pytest.approx(sps.ttest_1samp(diffs, 0).pvalue, rel=1e-8)
    assert row.p_wilcoxon == pytest.approx(sps.wilcoxon(diffs).pvalue, rel=1e-8)


def test_ties_are_untestable_tokens():
    frame = pd.DataFrame(dict(seq=[0, 0, 1, 1], pos=[0, 0, 0, 0], expert=[1, 2, 1, 3], delta_nll=[0.1, 0.2, 0.3, 0.4],
                              score=[1.0, 1.0, 1.0, 2.0]))
    pairs, dropped = high_low(frame, "score")
    assert dropped == 1 and len(pairs) == 1
    assert pairs.iloc[0].high == 0.4 and pairs.iloc[0].high_expert == 3


def test_deterministic_for_seed():
    effects, metrics = synthetic(n_tokens=120)
    settings = AuditSettings(n=50, n_permutations=199, seed=7)
    a, b = audit(effects, metrics, settings).tests, audit(effects, metrics, settings).tests
    pd.testing.assert_frame_equal(a, b)
    c = audit(effects, metrics, AuditSettings(n=50, n_permutations=199, seed=8)).tests
    assert not a.equals(c)


@pytest.mark.slow
def test_false_positive_rate_under_null():
    """Null ΔNLL: over 200 seeded replicates the single-cell dual test rejects at most at ~alpha."""
    rejections = 0
    replicates = 200
    for seed in range(replicates):
        effects, metrics = synthetic(n_tokens=40, layers=(0,), seed=1000 + seed, planted_scale=0.0)
        tests = audit(effects, metrics, AuditSettings(n=None, designs=("paired",), metrics=["unrelated"], cluster="none")).tests
        rejections += int(tests.iloc[0].verdict == "significant")
    upper = sps.binom.ppf(0.995, replicates, 0.05)
    assert rejections <= upper


def test_paper_table_and_bad_settings():
    effects, metrics = synthetic(n_tokens=80)
    tests = audit(effects, metrics, AuditSettings(designs=("paired",), cluster="none")).tests
    table = paper_table(tests)
    assert list(table.columns) == ["metric", "layer 0", "layer 1"]
    assert table.set_index("metric").loc["planted", "layer 0"].endswith("*")
    from moeaudit.errors import InvalidParameterError

    with pytest.raises(InvalidParameterError, match="`designs` must be a subset of"):
        AuditSettings(designs=("nope",))
    with pytest.raises(InvalidParameterError, match="`metrics` must be columns of expert_metrics"):
        audit(effects, metrics, AuditSettings(metrics=["missing"]))
