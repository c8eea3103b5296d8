"""DeepSeek Sparse Attention (DeepSeek-V3.2, GLM-5): audited on the reference engine, exactly.

The tiny configs keep 4 keys per query (``index_topk``) so that at 20 tokens the indexer really drops keys;
the real checkpoints keep 2048.
"""

from __future__ import annotations

import copy

import pytest
import torch

from moeaudit.intervene import InterveneConfig, Selection, compute_effects
from moeaudit.intervene.engine import fast_unsupported_reason
from moeaudit.models import wrap_model
from moeaudit.models.moe_model import nll_from_logits
from moeaudit.models.testing import tiny_model

DSA_FAMILIES = ("deepseek_v32", "glm_moe_dsa")


def window() -> torch.Tensor:
    return torch.randint(3, 96, (1, 20), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("family", DSA_FAMILIES)
def test_the_tiny_models_indexer_drops_keys(family):
    """Same weights, every key kept (index_topk = the window): the first 4 positions agree, later ones do not,
    so the tests below run through a really sparse attention."""
    ids = window()
    with torch.no_grad():
        sparse = tiny_model(family, seed=3)(ids).logits
        dense = tiny_model(family, seed=3, index_topk=ids.shape[1])(ids).logits
    torch.testing.assert_close(sparse[:, :4], dense[:, :4], rtol=0, atol=1e-6)
    assert (sparse[:, 4:] - dense[:, 4:]).abs().max() > 1e-2


@pytest.mark.parametrize("family", DSA_FAMILIES)
def test_the_fast_engine_names_the_indexer_before_any_data(family):
    moe = wrap_model(tiny_model(family, seed=3), name=family)
    reason = fast_unsupported_reason(moe)
    assert reason is not None and "DeepSeek Sparse Attention" in reason and "decoder layer 0" in reason


@pytest.mark.parametrize("family", DSA_FAMILIES)
def test_sequence_removal_equals_the_model_without_the_expert(family):
    """Brute force: zero kind in sequence scope removes the expert's term wherever it is active, which is the
    model whose expert has a zero down projection; the library's sparse attention runs in both forwards."""
    moe = wrap_model(tiny_model(family, seed=3), name=family)
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
