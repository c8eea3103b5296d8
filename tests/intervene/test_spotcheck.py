"""The fast engine's self-check: a decoder layer that does not add the MoE output to the residual stream
unchanged is caught before any effect is measured, and the rows restart at the block; what even that does
not replay sends the run to the reference engine."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
from torch import nn

from moeaudit.intervene import InterveneConfig, Selection, compute_effects
from moeaudit.intervene.fast import restarts_at_block
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


def test_a_coefficient_after_the_block_is_caught_and_the_rows_restart_at_the_block(caplog):
    """A block output scaled before the residual add: the additive rows disagree with the reference engine, so
    the rows restart at the intervened layer with the block's output replaced, which replays the scale."""
    moe = wrap_model(tiny_model("olmoe", seed=3, num_hidden_layers=4), name="olmoe")
    decoder = moe.adapter.decoder_layers(moe.model)[checked_layers(moe)[-1]]
    decoder.mlp = ScaledBlock(decoder.mlp, 0.5)
    ids = windows()
    selection = Selection.sample(3, seed=0)
    config = InterveneConfig(kinds=("zero", "reroute"), scopes=("token", "sequence"))

    result = compute_effects(moe, ids, selection, config=config)

    assert result.stats.fallback_reason is None and set(result.effects["engine"]) == {"fast"}
    assert restarts_at_block(moe)
    reference = compute_effects(moe, ids, selection, config=InterveneConfig(**{**vars(config), "engine": "reference"}))
    keys = ["layer", "seq", "pos", "expert", "kind", "scope"]
    fast = result.effects.sort_values(keys).reset_index(drop=True)
    ref = reference.effects.sort_values(keys).reset_index(drop=True)
    pd.testing.assert_frame_equal(fast[keys], ref[keys])
    assert (fast["delta_nll"] - ref["delta_nll"]).abs().max() < 1e-5


def test_what_the_rows_do_not_replay_is_caught_and_the_reference_engine_used(caplog):
    """Logits the model's own forward transforms where the rows cannot see it (an instance-level wrapper):
    neither row mode agrees with the reference engine, which then measures every effect."""
    moe = wrap_model(tiny_model("olmoe", seed=3, num_hidden_layers=4), name="olmoe")
    forward = moe.model.forward

    def halved_logits(*args, **kwargs):
        out = forward(*args, **kwargs)
        out.logits = out.logits * 0.5
        return out

    moe.model.forward = halved_logits
    ids = windows()
    selection = Selection.sample(3, seed=0)

    result = compute_effects(moe, ids, selection, config=InterveneConfig(engine="fast"))

    assert "disagrees with the reference engine" in result.stats.fallback_reason
    assert "disagrees with the reference engine" in caplog.text and not restarts_at_block(moe)
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
    assert not restarts_at_block(moe)  # the block's output enters the residual stream as it is


def test_every_moe_layer_is_checked():
    """Planted: a 0.5 residual coefficient on the second of seven MoE layers only (not first, last or middle).
    The coupling probe reads the first MoE layer (additive), so only the check of layer 1 can switch the rows
    to restarting at the block."""
    moe = wrap_model(tiny_model("olmoe", seed=3, num_hidden_layers=7), name="olmoe")
    assert checked_layers(moe) == list(range(7))
    decoder = moe.adapter.decoder_layers(moe.model)[1]
    decoder.mlp = ScaledBlock(decoder.mlp, 0.5)
    assert not restarts_at_block(moe)
    assert fast_disagreement(moe, windows(), None, compute_effects, InterveneConfig()) is None
    assert restarts_at_block(moe)


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


def _planted_tie(moe, layer, margin: float):
    """Clean router logits of ``layer`` with row 0 changed so that its best unselected expert trails the
    weakest selected one by ``margin`` (relative to the row's largest |logit|) in the rule's selection score."""
    with torch.no_grad(), moe.capture([layer.layer]) as trace:
        moe.model(windows())
    logits = trace[layer.layer].rows.router_logits.clone()
    z = logits[0]
    chosen = layer.route(logits[:1]).topk_idx[0].tolist()
    weakest = min(chosen, key=lambda e: z[e])
    if layer.routing_rule.startswith("sigmoid"):  # selection = sigmoid(z) + b, groups: stay in the weakest's group
        bias = layer.router.e_score_correction_bias
        choice = torch.sigmoid(z) + bias
        weakest = min(chosen, key=lambda e: choice[e])
        per = layer.num_experts // int(layer.router.num_group)
        group = range(weakest // per * per, weakest // per * per + per)
        other = max((e for e in group if e not in chosen), key=lambda e: choice[e])
        target = choice[weakest] - bias[other] - margin * z.abs().max()
        z[other] = torch.logit(target.clamp(1e-6, 1 - 1e-6))
    else:
        other = max((e for e in range(layer.num_experts) if e not in chosen), key=lambda e: z[e])
        z[other] = z[weakest] - margin * z.abs().max()
    return logits


@pytest.mark.parametrize("family", ["olmoe", "deepseek_v3"])
def test_near_ties_are_the_decisions_rounding_can_flip(family):
    from moeaudit.intervene.spotcheck import near_ties

    moe = wrap_model(tiny_model(family, seed=3), name=family)
    layer = moe.layers[-1]
    tie = _planted_tie(moe, layer, 1e-7)   # under 4 float32 ulps of the largest logit
    clear = _planted_tie(moe, layer, 1e-3)  # far above
    assert bool(near_ties(layer, tie, torch.float32)[0]) and not bool(near_ties(layer, clear, torch.float32)[0])
    assert bool(near_ties(layer, clear, torch.bfloat16)[0])  # bfloat16 rounds 2^16 times coarser


def test_each_run_counts_near_ties_per_moe_layer():
    moe = wrap_model(tiny_model("olmoe", seed=3), name="olmoe")
    ids = windows()
    result = compute_effects(moe, ids, Selection.sample(2, seed=0), config=InterveneConfig(scopes=("token",)))
    stats = result.stats
    assert set(stats.near_ties) == set(moe.moe_layer_indices)
    assert stats.near_tie_positions == ids.shape[0] * (ids.shape[1] - 1)
    assert all(0 <= count <= stats.near_tie_positions for count in stats.near_ties.values())


def test_a_decoder_layer_argument_the_rows_would_lack_sends_the_run_to_the_reference_engine():
    """Planted: the backbone hands every decoder layer an extra keyword argument (as Gemma-style per-layer
    inputs do); the rows could not supply it, so the fast engine must not run."""
    moe = wrap_model(tiny_model("olmoe", seed=3), name="olmoe")
    layers = moe.adapter.decoder_layers(moe.model)
    handles = [layer.register_forward_pre_hook(lambda module, args, kwargs: (args, {**kwargs, "per_layer_input": 1.0}),
                                               with_kwargs=True) for layer in layers]
    result = compute_effects(moe, windows(), Selection.sample(2, seed=0), config=InterveneConfig(scopes=("token",)))
    assert result.stats.engine == "reference" and "per_layer_input" in result.stats.fallback_reason
    for handle in handles:
        handle.remove()


def test_a_one_percent_residual_coefficient_is_caught_in_float32():
    """The float32 bound is 1e-4 nats, no share of the effect: a 0.99 coefficient on one layer is wrong."""
    moe = wrap_model(tiny_model("olmoe", seed=3, num_hidden_layers=4), name="olmoe")
    decoder = moe.adapter.decoder_layers(moe.model)[2]
    decoder.mlp = ScaledBlock(decoder.mlp, 0.99)
    assert not restarts_at_block(moe)
    assert fast_disagreement(moe, windows(), None, compute_effects, InterveneConfig()) is None
    assert restarts_at_block(moe)  # caught: the rows now restart at the block, which replays the coefficient


def test_rows_a_layer_cannot_run_send_the_run_to_the_reference_engine(monkeypatch):
    """Planted: decoder layers that raise an AttributeError when the fast engine calls them on rows (as a
    per-layer input the rows lack does: Qwen4-Exp's n-gram embeddings read ``input_ids.long()``): the
    self-check logs it and the reference engine, which runs the model's own forward, measures every effect."""
    import moeaudit.intervene.fast as fast

    def no_rows(*args, **kwargs):
        raise AttributeError("'NoneType' object has no attribute 'long'")

    monkeypatch.setattr(fast, "call_decoder_layer", no_rows)
    moe = wrap_model(tiny_model("olmoe", seed=3), name="olmoe")
    result = compute_effects(moe, windows(), Selection.sample(2, seed=0), config=InterveneConfig(scopes=("token",)))
    assert result.stats.engine == "reference" and set(result.effects["engine"]) == {"reference"}
    assert "cannot run this model's decoder layers on single rows (AttributeError" in result.stats.fallback_reason
    assert len(result.effects) > 0
