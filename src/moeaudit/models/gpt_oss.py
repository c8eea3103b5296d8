"""GPT-OSS (``GptOssForCausalLM``): the router (``mlp.router``, with a bias) takes the top-k of the raw
logits and softmaxes over the k; experts have biases and transposed, interleaved fused weights; the MLP
returns ``(hidden, router_scores)``."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moeaudit.models.base import FamilyAdapter, MoELayer, Routing


class GptOssAdapter(FamilyAdapter):
    family = "gpt_oss"
    model_types = ("gpt_oss",)
    architectures = ("GptOssForCausalLM",)
    router_attr = "router"

    def routing_rule(self, config) -> str:
        return "topk_logits_softmax"

    def combine_dtype(self, layer: MoELayer, top_value: torch.Tensor) -> torch.dtype:
        """The dtype of the weights the experts receive (GPT-OSS: the logits')."""
        return top_value.dtype

    def _route(self, layer: MoELayer, router_logits: torch.Tensor, logits: torch.Tensor,
               removed: torch.Tensor | None) -> Routing:
        # Mirrors GptOssTopKRouter.forward (and GraniteMoeTopKRouter.forward, which casts the weights).
        top_value, topk_idx = torch.topk(logits, layer.top_k, dim=-1)
        combine_weight = F.softmax(top_value, dim=1, dtype=top_value.dtype).to(self.combine_dtype(layer, top_value))
        router_probs = self.router_probs(layer, logits)
        raw_gate = router_probs.gather(-1, topk_idx)
        return Routing(router_logits, router_probs, topk_idx, raw_gate, combine_weight)
