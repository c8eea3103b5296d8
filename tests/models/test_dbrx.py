"""DBRX: routing in the block (softmax, top-k, p-norm), 2-D expert matrices seen per expert, exported by rows."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from moeaudit.intervene import InterveneConfig, Selection, compute_effects
from moeaudit.metrics import aimer
from moeaudit.metrics.stage import layer_weights
from moeaudit.models import wrap_model
from moeaudit.models.testing import tiny_config, tiny_model
from moeaudit.prune import export_pruned

IDS = torch.randint(3, 96, (2, 14), generator=torch.Generator().manual_seed(0))


def _ffn(p):
    return dict(tiny_config("dbrx").ffn_config.to_dict(), moe_normalize_expert_weights=p)


@pytest.mark.parametrize("p", [None, 2.0])
def test_other_p_norms_route_bit_for_bit_and_run_fast(p):
    """The load-time contract compares moeaudit's routing with the library's ``route_tokens_to_experts`` bit for
    bit; the p-norm (None: no division) must reach it, and the weights must be the k probabilities over it."""
    moe = wrap_model(tiny_model("dbrx", seed=3, ffn_config=_ffn(p)), name="dbrx")
    layer = moe.layers[0]
    assert moe.describe()["moe_layers"][0]["routing_parameters"] == {"p": p}
    logits = torch.randn(5, layer.num_experts, generator=torch.Generator().manual_seed(1))
    routing = layer.route(logits)
    probs = torch.softmax(logits.double(), dim=-1)
    top = probs.gather(1, routing.topk_idx)
    expected = top if p is None else top / top.pow(p).sum(dim=-1, keepdim=True).pow(1 / p)
    torch.testing.assert_close(routing.combine_weight.double(), expected, rtol=1e-6, atol=0)
    assert torch.equal(routing.topk_idx, probs.topk(layer.top_k, dim=-1).indices)
    fast = compute_effects(moe, IDS, Selection.sample(3, seed=7), config=InterveneConfig(kinds=("zero", "reroute")))
    ref = compute_effects(moe, IDS, Selection.sample(3, seed=7),
                          config=InterveneConfig(engine="reference", kinds=("zero", "reroute")))
    assert fast.stats.engine == "fast" and len(fast.effects) == len(ref.effects) > 0
    assert np.abs(fast.effects.delta_nll.values - ref.effects.delta_nll.values).max() <= 1e-5


def test_per_expert_views_are_the_library_matrices_without_copies():
    """Expert e's gate, up and down weights are rows e·F .. e·F + F − 1 of ``w1``, ``v1``, ``w2`` (``w2``
    transposed: the expert computes ``act(x w1ᵀ) * (x v1ᵀ) @ w2``), in the library's own storage; the
    weight-only metrics read them (AIMER pools all three)."""
    moe = wrap_model(tiny_model("dbrx", seed=3), name="dbrx")
    layer = moe.layers[1]
    mlp = layer.block.experts.mlp
    f = mlp.ffn_hidden_size
    for e in range(layer.num_experts):
        rows = slice(e * f, (e + 1) * f)
        assert torch.equal(layer.experts.gate_proj[e], mlp.w1[rows])
        assert torch.equal(layer.experts.up_proj[e], mlp.v1[rows])
        assert torch.equal(layer.experts.down_proj[e], mlp.w2[rows].T)
    for view, weight in ((layer.experts.gate_proj, mlp.w1), (layer.experts.down_proj, mlp.w2)):
        assert view.untyped_storage().data_ptr() == weight.untyped_storage().data_ptr()
    per_expert = [torch.cat([m[e * f:(e + 1) * f].reshape(-1) for m in (mlp.w1, mlp.v1, mlp.w2)])
                  for e in range(layer.num_experts)]
    expected = aimer(torch.stack(per_expert).detach())
    np.testing.assert_allclose(aimer(*layer_weights(moe)[layer.layer].experts), expected, rtol=1e-6)


def test_export_slices_each_kept_experts_rows(tmp_path):
    """The exported 2-D matrices are the kept experts' row blocks in order, the router keeps their rows, and
    ``ffn_config.moe_num_experts`` is the kept count (the rest: tests/prune/test_export.py)."""
    from transformers import AutoModelForCausalLM

    moe = wrap_model(tiny_model("dbrx", seed=3), name="dbrx")
    kept = [1, 2, 4, 7]
    export_pruned(moe, {layer.layer: kept for layer in moe.layers}, tmp_path / "p")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "p")
    assert loaded.config.ffn_config.moe_num_experts == len(kept)
    for index, block in enumerate(moe.model.transformer.blocks):
        f = block.ffn.experts.mlp.ffn_hidden_size
        rows = torch.cat([torch.arange(e * f, (e + 1) * f) for e in kept])
        ours = loaded.transformer.blocks[index].ffn
        for name in ("w1", "v1", "w2"):
            assert torch.equal(getattr(ours.experts.mlp, name), getattr(block.ffn.experts.mlp, name)[rows])
        assert torch.equal(ours.router.layer.weight, block.ffn.router.layer.weight[kept])
