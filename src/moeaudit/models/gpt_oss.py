"""GPT-OSS (``GptOssForCausalLM``): the router (``mlp.router``, with a bias) takes the top-k of the raw
logits and softmaxes over the k; experts have biases and transposed, interleaved fused weights; the MLP
returns ``(hidden, router_scores)``."""

from __future__ import annotations

import torch

from moeaudit.models.base import FamilyAdapter, MoELayer, Routing
from moeaudit.models.scored import ScoredRule, scored_route


class GptOssAdapter(FamilyAdapter):
    family = "gpt_oss"
    model_types = ("gpt_oss",)
    architectures = ("GptOssForCausalLM",)
    router_attr = "router"
    #: GptOssTopKRouter.forward as a :class:`ScoredRule`: the top-k of the logits, a softmax over the k in the
    #: logits' dtype; ``raw_gate`` is the softmax over all experts (:func:`moeaudit.models.scored.scored_route`).
    rule = ScoredRule("topk_logits_softmax", score="softmax", select="logits", sorted_topk=True, renorm="never")

    def routing_rule(self, config) -> str:
        return "topk_logits_softmax"

    def _route(self, layer: MoELayer, router_logits: torch.Tensor, logits: torch.Tensor,
               removed: torch.Tensor | None) -> Routing:
        return scored_route(self.rule, layer, router_logits, logits, removed, None)
