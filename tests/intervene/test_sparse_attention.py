"""Indexer sparse attention (DeepSeek Sparse Attention: DeepSeek-V3.2, GLM-5, Hy4, Mistral-Large-4; GLM-5.3-Next's
pooled indexer; MiniMax-M3's block indexer; DeepSeek-V4's indexer of compressed entries): exact on either engine.

Windows no longer than ``index_topk`` (2048 in the released checkpoints) keep every key, and the fast engine
runs them (the tiny configs keep 64 keys or more, more than any test window, so the every-family tests hold the fast
engine to the reference one on them). The tests here keep 4 keys per query, so that at 20 tokens the indexer
really drops keys and the reference engine must measure.
"""

from __future__ import annotations

import copy

import pandas as pd
import pytest
import torch

from moeaudit.intervene import InterveneConfig, Selection, compute_effects
from moeaudit.intervene.attention import UnsupportedAttention
from moeaudit.intervene.clean import capture_clean
from moeaudit.models import wrap_model
from moeaudit.models.moe_model import nll_from_logits
from moeaudit.models.testing import tiny_model

DSA_FAMILIES = ("deepseek_v32", "glm_moe_dsa", "minimax_m3", "hy_v4", "glm5_next", "mistral_large4", "deepseek_v4")
#: 4 keys per query: 4 best keys (DSA), or the query's own block of 4 keys (MiniMax-M3: 1 block kept); GLM-5.3-Next:
#: 2 best complete pools of 2 keys and the query's incomplete pool, so every key up to 5 tokens.
SPARSE_OF = {"deepseek_v32": {"index_topk": 4}, "glm_moe_dsa": {"index_topk": 4},
             "minimax_m3": {"index_topk_blocks": 1}, "hy_v4": {"index_topk": 4},
             "glm5_next": {"index_topk": 4, "index_kpool": 2}, "mistral_large4": {"index_topk": 4},
             "deepseek_v4": {"index_topk": 1}}
#: Tokens up to which the sparse configs keep every key (DeepSeek-V4: its best compressed entry of 4 positions, so
#: every entry up to 7 tokens; its sliding keys are not selected).
BUDGET = {"glm5_next": 5, "deepseek_v4": 7}
#: What the record pass says it would drop on a 20-token window: the selection handed to the attention as
#: indices or blocks, or folded into its mask (GLM-5.3-Next).
DROPPED = {"deepseek_v32": "keeps 4 of 20 keys", "glm_moe_dsa": "keeps 4 of 20 keys",
           "minimax_m3": "keeps 1 of 5 blocks of 4 keys", "hy_v4": "keeps 4 of 20 keys",
           "glm5_next": "drops keys of this window", "mistral_large4": "keeps 4 of 20 keys",
           "deepseek_v4": "keeps a selection of its entries"}
KEYS = ["layer", "seq", "pos", "expert", "kind", "scope"]


def window(batch: int = 1) -> torch.Tensor:
    return torch.randint(3, 96, (batch, 20), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("family", DSA_FAMILIES)
def test_the_sparse_configs_indexer_drops_keys(family):
    """Same weights, every key kept: the first 4 positions agree, later ones do not, so the tests below
    run through a really sparse attention."""
    ids = window()
    with torch.no_grad():
        sparse = tiny_model(family, seed=3, **SPARSE_OF[family])(ids).logits
        dense = tiny_model(family, seed=3)(ids).logits
    torch.testing.assert_close(sparse[:, :4], dense[:, :4], rtol=0, atol=1e-6)
    assert (sparse[:, 4:] - dense[:, 4:]).abs().max() > 1e-2


@pytest.mark.parametrize("family", DSA_FAMILIES)
def test_windows_past_index_topk_go_to_the_reference_engine_with_the_reason(family, caplog):
    moe = wrap_model(tiny_model(family, seed=3, **SPARSE_OF[family]), name=family)
    result = compute_effects(moe, window(), Selection.sample(3, seed=0))
    reason = result.stats.fallback_reason
    assert f"windows of 20 tokens exceed the {BUDGET.get(family, 4)} tokens up to which" in reason
    assert "Indexer) keeps every key" in reason
    assert reason in caplog.text and set(result.effects["engine"]) == {"reference"}


@pytest.mark.parametrize("family", DSA_FAMILIES)
def test_the_record_pass_refuses_a_selection_that_drops_keys(family):
    """The second guard, inside the attention function: if a window past index_topk reached the fast engine,
    its clean pass would stop instead of recording a dense attention."""
    moe = wrap_model(tiny_model(family, seed=3, **SPARSE_OF[family]), name=family)
    with pytest.raises(UnsupportedAttention, match=DROPPED[family]):
        capture_clean(moe, window())


@pytest.mark.parametrize("family", DSA_FAMILIES)
def test_sequence_removal_equals_the_model_without_the_expert(family):
    """Brute force: zero kind in sequence scope removes the expert's term wherever it is active, which is the
    model whose expert has a zero down projection; the library's sparse attention runs in both forwards."""
    moe = wrap_model(tiny_model(family, seed=3, **SPARSE_OF[family]), name=family)
    ids = window()
    result = compute_effects(moe, ids, Selection.sample(4, seed=0), config=InterveneConfig(scopes=("sequence",)))
    effects = result.effects
    assert set(effects["engine"]) == {"reference"} and len(effects) >= 8
    with torch.no_grad():
        clean_nll = nll_from_logits(moe.model(ids).logits, ids)[0]
    for (layer, expert), rows in effects.groupby(["layer", "expert"]):
        pruned = copy.deepcopy(moe.model)
        experts = moe.adapter.decoder_layers(pruned)[layer].mlp.experts
        with torch.no_grad():
            experts.down_proj[expert].zero_()
            nll = nll_from_logits(pruned(ids).logits, ids)[0]
        for row in rows.itertuples():
            assert row.nll_clean == pytest.approx(float(clean_nll[row.pos]), abs=1e-5)
            assert row.delta_nll == pytest.approx(float(nll[row.pos] - clean_nll[row.pos]), abs=1e-5)


@pytest.mark.parametrize("family", DSA_FAMILIES)
def test_the_fast_engine_equals_the_reference_within_index_topk(family):
    """Every MoE layer (GLM-5's layer 1 reuses layer 0's selection), every kind and scope, and the gradient
    estimate runs through the indexer's layers."""
    moe = wrap_model(tiny_model(family, seed=3), name=family)
    ids = window(batch=2)
    kinds = dict(kinds=("zero", "renorm", "reroute"), scopes=("token", "sequence"))
    fast = compute_effects(moe, ids, config=InterveneConfig(estimate=True, **kinds))
    reference = compute_effects(moe, ids, config=InterveneConfig(engine="reference", **kinds))
    assert fast.stats.fallback_reason is None and fast.stats.estimates > 0
    exact = fast.effects[~fast.effects["estimate"]]
    assert set(exact["engine"]) == {"fast"} and set(exact["layer"]) == set(moe.moe_layer_indices)
    merged = exact.merge(reference.effects, on=KEYS, suffixes=("_fast", "_ref"))
    assert len(merged) == len(reference.effects) == len(exact)
    pd.testing.assert_series_equal(merged["delta_nll_fast"], merged["delta_nll_ref"], check_names=False,
                                   rtol=0, atol=1e-4)


def test_an_indexer_of_another_selection_rule_goes_to_the_reference_engine():
    """An attention indexer without DeepSeek's ``index_topk`` (Qwen4-Exp's QSA indexer keeps compressed key
    blocks instead): the fast engine cannot tell which windows keep every key, so it refuses, naming it."""
    from moeaudit.intervene.engine import _sparse_attention_reason

    moe = wrap_model(tiny_model("deepseek_v32", seed=3), name="deepseek_v32")
    assert _sparse_attention_reason(moe, 20) is None  # 64 keys kept per query: dense on these windows
    indexer = moe.adapter.decoder_layers(moe.model)[1].self_attn.indexer
    del indexer.index_topk
    reason = _sparse_attention_reason(moe, 20)
    assert reason.startswith("decoder layer 1's attention selects keys with an indexer (DeepseekV32Indexer)")
