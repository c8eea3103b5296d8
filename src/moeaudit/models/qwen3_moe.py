"""Qwen3-MoE (``Qwen3MoeForCausalLM``): routed experts only, top-k usually renormalised."""

from __future__ import annotations

from moeaudit.models.base import SoftmaxTopKAdapter


class Qwen3MoeAdapter(SoftmaxTopKAdapter):
    family = "qwen3_moe"
    model_types = ("qwen3_moe",)
    architectures = ("Qwen3MoeForCausalLM",)
