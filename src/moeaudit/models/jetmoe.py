"""JetMoE (``JetMoeForCausalLM``; jetmoe/jetmoe-8b, 8 experts, top-2), its routed MLPs audited.

A JetMoE decoder layer holds two mixtures (``transformers/models/jetmoe/modeling_jetmoe.py``): routed MLP
experts (``JetMoeMoE``, the layer's ``mlp``) and a mixture of attention heads (``JetMoeMoA``: routed query and
output projections inside ``self_attention.experts``). moeaudit audits the MLP experts; the attention experts
keep their routing (``moeaudit inspect`` says so in the routing parameters) and are not intervened on.

``JetMoeMoE`` routes inside the block: its gate (``JetMoeTopKGating``) takes the top-k of the float32 logits,
a softmax over the k (cast to the hidden states' dtype: GPT-OSS's and Granite's rule), and returns the tokens
sorted by expert for ``JetMoeParallelExperts``; the block adds a learned bias after the experts' sum. The
adapter bridges this without touching the weights, as DBRX's (:mod:`moeaudit.models.dbrx`):
:class:`JetMoeRouterView` returns ``(router_logits, topk_weights, topk_idx)``, :class:`JetMoeExpertsView` is
called as ``experts(hidden[N, H], topk_idx, topk_weights)`` and runs the gate's sorting and the two parallel
linears op for op; the block's forward is re-expressed through them (:func:`jetmoe_block_forward`) and must
equal ``JetMoeMoE.forward`` bit for bit at load. The bias is the same for every token whatever the routing
(:meth:`JetMoeAdapter.block_offset`), so it is neither an expert nor touched by a removal.

The pruned export is refused: the MLP and the attention experts share one count (``num_local_experts``).
"""

from __future__ import annotations

import torch
from torch import nn

from moeaudit.models.base import MoELayer, attached_view, check_same_as_library
from moeaudit.models.granitemoe import GraniteMoeAdapter
from moeaudit.models.scored import ScoredTopKAdapter


class JetMoeRouterView(nn.Module):
    """``JetMoeTopKGating`` seen as ``(router_logits, topk_weights, topk_idx)``: the gate itself runs (so
    transformers' router-logit recorder still sees it) and its logits' top-k and softmax over the k are taken
    again with the gate's own ops (the gate returns them only sorted by expert)."""

    def __init__(self, gating: nn.Module):
        super().__init__()
        self.inner = gating
        self.num_experts = int(gating.num_experts)
        self.top_k = int(gating.top_k)

    @property
    def weight(self) -> torch.Tensor:
        return self.inner.layer.weight

    def forward(self, hidden_states: torch.Tensor):
        logits = self.inner(hidden_states)[4]
        top_k_logits, top_k_indices = logits.topk(self.top_k, dim=1)
        top_k_gates = torch.softmax(top_k_logits, dim=1).type_as(hidden_states)
        return logits, top_k_gates, top_k_indices


class JetMoeExpertsView(nn.Module):
    """``JetMoeMoE``'s experts called as ``experts(hidden[N, H], topk_idx[N, k], topk_weights[N, k])`` ->
    [N, H] (without the block's bias): the gate's grouping of tokens by expert and the two
    ``JetMoeParallelExperts``, op for op. ``gate_up_proj`` [E, 2I, H] and ``down_proj`` [E, H, I] are the
    library's parameters (the first half of ``input_linear``'s rows is the activated one)."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.input_linear = block.input_linear
        self.output_linear = block.output_linear
        self.__dict__["_activation"] = block.activation
        self.num_experts = int(block.input_linear.num_experts)

    @property
    def gate_up_proj(self) -> nn.Parameter:
        return self.input_linear.weight

    @property
    def down_proj(self) -> nn.Parameter:
        return self.output_linear.weight

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        top_k = top_k_index.shape[1]
        zeros = torch.zeros([top_k_weights.size(0), self.num_experts], dtype=top_k_weights.dtype,
                            device=top_k_weights.device)
        gates = zeros.scatter(1, top_k_index, 1)
        expert_size = gates.long().sum(0).tolist()
        _, index_sorted_experts = top_k_index.flatten().sort(0)
        batch_index = index_sorted_experts.div(top_k, rounding_mode="trunc")
        batch_gates = top_k_weights.flatten()[index_sorted_experts]
        expert_inputs = hidden_states[batch_index]
        hidden = self.input_linear(expert_inputs, expert_size)
        chunked = hidden.chunk(2, dim=-1)
        hidden = self.__dict__["_activation"](chunked[0]) * chunked[1]
        expert_outputs = self.output_linear(hidden, expert_size)
        expert_outputs = expert_outputs * batch_gates[:, None]
        out = torch.zeros((hidden_states.shape[0], hidden_states.shape[1]), dtype=expert_outputs.dtype,
                          device=expert_outputs.device)
        return out.index_add(0, batch_index, expert_outputs)


def jetmoe_block_forward(block: nn.Module, layer_input: torch.Tensor) -> torch.Tensor:
    """``JetMoeMoE.forward`` through the views (bound to the block as its ``forward``)."""
    router, experts = block.__dict__["_moeaudit_view"]
    bsz, length, emb_size = layer_input.size()
    layer_input = layer_input.reshape(-1, emb_size)
    _, topk_weights, topk_idx = router(layer_input)
    layer_output = experts(layer_input, topk_idx, topk_weights)
    layer_output = layer_output.view(bsz, length, emb_size)
    return layer_output + block.bias


class JetMoeAdapter(ScoredTopKAdapter):
    family = "jetmoe"
    model_types = ("jetmoe",)
    architectures = ("JetMoeForCausalLM",)
    router_attr = "router"
    rule = GraniteMoeAdapter.rule  # JetMoeTopKGating routes as Granite's router
    export_refusal = ("JetMoE's attention experts (mixture of attention heads) share num_local_experts with its "
                      "MLP experts, so its config cannot describe a copy with fewer MLP experts; evaluate the "
                      "pruning by masking (moeaudit prune)")

    def is_moe_block(self, mlp: nn.Module) -> bool:
        return hasattr(mlp, "router") and hasattr(mlp, "input_linear")

    def describe_layer(self, config, index: int, block: nn.Module) -> MoELayer:
        router, experts = attached_view(block, lambda: (JetMoeRouterView(block.router), JetMoeExpertsView(block)),
                                        jetmoe_block_forward)
        return MoELayer(layer=index, block=block, router=router, experts=experts, num_experts=router.num_experts,
                        top_k=router.top_k, routing_rule=self.routing_rule(config), adapter=self)

    def block_offset(self, layer: MoELayer) -> torch.Tensor:
        return layer.block.bias

    def routing_parameters(self, layer: MoELayer) -> dict:
        return {**super().routing_parameters(layer),
                "attention_experts": "not audited (the mixture of attention heads keeps its routing)"}

    def check_block(self, layer: MoELayer, hidden: torch.Tensor) -> None:
        """The re-expressed block forward equals the library's ``JetMoeMoE.forward`` bit for bit."""
        check_same_as_library(layer.block, (hidden.unsqueeze(0),), layer.layer, "JetMoE MoE block")
