"""Qwen3-MoE (``Qwen3MoeForCausalLM``): routed experts only, top-k usually renormalised; and Qwen3-Omni-MoE's
thinker, which has the same block."""

from __future__ import annotations

from moeaudit.models.base import SoftmaxTopKAdapter


class Qwen3MoeAdapter(SoftmaxTopKAdapter):
    family = "qwen3_moe"
    model_types = ("qwen3_moe",)
    architectures = ("Qwen3MoeForCausalLM",)


class Qwen3OmniMoeAdapter(SoftmaxTopKAdapter):
    """Qwen3-Omni-MoE (``Qwen3OmniMoeForConditionalGeneration``: a thinker that reads text, images and audio
    and writes text, and a talker that turns it into speech). The thinker is the audited causal LM, on text:
    a ``qwen3_omni_moe`` checkpoint loads as ``Qwen3OmniMoeThinkerForConditionalGeneration`` with its
    ``thinker_config`` (transformers' conversion mapping strips the ``thinker.`` prefix and reads only the
    thinker's tensors: the talker and the vocoder are never loaded). Its decoder layers sit under
    ``model.language_model``; Qwen3-MoE's block: softmax top-k, renormalised when ``norm_topk_prob``, no
    shared expert (``models/qwen3_omni_moe/modeling_qwen3_omni_moe.py``,
    ``Qwen3OmniMoeThinkerTextTopKRouter``). The talker's own MoE layers are not audited. A pruned export is
    the thinker alone (``model_type`` ``qwen3_omni_moe_thinker``)."""

    family = "qwen3_omni_moe"
    model_types = ("qwen3_omni_moe", "qwen3_omni_moe_thinker")
    architectures = ("Qwen3OmniMoeThinkerForConditionalGeneration",)

    def audited_config(self, config):
        return getattr(config, "thinker_config", None) or config

    def audited_model(self, model):
        return getattr(model, "thinker", None) or model

    def backbone(self, model):
        return model.model.language_model
