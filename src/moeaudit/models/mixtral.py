"""Mixtral (``MixtralForCausalLM``): 8 experts, top-2, always renormalised; weights stay float32."""

from __future__ import annotations

import torch

from moeaudit.models.base import SoftmaxTopKAdapter


class MixtralAdapter(SoftmaxTopKAdapter):
    family = "mixtral"
    model_types = ("mixtral",)
    architectures = ("MixtralForCausalLM",)

    def renormalises(self, config) -> bool:
        return True

    def combine_dtype(self, router_logits: torch.Tensor) -> torch.dtype:
        # MixtralTopKRouter softmaxes in float32 and never casts back.
        return torch.float32
