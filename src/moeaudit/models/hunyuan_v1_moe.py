"""Hunyuan-MoE (``HunYuanMoEV1ForCausalLM``): softmax top-k, always renormalised, of a router whose linear
map is ``gate.wg`` (kept in float32, the hidden states cast up to it); one ungated shared MLP
(``shared_mlp``) added to the routed output."""

from __future__ import annotations

import torch

from moeaudit.models.base import MoELayer, SoftmaxTopKAdapter


class HunYuanMoeAdapter(SoftmaxTopKAdapter):
    family = "hunyuan_v1_moe"
    model_types = ("hunyuan_v1_moe",)
    architectures = ("HunYuanMoEV1ForCausalLM",)
    shared_attr = "shared_mlp"

    def renormalises(self, config) -> bool:
        return True

    def router_weight(self, layer: MoELayer) -> torch.Tensor:
        return layer.router.wg.weight
