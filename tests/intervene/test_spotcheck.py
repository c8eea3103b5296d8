"""The fast engine's self-check: a decoder layer that does not add the MoE output to the residual stream
unchanged is caught before any effect is measured, and the run falls back to the reference engine."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
from torch import nn

from moeaudit.intervene import InterveneConfig, Selection, compute_effects
from moeaudit.intervene.spotcheck import checked_layers, fast_disagreement
from moeaudit.models import wrap_model
from moeaudit.models.testing import REFERENCE_ONLY, tiny_model


class ScaledBlock(nn.Module):
    """The MoE block's output times ``scale``: a residual coefficient the fast engine does not know about."""

    def __init__(self, block: nn.Module, scale: float):
        super().__init__()
        self.block, self.scale = block, scale

    def forward(self, hidden):
        return self.scale * self.block(hidden)


def windows():
    return torch.randint(3, 96, (2, 20), generator=torch.Generator().manual_seed(1))


def test_a_wrong_residual_coefficient_is_caught_and_the_reference_engine_used(caplog):
    moe = wrap_model(tiny_model("olmoe", seed=3, num_hidden_layers=4), name="olmoe")
    decoder = moe.adapter.decoder_layers(moe.model)[checked_layers(moe)[-1]]
    decoder.mlp = ScaledBlock(decoder.mlp, 0.5)
    ids = windows()
    selection = Selection.sample(3, seed=0)

    result = compute_effects(moe, ids, selection, config=InterveneConfig(engine="fast"))

    assert "disagrees with the reference engine" in result.stats.fallback_reason
    assert "disagrees with the reference engine" in caplog.text
    reference = compute_effects(moe, ids, selection, config=InterveneConfig(engine="reference"))
    keys = ["layer", "seq", "pos", "expert"]
    pd.testing.assert_frame_equal(result.effects.sort_values(keys).reset_index(drop=True)[keys + ["delta_nll"]],
                                  reference.effects.sort_values(keys).reset_index(drop=True)[keys + ["delta_nll"]],
                                  check_exact=True)


def test_an_exact_model_passes_and_keeps_the_fast_engine():
    moe = wrap_model(tiny_model("olmoe", seed=3, num_hidden_layers=4), name="olmoe")
    ids = windows()
    assert fast_disagreement(moe, ids, None, compute_effects, InterveneConfig()) is None
    result = compute_effects(moe, ids, Selection.sample(2, seed=0))
    assert result.stats.fallback_reason is None and set(result.effects["engine"]) == {"fast"}


def test_checked_layers_cover_first_last_and_middle():
    moe = wrap_model(tiny_model("olmoe", seed=3, num_hidden_layers=7), name="olmoe")
    assert checked_layers(moe) == [0, 2, 4, 6]
    small = wrap_model(tiny_model("deepseek_v2", seed=3), name="deepseek_v2")  # MoE layers 1 and 2
    assert checked_layers(small) == [1, 2]


@pytest.mark.parametrize("family", sorted(REFERENCE_ONLY))
def test_families_the_fast_engine_cannot_replay_are_measured_by_the_reference_engine(family):
    moe = wrap_model(tiny_model(family, seed=3), name=family)
    ids = windows()
    selection = Selection.sample(3, seed=0)
    result = compute_effects(moe, ids, selection, config=InterveneConfig(kinds=("zero", "reroute"),
                                                                          scopes=("token", "sequence")))
    assert REFERENCE_ONLY[family] in result.stats.fallback_reason
    assert set(result.effects["engine"]) == {"reference"}
    reference = compute_effects(moe, ids, selection, config=InterveneConfig(
        kinds=("zero", "reroute"), scopes=("token", "sequence"), engine="reference"))
    pd.testing.assert_frame_equal(result.effects, reference.effects, check_exact=True)
