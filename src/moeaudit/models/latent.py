"""Experts in a latent space: a projection into it before the experts and one back after them.

Nemotron 3's latent MoE (``NemotronHMoE`` with ``moe_latent_size``, ``models/nemotron_h/modeling_nemotron_h.py``)
and Muse-Spark (``MuseSparkMoE``, ``models/muse_spark/modeling_muse_spark.py``) route on the residual stream
but run their experts on a narrower latent copy of it:

.. math:: y = P_{\\uparrow}\\Big(\\sum_{s} w_s\\, f_{e_s}\\big(P_{\\downarrow}(x)\\big)\\Big)

with :math:`P_{\\downarrow}` a linear map (Muse-Spark: then a centred RMS norm) and :math:`P_{\\uparrow}` a linear
map without bias. :math:`P_{\\uparrow}` being linear, the routed output is the weighted sum of the terms
:math:`P_{\\uparrow} f_e(P_{\\downarrow}(x))`: each expert's contribution to the residual stream, which is what
moeaudit measures, removes and records (``act_norm``, REAP, the fast engine's terms). :class:`LatentExpertsView`
is that expert: the library's experts module between the block's own projections; the block's forward is
re-expressed through it op for op and must equal the library's bit for bit at load. An up-projection with a
bias is refused (its bias would be added once to the sum but once per term). The projections are not
experts: they are not pruned, and the experts' weight metrics read their latent-space matrices.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from moeaudit.errors import UnsupportedModelError
from moeaudit.models.base import ExpertsView, MoELayer, attached_view, check_same_as_library
from moeaudit.models.scored import ScoredRule, ScoredTopKAdapter


class LatentExpertsView(ExpertsView):
    """``up(experts(down(x), idx, w))``: the library's experts between the block's projections (kept out of
    the view's registered children, so the experts' parameters are the experts module's only)."""

    def __init__(self, experts: nn.Module, down: Callable[[torch.Tensor], torch.Tensor], up: nn.Module):
        super().__init__(experts)
        self.__dict__["_down"] = down
        self.__dict__["_up"] = up

    @property
    def latent_size(self) -> int:
        """The width of the latent space the experts work in (the up-projection's input)."""
        return int(self.__dict__["_up"].in_features)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        latent = self.__dict__["_down"](hidden_states)
        return self.__dict__["_up"](self.inner(latent, top_k_index, top_k_weights))


def _refuse_up_bias(up: nn.Module, family: str, index: int) -> None:
    if getattr(up, "bias", None) is not None:
        raise UnsupportedModelError(
            f"layer {index} of this {family} model projects its experts' latent output back with a bias, so the "
            "routed output is not a weighted sum of per-expert terms; checkpoints whose latent projections have "
            "no bias (mlp_bias=false) are supported")


def nemotron_h_latent_forward(block: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    """``NemotronHMoE.forward`` with the latent experts as one module (bound to the block)."""
    residuals = hidden_states
    orig_shape = hidden_states.shape
    _, topk_weights, topk_indices = block.gate(hidden_states)
    hidden_states = hidden_states.view(-1, hidden_states.shape[-1])
    hidden_states = block.__dict__["_moeaudit_view"](hidden_states, topk_indices, topk_weights)
    hidden_states = hidden_states.view(*orig_shape)
    hidden_states = hidden_states + block.shared_experts(residuals)
    return hidden_states


def muse_spark_forward(block: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    """``MuseSparkMoE.forward`` with the latent experts as one module (bound to the block)."""
    orig_shape = hidden_states.shape
    _, topk_weights, topk_indices = block.gate(hidden_states)
    hidden_states = hidden_states.view(-1, hidden_states.shape[-1])
    hidden_states = block.__dict__["_moeaudit_view"](hidden_states, topk_indices, topk_weights)
    return hidden_states.view(*orig_shape)


def nemotron_h_latent_experts(block: nn.Module, index: int) -> LatentExpertsView:
    """Nemotron 3's latent experts: ``fc2_latent_proj(experts(fc1_latent_proj(x)))``."""
    _refuse_up_bias(block.fc2_latent_proj, "Nemotron-H", index)
    return attached_view(block, lambda: LatentExpertsView(block.experts, block.fc1_latent_proj,
                                                          block.fc2_latent_proj), nemotron_h_latent_forward)


class NemotronHAdapter(ScoredTopKAdapter):
    """Nemotron-H / Nemotron 3 (``nemotron_h``): DeepSeek-V3's router (sigmoid of float32 logits, router-held
    bias, groups filled with -inf, renormalised when ``norm_topk_prob`` (+1e-20), scaled) in the decoder
    block's ``mixer``; ungated ReLU² experts (``up_proj`` / ``down_proj``) and one ungated shared MLP
    (``shared_experts``, ``moe_shared_expert_intermediate_size`` wide). Mamba-2 and attention blocks in
    between. Checkpoints whose experts work in a latent space (``moe_latent_size``, Nemotron 3's latent MoE)
    are seen through :class:`moeaudit.models.latent.LatentExpertsView`: each expert's term is its latent output
    projected back to the residual stream."""

    family = "nemotron_h"
    model_types = ("nemotron_h",)
    architectures = ("NemotronHForCausalLM",)
    block_attr = "mixer"
    rule = ScoredRule("sigmoid_bias_group_scaled", score="sigmoid", bias="router", grouped=True, scaled=True)

    def describe_layer(self, config, index, block):
        if getattr(config, "moe_latent_size", None) is None:
            return super().describe_layer(config, index, block)
        experts = nemotron_h_latent_experts(block, index)
        layer = super().describe_layer(config, index, block)
        layer.experts = experts
        return layer

    def routing_parameters(self, layer: MoELayer) -> dict:
        params = super().routing_parameters(layer)
        if not isinstance(layer.experts, LatentExpertsView):
            return params
        return {**params, "latent_size": layer.experts.latent_size}

    def check_block(self, layer: MoELayer, hidden: torch.Tensor) -> None:
        """A latent block's re-expressed forward equals the library's ``NemotronHMoE.forward`` bit for bit."""
        if isinstance(layer.experts, LatentExpertsView):
            check_same_as_library(layer.block, (hidden.unsqueeze(0),), layer.layer, "Nemotron-H latent MoE block")

    def shared_layout(self, config, shared):
        if shared is None:
            return 0, 0
        return 1, int(config.moe_shared_expert_intermediate_size)


class MuseSparkAdapter(ScoredTopKAdapter):
    """Muse-Spark (``MuseSparkForConditionalGeneration``), audited as a language model on text. Its router
    (``MuseSparkTopkRouter``) multiplies the float32 logits by ``output_multiplier`` and returns them; sigmoid
    scores, the router's correction bias, unsorted top-k, renormalised by the sum + 1e-15, times
    ``routed_scaling_factor``. Its experts work in a latent space (:class:`LatentExpertsView`:
    ``post_expert_proj(experts(pre_expert_norm(pre_expert_proj(x))))``, each expert with a norm of its own
    output). The fast engine replays its layers without rotary embeddings (``layer_rope_theta`` 0) and its
    logits' multiplier before the soft-cap (:mod:`moeaudit.intervene.replay`)."""

    family = "muse_spark"
    model_types = ("muse_spark",)
    architectures = ("MuseSparkForConditionalGeneration",)
    rule = ScoredRule("sigmoid_bias_renorm_scaled", score="sigmoid", score_float32=True, bias="router",
                      renorm="always", renorm_eps=1e-15, scaled=True)

    def backbone(self, model):
        return model.model.language_model

    def router_output_logits(self, layer: MoELayer, linear: torch.Tensor) -> torch.Tensor:
        return linear * layer.router.output_multiplier

    def describe_layer(self, config, index: int, block: nn.Module) -> MoELayer:
        _refuse_up_bias(block.post_expert_proj, "Muse-Spark", index)

        def down(hidden: torch.Tensor) -> torch.Tensor:
            return block.pre_expert_norm(block.pre_expert_proj(hidden))

        experts = attached_view(block, lambda: LatentExpertsView(block.experts, down, block.post_expert_proj),
                                muse_spark_forward)
        layer = super().describe_layer(config, index, block)
        layer.experts = experts
        return layer

    def routing_parameters(self, layer: MoELayer) -> dict:
        return {**super().routing_parameters(layer), "logit_multiplier": float(layer.router.output_multiplier),
                "latent_size": layer.experts.latent_size}

    def check_block(self, layer: MoELayer, hidden: torch.Tensor) -> None:
        """The re-expressed block forward equals the library's ``MuseSparkMoE.forward`` bit for bit."""
        check_same_as_library(layer.block, (hidden.unsqueeze(0),), layer.layer, "Muse-Spark MoE block")


__all__ = ["LatentExpertsView", "MuseSparkAdapter", "NemotronHAdapter", "muse_spark_forward",
           "nemotron_h_latent_experts", "nemotron_h_latent_forward"]
