"""ERNIE-4.5-VL (``Ernie4_5_VLMoeForConditionalGeneration``, ERNIE-4.5-VL-28B-A3B / 424B-A47B), audited as a
language model on text.

Each sparse decoder layer holds one ``Ernie4_5_VLMoeMoeBlock`` with *modality-isolated* experts: a text MoE
(``text_moe``: router and experts) that only text tokens reach, a vision MoE (``vision_moe``) that only image
and video tokens reach (``moe_mm_token_type_ids``), and shared experts every token passes
(``transformers/models/ernie4_5_vl_moe/modeling_ernie4_5_vl_moe.py``). On text the block computes
``text_moe(x) + shared_experts(x)``, and returns it with the router logits.

The adapter gives each block a view, :class:`Ernie45VLTextMoEView`: the text router, the text experts and the
shared experts, computing that sum op for op. The view is moeaudit's MoE block (it is not registered: the
state dict is unchanged); the block's forward is re-expressed through it (:func:`ernie45_vl_block_forward`,
bound to the block instance as A.X-K1's and Llama 4's are), and the load-time check
(:meth:`Ernie45VLMoeAdapter.check_block`) requires it to equal the library's forward bit for bit. The routing
rule is ERNIE-4.5's (:class:`moeaudit.models.scored.Ernie45MoeAdapter`: softmax, the ``moe_statics`` bias
steering selection, renormalised by max(sum, ``moe_norm_min``)).

The vision experts are not audited, and inputs with image or video tokens run the library's own forward, but
never while moeaudit's hooks are on the view (an intervention or a trace on text): that is refused. The text
and vision MoEs share one expert count (``moe_num_experts``), so a checkpoint with fewer text experts cannot
be described and the export is refused; ``moeaudit prune`` evaluates pruning (masked) as for every family.
"""

from __future__ import annotations

import torch
from torch import nn

from moeaudit.errors import UnsupportedModelError
from moeaudit.models.base import MoELayer, attached_view, check_same_as_library
from moeaudit.models.scored import Ernie45MoeAdapter


class Ernie45VLTextMoEView(nn.Module):
    """``Ernie4_5_VLMoeMoeBlock.forward`` on text tokens: the text MoE's weighted sum plus the shared experts.

    ``last_router_logits`` keeps the text router's logits of the last call for the re-expressed block forward,
    which returns them as the library's does (transformers records them as the block's ``router_logits``).
    """

    def __init__(self, block: nn.Module):
        super().__init__()
        self.gate = block.text_moe.gate
        self.experts = block.text_moe.experts
        self.shared_experts = block.shared_experts
        self.__dict__["library_block"] = block  # not registered: the view owns no weights
        self.__dict__["last_router_logits"] = None

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        batch_size, sequence_length, hidden_dim = hidden_states.shape
        if self.shared_experts is not None:
            shared_output = self.shared_experts(hidden_states)
        flat = hidden_states.view(-1, hidden_dim)
        router_logits, top_k_weights, top_k_index = self.gate(flat)
        out = self.experts(flat, top_k_index, top_k_weights).reshape(batch_size, sequence_length, hidden_dim)
        self.__dict__["last_router_logits"] = router_logits
        return out + shared_output if self.shared_experts is not None else out


def _hooked(view: Ernie45VLTextMoEView) -> bool:
    return any(module._forward_hooks or module._forward_pre_hooks
               for module in (view, view.gate, view.experts, view.shared_experts) if module is not None)


def ernie45_vl_block_forward(block: nn.Module, hidden_states: torch.Tensor,
                             moe_mm_token_type_ids: torch.Tensor | None = None):
    """``Ernie4_5_VLMoeMoeBlock.forward`` through its view (bound to the block as its ``forward``): on text,
    ``(view(x), router logits)``; with image or video tokens, the library's own forward."""
    view = block.__dict__["_moeaudit_view"]
    if moe_mm_token_type_ids is not None and moe_mm_token_type_ids.any():
        if _hooked(view):
            raise UnsupportedModelError(
                "moeaudit audits ERNIE-4.5-VL on text: image and video tokens (moe_mm_token_type_ids) reach the "
                "vision experts, which it does not adapt; run multimodal inputs outside moeaudit's traces and "
                "interventions")
        return type(block).forward(block, hidden_states, moe_mm_token_type_ids)
    out = view(hidden_states)
    return out, view.__dict__["last_router_logits"]


class Ernie45VLMoeAdapter(Ernie45MoeAdapter):
    """ERNIE-4.5-VL's text MoE, audited on text (see the module docstring)."""

    family = "ernie4_5_vl_moe"
    model_types = ("ernie4_5_vl_moe",)
    architectures = ("Ernie4_5_VLMoeForConditionalGeneration",)
    export_refusal = ("its text and vision experts share one expert count (moe_num_experts), so a checkpoint "
                      "with fewer text experts cannot be described; evaluate the pruning with `moeaudit prune` "
                      "(masked) instead")

    def backbone(self, model):
        return model.model.language_model

    def is_moe_block(self, mlp: nn.Module) -> bool:
        return hasattr(mlp, "text_moe") and hasattr(mlp, "vision_moe")

    def describe_layer(self, config, index: int, block: nn.Module) -> MoELayer:
        view = attached_view(block, lambda: Ernie45VLTextMoEView(block), ernie45_vl_block_forward)
        return super().describe_layer(config, index, view)

    def shared_layout(self, config, shared):
        if shared is None:
            return 0, 0
        return int(config.moe_num_shared_experts), int(config.moe_intermediate_size[0])

    def check_block(self, layer: MoELayer, hidden: torch.Tensor) -> None:
        """The re-expressed block forward equals the library's ``Ernie4_5_VLMoeMoeBlock.forward`` bit for bit on
        text, output and router logits."""
        check_same_as_library(layer.block.library_block, (hidden.unsqueeze(0),), layer.layer,
                              "ERNIE-4.5-VL MoE block on text")
