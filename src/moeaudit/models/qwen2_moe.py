"""Qwen1.5-MoE / Qwen2-MoE (``Qwen2MoeForCausalLM``): routed experts plus one shared expert behind a
sigmoid gate, ``sigmoid(shared_expert_gate(x)) * shared_expert(x)``; dense layers via ``mlp_only_layers``."""

from __future__ import annotations

from moeaudit.models.base import SoftmaxTopKAdapter


class Qwen2MoeAdapter(SoftmaxTopKAdapter):
    family = "qwen2_moe"
    model_types = ("qwen2_moe",)
    architectures = ("Qwen2MoeForCausalLM",)
    shared_attr = "shared_expert"
    shared_gate_attr = "shared_expert_gate"


class Qwen3NextAdapter(Qwen2MoeAdapter):
    """Qwen3-Next (``Qwen3NextForCausalLM``): Qwen2-MoE's block (gated shared expert) in a hybrid of Gated
    DeltaNet and attention layers; the fast engine replays attention only, so interventions run on the
    reference engine."""

    family = "qwen3_next"
    model_types = ("qwen3_next",)
    architectures = ("Qwen3NextForCausalLM",)


class Qwen35MoeAdapter(Qwen2MoeAdapter):
    """Qwen3.5-MoE text model (``Qwen3_5MoeForCausalLM``, which ``AutoModelForCausalLM`` also builds from a
    ``qwen3_5_moe`` vision-language config): Qwen2-MoE's block with the top-k always renormalised, in a hybrid of Gated DeltaNet and
    gated attention layers, so interventions run on the reference engine."""

    family = "qwen3_5_moe"
    model_types = ("qwen3_5_moe", "qwen3_5_moe_text")
    architectures = ("Qwen3_5MoeForCausalLM",)

    def renormalises(self, config) -> bool:
        return True  # Qwen3_5MoeTopKRouter renormalises unconditionally


class Qwen3VLMoeAdapter(Qwen35MoeAdapter):
    """Qwen3-VL-MoE (``Qwen3VLMoeForConditionalGeneration``), audited as a language model on text: the
    decoder layers sit under ``model.language_model``; softmax top-k, always renormalised, no shared expert.
    The fast engine replays that backbone's own rotary embedding (mRoPE; text positions are the same on all
    three axes)."""

    family = "qwen3_vl_moe"
    model_types = ("qwen3_vl_moe",)
    architectures = ("Qwen3VLMoeForConditionalGeneration",)

    def backbone(self, model):
        return model.model.language_model
