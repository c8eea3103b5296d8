"""A.X-K2 (``AXK2TopkRouter``): DeepSeek-V3's sigmoid + bias routing, except that the groups a token does not
keep get a selection score of 0 rather than -inf, so with a negative correction bias their experts win slots;
and the Light checkpoints (``n_group`` unset) route over all experts. moeaudit routes as the router module,
and a removed expert is never selected again, as in the router of a model without it."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from moeaudit.models import wrap_model
from moeaudit.models.scored import DeepseekV3Adapter, scored_route
from moeaudit.models.testing import tiny_model

HIDDEN = torch.randn(256, 32, generator=torch.Generator().manual_seed(0))


def negative_bias_layer():
    """A tiny A.X-K2 whose correction bias is -2 for every expert: every selection score in a kept group is
    negative, so the top-k fills from the dropped groups' zeros (their weights are their own scores)."""
    moe = wrap_model(tiny_model("axk2", seed=3), name="axk2")
    layer = moe.layers[0]
    with torch.no_grad():
        layer.router.e_score_correction_bias.fill_(-2.0)
    return moe, layer


def test_dropped_groups_filled_with_zero_route_as_the_router():
    moe, layer = negative_bias_layer()
    logits, weights, indices = layer.router(HIDDEN)
    ours = layer.route(logits)
    assert torch.equal(ours.topk_idx, indices) and torch.equal(ours.combine_weight, weights)
    per = layer.num_experts // 2
    kept_group = torch.sigmoid(logits).view(-1, 2, per).topk(2, dim=-1)[0].sum(-1).argmax(-1)
    assert bool((indices // per != kept_group[:, None]).all())  # every slot from the dropped group
    deepseek = scored_route(DeepseekV3Adapter.rule, layer, logits, logits, None, layer.router.e_score_correction_bias)
    assert not torch.equal(deepseek.topk_idx.sort(-1).values, indices.sort(-1).values)  # -inf fill differs


def test_a_removed_expert_is_never_selected_and_the_rest_route_as_without_it():
    """Experts 1 and 6 removed (one per group), with a bias of -0.5 (some selection scores of kept groups
    below the dropped groups' 0). A removed expert is never selected, though a fill of 0 would offer it a
    slot; and on every token without a tie at 0, moeaudit routes as A.X-K2's own router holding the other six
    experts (two groups of three). Ties at 0 are the router's own: torch.topk breaks them by position, which
    differs between 8 and 6 experts, in moeaudit and in a physically pruned model alike."""
    moe, layer = negative_bias_layer()
    with torch.no_grad():
        layer.router.e_score_correction_bias.fill_(-0.5)
    keep = [0, 2, 3, 4, 5, 7]
    pruned = copy.deepcopy(layer.router)
    with torch.no_grad():
        pruned.weight = torch.nn.Parameter(layer.router.weight[keep].clone())
        pruned.e_score_correction_bias = layer.router.e_score_correction_bias[keep].clone()
    pruned.num_experts = len(keep)
    with torch.no_grad():
        _, weights, indices = pruned(HIDDEN)
        logits = F.linear(HIDDEN.float(), layer.router.weight.float())
        removed = torch.zeros_like(logits, dtype=torch.bool)
        removed[:, [1, 6]] = True
        ours = layer.route(logits, removed)
        filled = pruned.apply_group_scoring(torch.sigmoid(F.linear(HIDDEN.float(), pruned.weight.float())) - 0.5)
    assert not bool(removed.gather(-1, ours.topk_idx).any())
    best = filled.topk(layer.top_k + 1, dim=-1).values
    untied = best[:, layer.top_k - 1] > best[:, layer.top_k]  # the k-th slot is won outright
    mapped = torch.tensor(keep)[indices]
    assert 0 < int(untied.sum()) < len(HIDDEN)
    order, theirs = ours.topk_idx[untied].sort(-1), mapped[untied].sort(-1)
    assert torch.equal(order.values, theirs.values)
    # the same weights up to the rounding of a 6-row against an 8-row matrix product
    torch.testing.assert_close(ours.combine_weight[untied].gather(-1, order.indices),
                               weights[untied].gather(-1, theirs.indices), rtol=1e-6, atol=0)


def test_light_checkpoints_route_over_all_experts():
    moe = wrap_model(tiny_model("axk2", seed=3, n_group=None, topk_group=None), name="axk2-light")
    layer = moe.layers[0]
    assert layer.routing_rule == "sigmoid_bias_scaled" and "n_group" not in moe.adapter.routing_parameters(layer)
    logits, weights, indices = layer.router(HIDDEN)
    ours = layer.route(logits)
    assert torch.equal(ours.topk_idx, indices) and torch.equal(ours.combine_weight, weights)
