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
                     "ernie4_5_vl_moe": "no MoE layers found",                         # text and vision MoEs
                     "longcat_flash": "no linear map with a row per expert",           # identity experts too
                     "step3p7": "is not its experts' weighted sum plus its shared experts",  # scaled in the block
                     "axk1": "is not its experts' weighted sum plus its shared experts",  # a norm in the block
                     "dbrx": "no MoE layers found",  # routing in the block, 2-D expert weights
                     "deepseek_v4": "not a tensor of its block",  # hash routers read the token ids
                     "minimax_m3": "is not its experts' weighted sum plus its shared experts",  # scaled in the block
                     "laguna": "the router's first output is not its raw logits",  # soft-capped (and block-scaled)
                     "beam": "is not its experts' weighted sum plus its shared experts",  # scaled in the block
                     "nemotron_h_latent": "the experts do not take the block's input of width 32",  # latent
                     "muse_spark": "the router's first output is not its raw logits",  # times a multiplier
                     "jetmoe": "no MoE layers found"}  # routing in the block, experts as two parallel linears
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


#: DeepSeek-V2's language model in the OCR wrappers: group-limited by a group's best expert, with more experts
#: per token than groups kept (so the grouping changes the selection); Unlimited-OCR's default greedy rule.
_OCR_TEXT = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
                 num_key_value_heads=2, n_routed_experts=8, num_experts_per_tok=3, n_shared_experts=1,
                 moe_intermediate_size=16, mlp_layer_types=["dense", "sparse", "sparse"], routed_scaling_factor=2.0,
                 max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2)
_OCR_VISION = dict(sam_config=dict(hidden_size=16, output_channels=8, num_hidden_layers=1, num_attention_heads=2,
                                   image_size=32, patch_size=16, global_attn_indexes=[0], mlp_dim=16,
                                   downsample_channels=[8, 16]),
                   encoder_config=dict(hidden_size=16, intermediate_size=16, num_hidden_layers=1,
                                       num_attention_heads=2, num_key_value_heads=2, vocab_size=16))


def tiny_wrapper(family: str, **text_overrides):
    """A random-weight multimodal checkpoint of ``family`` whose language model is tiny, with the config field
    of its expert count; routers drawn with unit spread (decisive routing)."""
    import transformers

    if family == "aria":
        vision = dict(hidden_size=16, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
                      image_size=28, patch_size=14)
        config = transformers.AriaConfig(text_config=tiny_config("aria_text", **text_overrides).to_dict(),
                                         vision_config=vision, projector_patch_to_query_dict={4: 2})
        cls, field = transformers.AriaForConditionalGeneration, "moe_num_experts"
    else:
        prefix = {"deepseek_ocr2": "DeepseekOcr2", "unlimited_ocr": "UnlimitedOcr"}[family]
        text = dict(_OCR_TEXT, **({"topk_method": "group_limited_greedy", "n_group": 4, "topk_group": 2}
                                  if family == "deepseek_ocr2" else {"sliding_window": 6}), **text_overrides)
        config = getattr(transformers, prefix + "Config")(text_config=text, vision_config=_OCR_VISION)
        cls, field = getattr(transformers, prefix + "ForConditionalGeneration"), "n_routed_experts"
    torch.manual_seed(0)
    wrapper = cls(config).eval()
    with torch.no_grad():
        for name, param in wrapper.named_parameters():
            if name.endswith(("mlp.gate.weight", "mlp.router.weight")):
                param.normal_()
    return wrapper, field


#: Experts kept by the export test: with DeepSeek-OCR-2's 4 groups of 2, one per group.
_WRAPPER_KEPT = {"aria": [0, 1, 3, 4, 6, 7], "deepseek_ocr2": [0, 3, 4, 7], "unlimited_ocr": [0, 1, 3, 4, 6, 7]}


@pytest.mark.parametrize("family", ["aria", "deepseek_ocr2", "unlimited_ocr"])
def test_multimodal_wrappers_are_audited_pruned_and_exported(family, tmp_path):
    """Aria, DeepSeek-OCR-2 and Unlimited-OCR ship ``…ForConditionalGeneration`` checkpoints, which
    ``AutoModelForCausalLM`` does not map: each loads through the class its config names, the generic adapter
    finds the language model's MoE layers under ``model.language_model`` (DeepSeek-OCR-2: a group scored by its
    best expert, DeepSeek-V2's ``group_limited_greedy``), the fast engine agrees with the reference engine on
    text, and the pruned export loads with plain transformers, computing what the masked pruning computes."""
    from moeaudit.models import load_model
    from moeaudit.models.moe_model import nll_from_logits
    from moeaudit.prune import export_pruned, pruning_ablations

    wrapper, field = tiny_wrapper(family)
    wrapper.save_pretrained(tmp_path / "source")
    moe = load_model(str(tmp_path / "source"))
    assert isinstance(moe.adapter, GenericAdapter) and type(moe.model) is type(wrapper)
    assert moe.moe_layer_indices == ([0, 1, 2] if family == "aria" else [1, 2])
    if family == "deepseek_ocr2":
        assert moe.adapter.routing_parameters(moe.layers[0])["group_score"] == "its best"
    assert_fast_equals_reference(moe, IDS[:1])
    kept = {layer: _WRAPPER_KEPT[family] for layer in moe.moe_layer_indices}
    assert export_pruned(moe, kept, tmp_path / "pruned").num_experts == len(_WRAPPER_KEPT[family])
    loaded = type(wrapper).from_pretrained(tmp_path / "pruned").eval()
    assert getattr(loaded.config.text_config, field) == len(_WRAPPER_KEPT[family])
    with torch.no_grad():
        with moe.intervene(pruning_ablations(moe, kept)):
            masked = nll_from_logits(moe.model(input_ids=IDS).logits, IDS)
        exported = nll_from_logits(loaded(input_ids=IDS).logits, IDS)
    assert torch.allclose(masked[:, :-1], exported[:, :-1], atol=1e-5, rtol=0)


def _wrapper_of_text_model(family: str):
    """A vision-language checkpoint of ``family`` (``…ForConditionalGeneration``) around the tiny text config."""
    import transformers

    text = tiny_config(family).to_dict()
    for key in ("model_type", "transformers_version", "architectures"):
        text.pop(key, None)
    if family == "dots3_note":
        vision = dict(hidden_size=16, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2,
                      moe_intermediate_size=8, num_local_experts=4, pyramid_num_routed=[-1, 4], adapter_in_dim=16,
                      adapter_out_dim=32, patch_size=14)
        audio = dict(hidden_size=16, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
                     adapter_input_size=16, adapter_out_dim=32, downsample_hidden_size=8, feature_size=16)
        config = transformers.Dots3NoteConfig(text_config=text, vision_config=vision, audio_config=audio)
        cls = transformers.Dots3NoteForConditionalGeneration
    elif family == "qwen4_exp":
        config = transformers.Qwen4ExpConfig(text_config=text, vision_config=dict(
            depth=1, hidden_size=16, intermediate_size=16, num_heads=2, out_hidden_size=32))
        cls = transformers.Qwen4ExpForConditionalGeneration
    else:
        config = transformers.Inkling2Config(text_config=text, vision_config=dict(
            hidden_size=16, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2, patch_size=14,
            projection_hidden_dim=16, text_hidden_size=32))
        cls = transformers.Inkling2ForConditionalGeneration
    torch.manual_seed(0)
    wrapper = cls(config).eval()
    with torch.no_grad():
        for name, param in wrapper.named_parameters():
            if name.endswith("mlp.gate.weight"):
                param.normal_()
    return wrapper


@pytest.mark.parametrize("family, text_class", [("dots3_note", "Dots3NoteForCausalLM"),
                                                ("qwen4_exp", "Qwen4ExpForCausalLM"),
                                                ("inkling2", "Inkling2ForConditionalGeneration")])
def test_vision_language_checkpoints_load_as_their_text_model(family, text_class, tmp_path):
    """dots3-note and Qwen4-Exp ship vision-language checkpoints whose config ``AutoModelForCausalLM`` maps to
    the text model: moeaudit loads that one (the vision weights are left out), with the language model's
    logits; Inkling-2's, which it does not map, load as the wrapper its config names. The generic adapter
    audits each (Qwen4-Exp and Inkling-2 on the reference engine, as their refusals say; sequence removal
    checked by brute force through Inkling-2's convolutions)."""
    from moeaudit.models import load_model

    from tests.conftest import assert_sequence_removal_is_brute_force

    wrapper = _wrapper_of_text_model(family)
    wrapper.save_pretrained(tmp_path / "source")
    moe = load_model(str(tmp_path / "source"))
    assert type(moe.model).__name__ == text_class and isinstance(moe.adapter, GenericAdapter)
    assert moe.moe_layer_indices == ([1, 2] if family == "dots3_note" else [0, 1, 2, 3])
    assert (moe.adapter.fast_refusal is not None) == (family != "dots3_note")
    with torch.no_grad():
        assert torch.equal(wrapper(input_ids=IDS).logits, moe.model(input_ids=IDS).logits)
    if family == "inkling2":
        result = compute_effects(moe, IDS[:1], Selection.sample(2, seed=0),
                                 config=InterveneConfig(scopes=("sequence",)))
        assert result.stats.engine == "reference"
        assert_sequence_removal_is_brute_force(moe, IDS[:1], result.effects)
