"""ERNIE-4.5-VL: modality-isolated experts. moeaudit audits the text MoE (and the shared experts) on text; inputs
with image or video tokens run the library's own forward, except under moeaudit's hooks, where they are
refused."""

from __future__ import annotations

import pytest
import torch

from moeaudit.errors import UnsupportedModelError
from moeaudit.models import load_model, wrap_model
from moeaudit.models.testing import tiny_model

IDS = torch.randint(3, 96, (2, 12), generator=torch.Generator().manual_seed(0))
#: Token types as the processor marks them: 0 text, 1 image (positions 3-6 of each window).
TYPES = torch.zeros_like(IDS).index_fill_(1, torch.arange(3, 7), 1)


def test_the_text_moe_is_audited_and_the_vision_experts_are_left_alone():
    moe = wrap_model(tiny_model("ernie4_5_vl_moe", seed=3), name="ernie")
    layer = moe.layers[0]
    library = moe.adapter.decoder_layers(moe.model)[layer.layer].mlp
    assert layer.router is library.text_moe.gate and layer.experts is library.text_moe.experts
    assert layer.shared is library.shared_experts and (layer.num_shared, layer.shared_intermediate) == (1, 16)
    assert all(p is not q for p in layer.block.parameters() for q in library.vision_moe.parameters())


def test_image_tokens_run_the_library_forward_and_are_refused_under_moeaudits_hooks():
    reference = tiny_model("ernie4_5_vl_moe", seed=3)
    model = tiny_model("ernie4_5_vl_moe", seed=3)
    moe = wrap_model(model, name="ernie")
    with torch.no_grad():  # outside moeaudit: the vision experts serve the image tokens, as in the library
        ours = model(input_ids=IDS, moe_mm_token_type_ids=TYPES).logits
        theirs = reference(input_ids=IDS, moe_mm_token_type_ids=TYPES).logits
        assert torch.equal(ours, theirs)
        assert not torch.equal(ours, model(input_ids=IDS).logits)  # the vision experts did change something
    with pytest.raises(UnsupportedModelError, match="audits ERNIE-4.5-VL on text") as err:
        with torch.no_grad(), moe.capture("all"):
            model(input_ids=IDS, moe_mm_token_type_ids=TYPES)
    assert "\n" not in str(err.value)


def test_a_saved_checkpoint_loads_through_its_own_class(tmp_path):
    from transformers import Ernie4_5_VLMoeForConditionalGeneration

    tiny_model("ernie4_5_vl_moe", seed=3).save_pretrained(tmp_path / "ernie")
    moe = load_model(str(tmp_path / "ernie"))
    assert moe.family == "ernie4_5_vl_moe" and type(moe.model) is Ernie4_5_VLMoeForConditionalGeneration
    library = Ernie4_5_VLMoeForConditionalGeneration.from_pretrained(tmp_path / "ernie").eval()
    with torch.no_grad():
        assert torch.equal(moe.model(input_ids=IDS).logits, library(input_ids=IDS).logits)
