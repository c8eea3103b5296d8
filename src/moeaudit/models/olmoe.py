"""OLMoE (``OlmoeForCausalLM``): 64 routed experts, top-8, no shared expert, ``norm_topk_prob=False``."""

from __future__ import annotations

from moeaudit.models.base import SoftmaxTopKAdapter


class OlmoeAdapter(SoftmaxTopKAdapter):
    family = "olmoe"
    model_types = ("olmoe",)
    architectures = ("OlmoeForCausalLM",)


class FlexOlmoAdapter(SoftmaxTopKAdapter):
    """FlexOlmo (``FlexOlmoForCausalLM``): OLMoE's router and experts, with a norm after the MoE block
    (``post_feedforward_layernorm``) before the residual add. The fast engine's self-check sees that the
    block output does not enter the residual unchanged and measures with the reference engine."""

    family = "flex_olmo"
    model_types = ("flex_olmo",)
    architectures = ("FlexOlmoForCausalLM",)
