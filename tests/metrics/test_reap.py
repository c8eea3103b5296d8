"""REAP: mean over active tokens of gate × act_norm, with the three gate choices."""

from __future__ import annotations

import numpy as np
import pytest
from numpy.testing import assert_allclose

from moeaudit.errors import InvalidParameterError
from moeaudit.metrics import compute_expert_metrics
from moeaudit.metrics.reap import reap

# expert 0: rows (gate, norm) at tokens 0, 1, 2 with norms 2, 4, 6; expert 1: norms 4, 2; expert 2: norm 1
WANT = {
    "raw": [(0.5 * 2 + 0.4 * 4 + 0.2 * 6) / 3, (0.3 * 4 + 0.6 * 2) / 2, 0.4 * 1, np.nan],
    "renorm": [(0.625 * 2 + 0.5 * 4 + 0.25 * 6) / 3, (0.375 * 4 + 0.75 * 2) / 2, 0.5 * 1, np.nan],
    "combine": [(1.25 * 2 + 1.0 * 4 + 0.5 * 6) / 3, (0.75 * 4 + 1.5 * 2) / 2, 1.0 * 1, np.nan],
}


def test_reap_function(routing):
    assert_allclose(reap(routing.expert, routing.raw_gate, routing.act_norm, num_experts=4), WANT["raw"])


@pytest.mark.parametrize("gate", ["raw", "renorm", "combine"])
def test_reap_gate_switch(routing, gate):
    table = compute_expert_metrics(routing, {0: 4}, metrics=["reap"], reap_gate=gate)
    assert_allclose(table.reap, WANT[gate])
    assert table.attrs["reap_gate"] == gate


def test_reap_gates_differ_and_default_is_combine(routing):
    assert len({tuple(np.round(v[:3], 9)) for v in WANT.values()}) == 3
    assert_allclose(compute_expert_metrics(routing, {0: 4}).reap, WANT["combine"])


def test_renorm_gate_is_derived_when_absent(routing):
    table = compute_expert_metrics(routing.drop(columns="renorm_gate"), {0: 4}, metrics=["reap"], reap_gate="renorm")
    assert_allclose(table.reap, WANT["renorm"])


def test_bad_reap_gate_is_refused(routing):
    with pytest.raises(InvalidParameterError, match="`reap_gate` must be one of"):
        compute_expert_metrics(routing, {0: 4}, reap_gate="softmax")


def test_reap_code_follows_norm_topk_prob_as_reaps_released_code():
    from types import SimpleNamespace

    from moeaudit.errors import InvalidParameterError
    from moeaudit.metrics.reap import resolve_reap_gate

    qwen3 = SimpleNamespace(norm_topk_prob=True)
    mixtral = SimpleNamespace()  # renormalises in its router, but has no norm_topk_prob field
    assert resolve_reap_gate("reap-code", qwen3) == "renorm"
    assert resolve_reap_gate("reap-code", mixtral) == "raw"
    assert resolve_reap_gate("reap-code", SimpleNamespace(norm_topk_prob=False)) == "raw"
    assert [resolve_reap_gate(g, mixtral) for g in ("combine", "renorm", "raw")] == ["combine", "renorm", "raw"]
    with pytest.raises(InvalidParameterError, match="`reap_gate` must be one of combine, renorm, raw, reap-code"):
        resolve_reap_gate("signed", mixtral)


def test_metrics_stage_uses_the_runs_reap_gate(tmp_path):
    """On the built-in OLMoE-style model (no renormalisation): reap-code is the raw gate, and the stage's
    reap column equals the raw-gate REAP recomputed from the routing table."""
    import numpy as np

    from moeaudit.config import AuditConfig
    from moeaudit.metrics.stage import run_metrics
    from moeaudit.models import load_model
    from moeaudit.observe.stage import run_observe
    from moeaudit.rundir import RunDir

    moe = load_model("tiny-olmoe")
    run = RunDir(tmp_path / "run", AuditConfig(model="tiny-olmoe", corpus="builtin", max_windows=2, max_len=32,
                                               in_sample=True, reap_gate="reap-code"))
    run_observe(run, moe=moe)
    info = run_metrics(run, moe=moe)
    assert info["reap_gate"] == ("renorm" if moe.model.config.norm_topk_prob else "raw")
    routing, table = run.read("routing"), run.read("expert_metrics")
    layer = moe.layers[0].layer
    rows = routing[routing.layer == layer]
    column = "renorm_gate" if info["reap_gate"] == "renorm" else "raw_gate"
    want = (rows[column].astype(float) * rows.act_norm.astype(float)).groupby(rows.expert).mean()
    got = table[table.layer == layer].set_index("expert").reap.loc[want.index]
    np.testing.assert_allclose(got.to_numpy(), want.to_numpy(), rtol=1e-6)
