"""LongCat-Flash: 8 real and 4 zero-computation (identity) experts per tiny layer, the MoE block a shortcut added
at the end of the decoder layer. The identity experts are audited as experts; they hold no weights."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from moeaudit.errors import InvalidParameterError
from moeaudit.metrics import compute_expert_metrics
from moeaudit.metrics.stage import layer_weights
from moeaudit.models import wrap_model
from moeaudit.models.testing import tiny_model
from moeaudit.observe.forward import observe
from moeaudit.prune import export_pruned

IDS = torch.randint(3, 96, (4, 16), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def moe():
    return wrap_model(tiny_model("longcat_flash", seed=3), name="longcat_flash")


def test_identity_experts_return_their_input_and_are_routed_to(moe):
    layer = moe.layers[0]
    assert (layer.num_experts, moe.adapter.identity_experts(layer)) == (12, 4)
    hidden = torch.randn(5, moe.config.hidden_size, generator=torch.Generator().manual_seed(1))
    index = torch.tensor([[0, 8], [9, 3], [10, 11], [7, 1], [2, 8]])
    ungated = layer.ungated_outputs(hidden, index)
    identity = index >= 8
    assert torch.equal(ungated[identity], hidden.unsqueeze(1).expand(-1, 2, -1)[identity])
    with torch.no_grad():  # a real expert's output is its SwiGLU, exactly as the library computes it alone
        gate, up = torch.nn.functional.linear(hidden[3], layer.experts.gate_up_proj[7]).chunk(2, dim=-1)
        expected = torch.nn.functional.linear(torch.nn.functional.silu(gate) * up, layer.experts.down_proj[7])
    assert torch.allclose(ungated[3, 0], expected, atol=1e-6, rtol=0)
    with torch.no_grad(), moe.capture("all") as trace:
        moe.model(IDS)
    chosen = torch.cat([trace[l.layer].rows.topk_idx.reshape(-1) for l in moe.layers])
    assert bool((chosen >= 8).any()) and bool((chosen < 8).any())  # the tiny model routes to both kinds


def test_weight_metrics_are_nan_for_identity_experts(moe, tmp_path):
    observe(moe, [row for row in IDS], tokens_path=tmp_path / "tokens.parquet",
            routing_path=tmp_path / "routing.parquet")
    routing = pd.read_parquet(tmp_path / "routing.parquet")
    table = compute_expert_metrics(routing, {l.layer: l.num_experts for l in moe.layers},
                                   weights=layer_weights(moe), metrics=["aimer", "router_row_norm", "frequency"])
    first = table[table["layer"] == moe.layers[0].layer].sort_values("expert")
    assert first["aimer"].iloc[:8].notna().all() and first["aimer"].iloc[8:].isna().all()
    assert first["router_row_norm"].notna().all()  # the router has a row for every expert, identity included
    real = moe.layers[0].experts
    expected = [float(np.abs(np.concatenate([real.gate_up_proj[e].detach().numpy().ravel(),
                                             real.down_proj[e].detach().numpy().ravel()])).mean()
                      / np.sqrt(np.mean(np.concatenate([real.gate_up_proj[e].detach().numpy().ravel(),
                                                        real.down_proj[e].detach().numpy().ravel()]) ** 2)))
                for e in range(8)]
    assert np.allclose(first["aimer"].iloc[:8].to_numpy(), expected, rtol=1e-6)


def test_export_refuses_unequal_kinds_across_layers_before_writing(moe, tmp_path):
    kept = {l.layer: [0, 1, 2, 3, 4, 5, 8, 9] for l in moe.layers}
    kept[moe.layers[1].layer] = [0, 1, 2, 3, 4, 8, 9, 10]  # 8 experts in every layer, but 5 real + 3 identity
    with pytest.raises(InvalidParameterError) as err:
        export_pruned(moe, kept, tmp_path / "x")
    assert "same number of experts of each kind" in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "x").exists()
