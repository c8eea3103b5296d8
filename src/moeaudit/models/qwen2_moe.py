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
