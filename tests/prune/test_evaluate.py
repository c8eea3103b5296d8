"""Masked evaluation: NLL / KL by hand, deduplication, domains, identity when nothing is dropped."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from moeaudit.errors import InvalidParameterError
from moeaudit.models.moe_model import nll_from_logits
from moeaudit.prune import evaluate_pruned, pruning_ablations

from tests.prune.conftest import make_moe, windows


def test_evaluate_matches_hand_computation():
    moe = make_moe("mixtral")
    ids = windows(5, 10, seed=1)
    mask = torch.ones_like(ids)
    mask[2, 6:] = 0
    layers = [l.layer for l in moe.layers]
    kept = {layers[0]: [0, 1, 2, 4, 5, 7], layers[1]: [1, 2, 3, 4, 6, 7]}
    domains = np.array([["x"] * 10, ["y"] * 10, ["x"] * 10, [None] * 10, ["y"] * 10], dtype=object)
    configs = {"pruned": kept, "same": dict(kept), "none": {}}
    results, clean = evaluate_pruned(moe, ids, configs, attention_mask=mask, domains=domains, batch_size=2)
    with torch.no_grad():
        logits = moe.model(input_ids=ids, attention_mask=mask).logits
        with moe.intervene(pruning_ablations(moe, kept)):
            pruned = moe.model(input_ids=ids, attention_mask=mask).logits
    nll_c, nll_p = nll_from_logits(logits, ids, mask), nll_from_logits(pruned, ids, mask)
    valid = ~torch.isnan(nll_c)
    lp, lq = torch.log_softmax(logits.float(), -1), torch.log_softmax(pruned.float(), -1)
    kl = (lp.exp() * (lp - lq)).sum(-1)[valid]
    result = results["pruned"]
    assert result is results["same"]  # evaluated once
    assert result.n_tokens == int(valid.sum()) == 5 * 9 - 4
    assert result.heldout_nll == pytest.approx(float(nll_p[valid].double().mean()), abs=1e-6)
    assert result.heldout_ppl == pytest.approx(math.exp(result.heldout_nll))
    assert result.mean_kl == pytest.approx(float(kl.double().mean()), abs=1e-6) and result.mean_kl > 0
    assert clean.heldout_nll == pytest.approx(float(nll_c[valid].double().mean()), abs=1e-6) and clean.mean_kl == 0
    assert results["none"].heldout_nll == pytest.approx(clean.heldout_nll, abs=1e-7)
    assert abs(results["none"].mean_kl) < 1e-6
    x_rows = torch.tensor([0, 2])
    x_valid = valid[x_rows]
    assert result.by_domain["x"][0] == int(x_valid.sum())
    assert result.by_domain["x"][1] == pytest.approx(float(nll_p[x_rows][x_valid].double().mean()), abs=1e-6)
    assert set(result.by_domain) == {"x", "y"}


def test_pruning_ablations_validate():
    moe = make_moe()
    layer = moe.layers[0].layer
    with pytest.raises(InvalidParameterError, match="at least top_k = 2"):
        pruning_ablations(moe, {layer: [0]})
    with pytest.raises(InvalidParameterError, match=r"expert ids in \[0, 7\]"):
        pruning_ablations(moe, {layer: [0, 9]})
    with pytest.raises(InvalidParameterError, match="`layer` must be"):
        pruning_ablations(moe, {99: [0, 1]})
    assert pruning_ablations(moe, {layer: list(range(8))}) == []
