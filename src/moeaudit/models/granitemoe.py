"""Granite-MoE (``GraniteMoeForCausalLM``; Granite 3.x MoE): the block is the decoder
layer's ``block_sparse_moe`` with a ``router``; top-k of the float32 logits, softmax over the k, cast to the
hidden states' dtype. Granite scales the residual branch (``residual_multiplier``) and the logits
(``logits_scaling``); the fast engine's self-check sees both and measures with the reference engine."""

from __future__ import annotations

import torch

from moeaudit.models.base import FamilyAdapter, MoELayer, Routing


class GraniteMoeAdapter(FamilyAdapter):
    family = "granitemoe"
    model_types = ("granitemoe",)
    architectures = ("GraniteMoeForCausalLM",)
    block_attr = "block_sparse_moe"
    router_attr = "router"
    shared_attr = None

    def routing_rule(self, config) -> str:
        return "topk_logits_softmax"

    def _route(self, layer: MoELayer, router_logits: torch.Tensor, logits: torch.Tensor,
               removed: torch.Tensor | None) -> Routing:
        # Mirrors GraniteMoeTopKRouter.forward (the logits are float32 there).
        top_value, topk_idx = logits.topk(layer.top_k, dim=-1)
        combine_weight = torch.softmax(top_value, dim=-1).to(layer.experts.gate_up_proj.dtype)
        router_probs = self.router_probs(layer, logits)
        raw_gate = router_probs.gather(-1, topk_idx)
        return Routing(router_logits, router_probs, topk_idx, raw_gate, combine_weight)
