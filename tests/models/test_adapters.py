"""Adapters are exact: capture, routing, recomposition and every ablation kind, for every family.

Kernel: ``batched_mm`` (each (token, slot) row computed on its own), which makes untouched positions
bit-identical; ``test_zero_noise_floor_grouped_mm`` measures the floor of transformers' default kernel.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from moeaudit.errors import InvalidParameterError
from moeaudit.models import Ablation, SharedAblation, UnchangedWarning, wrap_model
from moeaudit.models.testing import FAMILIES, tiny_model

BATCH, SEQ = 2, 12


@pytest.fixture(scope="module", params=FAMILIES)
def moe(request):
    return wrap_model(tiny_model(request.param, seed=3), name=request.param)


@pytest.fixture(scope="module")
def input_ids():
    return torch.randint(3, 96, (BATCH, SEQ), generator=torch.Generator().manual_seed(0))


def clean_run(moe, input_ids, layers="all"):
    with torch.no_grad(), moe.capture(layers, keep_outputs=True) as trace:
        logits = moe.model(input_ids).logits
    return logits, trace


def row1(pos):
    """A [B, T] position mask selecting only batch row 1 at ``pos``."""
    mask = torch.zeros(BATCH, SEQ, dtype=torch.bool)
    mask[1, pos] = True
    return mask


def pick_active(record, token=7, slot=0):
    """(flat token index, position in batch row 1, expert, slot) of an active expert."""
    flat = SEQ + token  # batch row 1
    return flat, token, int(record.topk_idx[flat, slot]), slot


def test_capture_leaves_logits_bit_identical(moe, input_ids):
    with torch.no_grad():
        plain = moe.model(input_ids).logits
    logits, trace = clean_run(moe, input_ids)
    assert torch.equal(plain, logits)
    assert trace.layers == moe.moe_layer_indices


def test_router_logits_match_transformers_recorder(moe, input_ids):
    with torch.no_grad(), moe.capture("all") as trace:
        out = moe.model(input_ids, output_router_logits=True)
    recorded = [r for r in out.router_logits if r is not None]
    if moe.family == "jetmoe":  # per layer: the attention experts' gate, the attention (the same logits), the MLP's
        recorded = recorded[2::3]
    assert len(recorded) == len(moe.layers)
    for layer, theirs in zip(moe.layers, recorded):
        ours = trace[layer.layer].rows.router_logits
        if moe.family == "gemma4":  # Gemma4TextRouter's first output, what transformers records, is its softmax
            ours = layer.router_probs(ours)
        assert torch.equal(ours, theirs.reshape(-1, layer.num_experts))


def test_trace_tensors_are_batch_by_position(moe, input_ids):
    """``trace[layer]`` tensors are ``[batch, pos, ...]`` (TransformerLens's layout): sequence b of the batch
    holds what running sequence b alone records, and ``.rows`` is the same record as ``[batch * pos]`` rows."""
    _, trace = clean_run(moe, input_ids)
    for layer in moe.layers:
        record = trace[layer.layer]
        assert record.topk_idx.shape == record.combine_weight.shape == record.act_norm.shape == (BATCH, SEQ,
                                                                                               layer.top_k)
        assert record.router_logits.shape == record.router_probs.shape == (BATCH, SEQ, layer.num_experts)
        assert record.ungated.shape[:3] == (BATCH, SEQ, layer.top_k)
        for name in ("moe_input", "routed_output", "moe_output", "shared_output"):
            assert getattr(record, name) is None or getattr(record, name).shape[:2] == (BATCH, SEQ), name
        rows = record.rows
        assert rows.flat and rows.rows is rows and rows.topk_idx.shape == (BATCH * SEQ, layer.top_k)
        assert torch.equal(rows.ungated[SEQ + 7], record.ungated[1, 7])  # row b * SEQ + t
        assert torch.equal(rows.shaped().router_logits, record.router_logits) and record.shaped() is record
    for b in range(BATCH):
        _, alone = clean_run(moe, input_ids[b:b + 1])
        for layer in moe.layers:
            torch.testing.assert_close(alone[layer.layer].router_logits[0], trace[layer.layer].router_logits[b],
                                       rtol=1e-5, atol=1e-5)
            assert torch.equal(alone[layer.layer].topk_idx[0], trace[layer.layer].topk_idx[b])


def test_reimplemented_routing_equals_module(moe, input_ids):
    with torch.no_grad(), moe.intervene((), capture="all", keep_outputs=True, blocks="all") as trace:
        moe.model(input_ids)
    for layer in moe.layers:
        record = trace[layer.layer].rows
        block_input = trace.block_inputs[layer.layer][0]
        router_input = block_input.reshape(-1, block_input.shape[-1])  # the router reads the block's input
        with torch.no_grad():
            assert torch.equal(layer.adapter.experts_input(layer, router_input), record.moe_input)
            router_logits, weights, idx = layer.call_router(router_input)
        routing = layer.route(router_logits)
        assert torch.equal(routing.topk_idx, idx)
        assert torch.equal(routing.combine_weight, weights)
        assert torch.equal(record.topk_idx, idx) and torch.equal(record.combine_weight, weights)
        if score_function(layer) == "sigmoid":  # the family's score: sigmoid, bias not included
            probs = torch.sigmoid(router_logits.float())
        elif score_function(layer) == "sqrtsoftplus":  # DeepSeek-V4: sqrt(softplus) in the logits' dtype
            probs = torch.nn.functional.softplus(router_logits).sqrt().float()
        else:
            probs = torch.softmax(router_logits.float(), dim=-1)
        assert torch.equal(record.raw_gate, probs.gather(-1, idx))


def score_function(layer) -> str:
    """The family's score: named by the rule, or by the inferred parameters of the generic adapter."""
    if layer.routing_rule == "inferred_scored_topk":
        return layer.adapter.routing_parameters(layer)["score"]
    return next((name for name in ("sigmoid", "sqrtsoftplus") if layer.routing_rule.startswith(name)), "softmax")


def independent_shared_part(layer, hidden):
    """The shared experts' part of the block's output, plus a routing-independent offset (JetMoE's bias)."""
    offset = layer.adapter.block_offset(layer)
    out = torch.zeros_like(hidden) if offset is None else offset.expand_as(hidden)
    if layer.shared is None:
        return out
    shared = layer.shared(hidden)
    if layer.shared_gate is not None:
        shared = torch.sigmoid(layer.shared_gate(hidden)) * shared
    return out + shared


def slot_terms(layer, record, weights=None):
    """Each slot's term of the routed output [N, k, H] from first principles: w * f_e(x), or for a family whose
    weight scales the expert's input (Llama 4) f_e(w * x), with f_e the SwiGLU of the fused weights."""
    weights = record.combine_weight if weights is None else weights
    if not layer.weights_scale_input:
        return weights.float().unsqueeze(-1) * record.ungated
    x = record.moe_input.unsqueeze(1) * weights.unsqueeze(-1)  # [N, k, H]
    gate_up = torch.einsum("nkh,nkhi->nki", x, layer.experts.gate_up_proj[record.topk_idx])
    gate, up = gate_up.chunk(2, dim=-1)
    return torch.einsum("nki,nkih->nkh", up * torch.nn.functional.silu(gate), layer.experts.down_proj[record.topk_idx])


def test_recomposition_equals_block_output(moe, input_ids):
    _, trace = clean_run(moe, input_ids)
    for layer in moe.layers:
        r = trace[layer.layer].rows
        with torch.no_grad():
            shared = independent_shared_part(layer, r.moe_input)
            recomposed = slot_terms(layer, r).sum(dim=1) + shared
        rel = (recomposed - r.moe_output).abs().max() / r.moe_output.abs().max()
        assert rel <= 1e-6, f"layer {layer.layer}: relative error {rel:.2e}"
        assert torch.allclose(r.act_norm, torch.linalg.vector_norm(r.ungated, dim=-1))
        if layer.shared is not None:
            assert torch.allclose(r.shared_output, shared, atol=1e-6)


def test_zero_removes_exactly_one_term(moe, input_ids):
    clean_logits, clean = clean_run(moe, input_ids)
    for layer in moe.layers:
        c = clean[layer.layer].rows
        flat, pos, expert, slot = pick_active(c)
        with torch.no_grad(), moe.intervene([Ablation(layer.layer, experts=expert, positions=row1(pos))],
                                            capture=[layer.layer], keep_outputs=True) as trace:
            logits = moe.model(input_ids).logits
        a = trace[layer.layer].rows
        delta = c.moe_output - a.moe_output
        with torch.no_grad():
            expected = slot_terms(layer, c)[flat, slot]
        assert torch.allclose(delta[flat], expected, rtol=1e-5, atol=1e-6)
        others = torch.ones(BATCH * SEQ, dtype=torch.bool)
        others[flat] = False
        assert torch.equal(a.moe_output[others], c.moe_output[others])
        # causal: earlier positions of that row, and the other row, are bit-identical under batched_mm
        assert torch.equal(logits[1, :pos], clean_logits[1, :pos])
        assert torch.equal(logits[0], clean_logits[0])
        assert not torch.equal(logits[1, pos], clean_logits[1, pos])


def test_zero_of_inactive_expert_has_no_effect(moe, input_ids):
    clean_logits, clean = clean_run(moe, input_ids)
    layer = moe.layers[-1]
    flat, pos, _, _ = pick_active(clean[layer.layer].rows)
    inactive = sorted(set(range(layer.num_experts)) - set(clean[layer.layer].rows.topk_idx[flat].tolist()))[0]
    with pytest.warns(UnchangedWarning, match="removed no slot"):  # and moe.intervene says so
        with torch.no_grad(), moe.intervene([Ablation(layer.layer, experts=inactive, positions=row1(pos))]) as trace:
            logits = moe.model(input_ids).logits
    assert torch.equal(logits[1, : pos + 1], clean_logits[1, : pos + 1]) and trace.slots_changed[layer.layer] == 0


def brute_force_route(layer, logits_row: np.ndarray, removed: int) -> tuple[set, dict]:
    """Selected set and combine weights after removing ``removed``, from first principles."""
    z = logits_row.astype(np.float64).copy()
    z[removed] = -np.inf
    probs = np.exp(z - z.max())
    probs /= probs.sum()
    k = layer.top_k
    rule = layer.routing_rule
    scored = {  # rule: (score, bias held by, groups filled with, renormalise, scaled); arXiv 2412.19437 Sec. 2.1.2
        "sigmoid_bias_group_scaled": ("sigmoid", "router", -np.inf, "config", True),   # DeepSeek-V3 and kin
        "softmax_group_sum_scaled": ("softmax", None, 0.0, "config", True),             # Mistral 4
        "sigmoid_bias_renorm": ("sigmoid", "block", None, "always", False),             # MiniMax-M2, Step-3.7
        "softmax_bias_renorm": ("softmax", "statics", None, "clamp", False),            # ERNIE-4.5
        "softmax_bias_scaled": ("softmax", "router", None, "never", True),               # LongCat-Flash
        "sqrtsoftplus_bias_renorm_scaled": ("sqrtsoftplus", "router", None, "always", True),  # DeepSeek-V4
        "softmax_group_sum_renorm_scaled": ("softmax", None, 0.0, "always", True),              # Mistral-Large-4
        "sigmoid_bias_group0_scaled": ("sigmoid", "router", 0.0, "config", True),                # A.X-K2
        "sigmoid_bias_scaled": ("sigmoid", "router", None, "config", True),                      # A.X-K2 Light
        "sigmoid_bias_group_renorm": ("sigmoid", "router", -np.inf, "config", False),            # Beam
        "sigmoid_bias_renorm_scaled": ("sigmoid", "router", None, "always", True),               # Muse-Spark
    }
    if rule == "inferred_scored_topk":  # the generic adapter: the rule its parameters describe
        params = layer.adapter.routing_parameters(layer)
        scale_attr = next((a for a in ("routed_scaling_factor", "router_scaling_factor", "route_scale") if a in params),
                          None)
        if params.get("selects_on") == "logits":
            chosen = list(np.argsort(-z, kind="stable")[:k])
            if params["score"] == "softmax":
                w = np.exp(z[chosen] - z[chosen].max())
                w = w / w.sum()
            else:
                w = 1.0 / (1.0 + np.exp(-z[chosen]))
                if params["renormalise"]:
                    w = w / w.sum()
            return set(chosen), dict(zip(chosen, w))
        fill = float(params["dropped_groups_filled_with"]) if "n_group" in params else None
        renorm = "always" if params["renormalise"] else None
        scored[rule] = (params["score"], None if params["correction_bias"] == "none" else params["correction_bias"],
                        fill, renorm, scale_attr)
    block_bias = "e_score_correction_bias"
    if rule == "inferred_scored_topk":
        block_bias = layer.adapter.routing_parameters(layer).get("correction_bias_attribute", block_bias)
    if rule in scored:
        score, bias_at, fill, renorm, scaled = scored[rule]
        if rule == "sigmoid_bias_renorm":  # MiniMax-M2's block holds the bias, Step-3.7's router
            bias_at = layer.adapter.routing_parameters(layer)["correction_bias"]
        router = layer.router
        scores = {"sigmoid": lambda: 1.0 / (1.0 + np.exp(-z)), "sqrtsoftplus": lambda: np.sqrt(np.logaddexp(0.0, z)),
                  "softmax": lambda: probs}[score]()
        bias = {None: 0.0, "router": lambda: router.e_score_correction_bias,
                "block": lambda: getattr(layer.block, block_bias),
                "statics": lambda: router.moe_statics.e_score_correction_bias[0]}[bias_at]
        choice = scores + (bias().double().numpy() if callable(bias) else bias)
        choice[removed] = -np.inf  # the bias must not win the removed expert a slot
        if fill is not None:
            groups = int(router.num_group)
            per = len(choice) // groups
            best = 1 if layer.adapter.routing_parameters(layer).get("group_score") == "its best" else 2
            group_score = np.sort(choice.reshape(groups, per), axis=1)[:, -best:].sum(axis=1)
            dropped = np.argsort(-group_score)[router.topk_group:]
            for g in dropped:
                choice[g * per:(g + 1) * per] = fill
            choice[removed] = -np.inf  # a fill of 0 must not offer the removed expert a slot again
        chosen = list(np.argsort(-choice, kind="stable")[:k])
        w = scores[chosen]
        if renorm == "always" or (renorm == "config" and router.norm_topk_prob):
            w = w / w.sum()
        elif renorm == "clamp":
            w = w / max(w.sum(), router.norm_min)
        if scaled:
            w = w * getattr(router, scaled if isinstance(scaled, str) else "routed_scaling_factor")
        return set(chosen), dict(zip(chosen, w))
    if rule == "sparsemixer":  # arXiv 2409.12136 at inference: argmax, then argmax of the rest
        eps = layer.router.router_jitter_noise
        alive = [j for j in range(len(z)) if j != removed]
        chosen, w = [], []
        for _ in range(2):
            best = max(alive, key=lambda j: z[j])
            near = [j for j in alive if (z[best] - z[j]) / max(abs(z[j]), z[best]) <= 2 * eps]
            e = np.exp(z[near] - z[best])
            chosen.append(best)
            w.append(e[near.index(best)] / e.sum())
            alive.remove(best)
        return set(chosen), dict(zip(chosen, w))
    if rule == "sigmoid_topk_logits_input":  # Llama 4: top-k of the logits, weights their sigmoid
        chosen = list(np.argsort(-z)[:k])
        return set(chosen), dict(zip(chosen, 1.0 / (1.0 + np.exp(-z[chosen]))))
    if rule == "softmax_topk_renorm_expert_scaled":  # Gemma 4: renormalised, then x a per-expert scale
        chosen = list(np.argsort(-probs)[:k])
        scale = layer.router.per_expert_scale.detach().double().numpy()
        return set(chosen), dict(zip(chosen, probs[chosen] / probs[chosen].sum() * scale[chosen]))
    if rule == "topk_logits_softmax":
        chosen = list(np.argsort(-z)[:k])
        w = np.exp(z[chosen] - z[chosen].max())
        return set(chosen), dict(zip(chosen, w / w.sum()))
    if rule == "softmax_topk_pnorm":  # DBRX: the k probabilities over their p-norm (DbrxFFN.route_tokens_to_experts)
        chosen = list(np.argsort(-probs)[:k])
        p = layer.adapter.routing_parameters(layer)["p"]
        w = probs[chosen] if p is None else probs[chosen] / (np.abs(probs[chosen]) ** p).sum() ** (1.0 / p)
        return set(chosen), dict(zip(chosen, w))
    allowed = np.arange(len(z))
    if rule == "softmax_group_limited_scaled":
        groups = layer.router.num_group
        per = len(z) // groups
        best_groups = np.argsort(-probs.reshape(groups, per).max(axis=1))[: layer.router.topk_group]
        allowed = np.concatenate([np.arange(g * per, (g + 1) * per) for g in best_groups])
    chosen = list(allowed[np.argsort(-probs[allowed])[:k]])
    w = probs[chosen]
    if rule == "softmax_topk_renorm":
        w = w / w.sum()
    if rule.endswith("_scaled"):
        w = w * layer.router.routed_scaling_factor
    return set(chosen), dict(zip(chosen, w))


def test_reroute_selects_next_best(moe, input_ids):
    _, clean = clean_run(moe, input_ids)
    for layer in moe.layers:
        c = clean[layer.layer].rows
        flat, pos, expert, _ = pick_active(c)
        with torch.no_grad(), moe.intervene([Ablation(layer.layer, experts=expert, positions=row1(pos), kind="reroute")],
                                            capture=[layer.layer], keep_outputs=True) as trace:
            moe.model(input_ids)
        a = trace[layer.layer].rows
        chosen, weights = brute_force_route(layer, c.router_logits[flat].double().numpy(), expert)
        new = a.topk_idx[flat].tolist()
        assert expert not in new and set(new) == chosen
        inferred_groups = (layer.routing_rule == "inferred_scored_topk"
                           and "n_group" in layer.adapter.routing_parameters(layer))
        grouped = ("group" in layer.routing_rule or inferred_groups) and getattr(layer.router, "num_group", 1) > 1
        if not grouped and layer.routing_rule != "softmax_bias_renorm":
            assert len(set(new) & set(c.topk_idx[flat].tolist())) == layer.top_k - 1  # one replacement
        # (with a group score of the two best, a removal can move the token to another group; with softmax
        # probabilities + a bias, renormalising over the survivors can reorder them)
        for slot, e in enumerate(new):
            assert a.combine_weight[flat, slot].item() == pytest.approx(weights[e], rel=1e-5)
        others = torch.ones(BATCH * SEQ, dtype=torch.bool)
        others[flat] = False
        assert torch.equal(a.topk_idx[others], c.topk_idx[others])  # only (row 1, pos) is re-routed here
        assert torch.equal(a.router_logits, c.router_logits)  # recorders see the original logits


def test_renorm_keeps_surviving_sum(moe, input_ids):
    _, clean = clean_run(moe, input_ids)
    for layer in moe.layers:
        c = clean[layer.layer].rows
        flat, pos, expert, slot = pick_active(c, slot=1)
        with torch.no_grad(), moe.intervene([Ablation(layer.layer, experts=expert, positions=row1(pos), kind="renorm")],
                                            capture=[layer.layer], keep_outputs=True) as trace:
            moe.model(input_ids)
        a = trace[layer.layer].rows
        before, after = c.combine_weight[flat].float(), a.combine_weight[flat].float()
        assert after[slot] == 0
        assert after.sum().item() == pytest.approx(before.sum().item(), rel=1e-6)
        keep = torch.arange(layer.top_k) != slot
        ratio = after[keep] / before[keep]
        assert torch.allclose(ratio, ratio[0].expand_as(ratio), rtol=1e-6)
        weights = c.combine_weight.clone()
        weights[flat] = a.combine_weight[flat]
        with torch.no_grad():
            expected = slot_terms(layer, c, weights)[flat].sum(0) + (c.moe_output[flat] - c.routed_output[flat])
        assert torch.allclose(a.moe_output[flat], expected, rtol=1e-5, atol=1e-6)


def test_mean_replaces_output(moe, input_ids):
    _, clean = clean_run(moe, input_ids)
    for layer in moe.layers:
        c = clean[layer.layer].rows
        flat, pos, expert, slot = pick_active(c)
        means = torch.randn(layer.num_experts, c.moe_output.shape[-1], generator=torch.Generator().manual_seed(1))
        if layer.weights_scale_input:  # Llama 4: no output term w * f_e(x) to replace
            with pytest.raises(InvalidParameterError, match="scales the expert's input"):
                with moe.intervene([Ablation(layer.layer, experts=expert, kind="mean", mean_output=means)]):
                    pass
            continue
        with torch.no_grad(), moe.intervene([Ablation(layer.layer, experts=expert, positions=row1(pos), kind="mean",
                                                      mean_output=means)],
                                            capture=[layer.layer], keep_outputs=True) as trace:
            moe.model(input_ids)
        a = trace[layer.layer].rows
        w = c.combine_weight[flat, slot].float()
        expected = c.moe_output[flat] - w * c.ungated[flat, slot] + w * means[expert]
        assert torch.allclose(a.moe_output[flat], expected, rtol=1e-5, atol=1e-6)


def test_sequence_scope_removes_expert_wherever_active(moe, input_ids):
    _, clean = clean_run(moe, input_ids)
    layer = moe.layers[0]
    c = clean[layer.layer].rows
    expert = int(c.topk_idx[0, 0])
    with torch.no_grad(), moe.intervene([Ablation(layer.layer, experts=expert)], capture=[layer.layer],
                                        keep_outputs=True) as trace:
        moe.model(input_ids)
    a = trace[layer.layer].rows
    active = (c.topk_idx == expert)
    assert torch.all(a.combine_weight[active] == 0)
    assert torch.equal(a.combine_weight[~active], c.combine_weight[~active])
    rows_unaffected = ~active.any(dim=-1)
    assert torch.equal(a.moe_output[rows_unaffected], c.moe_output[rows_unaffected])


def test_shared_ablation(moe, input_ids):
    layers = [layer for layer in moe.layers if layer.shared is not None]
    if not layers:
        with pytest.raises(Exception, match="shared experts"):
            with moe.intervene([SharedAblation(moe.layers[0].layer)]):
                pass
        return
    _, clean = clean_run(moe, input_ids)
    layer = layers[0]
    c = clean[layer.layer].rows
    flat, pos, _, _ = pick_active(c)
    for index in [None] + list(range(layer.num_shared if layer.num_shared > 1 else 0)):
        with torch.no_grad(), moe.intervene([SharedAblation(layer.layer, positions=row1(pos), index=index)],
                                            capture=[layer.layer], keep_outputs=True) as trace:
            moe.model(input_ids)
        a = trace[layer.layer].rows
        if index is None:
            expected = c.moe_output[flat] - c.shared_output[flat]
        else:  # recompute shared expert `index` alone from its slice of the fused MLP
            s = layer.shared
            lo, hi = index * layer.shared_intermediate, (index + 1) * layer.shared_intermediate
            x = c.moe_input[flat]
            with torch.no_grad():
                inter = s.act_fn(x @ s.gate_proj.weight[lo:hi].T) * (x @ s.up_proj.weight[lo:hi].T)
                part = inter @ s.down_proj.weight[:, lo:hi].T
            expected = c.moe_output[flat] - part
        assert torch.allclose(a.moe_output[flat], expected, rtol=1e-5, atol=1e-6)


def test_hooks_removed_after_exception(moe, input_ids):
    def hooks():  # transformers keeps its own output-recorder hooks; ours must all go
        return [(id(m), list(m._forward_hooks), list(m._forward_pre_hooks)) for m in moe.model.modules()]

    before = hooks()
    with pytest.raises(RuntimeError, match="boom"):
        with moe.intervene([Ablation(moe.layers[0].layer, experts=0)], capture="all"):
            assert hooks() != before
            raise RuntimeError("boom")
    assert hooks() == before


@pytest.mark.parametrize("family", ["olmoe", "deepseek_v2"])
def test_zero_noise_floor_grouped_mm(family, input_ids):
    """transformers' default grouped_mm kernel: untouched earlier positions stay within a float32 floor."""
    moe = wrap_model(tiny_model(family, seed=3, experts_implementation="grouped_mm"))
    assert moe.experts_implementation == "grouped_mm"
    layer = moe.layers[0]
    with torch.no_grad(), moe.capture([layer.layer], keep_outputs=True) as clean:
        clean_logits = moe.model(input_ids).logits
    _, pos, expert, _ = pick_active(clean[layer.layer].rows)
    with torch.no_grad(), moe.intervene([Ablation(layer.layer, experts=expert, positions=row1(pos))]):
        logits = moe.model(input_ids).logits
    floor = (logits[1, :pos] - clean_logits[1, :pos]).abs().max().item()
    assert floor <= 1e-5 * clean_logits.abs().max().item()
    assert (logits[1, pos] - clean_logits[1, pos]).abs().max().item() > 100 * max(floor, 1e-7)


def test_bad_ablation_arguments(moe):
    from moeaudit.errors import InvalidParameterError

    with pytest.raises(InvalidParameterError, match="`kind` must be one of zero, renorm, reroute, mean"):
        Ablation(moe.layers[0].layer, experts=0, kind="drop")
    with pytest.raises(InvalidParameterError, match="`mean_output`"):
        Ablation(moe.layers[0].layer, experts=0, kind="mean")
    with pytest.raises(InvalidParameterError, match="`layer` must be an MoE layer index"):
        with moe.intervene([Ablation(99, experts=0)]):
            pass
    last = moe.layers[0].num_experts - 1
    with pytest.raises(InvalidParameterError, match=rf"`experts` must be in \[0, {last}\]"):
        with torch.no_grad(), moe.intervene([Ablation(moe.layers[0].layer, experts=last + 1)]):
            moe.model(torch.ones(1, 4, dtype=torch.long))


@pytest.mark.parametrize("family", ["deepseek_v3", "glm4_moe"])
def test_reroute_on_a_biased_sigmoid_router_never_keeps_the_removed_expert(family, input_ids):
    """A load-balancing bias large enough to always select expert 5: masking its logit alone would leave
    sigmoid(-inf) + bias = bias as its selection score, and it would keep its slot (with weight 0)."""
    model = tiny_model(family, seed=3)
    moe = wrap_model(model, name=family)
    layer = moe.layers[-1]
    with torch.no_grad():
        layer.router.e_score_correction_bias[5] = 10.0
    _, clean = clean_run(moe, input_ids, layers=[layer.layer])
    assert (clean[layer.layer].rows.topk_idx == 5).any(dim=-1).all()  # the bias selects it at every token
    # What masking the logit alone would select: expert 5 again, at a zero score.
    masked = clean[layer.layer].rows.router_logits.clone()
    masked[:, 5] = float("-inf")
    naive_choice = torch.sigmoid(masked) + layer.router.e_score_correction_bias
    assert (naive_choice.topk(layer.top_k, dim=-1).indices == 5).any(dim=-1).all()

    everywhere = torch.ones(BATCH, SEQ, dtype=torch.bool)
    with torch.no_grad(), moe.intervene([Ablation(layer.layer, experts=5, positions=everywhere, kind="reroute")],
                                        capture=[layer.layer], keep_outputs=True) as trace:
        moe.model(input_ids)
    rerouted = trace[layer.layer].rows
    assert not (rerouted.topk_idx == 5).any()
    for flat in range(BATCH * SEQ):
        chosen, weights = brute_force_route(layer, clean[layer.layer].rows.router_logits[flat].double().numpy(), 5)
        assert set(rerouted.topk_idx[flat].tolist()) == chosen
        for slot, e in enumerate(rerouted.topk_idx[flat].tolist()):
            assert rerouted.combine_weight[flat, slot].item() == pytest.approx(weights[e], rel=1e-5)
