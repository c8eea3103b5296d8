"""Selections: seeded samples, contrasts, progressive ablation, validation."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from moeaudit.errors import InvalidParameterError
from moeaudit.intervene import InterveneConfig, Selection, compute_effects
from moeaudit.intervene.selection import gate_ranks, sample_targets

from .conftest import make_moe


def test_sample_is_seeded_and_without_replacement():
    valid = torch.ones(3, 10, dtype=torch.bool)
    valid[:, -1] = False
    a = sample_targets(Selection.sample(7, seed=3), [0, 2], valid)
    b = sample_targets(Selection.sample(7, seed=3), [0, 2], valid)
    c = sample_targets(Selection.sample(7, seed=4), [0, 2], valid)
    assert all(np.array_equal(a[l], b[l]) for l in a)
    assert any(not np.array_equal(a[l], c[l]) for l in a)
    for targets in a.values():
        assert len({tuple(t) for t in targets}) == 7 and (targets[:, 1] < 9).all()
    assert len(sample_targets(Selection.sample(100), [0], valid)[0]) == 27  # all there are


def test_gate_ranks():
    raw_gate = torch.tensor([[0.1, 0.5, 0.2], [0.3, 0.3, 0.4]])
    assert gate_ranks(raw_gate).tolist() == [[2, 0, 1], [1, 2, 0]]


def test_contrast_picks_highest_and_lowest_metric(input_ids):
    moe = make_moe("olmoe", num_experts_per_tok=4)
    values = {(l.layer, e): float(e) for l in moe.layers for e in range(l.num_experts)}
    table = pd.DataFrame([(l, e, v) for (l, e), v in values.items()], columns=["layer", "expert", "ean_mean"])
    effects = compute_effects(moe, input_ids, Selection.contrast("ean_mean", table, n=6, seed=0)).effects
    with torch.no_grad(), moe.capture("all") as trace:
        moe.model(input_ids)
    for (layer, seq, pos), group in effects.groupby(["layer", "seq", "pos"]):
        active = trace[layer].topk_idx[seq, pos].tolist()  # [batch, pos, k]
        roles = dict(zip(group.role, group.expert))
        assert roles == {"high": max(active), "low": min(active)}
    own = compute_effects(moe, input_ids, Selection.contrast("raw_gate", n=6, seed=0)).effects
    assert set(own[own.role == "high"].gate_rank) == {0}
    assert set(own[own.role == "low"].gate_rank) == {3}


def test_progressive_removes_top_j_by_gate(input_ids):
    moe = make_moe("olmoe", num_experts_per_tok=4)
    effects = compute_effects(moe, input_ids, Selection.progressive(n=4)).effects
    for _, group in effects.groupby(["layer", "seq", "pos"]):
        assert group.j.tolist() == [1, 2, 3] and group.gate_rank.tolist() == [0, 1, 2]
        assert group.raw_gate.is_monotonic_decreasing


def test_explicit_items_outside_the_window_are_skipped_and_counted(input_ids):
    moe = make_moe("olmoe")
    last = input_ids.shape[1] - 1
    result = compute_effects(moe, input_ids, Selection.explicit([(0, 0, 3, 1), (0, 1, last, 2)]),
                             config=InterveneConfig(kinds=("zero", "renorm")))
    assert len(result.effects) == 2 and result.stats.skipped == {"no_next_token": 2}
    assert set(result.effects.selection) == {"explicit"}


@pytest.mark.parametrize("build, message", [
    (lambda: Selection.sample(0), "`n` must be a positive integer or None"),
    (lambda: Selection.contrast("reap"), "`metric_table` must be given for metric 'reap'"),
    (lambda: Selection.contrast("reap", pd.DataFrame({"layer": [0]})), "`metric_table` must be a table with columns"),
    (lambda: Selection.explicit([]), "`items` must be a non-empty list"),
    (lambda: Selection.explicit([(0, 1, 2)]), r"`items` must be tuples \(layer, seq, pos, expert\)"),
    (lambda: Selection(what="everything"), "`what` must be one of active, explicit, contrast, progressive, shared"),
])
def test_bad_selection(build, message):
    with pytest.raises(InvalidParameterError, match=message):
        build()
