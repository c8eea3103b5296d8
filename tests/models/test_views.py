"""Families moeaudit reaches through views of the library's own modules (Llama 4's router and experts, A.X-K1's
block up to its norm, Gemma 4's MoE branch inside the decoder layer, ERNIE-4.5-VL's text MoE and shared
experts, Step-3.7's experts times its block's scale): the views change neither the library's
forward nor its state dict, wrapping twice keeps one set, and a view that differs from the library by a
rounding step is refused at load."""

from __future__ import annotations

import pytest
import torch

from moeaudit.errors import ContractError
from moeaudit.models import wrap_model
from moeaudit.models.axk1 import AXK1MoEView
from moeaudit.models.ernie45_vl import Ernie45VLTextMoEView
from moeaudit.models.gemma4 import Gemma4MoEView
from moeaudit.models.llama4 import Llama4ExpertsView
from moeaudit.models.step3p7 import Step3p7ScaledExpertsView
from moeaudit.models.testing import tiny_model

IDS = torch.randint(3, 96, (2, 12), generator=torch.Generator().manual_seed(0))
VIEWS = {"llama4_text": Llama4ExpertsView, "axk1": AXK1MoEView, "gemma4_text": Gemma4MoEView,
         "ernie4_5_vl_moe": Ernie45VLTextMoEView, "step3p7": Step3p7ScaledExpertsView}


@pytest.mark.parametrize("family", sorted(VIEWS))
def test_views_leave_the_library_forward_and_state_dict_unchanged(family):
    model = tiny_model(family, seed=3)
    keys = list(model.state_dict())
    with torch.no_grad():
        before = model(IDS).logits
    moe = wrap_model(model, name=family)
    with torch.no_grad():
        after = model(IDS).logits
    assert torch.equal(before, after)
    assert list(model.state_dict()) == keys  # the views are not submodules
    again = wrap_model(model, name=family)  # wrapping twice keeps one set of views
    assert all(a.block is b.block and a.router is b.router and a.experts is b.experts
               for a, b in zip(moe.layers, again.layers))


@pytest.mark.parametrize("family", sorted(VIEWS))
def test_a_view_that_differs_from_the_library_is_refused_at_load(family, monkeypatch):
    view = VIEWS[family]
    forward = view.forward
    monkeypatch.setattr(view, "forward", lambda self, *args: forward(self, *args) * (1 + 1e-6))
    with pytest.raises(ContractError, match="differs from the library's forward"):
        wrap_model(tiny_model(family, seed=3), name=family)


def test_the_axk1_view_stops_before_the_blocks_norm():
    """A.X-K1's library block is the norm (``post_mlp_layernorm``) of its view's output: the view, moeaudit's
    MoE block, is the experts' weighted sum plus the shared experts."""
    model = tiny_model("axk1", seed=3)
    moe = wrap_model(model, name="axk1")
    layer = moe.layers[0]
    library = moe.adapter.decoder_layers(model)[layer.layer].mlp
    hidden = torch.randn(1, 5, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(library(hidden), library.post_mlp_layernorm(layer.block(hidden)))
        assert not torch.allclose(library(hidden), layer.block(hidden))


def test_the_step3p7_view_moves_the_blocks_scale_into_each_experts_output():
    """Step-3.7's block computes ``experts(x, idx, w) * s + shared(x)``; moeaudit's experts are the view, so each
    expert's output (what the metrics and the engines read) is ``s · f_e(x)``, the term it adds at unit weight."""
    model = tiny_model("step3p7", seed=3)
    moe = wrap_model(model, name="step3p7")
    layer = moe.layers[0]
    library = moe.adapter.decoder_layers(model)[layer.layer].mlp
    assert layer.experts.inner is library.experts and layer.experts.scale == 2.5 == library.routed_scaling_factor
    hidden = torch.randn(4, model.config.text_config.hidden_size, generator=torch.Generator().manual_seed(0))
    index = torch.tensor([[0, 5], [1, 2], [7, 3], [4, 6]])
    ones = torch.ones(8, 1)
    with torch.no_grad():
        alone = type(library.experts).forward(library.experts, hidden.repeat_interleave(2, 0), index.reshape(-1, 1),
                                              ones)
        assert torch.equal(layer.ungated_outputs(hidden, index), (alone * 2.5).reshape(4, 2, -1))
