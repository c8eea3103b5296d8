"""DeepSeek-V2 / V2-Lite (native ``DeepseekV2ForCausalLM``; never ``trust_remote_code``).

Dense first ``first_k_dense_replace`` layers; routed experts chosen greedily or group-limited from the
softmax scores, weights multiplied by ``routed_scaling_factor`` and not renormalised; ``n_shared_experts``
shared experts fused into one ungated MLP of width ``n_shared_experts * moe_intermediate_size``.
"""

from __future__ import annotations

import torch

from moeaudit.models.base import FamilyAdapter, MoELayer, Routing


class DeepseekV2Adapter(FamilyAdapter):
    family = "deepseek_v2"
    model_types = ("deepseek_v2",)
    architectures = ("DeepseekV2ForCausalLM",)
    shared_attr = "shared_experts"

    def routing_rule(self, config) -> str:
        if config.topk_method == "group_limited_greedy":
            return "softmax_group_limited_scaled"
        return "softmax_greedy_scaled"

    def routing_parameters(self, layer: MoELayer) -> dict:
        router = layer.router
        grouped = layer.routing_rule == "softmax_group_limited_scaled"
        return {"routed_scaling_factor": float(router.routed_scaling_factor),
                **({"n_group": int(router.num_group), "topk_group": int(router.topk_group)} if grouped else {})}

    def shared_layout(self, config, shared):
        if shared is None:
            return 0, 0
        return int(config.n_shared_experts), int(config.moe_intermediate_size)

    def _route(self, layer: MoELayer, router_logits: torch.Tensor, logits: torch.Tensor,
               removed: torch.Tensor | None) -> Routing:
        # Mirrors DeepseekV2TopkRouter.forward (the logits are already float32 there).
        router = layer.router
        router_probs = self.router_probs(layer, logits)
        scores = router_probs
        if layer.routing_rule == "softmax_group_limited_scaled":
            n_group, per_group = router.num_group, router.num_experts // router.num_group
            group_scores = scores.view(-1, n_group, per_group).max(dim=-1).values
            group_idx = torch.topk(group_scores, k=router.topk_group, dim=-1, sorted=False)[1]
            group_mask = torch.zeros_like(group_scores)
            group_mask.scatter_(1, group_idx, 1)
            score_mask = group_mask.unsqueeze(-1).expand(-1, n_group, per_group).reshape(-1, router.num_experts)
            scores = scores.masked_fill(~score_mask.bool(), 0.0)
        top_value, topk_idx = torch.topk(scores, k=layer.top_k, dim=-1, sorted=False)
        raw_gate = router_probs.gather(-1, topk_idx)
        combine_weight = top_value * router.routed_scaling_factor
        return Routing(router_logits, router_probs, topk_idx, raw_gate, combine_weight)
