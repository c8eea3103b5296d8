"""Llama 4: the multimodal checkpoint people download is audited as its text model; ``mean`` is refused (its
views of the library's router and experts: tests/models/test_views.py)."""

from __future__ import annotations

import pytest
import torch

from moeaudit.errors import InvalidParameterError
from moeaudit.intervene import InterveneConfig, compute_effects
from moeaudit.models import load_model, wrap_model
from moeaudit.models.testing import tiny_config, tiny_model

IDS = torch.randint(3, 96, (2, 12), generator=torch.Generator().manual_seed(0))


def test_multimodal_checkpoint_is_audited_as_its_text_model(tmp_path):
    """Llama-4-Scout/Maverick ship ``Llama4ForConditionalGeneration`` (model_type "llama4"); the text model
    loads from it and gives the wrapper's own logits on text."""
    from transformers import Llama4Config, Llama4ForConditionalGeneration

    vision = dict(hidden_size=16, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2, image_size=28,
                  patch_size=14, vision_output_dim=16, projector_input_dim=16, projector_output_dim=32)
    torch.manual_seed(0)
    wrapper = Llama4ForConditionalGeneration(
        Llama4Config(text_config=tiny_config("llama4_text").to_dict(), vision_config=vision)).eval()
    wrapper.save_pretrained(tmp_path)
    moe = load_model(str(tmp_path))
    assert moe.family == "llama4" and type(moe.model).__name__ == "Llama4ForCausalLM"
    with torch.no_grad():
        assert torch.equal(moe.model(IDS).logits, wrapper(input_ids=IDS).logits)


def test_mean_is_refused_before_any_intervention():
    moe = wrap_model(tiny_model("llama4_text", seed=3), name="llama4")
    with pytest.raises(InvalidParameterError, match="scales the expert's input"):
        compute_effects(moe, IDS, config=InterveneConfig(kinds=("mean",)))
