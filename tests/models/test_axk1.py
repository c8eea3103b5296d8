"""A.X-K1: the block re-expressed through moeaudit's view is the library's block, bit for bit; a view that
differs is refused at load; interventions (fast engine, its rows restarting at the block past its norm) equal a
model without the expert."""

from __future__ import annotations

import copy

import pytest
import torch

from moeaudit.errors import ContractError
from moeaudit.intervene import InterveneConfig, Selection, compute_effects
from moeaudit.intervene.fast import restarts_at_block
from moeaudit.models import wrap_model
from moeaudit.models.axk1 import AXK1MoEView
from moeaudit.models.moe_model import nll_from_logits
from moeaudit.models.testing import tiny_model

IDS = torch.randint(3, 96, (2, 12), generator=torch.Generator().manual_seed(0))


def test_the_view_leaves_the_library_forward_and_state_dict_unchanged():
    model = tiny_model("axk1", seed=3)
    keys = list(model.state_dict())
    with torch.no_grad():
        before = model(IDS).logits
    moe = wrap_model(model, name="axk1")
    with torch.no_grad():
        after = model(IDS).logits
    assert torch.equal(before, after)
    assert list(model.state_dict()) == keys  # the view is not a submodule
    assert moe.layers[0].block is wrap_model(model).layers[0].block  # wrapping twice keeps one view
    layer = moe.layers[0]
    library = moe.adapter.decoder_layers(model)[layer.layer].mlp
    hidden = torch.randn(1, 5, model.config.hidden_size)
    with torch.no_grad():  # the library's block is the norm of the view's output: the view stops before it
        assert torch.equal(library(hidden), library.post_mlp_layernorm(layer.block(hidden)))
        assert not torch.allclose(library(hidden), layer.block(hidden))


def test_a_view_that_differs_from_the_library_is_refused_at_load(monkeypatch):
    forward = AXK1MoEView.forward
    monkeypatch.setattr(AXK1MoEView, "forward", lambda self, hidden: forward(self, hidden) * (1 + 1e-6))
    with pytest.raises(ContractError, match="differs from the library's forward"):
        wrap_model(tiny_model("axk1", seed=3), name="axk1")


def test_sequence_removal_equals_the_model_without_the_expert():
    """Brute force: the zero kind in sequence scope is the model whose expert has a zero down projection (its
    absence then passes the block's norm), measured by the fast engine restarting its rows at the block."""
    moe = wrap_model(tiny_model("axk1", seed=3), name="axk1")
    ids = IDS[:1]
    result = compute_effects(moe, ids, Selection.sample(4, seed=0), config=InterveneConfig(scopes=("sequence",)))
    effects = result.effects
    assert set(effects["engine"]) == {"fast"} and result.stats.fallback_reason is None and restarts_at_block(moe)
    assert effects["layer"].nunique() == len(moe.layers) and len(effects) >= 8
    with torch.no_grad():
        clean_nll = nll_from_logits(moe.model(ids).logits, ids)[0]
    for (layer, expert), rows in effects.groupby(["layer", "expert"]):
        pruned = copy.deepcopy(moe.model)
        with torch.no_grad():
            moe.adapter.decoder_layers(pruned)[layer].mlp.experts.down_proj[expert].zero_()
            nll = nll_from_logits(pruned(ids).logits, ids)[0]
        assert bool((nll != clean_nll).any())
        for row in rows.itertuples():
            assert row.nll_clean == pytest.approx(float(clean_nll[row.pos]), abs=1e-5)
            assert row.delta_nll == pytest.approx(float(nll[row.pos] - clean_nll[row.pos]), abs=1e-5)
