"""Joint removals, Shapley values and pruning sets measured on tiny models, against brute force."""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np
import pandas as pd
import pytest
import torch

from moeaudit.errors import InvalidParameterError
from moeaudit.interactions import measure_interactions
from moeaudit.intervene import InterveneConfig, Selection, compute_effects
from moeaudit.models import Ablation, wrap_model
from moeaudit.models.testing import tiny_model

torch.set_num_threads(1)

VOCAB, T = 96, 20
TOKEN = ["layer", "seq", "pos"]


def make(family="olmoe", **kwargs):
    return wrap_model(tiny_model(family, seed=3, **kwargs), name=family)


@pytest.fixture(scope="module")
def moe():
    return make(num_experts_per_tok=4)


@pytest.fixture(scope="module")
def ids():
    return torch.randint(3, VOCAB, (2, T), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def result(moe, ids):
    return measure_interactions(moe, ids, n=6, seed=1)


def brute_force_delta(moe, ids, layer, seq, pos, experts) -> float:
    """ΔNLL at (seq, pos) with ``experts`` removed there at ``layer``: two full forwards of the plain model."""
    window = ids[seq:seq + 1]
    with torch.no_grad():
        clean = torch.log_softmax(moe.model(window).logits[0, pos].float(), -1)
        with moe.intervene([Ablation(layer, experts=list(experts), positions=[pos])], warn_unchanged=False):
            removed = torch.log_softmax(moe.model(window).logits[0, pos].float(), -1)
    target = int(window[0, pos + 1])
    return float(clean[target] - removed[target])


def test_joint_removal_equals_a_full_forward_with_both_experts_removed(moe, ids, result):
    pairs = result.pairs
    assert len(pairs) == 6 * 3 * 6  # 6 tokens x 3 layers x C(4, 2) pairs
    for row in pairs.sample(12, random_state=0).itertuples():
        expected = brute_force_delta(moe, ids, row.layer, row.seq, row.pos, [row.expert_a, row.expert_b])
        assert abs(row.delta_nll_joint - expected) <= 1e-5
        single = brute_force_delta(moe, ids, row.layer, row.seq, row.pos, [row.expert_a])
        assert abs(row.delta_nll_a - single) <= 1e-5
    assert np.allclose(pairs["interaction"], pairs["delta_nll_joint"] - pairs["delta_nll_a"] - pairs["delta_nll_b"],
                       rtol=0, atol=0)
    assert (pairs["interaction"].abs() > 1e-3).any()  # the tiny random model is not additive


def test_fast_engine_equals_reference_engine(moe, ids, result):
    reference = measure_interactions(moe, ids, n=6, seed=1, config=InterveneConfig(engine="reference"))
    assert reference.stats.engine == "reference"
    keys = TOKEN + ["expert_a", "expert_b"]
    merged = result.pairs.merge(reference.pairs, on=keys, suffixes=("", "_ref"))
    assert len(merged) == len(result.pairs)
    for column in ("delta_nll_joint", "delta_nll_a", "interaction", "kl_joint"):
        assert (merged[column] - merged[column + "_ref"]).abs().max() <= 1e-5, column
    shap = result.shapley.merge(reference.shapley, on=TOKEN + ["expert"], suffixes=("", "_ref"))
    assert (shap["shapley"] - shap["shapley_ref"]).abs().max() <= 1e-5


def test_single_removals_equal_the_census(moe, ids, result):
    census = compute_effects(moe, ids, Selection.census()).effects
    merged = result.shapley.merge(census[TOKEN + ["expert", "delta_nll"]], on=TOKEN + ["expert"])
    assert len(merged) == len(result.shapley)
    assert (merged["delta_nll_single"] - merged["delta_nll"]).abs().max() <= 1e-6


def test_shapley_efficiency_and_players(result):
    shapley = result.shapley
    assert len(shapley) == 6 * 3 * 4 and not shapley["estimate"].any() and shapley["shapley_se"].isna().all()
    per_token = shapley.groupby(TOKEN).agg(total=("shapley", "sum"), everything=("delta_nll_all", "first"),
                                           ranks=("gate_rank", lambda r: tuple(sorted(r))))
    assert (per_token["total"] - per_token["everything"]).abs().max() <= 1e-5
    assert set(per_token["ranks"]) == {(0, 1, 2, 3)}
    # the players are the token's active experts, gate rank 0 with the largest raw gate
    top = shapley.loc[shapley.groupby(TOKEN)["raw_gate"].idxmax()]
    assert (top["gate_rank"] == 0).all()
    assert result.stats.exact_tokens == 18 and result.stats.estimated_tokens == 0
    assert result.stats.removals == 18 * 16  # every coalition, the empty one included
    assert 0 <= result.stats.noise_floor <= 1e-5


def test_permutation_estimate_keeps_efficiency_and_approaches_the_exact_values(moe, ids, result):
    estimated = measure_interactions(moe, ids, n=6, seed=1, max_exact_players=3, permutations=400)
    shapley = estimated.shapley
    assert shapley["estimate"].all() and (shapley["shapley_se"] > 0).any()
    per_token = shapley.groupby(TOKEN).agg(total=("shapley", "sum"), everything=("delta_nll_all", "first"))
    assert (per_token["total"] - per_token["everything"]).abs().max() <= 1e-5
    merged = shapley.merge(result.shapley, on=TOKEN + ["expert"], suffixes=("", "_exact"))
    z = (merged["shapley"] - merged["shapley_exact"]).abs() / merged["shapley_se"].clip(lower=1e-9)
    assert (z < 5).mean() >= 0.97  # within 5 standard errors
    # pairs and single removals do not depend on the Shapley method
    pairs = estimated.pairs.merge(result.pairs, on=TOKEN + ["expert_a", "expert_b"], suffixes=("", "_exact"))
    assert (pairs["delta_nll_joint"] - pairs["delta_nll_joint_exact"]).abs().max() <= 1e-5


def test_a_null_player_gets_zero():
    """An active expert whose output is zero changes nothing when removed: its Shapley value is 0."""
    moe = make(num_experts_per_tok=2, num_experts=4)
    layer = moe.layers[-1]
    with torch.no_grad():
        layer.experts.down_proj[1].zero_()
    ids = torch.randint(3, VOCAB, (1, T), generator=torch.Generator().manual_seed(5))
    result = measure_interactions(moe, ids, n=None, layers=[layer.layer])
    null = result.shapley[result.shapley["expert"] == 1]
    assert len(null) >= 3
    assert null["shapley"].abs().max() <= 1e-6 and null["delta_nll_single"].abs().max() <= 1e-6
    others = result.shapley[result.shapley["expert"] != 1]
    assert others["shapley"].abs().max() > 1e-3


def test_every_token_when_n_is_none(moe, ids):
    result = measure_interactions(moe, ids, n=None, layers=[1])
    assert result.stats.tokens == {1: 2 * (T - 1)}
    assert set(result.shapley["pos"]) == set(range(T - 1))


def test_removal_sets_joint_and_sum(moe, ids, result):
    sets = pd.DataFrame({"criterion": ["a", "a", "random"], "ratio": [0.25, 0.25, 0.25], "seed": [None, None, 7],
                         "layer": [0, 1, 0], "dropped": [[0, 1, 2, 3, 4], [5, 6], [7, 8, 9]]})
    measured = measure_interactions(moe, ids, n=6, seed=1, sets=sets)
    table = measured.sets
    assert len(table) == 6 * 3  # layer 0: two sets, layer 1: one set, six tokens each
    singles = result.shapley.set_index(TOKEN + ["expert"])["delta_nll_single"]
    pairs = result.pairs.set_index(TOKEN + ["expert_a", "expert_b"])
    for row in table.itertuples():
        dropped = {("a", 0): {0, 1, 2, 3, 4}, ("a", 1): {5, 6}, ("random", 0): {7, 8, 9}}[(row.criterion, row.layer)]
        active = result.shapley[(result.shapley["layer"] == row.layer) & (result.shapley["seq"] == row.seq)
                                & (result.shapley["pos"] == row.pos)]
        hit = sorted(set(active["expert"]) & dropped)
        assert row.n_removed == len(hit)
        assert row.delta_nll_sum == pytest.approx(sum(singles[(row.layer, row.seq, row.pos, e)] for e in hit), abs=1e-12)
        if not hit:
            assert row.delta_nll_joint == 0
        elif len(hit) == 1:
            assert row.delta_nll_joint == pytest.approx(singles[(row.layer, row.seq, row.pos, hit[0])], abs=1e-6)
        elif len(hit) == 2:
            assert row.delta_nll_joint == pytest.approx(pairs.loc[(row.layer, row.seq, row.pos, *hit), "delta_nll_joint"]
                                                        if (row.layer, row.seq, row.pos, *hit) in pairs.index else
                                                        pairs.loc[(row.layer, row.seq, row.pos, *hit[::-1]),
                                                                  "delta_nll_joint"], abs=1e-6)
        else:
            expected = brute_force_delta(moe, ids, row.layer, row.seq, row.pos, hit)
            assert abs(row.delta_nll_joint - expected) <= 1e-5
    assert table.loc[table["criterion"] == "random", "seed"].eq(7).all()
    assert table.loc[table["criterion"] == "a", "seed"].isna().all()


def test_bad_input_is_refused_before_any_work(moe, ids):
    with pytest.raises(InvalidParameterError, match="kind"):
        measure_interactions(moe, ids, kind="drop")
    with pytest.raises(InvalidParameterError, match="max_exact_players"):
        measure_interactions(moe, ids, max_exact_players=11)
    with pytest.raises(InvalidParameterError, match="sets"):
        measure_interactions(moe, ids, sets=pd.DataFrame({"criterion": ["a"]}))


# ---------------------------------------------------------------------------- planted redundancy
def redundant_pair_model(scale: float):
    """Tiny OLMoE, top-2, whose last layer's experts are all copies of expert 0 with outputs × ``scale``.

    Both active experts at a token write the same vector w·f(x) (OLMoE keeps the softmax weights, so each
    contributes about half). Windows continue with argmax(W_U f): the vector is the answer. With a large
    scale the MoE output dominates the residual stream, so the final RMS norm makes the logits depend on
    its direction only: the clean loss saturates near its floor and half the vector predicts as well as
    all of it. Either expert alone can go (each is redundant given the other); both together cannot.
    """
    moe = wrap_model(tiny_model("olmoe", seed=2, weight_std=0.05, router_std=0.05, num_experts_per_tok=2,
                                num_experts=4), name="olmoe")
    layer = moe.layers[-1]
    experts = layer.experts
    with torch.no_grad():
        experts.gate_up_proj.copy_(experts.gate_up_proj[:1].clone().expand_as(experts.gate_up_proj))
        experts.down_proj.copy_(experts.down_proj[:1].clone().expand_as(experts.down_proj) * scale)
        moe.model.lm_head.weight.mul_(20.0)  # sharp predictions: losing the answer costs several nats
    generator = torch.Generator().manual_seed(11)
    ids = torch.randint(3, VOCAB, (4, 1), generator=generator)
    unembed = moe.model.lm_head.weight
    for _ in range(15):
        with torch.no_grad(), moe.capture([layer.layer], keep_outputs=True) as trace:
            moe.model(ids)
        f_last = trace[layer.layer].ungated[:, -1, 0]  # [batch, pos, slot, H]
        ids = torch.cat([ids, (f_last.float() @ unembed.T).argmax(-1, keepdim=True)], dim=1)
    return moe, ids, layer.layer


def test_planted_redundant_pair():
    moe, ids, layer = redundant_pair_model(scale=1000.0)
    result = measure_interactions(moe, ids, n=None, layers=[layer])
    pairs, shapley = result.pairs, result.shapley
    assert len(pairs) == 4 * 15
    joint = pairs["delta_nll_joint"]
    assert joint.min() > 1.0 and joint.mean() > 10.0  # removing both loses the answer (measured: mean 16.9)
    single = pairs[["delta_nll_a", "delta_nll_b"]].abs().max(axis=1)
    assert (single < 0.1 * joint).all()  # either alone is compensated by the other (measured: <= 8 % of it)
    # so the joint cost exceeds the sum of the single costs: a clearly positive interaction (measured >= 0.97)
    assert (pairs["interaction"] > 0.9 * joint).all()
    # and Shapley splits the joint cost evenly between the two copies (measured within 0.495-0.505)
    half = shapley.merge(pairs[TOKEN + ["delta_nll_joint"]], on=TOKEN)
    assert ((half["shapley"] / half["delta_nll_joint"] - 0.5).abs() < 0.02).all()
