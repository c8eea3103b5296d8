"""The generic adapter rediscovers every rule-based family on its own: the same modules as the hand-written
adapter, a routing rule that routes bit for bit as the hand-written one (also with experts removed), and a
family transformers knows under a name moeaudit has never seen is audited end to end."""

from __future__ import annotations

import pytest
import torch

from moeaudit.errors import ContractError, UnsupportedModelError
from moeaudit.intervene import InterveneConfig, Selection, compute_effects
from moeaudit.models import wrap_model
from moeaudit.models.generic import GenericAdapter, discover_layout
from moeaudit.models.testing import FAMILIES, tiny_config, tiny_model

HAND_WRITTEN_ONLY = {"phimoe": "no routing rule moeaudit knows reproduces",          # sparsemixer
                     "llama4_text": r"a 2-tuple, not \(router_logits",                  # (scores, logits)
                     "gemma4_text": "no MoE layers found",                             # MoE inline in the layer
                     "axk1": "is not its experts' weighted sum plus its shared experts"}  # a norm in the block
RULE_BASED = [f for f in FAMILIES if f not in HAND_WRITTEN_ONLY]

from tests.conftest import assert_fast_equals_reference

IDS = torch.randint(3, 96, (2, 12), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("family", RULE_BASED)
def test_generic_adapter_finds_the_same_modules_and_routes_bit_for_bit(family):
    model = tiny_model(family, seed=3)
    known = wrap_model(model, name=family)
    generic = wrap_model(model, name=family, adapter=GenericAdapter(model.config.model_type))  # runs the contract

    assert [l.layer for l in generic.layers] == [l.layer for l in known.layers]
    for ours, theirs in zip(generic.layers, known.layers):
        assert ours.block is theirs.block and ours.router is theirs.router and ours.experts is theirs.experts
        assert ours.shared is theirs.shared and ours.shared_gate is theirs.shared_gate
        assert (ours.num_experts, ours.top_k) == (theirs.num_experts, theirs.top_k)
    with torch.no_grad(), known.capture("all") as trace:
        model(IDS)
    generator = torch.Generator().manual_seed(1)
    for ours, theirs in zip(generic.layers, known.layers):
        logits = trace[theirs.layer].rows.router_logits
        removed = torch.rand(logits.shape, generator=generator) < 0.25  # a quarter of the experts, per token
        removed[:, : theirs.top_k] = False  # at least top_k survive
        for mask in (None, removed):
            a, b = ours.route(logits, mask), theirs.route(logits, mask)
            assert torch.equal(a.topk_idx, b.topk_idx), f"layer {ours.layer}"
            assert torch.equal(a.combine_weight, b.combine_weight), f"layer {ours.layer}"
            assert torch.equal(a.raw_gate, b.raw_gate) and torch.equal(a.router_probs, b.router_probs)
    params = generic.describe()["moe_layers"][0]["routing_parameters"]
    assert params["inferred"] is True and params["score"] in ("softmax", "sigmoid")


@pytest.mark.parametrize("family", sorted(HAND_WRITTEN_ONLY))
def test_families_no_rule_fits_are_refused_in_one_line(family):
    model = tiny_model(family, seed=3)
    with pytest.raises((UnsupportedModelError, ContractError), match=HAND_WRITTEN_ONLY[family]) as caught:
        wrap_model(model, adapter=GenericAdapter(model.config.model_type))
    assert "\n" not in str(caught.value)


def test_inference_reads_the_routers_own_parameters():
    """Planted: DeepSeek-V3 routers given a scaling factor no config has; the inferred rule is the routers' own."""
    model = tiny_model("deepseek_v3", seed=3)
    for layer in wrap_model(model).layers:
        layer.router.routed_scaling_factor = 0.75
    generic = wrap_model(model, adapter=GenericAdapter("deepseek_v3"))
    assert {generic.adapter.routing_parameters(l)["routed_scaling_factor"] for l in generic.layers} == {0.75}


def test_discovery_finds_nothing_in_a_dense_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    dense = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=2))
    assert discover_layout(dense) is None
    with pytest.raises(UnsupportedModelError, match="no MoE layers found"):
        wrap_model(dense)


def test_a_family_moeaudit_has_never_heard_of_is_audited_end_to_end(tmp_path):
    """A DeepSeek-V3-style model registered with transformers under a new model_type ("acme_moe"): loaded by
    name from disk with no adapter of its own, its rule inferred, and its effects equal to the hand-written
    DeepSeek-V3 adapter's on the same weights, on both engines."""
    from transformers import AutoConfig, AutoModelForCausalLM, DeepseekV3Config, DeepseekV3ForCausalLM

    from moeaudit.models import load_model

    class AcmeMoeConfig(DeepseekV3Config):
        model_type = "acme_moe"

    class AcmeMoeForCausalLM(DeepseekV3ForCausalLM):
        config_class = AcmeMoeConfig

    from transformers.conversion_mapping import (get_checkpoint_conversion_mapping,
                                                 register_checkpoint_conversion_mapping)

    # Its checkpoints store experts as DeepSeek-V3's do (one tensor per expert, fused on load).
    register_checkpoint_conversion_mapping("acme_moe", get_checkpoint_conversion_mapping("deepseek_v3"), overwrite=True)
    AutoConfig.register("acme_moe", AcmeMoeConfig, exist_ok=True)
    AutoModelForCausalLM.register(AcmeMoeConfig, AcmeMoeForCausalLM, exist_ok=True)
    native = tiny_model("deepseek_v3", seed=3)
    acme = AcmeMoeForCausalLM(AcmeMoeConfig(**native.config.to_dict()))
    acme.load_state_dict(native.state_dict())
    acme.save_pretrained(tmp_path)

    moe = load_model(str(tmp_path), experts_implementation="batched_mm")
    assert isinstance(moe.adapter, GenericAdapter) and moe.family == "acme_moe"
    reference = wrap_model(native, name="deepseek_v3")
    for engine in ("fast", "reference"):
        config = InterveneConfig(engine=engine, kinds=("zero", "reroute"), scopes=("token",))
        ours = compute_effects(moe, IDS, Selection.sample(3, seed=0), config=config).effects
        theirs = compute_effects(reference, IDS, Selection.sample(3, seed=0), config=config).effects
        assert ours.delta_nll.tolist() == theirs.delta_nll.tolist()


def test_a_bias_on_the_logits_is_inferred_and_steers_the_selection_only():
    """Kolibri-1 ranks logits + the router's correction bias and weights each chosen expert by the sigmoid of its
    raw logit. Planted: expert 5's bias is +100, so it takes a slot at every token while its weight stays its
    own sigmoid (renormalised); removed, it gives its slot to the next best by logit + bias."""
    model = tiny_model("kolibri1", seed=3)
    with torch.no_grad():
        for decoder_layer in model.model.layers:
            decoder_layer.mlp.gate.e_score_correction_bias[5] = 100.0
    moe = wrap_model(model)  # the contract check: the inferred rule routes as the module, bit for bit
    layer = moe.layer(0)
    rule = moe.adapter.rule_for(layer)
    assert (rule.select, rule.bias, rule.score) == ("logits", "router", "sigmoid")
    hidden = torch.randn(16, model.config.hidden_size, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        logits, weights, idx = layer.router(hidden)
    assert bool((idx == 5).any(dim=-1).all())
    chosen = logits.gather(1, idx).sigmoid()
    assert torch.equal(weights, chosen / chosen.sum(dim=-1, keepdim=True))
    removed = torch.zeros(logits.shape, dtype=torch.bool)
    removed[:, 5] = True
    rerouted = layer.route(logits, removed)
    choice = (logits + layer.router.e_score_correction_bias).masked_fill(removed, float("-inf"))
    expected = torch.topk(choice, layer.top_k, dim=-1).indices
    assert not bool((rerouted.topk_idx == 5).any())
    assert torch.equal(rerouted.topk_idx.sort(dim=-1).values, expected.sort(dim=-1).values)
    survivors = logits.gather(1, expected).sigmoid()
    weights_by_expert = torch.zeros_like(logits).scatter(1, rerouted.topk_idx, rerouted.combine_weight)
    expected_by_expert = torch.zeros_like(logits).scatter(1, expected, survivors / survivors.sum(-1, keepdim=True))
    assert torch.equal(weights_by_expert, expected_by_expert)


def test_arias_multimodal_checkpoint_is_audited_pruned_and_exported(tmp_path):
    """Aria ships ``AriaForConditionalGeneration`` (model_type "aria"), which ``AutoModelForCausalLM`` does not
    map: it loads through the class its config names, the generic adapter finds the language model's MoE
    layers under ``model.language_model``, the fast engine agrees with the reference engine on text, and the
    pruned export loads with plain transformers, computing what the masked pruning computes."""
    from transformers import AriaConfig, AriaForConditionalGeneration

    from moeaudit.models import load_model
    from moeaudit.models.moe_model import nll_from_logits
    from moeaudit.prune import export_pruned, pruning_ablations

    vision = dict(hidden_size=16, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2, image_size=28,
                  patch_size=14)
    torch.manual_seed(0)
    wrapper = AriaForConditionalGeneration(AriaConfig(text_config=tiny_config("aria_text").to_dict(),
                                                      vision_config=vision, projector_patch_to_query_dict={4: 2}))
    wrapper.eval().save_pretrained(tmp_path / "source")
    moe = load_model(str(tmp_path / "source"))
    assert isinstance(moe.adapter, GenericAdapter) and type(moe.model).__name__ == "AriaForConditionalGeneration"
    assert moe.moe_layer_indices == [0, 1, 2]
    assert_fast_equals_reference(moe, IDS[:1])
    kept = {layer: [0, 1, 3, 4, 6, 7] for layer in moe.moe_layer_indices}
    assert export_pruned(moe, kept, tmp_path / "pruned").num_experts == 6
    loaded = AriaForConditionalGeneration.from_pretrained(tmp_path / "pruned").eval()
    assert loaded.config.text_config.moe_num_experts == 6
    with torch.no_grad():
        with moe.intervene(pruning_ablations(moe, kept)):
            masked = nll_from_logits(moe.model(input_ids=IDS).logits, IDS)
        exported = nll_from_logits(loaded(input_ids=IDS).logits, IDS)
    assert torch.allclose(masked[:, :-1], exported[:, :-1], atol=1e-5, rtol=0)
