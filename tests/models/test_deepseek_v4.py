"""DeepSeek-V4: its learned-router layers audited (on the reference engine, through its compressed attention:
tests/intervene/test_reference_families.py); its hash-routed layers listed and left alone; pruning evaluated by
masking, the export refused."""

from __future__ import annotations

import pytest

from moeaudit.errors import InvalidParameterError
from moeaudit.models import wrap_model
from moeaudit.models.testing import tiny_model


@pytest.fixture(scope="module")
def moe():
    return wrap_model(tiny_model("deepseek_v4", seed=3), name="deepseek_v4")


def test_hash_routed_layers_are_listed_not_audited(moe):
    """Layer 0 routes by token id (``tid2eid``): not an audited MoE layer, and not called dense."""
    described = moe.describe()
    assert [layer.layer for layer in moe.layers] == [1, 2]
    assert described["unaudited_moe_layers"] == {"0": "hash-routed (experts fixed per token id)"}
    assert described["dense_layers"] == []
    assert described["moe_layers"][0]["routing_rule"] == "sqrtsoftplus_bias_renorm_scaled"
    experts = [moe.model.model.layers[i].mlp.experts for i in range(3)]  # the hash layer's experts count too
    routed = sum(p.numel() for e in experts for p in e.parameters())
    assert described["parameters"]["routed_experts"] == routed
    total = sum(p.numel() for p in moe.model.parameters())
    assert described["parameters"]["active_per_token"] == total - routed + routed * 2 // 8  # top-2 of 8


def test_pruning_is_evaluated_by_masking_and_the_export_refused(tmp_path, moe):
    from moeaudit.prune import export_pruned, run_prune
    from tests.prune.conftest import make_run, metrics_table

    run = make_run(tmp_path, moe, metrics_table(moe))
    run_prune(run, moe=moe, ratios=(0.25,), criteria=["frequency", "random"], random_seeds=2)
    table = run.read("pruning")
    assert set(table.layer.astype(int)) == {1, 2} and (table.n_dropped == 2).all()
    assert table.heldout_nll.notna().all() and table.heldout_nll.nunique() > 1  # the prunings differ
    with pytest.raises(InvalidParameterError, match="hash-routed layers keep every expert") as err:
        export_pruned(moe, {layer.layer: [0, 2, 3, 5, 6, 7] for layer in moe.layers}, tmp_path / "x")
    assert "\n" not in str(err.value) and not (tmp_path / "x").exists()
