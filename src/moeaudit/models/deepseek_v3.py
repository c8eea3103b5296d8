"""DeepSeek-V3 / R1 and the families that share its router: GLM-4.5 / 4.6 / 4.7 (``glm4_moe``), GLM-4.7-Flash
(``glm4_moe_lite``), dots.llm1 (``dots1``) and EXAONE-MoE (``exaone_moe``).

Their routers are the same code in transformers 5.23 (``DeepseekV3TopkRouter`` and its copies): sigmoid
scores of float32 logits; a *selection* score that adds the load-balancing ``e_score_correction_bias``
(arXiv 2412.19437, Sec. 2.1.2: the bias steers selection only, never the weights); group-limited selection
(a group's score is the sum of its two best selection scores; the ``topk_group`` best groups stay, the others
are filled with -inf); top-k of the selection score (unsorted); weights = the sigmoid scores at the chosen
experts, renormalised when ``norm_topk_prob`` (denominator + 1e-20), times ``routed_scaling_factor``.
``n_shared_experts`` (EXAONE: ``num_shared_experts``) shared experts are fused into one ungated MLP added
to the routed output.

Removing an expert (``reroute``) masks its *selection score* with -inf: masking the logit would leave
sigmoid(-inf) + bias = bias as its selection score, and a large bias could still win the removed expert a
slot (with weight 0).
"""

from __future__ import annotations

import torch

from moeaudit.models.base import FamilyAdapter, MoELayer, Routing


class DeepseekV3Adapter(FamilyAdapter):
    family = "deepseek_v3"
    model_types = ("deepseek_v3", "glm4_moe", "glm4_moe_lite", "dots1", "exaone_moe")
    architectures = ("DeepseekV3ForCausalLM", "Glm4MoeForCausalLM", "Glm4MoeLiteForCausalLM", "Dots1ForCausalLM",
                     "ExaoneMoeForCausalLM")
    shared_attr = "shared_experts"

    def routing_rule(self, config) -> str:
        return "sigmoid_bias_group_scaled"

    def shared_layout(self, config, shared):
        if shared is None:
            return 0, 0
        count = getattr(config, "n_shared_experts", None) or getattr(config, "num_shared_experts", None) or 1
        return int(count), int(config.moe_intermediate_size)

    def router_probs(self, layer: MoELayer, router_logits: torch.Tensor) -> torch.Tensor:
        """The family's expert scores: sigmoid of the float32 logits, [N, E] (not a distribution: each
        score is in (0, 1) and they need not sum to 1). The correction bias is not part of it."""
        return router_logits.float().sigmoid()

    def _route(self, layer: MoELayer, router_logits: torch.Tensor, logits: torch.Tensor,
               removed: torch.Tensor | None) -> Routing:
        # Mirrors DeepseekV3TopkRouter.forward op for op; a removed expert's selection score is -inf before
        # the group scores (a router without that expert), and its score sigmoid(-inf) = 0.
        router = layer.router
        scores = self.router_probs(layer, logits)
        choice = scores + router.e_score_correction_bias
        if removed is not None:
            choice = choice.masked_fill(removed, float("-inf"))
        n_group = int(router.num_group)
        per_group = router.num_experts // n_group
        group_scores = choice.view(-1, n_group, per_group).topk(2, dim=-1)[0].sum(dim=-1)
        group_idx = torch.topk(group_scores, k=router.topk_group, dim=-1, sorted=False)[1]
        group_mask = torch.zeros_like(group_scores)
        group_mask.scatter_(1, group_idx, 1)
        score_mask = group_mask.unsqueeze(-1).expand(-1, n_group, per_group).reshape(-1, router.num_experts)
        choice = choice.masked_fill(~score_mask.bool(), float("-inf"))
        topk_idx = torch.topk(choice, k=layer.top_k, dim=-1, sorted=False)[1]
        raw_gate = scores.gather(1, topk_idx)
        weights = raw_gate
        if router.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        combine_weight = weights * router.routed_scaling_factor
        return Routing(router_logits, scores, topk_idx, raw_gate, combine_weight)
