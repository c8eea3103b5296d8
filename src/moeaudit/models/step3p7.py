"""Step-3.7-Flash (``Step3p7ForConditionalGeneration``, StepFun), audited as a language model on text.

The MoE block (``Step3p7SparseMoeBlock``, ``transformers/models/step3p7/modeling_step3p7.py``) routes with a
sigmoid of float32 logits, a correction bias that steers selection only, and renormalised weights, then
scales the routed experts' output by the block's ``routed_scaling_factor`` (``moe_router_scaling_factor``)
before adding an ungated shared expert: ``experts(x, idx, w) * s + shared(x)``.

moeaudit's contract needs the block's output to be its experts' weighted sum plus its shared experts
(contract check 5), so the scale is moved inside the experts: :class:`Step3p7ScaledExpertsView` computes
``experts(x, idx, w) * s`` with the library's own experts module and the block's own scale, and the block's
forward is re-expressed through it op for op (:func:`step3p7_block_forward`, bound to the block instance with
:func:`moeaudit.models.base.attached_view`), which the load-time check requires to equal the library's bit
for bit. An expert's output, as moeaudit records it (``act_norm``, REAP, the fast engine's terms), is thus
``s · f_e(x)``: the term it contributes to the residual stream at unit weight. The view registers the
library's experts module as its child, so the export slices the library's tensors.

The decoder layers run sliding-window and full attention with per-layer head counts and rotary bases; the
fast engine replays each layer's own attention module and rotary embedding of its layer type.
"""

from __future__ import annotations

import torch
from torch import nn

from moeaudit.models.base import ExpertsView, MoELayer, attached_view, check_same_as_library
from moeaudit.models.scored import ScoredRule, ScoredTopKAdapter


class Step3p7ScaledExpertsView(ExpertsView):
    """``experts(x, idx, w) * routed_scaling_factor``: Step-3.7's experts module and its block's scale."""

    def __init__(self, block: nn.Module):
        super().__init__(block.experts)
        self.scale = float(block.routed_scaling_factor)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        return self.inner(hidden_states, top_k_index, top_k_weights) * self.scale


def step3p7_block_forward(block: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    """``Step3p7SparseMoeBlock.forward`` with the scaled experts as one module (bound to the block)."""
    batch_size, sequence_length, hidden_dim = hidden_states.shape
    hidden_states = hidden_states.view(-1, hidden_dim)
    shared_output = block.shared_experts(hidden_states)
    _, routing_weights, selected_experts = block.gate(hidden_states)
    hidden_states = block.__dict__["_moeaudit_view"](hidden_states, selected_experts, routing_weights)
    hidden_states = hidden_states + shared_output
    return hidden_states.reshape(batch_size, sequence_length, hidden_dim)


class Step3p7Adapter(ScoredTopKAdapter):
    """Step-3.7-Flash: sigmoid + router-held correction bias, renormalised (bare sum); the block's output scale
    inside the experts' view; one ungated shared expert (see the module docstring)."""

    family = "step3p7"
    model_types = ("step3p7",)
    architectures = ("Step3p7ForConditionalGeneration",)
    rule = ScoredRule("sigmoid_bias_renorm", score="sigmoid", score_float32=True, bias="router", renorm="always",
                      renorm_guard="none")

    def backbone(self, model):
        return model.model.language_model

    def describe_layer(self, config, index: int, block: nn.Module) -> MoELayer:
        experts = attached_view(block, lambda: Step3p7ScaledExpertsView(block), step3p7_block_forward)
        layer = super().describe_layer(config, index, block)
        layer.experts = experts
        return layer

    def shared_layout(self, config, shared):
        return (0, 0) if shared is None else (1, int(config.share_expert_dim))

    def routing_parameters(self, layer: MoELayer) -> dict:
        return {**super().routing_parameters(layer), "experts_output_scale": layer.experts.scale}

    def check_block(self, layer: MoELayer, hidden: torch.Tensor) -> None:
        """The re-expressed block forward equals the library's ``Step3p7SparseMoeBlock.forward`` bit for bit."""
        check_same_as_library(layer.block, (hidden.unsqueeze(0),), layer.layer, "Step-3.7 MoE block")
