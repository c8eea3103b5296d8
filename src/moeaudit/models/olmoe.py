"""OLMoE (``OlmoeForCausalLM``): 64 routed experts, top-8, no shared expert, ``norm_topk_prob=False``."""

from __future__ import annotations

from moeaudit.models.base import SoftmaxTopKAdapter


class OlmoeAdapter(SoftmaxTopKAdapter):
    family = "olmoe"
    model_types = ("olmoe",)
    architectures = ("OlmoeForCausalLM",)
