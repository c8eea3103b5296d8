"""A.X-K1 (``AXK1ForCausalLM``, SK Telecom's A.X K1): DeepSeek-V3's MoE block, router and multi-head latent
attention, with one change: the block normalises its output, ``post_mlp_layernorm(routed + shared)``
(``transformers/models/axk1/modeling_axk1.py``, ``AXK1MoE``).

moeaudit's contract needs the block's output to be the experts' weighted sum plus the shared experts
(contract check 5), so the adapter gives each block a view, :class:`AXK1MoEView`, that is
``AXK1MoE.forward`` up to that sum, and re-expresses the block's forward as ``post_mlp_layernorm(view(x))``
(:func:`axk1_block_forward`, bound to the block instance as Llama 4's is, :mod:`moeaudit.models.llama4`). The
view is moeaudit's MoE block; it holds the library's own router, experts and shared experts and is not
registered (the state dict is unchanged), and the load-time check (:meth:`AXK1Adapter.check_block`) requires
the re-expressed forward to equal the library's bit for bit. The routing rule is DeepSeek-V3's
(:class:`moeaudit.models.scored.DeepseekV3Adapter`). A change of the view's output passes the norm before it
reaches the residual stream, so the fast engine's rows restart at the intervened layer with the view's output
replaced (:func:`moeaudit.intervene.fast.restarts_at_block`, chosen by its self-check).
"""

from __future__ import annotations

import torch
from torch import nn

from moeaudit.models.base import MoELayer, attached_view, check_same_as_library
from moeaudit.models.scored import DeepseekV3Adapter


class AXK1MoEView(nn.Module):
    """``AXK1MoE.forward`` without its last step: the routed experts' weighted sum plus the shared experts."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.gate = block.gate
        self.experts = block.experts
        self.shared_experts = block.shared_experts
        self.__dict__["library_block"] = block  # not registered: the view owns no weights

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        residuals = hidden_states
        orig_shape = hidden_states.shape
        _, topk_weights, topk_indices = self.gate(hidden_states)
        hidden_states = hidden_states.view(-1, hidden_states.shape[-1])
        hidden_states = self.experts(hidden_states, topk_indices, topk_weights).view(*orig_shape)
        return hidden_states + self.shared_experts(residuals)


def axk1_block_forward(block: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    """``AXK1MoE.forward`` through its view (bound to the block as its ``forward``)."""
    return block.post_mlp_layernorm(block.__dict__["_moeaudit_view"](hidden_states))


class AXK1Adapter(DeepseekV3Adapter):
    """A.X-K1: DeepSeek-V3's rule (sigmoid + correction bias, group-limited, renormalised +1e-20, scaled),
    fused shared experts, the block's output normalised (see the module docstring)."""

    family = "axk1"
    model_types = ("axk1",)
    architectures = ("AXK1ForCausalLM",)

    def describe_layer(self, config, index: int, block: nn.Module) -> MoELayer:
        view = attached_view(block, lambda: AXK1MoEView(block), axk1_block_forward)
        return super().describe_layer(config, index, view)

    def check_block(self, layer: MoELayer, hidden: torch.Tensor) -> None:
        """The re-expressed block forward equals the library's ``AXK1MoE.forward`` bit for bit."""
        check_same_as_library(layer.block.library_block, (hidden.unsqueeze(0),), layer.layer, "A.X-K1 MoE block")
