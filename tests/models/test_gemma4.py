"""Gemma 4: router logits from another input are refused at load; the multimodal checkpoint people download is
audited (fast engine), pruned and exported as it is (its views: tests/models/test_views.py; interventions
against a model without the expert: tests/intervene/test_restart.py)."""

from __future__ import annotations

import pytest
import torch

from moeaudit.errors import ContractError
from moeaudit.models import load_model, wrap_model
from moeaudit.models.gemma4 import Gemma4RouterView
from moeaudit.models.testing import tiny_config, tiny_model
from moeaudit.prune import export_pruned, pruning_ablations

from tests.conftest import assert_fast_equals_reference

IDS = torch.randint(3, 96, (2, 12), generator=torch.Generator().manual_seed(0))


def test_the_tiny_config_exercises_every_part_of_the_layer():
    """Per-layer inputs, keys/values shared across layers, sliding and full attention, soft-capped logits: the
    re-expressed forward runs through all of them."""
    config = tiny_config("gemma4_text")
    assert config.hidden_size_per_layer_input and config.final_logit_softcapping
    assert set(config.kv_sharing_modes) == {"store", "reuse"}
    assert set(config.layer_types) == {"sliding_attention", "full_attention"}


def test_router_logits_from_another_input_are_refused_at_load(monkeypatch):
    monkeypatch.setattr(Gemma4RouterView, "linear_input", lambda self, hidden: self.inner.norm(hidden))
    with pytest.raises(ContractError, match="router"):
        wrap_model(tiny_model("gemma4_text", seed=3), name="gemma4")


def test_multimodal_checkpoint_is_audited_pruned_and_exported(tmp_path):
    """gemma-4-26B-A4B ships ``Gemma4ForConditionalGeneration`` (model_type "gemma4"): it loads as it is, gives
    the wrapper's own logits on text, and its pruned export loads with plain transformers, computing what the
    masked pruning computes."""
    from transformers import AutoModelForCausalLM, Gemma4Config, Gemma4ForConditionalGeneration

    vision = dict(hidden_size=16, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
                  num_key_value_heads=2, head_dim=8)
    torch.manual_seed(0)
    wrapper = Gemma4ForConditionalGeneration(
        Gemma4Config(text_config=tiny_config("gemma4_text").to_dict(), vision_config=vision, audio_config=None)).eval()
    wrapper.save_pretrained(tmp_path / "source")
    with torch.no_grad():  # plain transformers' load of the checkpoint (its own load differs from `wrapper` ~1e-7)
        expected = AutoModelForCausalLM.from_pretrained(tmp_path / "source").eval()(input_ids=IDS).logits
    moe = load_model(str(tmp_path / "source"))
    assert moe.family == "gemma4" and type(moe.model).__name__ == "Gemma4ForConditionalGeneration"
    assert moe.moe_layer_indices == [0, 1, 2, 3]
    with torch.no_grad():
        assert torch.equal(moe.model(IDS).logits, expected)
    kept = {layer: [0, 1, 3, 4, 6, 7] for layer in moe.moe_layer_indices}
    result = export_pruned(moe, kept, tmp_path / "pruned")
    assert result.num_experts == 6 and result.original_num_experts == 8
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned").eval()
    assert type(loaded).__name__ == "Gemma4ForConditionalGeneration" and loaded.config.text_config.num_experts == 6
    with torch.no_grad():
        with moe.intervene(pruning_ablations(moe, kept)):
            masked = moe.model(input_ids=IDS).logits
        exported = loaded(input_ids=IDS).logits
    torch.testing.assert_close(exported, masked, rtol=0, atol=1e-5)
    layer = moe.adapter.find_layers(loaded)[2]
    assert torch.equal(layer.router.per_expert_scale, moe.layers[2].router.per_expert_scale[kept[2]])
    # the fast engine runs the multimodal model's language model as the text model's
    assert_fast_equals_reference(moe, IDS[:1])
