"""Qwen3-Omni-MoE: a thinker (text, images, audio in; text out) and a talker (speech out) in one checkpoint.
The thinker is the audited causal LM: it loads alone from the whole checkpoint, runs on both engines, and its
pruned export is a thinker checkpoint that plain transformers loads."""

from __future__ import annotations

import torch

from moeaudit.models import load_model, wrap_model
from moeaudit.models.moe_model import nll_from_logits
from moeaudit.models.testing import tiny_config
from moeaudit.prune import export_pruned, pruning_ablations

from tests.conftest import assert_fast_equals_reference

IDS = torch.randint(3, 96, (2, 12), generator=torch.Generator().manual_seed(0))
_MROPE = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1], "interleaved": True}


def tiny_omni():
    """The whole model: the tiny thinker of ``tiny_config("qwen3_omni_moe")``, a one-layer MoE talker and
    vocoder; routers drawn with unit spread (decisive routing)."""
    from transformers import Qwen3OmniMoeConfig, Qwen3OmniMoeForConditionalGeneration

    talker_text = dict(vocab_size=64, hidden_size=16, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
                       num_key_value_heads=1, head_dim=8, moe_intermediate_size=8, shared_expert_intermediate_size=16,
                       num_experts=4, num_experts_per_tok=2, rope_parameters=_MROPE)
    predictor = dict(vocab_size=64, hidden_size=16, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
                     num_key_value_heads=1, head_dim=8, num_code_groups=4)
    talker = dict(text_config=talker_text, code_predictor_config=predictor, thinker_hidden_size=32, num_code_groups=4,
                  accept_hidden_layer=1, spatial_merge_size=2)
    code2wav = dict(codebook_size=64, hidden_size=16, num_attention_heads=2, num_key_value_heads=2,
                    intermediate_size=16, num_hidden_layers=1, num_quantizers=4, upsample_rates=[2],
                    upsampling_ratios=[2], decoder_dim=16)
    config = Qwen3OmniMoeConfig(thinker_config=tiny_config("qwen3_omni_moe").to_dict(), talker_config=talker,
                                code2wav_config=code2wav)
    torch.manual_seed(0)
    model = Qwen3OmniMoeForConditionalGeneration(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("mlp.gate.weight"):
                param.normal_()
    return model


def test_the_thinker_is_loaded_alone_from_the_whole_checkpoint_and_audited(tmp_path):
    from transformers import Qwen3OmniMoeThinkerForConditionalGeneration

    whole = tiny_omni()
    whole.save_pretrained(tmp_path / "omni")
    moe = load_model(str(tmp_path / "omni"))
    assert moe.family == "qwen3_omni_moe" and type(moe.model) is Qwen3OmniMoeThinkerForConditionalGeneration
    assert moe.moe_layer_indices == [1, 2] and moe.layers[0].routing_rule == "softmax_topk_renorm"
    assert not any(name.startswith(("talker", "code2wav")) for name, _ in moe.model.named_parameters())
    with torch.no_grad():  # the thinker's own weights, not a fresh initialisation
        assert torch.equal(moe.model(input_ids=IDS).logits, whole.thinker(input_ids=IDS).logits)
    wrapped = wrap_model(whole, name="omni")  # an already-built whole model: its thinker is audited
    assert wrapped.model is whole.thinker and wrapped.moe_layer_indices == [1, 2]
    assert_fast_equals_reference(moe, IDS[:1])


def test_the_pruned_thinker_exports_and_loads_with_plain_transformers(tmp_path):
    from transformers import Qwen3OmniMoeThinkerForConditionalGeneration

    tiny_omni().save_pretrained(tmp_path / "omni")
    moe = load_model(str(tmp_path / "omni"))
    kept = {layer: [0, 1, 3, 4, 6, 7] for layer in moe.moe_layer_indices}
    assert export_pruned(moe, kept, tmp_path / "pruned").num_experts == 6
    loaded = Qwen3OmniMoeThinkerForConditionalGeneration.from_pretrained(tmp_path / "pruned").eval()
    assert loaded.config.text_config.num_experts == 6
    with torch.no_grad():
        with moe.intervene(pruning_ablations(moe, kept)):
            masked = nll_from_logits(moe.model(input_ids=IDS).logits, IDS)
        exported = nll_from_logits(loaded(input_ids=IDS).logits, IDS)
    assert torch.allclose(masked[:, :-1], exported[:, :-1], atol=1e-5, rtol=0)
    again = load_model(str(tmp_path / "pruned"))  # the export is itself an auditable checkpoint
    assert again.family == "qwen3_omni_moe" and again.layers[0].num_experts == 6
