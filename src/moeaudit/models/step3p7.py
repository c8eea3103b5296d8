"""Routed output scaled in the MoE block: Step-3.7-Flash, MiniMax-M3, Laguna and Beam.

Step-3.7-Flash (``Step3p7ForConditionalGeneration``, StepFun), MiniMax-M3 (``MiniMaxM3VLForCausalLM`` /
``MiniMaxM3SparseForConditionalGeneration``) and Laguna (``LagunaForCausalLM``) share one MoE block forward
(``Step3p7SparseMoeBlock``, ``MiniMaxM3VLSparseMoeBlock``, ``LagunaSparseMoeBlock`` in transformers 5.23): the
router's renormalised weights, then the routed experts' output times the block's ``routed_scaling_factor``,
plus an ungated shared expert: ``experts(x, idx, w) * s + shared(x)``. Beam's block (``BeamMoE``) is the same
without a shared expert.

moeaudit's contract needs the block's output to be its experts' weighted sum plus its shared experts
(contract check 5), so the scale is moved inside the experts: :class:`Step3p7ScaledExpertsView` computes
``experts(x, idx, w) * s`` with the library's own experts module and the block's own scale, and the block's
forward is re-expressed through it op for op (:func:`step3p7_block_forward`, :func:`beam_block_forward`, bound
to the block instance with :func:`moeaudit.models.base.attached_view`), which the load-time check requires to
equal the library's bit for bit. An expert's output, as moeaudit records it (``act_norm``, REAP, the fast
engine's terms), is thus ``s · f_e(x)``: the term it contributes to the residual stream at unit weight. The
view registers the library's experts module as its child, so the export slices the library's tensors.

Step-3.7's decoder layers run sliding-window and full attention with per-layer head counts and rotary bases;
the fast engine replays each layer's own attention module and rotary embedding of its layer type.
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


def beam_block_forward(block: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    """``BeamMoE.forward`` with the scaled experts as one module (bound to the block)."""
    batch_size, sequence_length, hidden_dim = hidden_states.shape
    hidden_states_reshaped = hidden_states.view(-1, hidden_dim)
    _, routing_weights, selected_experts = block.gate(hidden_states_reshaped)
    final_hidden_states = block.__dict__["_moeaudit_view"](hidden_states_reshaped, selected_experts, routing_weights)
    return final_hidden_states.reshape(batch_size, sequence_length, hidden_dim)


class ScaledBlockAdapter(ScoredTopKAdapter):
    """A family whose MoE block scales its routed output (see the module docstring); subclasses set the rule,
    the block forward re-expressed through the scaled view and the shared expert's width field."""

    #: The library's block forward, re-expressed through :class:`Step3p7ScaledExpertsView`.
    block_forward = staticmethod(step3p7_block_forward)
    #: The config field holding the shared expert's width (None: no shared expert).
    shared_width_field: str | None = None
    #: The block's name in the load-time check's message.
    block_name = "MoE block"

    def describe_layer(self, config, index: int, block: nn.Module) -> MoELayer:
        experts = attached_view(block, lambda: Step3p7ScaledExpertsView(block), self.block_forward)
        layer = super().describe_layer(config, index, block)
        layer.experts = experts
        return layer

    def shared_layout(self, config, shared):
        return (0, 0) if shared is None else (1, int(getattr(config, self.shared_width_field)))

    def routing_parameters(self, layer: MoELayer) -> dict:
        return {**super().routing_parameters(layer), "experts_output_scale": layer.experts.scale}

    def check_block(self, layer: MoELayer, hidden: torch.Tensor) -> None:
        """The re-expressed block forward equals the library's bit for bit."""
        check_same_as_library(layer.block, (hidden.unsqueeze(0),), layer.layer, self.block_name)


class Step3p7Adapter(ScaledBlockAdapter):
    """Step-3.7-Flash: sigmoid + router-held correction bias, renormalised (bare sum); the block's output scale
    inside the experts' view; one ungated shared expert (see the module docstring)."""

    family = "step3p7"
    model_types = ("step3p7",)
    architectures = ("Step3p7ForConditionalGeneration",)
    rule = ScoredRule("sigmoid_bias_renorm", score="sigmoid", score_float32=True, bias="router", renorm="always",
                      renorm_guard="none")
    shared_width_field = "share_expert_dim"
    block_name = "Step-3.7 MoE block"

    def backbone(self, model):
        return model.model.language_model


class MiniMaxM3Adapter(ScaledBlockAdapter):
    """MiniMax-M3 (``minimax_m3_vl``: ``MiniMaxM3SparseForConditionalGeneration``, audited on text, and its text
    model ``MiniMaxM3VLForCausalLM``): Step-3.7's router (``MiniMaxM3VLTopKRouter``: sigmoid of float32 logits,
    the router's correction bias, unsorted top-k, renormalised by the bare sum) and block (the routed sum times
    ``routed_scaling_factor``, plus an ungated shared expert ``shared_intermediate_size`` wide;
    ``models/minimax_m3_vl/modeling_minimax_m3_vl.py``). Its sparse attention layers keep key blocks chosen by an
    indexer, which the fast engine does not replay
    (:func:`moeaudit.intervene.engine.fast_unsupported_reason`'s indexer check): the reference engine measures."""

    family = "minimax_m3_vl"
    model_types = ("minimax_m3_vl", "minimax_m3_vl_text")
    architectures = ("MiniMaxM3SparseForConditionalGeneration", "MiniMaxM3VLForCausalLM")
    rule = Step3p7Adapter.rule
    shared_width_field = "shared_intermediate_size"
    block_name = "MiniMax-M3 MoE block"

    def backbone(self, model):
        return getattr(model.model, "language_model", model.model)


class LagunaAdapter(ScaledBlockAdapter):
    """Laguna (``LagunaForCausalLM``): sigmoid of float32 logits (soft-capped, ``c·tanh(z/c)``, when
    ``moe_router_logit_softcapping`` > 0; the router returns the capped logits), the router's correction bias,
    sorted top-k, renormalised by the bare sum and cast to the hidden states' dtype (``LagunaTopKRouter``); the
    block scales the routed sum by ``moe_routed_scaling_factor`` and adds an ungated shared expert
    (``LagunaSparseMoeBlock``, ``models/laguna/modeling_laguna.py``)."""

    family = "laguna"
    model_types = ("laguna",)
    architectures = ("LagunaForCausalLM",)
    rule = ScoredRule("sigmoid_bias_renorm", score="sigmoid", score_float32=True, bias="router", sorted_topk=True,
                      renorm="always", renorm_guard="none", weights_in_expert_dtype=True)
    shared_width_field = "shared_expert_intermediate_size"
    block_name = "Laguna MoE block"

    def router_output_logits(self, layer: MoELayer, linear: torch.Tensor) -> torch.Tensor:
        cap = float(layer.router.router_logit_softcapping)
        return torch.tanh(linear / cap) * cap if cap > 0.0 else linear

    def routing_parameters(self, layer: MoELayer) -> dict:
        cap = float(layer.router.router_logit_softcapping)
        return {**super().routing_parameters(layer), **({"logit_softcap": cap} if cap > 0.0 else {})}


class BeamAdapter(ScaledBlockAdapter):
    """Beam (``BeamForCausalLM``): DeepSeek-V3's group-limited sigmoid routing without its scaling factor
    (``BeamTopKRouter``: float32 logits, the router's correction bias, sorted top-k, renormalised when
    ``norm_topk_prob`` (+1e-20)); the block scales the routed sum by ``routed_scaling_factor`` (``BeamMoE``,
    ``models/beam/modeling_beam.py``), no shared expert. Its decoder layers normalise the block's output before
    a depth-scaled residual sum (the fast engine's rows restart at the block,
    :func:`moeaudit.intervene.fast.restarts_at_block`), and its full-attention layers run without rotary
    embeddings, scaling their queries by position instead (``attention_scaling``, supplied per row by
    :meth:`row_layer_arguments`)."""

    family = "beam"
    model_types = ("beam",)
    architectures = ("BeamForCausalLM",)
    rule = ScoredRule("sigmoid_bias_group_renorm", score="sigmoid", bias="router", grouped=True, sorted_topk=True)
    block_forward = staticmethod(beam_block_forward)
    block_name = "Beam MoE block"
    shared_attr = None
    replayed_layer_arguments = frozenset({"attention_scaling"})

    def row_layer_arguments(self, moe, clean, position_ids: torch.Tensor, first_layer: int):
        """Each layer's ``attention_scaling`` at the rows' positions, as ``BeamModel.forward`` computes it: the
        library's ``compute_attention_scaling(position_ids)`` (scalable softmax, ``(1 + (p + 1) / 2048) ** 0.1``)
        for a layer type without rotary parameters (NoPE), None for the others."""
        from transformers.models.beam.modeling_beam import compute_attention_scaling

        config = moe.config
        scaling = compute_attention_scaling(position_ids)
        nope = {kind for kind in set(config.layer_types) if config.rope_parameters[kind] is None}
        return lambda index: {"attention_scaling": scaling if config.layer_types[index] in nope else None}
