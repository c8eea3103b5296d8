"""`compute_effects`: the fast engine equals the reference engine, for every family, kind and scope."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from moeaudit.errors import InvalidParameterError
from moeaudit.intervene import EFFECT_COLUMNS, InterveneConfig, Selection, compute_effects, engine as engine_module
from moeaudit.models import ABLATION_KINDS
from moeaudit.models.testing import FAST_FAMILIES

from .conftest import BATCH, SEQ, make_moe

KEYS = ["layer", "seq", "pos", "expert", "kind", "scope", "j", "role", "gate_rank"]
TOL = 1e-5  # |ΔNLL| in float32


def both_engines(moe, input_ids, selection, **config):
    fast = compute_effects(moe, input_ids, selection, config=InterveneConfig(**config))
    ref = compute_effects(moe, input_ids, selection,
                          config=InterveneConfig(engine="reference", reference_batch=4, **config))
    assert fast.stats.engine == "fast" and fast.stats.fallback_reason is None
    assert ref.stats.engine == "reference"
    return fast.effects, ref.effects


def assert_same_effects(fast: pd.DataFrame, ref: pd.DataFrame, later_tol: float = TOL * SEQ) -> None:
    assert len(fast) == len(ref) > 0
    pd.testing.assert_frame_equal(fast[KEYS].reset_index(drop=True), ref[KEYS].reset_index(drop=True))
    assert np.abs(fast.delta_nll.values - ref.delta_nll.values).max() <= TOL
    assert np.abs(fast.kl.values - ref.kl.values).max() <= TOL
    assert (fast.top1_flip.values == ref.top1_flip.values).all()
    assert np.allclose(fast.gap_norm.values, ref.gap_norm.values, rtol=1e-4, atol=1e-5)
    later = np.abs(fast.delta_nll_later_sum.values - ref.delta_nll_later_sum.values)
    assert np.nanmax(later, initial=0.0) <= later_tol
    assert np.array_equal(np.isnan(fast.delta_nll_later_sum.values), np.isnan(ref.delta_nll_later_sum.values))


@pytest.mark.parametrize("scope", ["token", "sequence"])
def test_fast_equals_reference_every_kind(moe, input_ids, scope):
    kinds = tuple(k for k in ABLATION_KINDS if not (k == "mean" and moe.layers[0].weights_scale_input))
    fast, ref = both_engines(moe, input_ids, Selection.sample(3, seed=7), kinds=kinds, scopes=(scope,))
    assert set(fast.kind) == set(kinds)
    assert fast.delta_nll.abs().max() > 1e-3  # the interventions do something
    assert_same_effects(fast, ref)
    assert fast.delta_nll_later_sum.isna().all() == (scope == "token")


@pytest.mark.parametrize("family", ["olmoe", "deepseek_v2_grouped", "gpt_oss"])
@pytest.mark.parametrize("what", ["progressive", "contrast"])
def test_fast_equals_reference_multi_expert_selections(family, what, input_ids):
    moe = make_moe(family, num_experts_per_tok=3)
    if what == "progressive":
        selection = Selection.progressive(n=3, seed=1)
    else:
        table = pd.DataFrame([(l.layer, e, float((7 * e) % 5)) for l in moe.layers for e in range(l.num_experts)],
                             columns=["layer", "expert", "reap"])
        selection = Selection.contrast("reap", table, n=3, seed=1)
    fast, ref = both_engines(moe, input_ids, selection, kinds=("zero", "reroute"), scopes=("token", "sequence"))
    assert_same_effects(fast, ref)


@pytest.mark.parametrize("family", ["qwen2_moe", "deepseek_v2"])
@pytest.mark.parametrize("index", [None, 0])
def test_fast_equals_reference_shared(family, index, input_ids):
    moe = make_moe(family)
    fast, ref = both_engines(moe, input_ids, Selection.shared(index=index, n=4, seed=2), scopes=("token", "sequence"))
    assert fast.shared.all() and (fast.expert == (-1 if index is None else index)).all()
    assert_same_effects(fast, ref)


def test_padding_is_skipped_and_still_exact(input_ids):
    moe = make_moe("olmoe")
    mask = torch.ones_like(input_ids)
    mask[1, -5:] = 0  # window 1 ends in padding
    fast = compute_effects(moe, input_ids, config=InterveneConfig(scopes=("token", "sequence")), attention_mask=mask)
    ref = compute_effects(moe, input_ids, config=InterveneConfig(engine="reference", reference_batch=8,
                                                                  scopes=("token", "sequence")), attention_mask=mask)
    assert_same_effects(fast.effects, ref.effects)
    k = moe.layers[0].top_k
    per_position = k * len(moe.layers) * 2  # two scopes
    # both windows lose their last position; window 1 also positions 14..18 (padding or padded next token)
    assert fast.stats.skipped == {"no_next_token": per_position * 2, "padding": per_position * 5}
    assert not ((fast.effects.seq == 1) & (fast.effects.pos >= SEQ - 6)).any()


def test_census_row_count_and_columns(moe, input_ids):
    """Census rows = Σ over layers and positions with a next token of |A_ℓ(t)| (the last position is skipped)."""
    result = compute_effects(moe, input_ids)
    effects = result.effects
    assert list(effects.columns) == list(EFFECT_COLUMNS)
    active_sizes = sum(layer.top_k for layer in moe.layers) * BATCH * (SEQ - 1)
    assert len(effects) == result.stats.interventions == active_sizes
    assert result.stats.skipped == {"no_next_token": sum(layer.top_k for layer in moe.layers) * BATCH}
    assert not effects.duplicated(["layer", "seq", "pos", "expert"]).any()
    for (layer, seq, pos), group in effects.groupby(["layer", "seq", "pos"]):
        assert sorted(group.gate_rank) == list(range(moe.layer(layer).top_k))
        top = group[group.gate_rank == 0]
        assert top.raw_gate.iloc[0] == group.raw_gate.max()
    assert (effects.selection == "census").all() and (effects.engine == "fast").all()
    assert not effects.estimate.any()
    assert 0 <= result.stats.noise_floor <= TOL


def test_zero_of_inactive_expert_has_no_effect(input_ids):
    moe = make_moe("olmoe")
    with torch.no_grad(), moe.capture("all") as trace:
        moe.model(input_ids[:1])
    items = []
    for layer in moe.layers:
        for pos in (0, 5, 11):
            active = set(trace[layer.layer].topk_idx[0, pos].tolist())
            items.append((layer.layer, 0, pos, min(set(range(layer.num_experts)) - active)))
    fast, ref = both_engines(moe, input_ids, Selection.explicit(items))
    assert (ref.delta_nll == 0).all() and (ref.kl.abs() <= 1e-7).all()  # bit-identical in the reference
    assert fast.delta_nll.abs().max() <= TOL and (fast.gap_norm == 0).all()
    assert (fast.gate_rank == -1).all() and (fast.combine_weight == 0).all()


def test_progressive_j1_equals_top_gate_removal(input_ids):
    moe = make_moe("olmoe", num_experts_per_tok=4)
    config = InterveneConfig(kinds=("zero", "renorm"))
    progressive = compute_effects(moe, input_ids, Selection.progressive(n=5, seed=3), config=config).effects
    top = compute_effects(moe, input_ids, Selection.sample(5, seed=3), config=config).effects
    assert sorted(set(progressive.j)) == [1, 2, 3]
    first = progressive[progressive.j == 1].reset_index(drop=True)
    single = top[top.gate_rank == 0].reset_index(drop=True)
    pd.testing.assert_frame_equal(first[["layer", "seq", "pos", "expert", "kind"]],
                                  single[["layer", "seq", "pos", "expert", "kind"]])
    assert np.abs(first.delta_nll.values - single.delta_nll.values).max() <= 1e-6


def test_fallback_to_reference_is_logged(monkeypatch, input_ids, caplog):
    moe = make_moe("olmoe")
    monkeypatch.setattr(engine_module, "fast_unsupported_reason", lambda moe: "no fast path for this test")
    result = compute_effects(moe, input_ids, Selection.sample(2), config=InterveneConfig(estimate=True))
    assert result.stats.engine == "reference" and result.stats.requested_engine == "fast"
    assert result.stats.fallback_reason == "no fast path for this test"
    assert "no fast path for this test" in caplog.text
    assert result.stats.estimates == 0 and (result.effects.engine == "reference").all()


@pytest.mark.parametrize("family", FAST_FAMILIES)
def test_every_family_has_a_fast_path(family):
    moe = make_moe(family)
    assert engine_module.fast_unsupported_reason(moe) is None
    moe.model.train()
    try:
        assert "training mode" in engine_module.fast_unsupported_reason(moe)
    finally:
        moe.model.eval()


def test_grouped_mm_kernel_within_tolerance(input_ids):
    """transformers' default experts kernel (grouped_mm) is not bit-exact, but stays within the tolerance."""
    moe = make_moe("olmoe", experts_implementation="grouped_mm")
    fast, ref = both_engines(moe, input_ids, Selection.sample(4, seed=5), kinds=("zero", "reroute"))
    assert_same_effects(fast, ref)


@pytest.mark.parametrize("field, value, message", [
    ("kinds", ("drop",), "`kinds` must be a non-empty subset of zero, renorm, reroute, mean"),
    ("kinds", (), "`kinds` must be a non-empty subset"),
    ("scopes", ("global",), "`scopes` must be a non-empty subset of token, sequence"),
    ("engine", "brute", "`engine` must be one of fast, reference"),
    ("rows_per_call", 0, "`rows_per_call` must be a positive integer"),
    ("reference_batch", 1.5, "`reference_batch` must be a positive integer"),
    ("max_logit_elements", -1, "`max_logit_elements` must be a positive integer"),
    ("noise_positions", -1, "`noise_positions` must be a non-negative integer"),
    ("max_state_bytes", 0, "`max_state_bytes` must be a positive integer or None"),
    ("max_state_bytes", True, "`max_state_bytes` must be a positive integer or None"),
])
def test_bad_config(field, value, message):
    with pytest.raises(InvalidParameterError, match=message.replace("(", r"\(").replace(")", r"\)")):
        InterveneConfig(**{field: value})


def test_bad_inputs(input_ids):
    moe = make_moe("olmoe")
    with pytest.raises(InvalidParameterError, match="`input_ids` must be a LongTensor of shape"):
        compute_effects(moe, input_ids[0])
    with pytest.raises(InvalidParameterError, match="`input_ids` must be windows of at least 2 tokens"):
        compute_effects(moe, input_ids[:, :1])
    with pytest.raises(InvalidParameterError, match="`attention_mask` must be of shape"):
        compute_effects(moe, input_ids, attention_mask=torch.ones(2, 3))
    with pytest.raises(InvalidParameterError, match="`layer` must be an MoE layer index"):
        compute_effects(moe, input_ids, Selection.census(layers=[7]))
    with pytest.raises(InvalidParameterError, match=r"`items` must be pos in \[0, 19\]"):
        compute_effects(moe, input_ids, Selection.explicit([(0, 0, 20, 1)]))
    with pytest.raises(InvalidParameterError, match=r"`items` must be expert in \[0, 7\]"):
        compute_effects(moe, input_ids, Selection.explicit([(0, 0, 2, 8)]))
    with pytest.raises(InvalidParameterError, match="`layers` must be MoE layers with shared experts"):
        compute_effects(moe, input_ids, Selection.shared())
    with pytest.raises(InvalidParameterError, match="`mean_output` must be a"):
        compute_effects(moe, input_ids, config=InterveneConfig(kinds=("mean",)), mean_output={0: torch.zeros(3)})
    table = pd.DataFrame({"layer": [0], "expert": [0], "reap": [1.0]})
    with pytest.raises(InvalidParameterError, match="`metric_table` must be a value of 'reap' for every expert"):
        compute_effects(moe, input_ids, Selection.contrast("reap", table))
    shared_moe = make_moe("qwen2_moe")
    with pytest.raises(InvalidParameterError, match=r"`kinds` must be \('zero',\) for a shared-expert selection"):
        compute_effects(shared_moe, input_ids, Selection.shared(), config=InterveneConfig(kinds=("renorm",)))


@pytest.mark.parametrize("family", ["olmoe", "mixtral"])
def test_inactive_experts_every_kind_and_scope(family, input_ids):
    """Explicit inactive experts: reroute still renormalises (softmax over survivors), both engines agree."""
    moe = make_moe(family)
    with torch.no_grad(), moe.capture("all") as trace:
        moe.model(input_ids[1:])
    items = [(layer.layer, 1, pos, min(set(range(layer.num_experts)) - set(trace[layer.layer].topk_idx[0, pos].tolist())))
             for layer in moe.layers for pos in (2, 9)]
    fast, ref = both_engines(moe, input_ids, Selection.explicit(items), kinds=ABLATION_KINDS,
                             scopes=("token", "sequence"))
    assert_same_effects(fast, ref)
    unchanged = fast[(fast.kind != "reroute") | (fast.scope == "sequence")]
    assert (unchanged.gap_norm == 0).all()
