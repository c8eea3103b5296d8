"""PhiMoE (``PhimoeForCausalLM``; Phi-3.5-MoE): the router (``mlp.router``, a linear map) selects two
experts by *sparsemixer* (arXiv 2409.12136), not by a top-k of scores.

At inference (the router in eval mode, no Gumbel sampling) sparsemixer is, for the raw logits ``s``:

1. ``e1 = argmax s``; experts whose relative gap to the maximum exceeds ``2 eps``,
   :math:`(s_{max} - s_j) / \\max(|s_j|, s_{max}) > 2\\,\\epsilon`, are masked to -inf and
   :math:`w_1 = \\mathrm{softmax}(\\text{masked } s)_{e_1}`;
2. ``e2 = argmax`` of ``s`` with ``e1`` masked to -inf; the same relative-gap mask against the new maximum,
   applied to ``s`` with ``e1`` masked, gives :math:`w_2 = \\mathrm{softmax}(\\cdot)_{e_2}`;

with :math:`\\epsilon` = ``router_jitter_noise``. Exactly two slots per token whatever
``num_experts_per_tok`` says (``transformers/models/phimoe/modeling_phimoe.py``, ``sparsemixer``). Removing
an expert sets its logit to -inf, which is what a router without that expert's row computes: a -inf logit
is never the maximum and never unmasks another expert (its relative gap is inf/inf = NaN, not > 2 eps).
"""

from __future__ import annotations

import torch

from moeaudit.models.base import FamilyAdapter, MoELayer, Routing

#: Slots per token sparsemixer fills (hard-coded in the library).
SPARSEMIXER_SLOTS = 2


def _mixer_step(scores: torch.Tensor, candidates: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One sparsemixer step (inference): the argmax of ``candidates`` and its softmax weight over the
    candidates within the relative gap ``2 eps`` of it (the gap's scale uses ``scores``, as the library)."""
    threshold, chosen = candidates.max(dim=-1, keepdim=True)
    factor = scores.abs().clamp(min=threshold)
    outside = ((threshold - scores) / factor) > (2 * eps)
    weight = torch.softmax(candidates.masked_fill(outside, float("-inf")), dim=-1).gather(-1, chosen)
    return chosen, weight


class PhimoeAdapter(FamilyAdapter):
    family = "phimoe"
    model_types = ("phimoe",)
    architectures = ("PhimoeForCausalLM",)
    router_attr = "router"

    def describe_layer(self, config, index, block) -> MoELayer:
        layer = super().describe_layer(config, index, block)
        layer.top_k = SPARSEMIXER_SLOTS
        return layer

    def routing_rule(self, config) -> str:
        return "sparsemixer"

    def routing_parameters(self, layer: MoELayer) -> dict:
        return {"slots": SPARSEMIXER_SLOTS, "jitter_eps": float(layer.router.router_jitter_noise)}

    def _route(self, layer: MoELayer, router_logits: torch.Tensor, logits: torch.Tensor,
               removed: torch.Tensor | None) -> Routing:
        # Mirrors sparsemixer(..., training=False) op for op, so indices and weights are bit-identical.
        eps = layer.router.router_jitter_noise
        first, w1 = _mixer_step(logits, logits, eps)
        rest = torch.scatter(logits, -1, first, float("-inf"))
        second, w2 = _mixer_step(logits, rest, eps)
        topk_idx = torch.cat((first, second), dim=-1)
        combine_weight = torch.cat((w1, w2), dim=-1)
        router_probs = self.router_probs(layer, logits)
        return Routing(router_logits, router_probs, topk_idx, router_probs.gather(-1, topk_idx), combine_weight)
