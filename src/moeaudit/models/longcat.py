"""LongCat-Flash (``LongcatFlashForCausalLM``: LongCat-Flash-Chat / -Thinking, Meituan, arXiv 2509.01322).

Each decoder layer holds two attention sublayers and two dense MLPs, and one MoE block whose output is a
*shortcut*: computed from the first MLP's input and added to the residual stream at the end of the layer
(``transformers/models/longcat_flash/modeling_longcat_flash.py``, ``LongcatFlashDecoderLayer``). The layer's
output therefore changes by exactly a change of the block's output, as for a block that sits last.

The router chooses among ``n_routed_experts`` experts and ``zero_expert_num`` *zero-computation* experts,
which return their input unchanged (``LongcatFlashExperts``: an index at or past ``n_routed_experts`` is
the identity; arXiv 2509.01322 Sec. 2.1). moeaudit audits all of them as experts: ``num_experts`` is
``n_routed_experts + zero_expert_num``, the identity experts last. Removing one is what it is for any
expert: the token no longer receives that term. Weight-only metrics are NaN for the identity experts (they
have no weights), and a pruned export slices the real experts' ``down_proj`` and counts the kept experts of
each kind into the two config fields.

The router (``LongcatFlashTopkRouter``): softmax over the float32 logits of all experts, the top-k of
probability + ``e_score_correction_bias`` (unsorted), weights = the probabilities there times
``routed_scaling_factor``, not renormalised. Its linear map is ``router.classifier``.
"""

from __future__ import annotations

import torch
from torch import nn

from moeaudit.models.base import MoELayer
from moeaudit.models.scored import ScoredRule, ScoredTopKAdapter


class LongcatFlashAdapter(ScoredTopKAdapter):
    """LongCat-Flash (see the module docstring)."""

    family = "longcat_flash"
    model_types = ("longcat_flash",)
    architectures = ("LongcatFlashForCausalLM",)
    router_attr = "router"
    shared_attr = None
    rule = ScoredRule("softmax_bias_scaled", score="softmax", bias="router", renorm="never", scaled=True)

    def describe_layer(self, config, index: int, block: nn.Module) -> MoELayer:
        layer = super().describe_layer(config, index, block)
        layer.num_experts = int(block.router.n_routed_experts)  # the real experts and the identity experts
        return layer

    def identity_experts(self, layer: MoELayer) -> int:
        return int(layer.experts.zero_expert_num)

    def single_expert_rows(self, layer: MoELayer, rows: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """``LongcatFlashExperts.forward`` cannot take top-k 1 (it squeezes the slot axis away), so each row
        gets a second slot of the same expert with weight 0: f_e(x)·1 + f_e(x)·0 = f_e(x) exactly."""
        index = index.reshape(-1, 1).expand(-1, 2)
        weights = torch.zeros(index.shape, dtype=rows.dtype, device=rows.device)
        weights[:, 0] = 1
        return type(layer.experts).forward(layer.experts, rows, index, weights)

    def router_weight(self, layer: MoELayer) -> torch.Tensor:
        return layer.router.classifier.weight

    def exported_expert_counts(self, config, kept: list[int], layer: MoELayer) -> dict[str, int]:
        real = layer.num_experts - self.identity_experts(layer)
        return {"n_routed_experts": sum(1 for e in kept if e < real),
                "zero_expert_num": sum(1 for e in kept if e >= real)}
