"""DBRX (``DbrxForCausalLM``; databricks/dbrx-base and dbrx-instruct, 16 experts, top-4).

Routing lives in the block, not the router (``transformers/models/dbrx/modeling_dbrx.py``): ``DbrxRouter``
returns the raw logits only, and ``DbrxFFN.route_tokens_to_experts`` takes the softmax over all experts (in the
logits' dtype), the top-k of it and divides the k weights by their p-norm (``moe_normalize_expert_weights``:
1.0 in the released checkpoints, a plain renormalisation; None: no division). The experts keep their weights as
2-D matrices ``w1``, ``v1``, ``w2`` [E·F, H] (expert e owns rows e·F .. e·F + F − 1), the decoder layers are
``transformer.blocks`` and the block is ``ffn``.

The adapter bridges both without touching the weights, as Llama 4's (:mod:`moeaudit.models.llama4`):
:class:`DbrxRouterView` returns ``(router_logits, topk_weights, topk_idx)`` by calling the library's own router
and ``route_tokens_to_experts``, :class:`DbrxExpertsView` is called as ``experts(hidden[N, H], topk_idx,
topk_weights)`` and runs the library's ``DbrxExperts``; the block's forward is re-expressed through them
(:func:`dbrx_block_forward`) and required, at load, to equal ``DbrxFFN.forward`` bit for bit. The view exposes the
expert weights per expert without copying: ``gate_proj`` and ``up_proj`` [E, F, H] (``w1``, ``v1``) and
``down_proj`` [E, H, F] (``w2`` transposed). The pruned export slices each expert's F rows out of the 2-D
matrices (:meth:`DbrxAdapter.expert_rows`) and rewrites ``ffn_config.moe_num_experts``
(:meth:`DbrxAdapter.expert_count_config`).
"""

from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F

from moeaudit.models.base import ExpertsView, FamilyAdapter, MoELayer, Routing, attached_view, check_same_as_library


class DbrxRouterView(nn.Module):
    """``DbrxRouter`` plus ``DbrxFFN.route_tokens_to_experts``: ``(router_logits, topk_weights, topk_idx)``."""

    def __init__(self, router: nn.Module, block: nn.Module):
        super().__init__()
        self.inner = router
        self.__dict__["_block"] = block  # not registered: the block owns the router, not the other way round
        self.num_experts = int(router.layer.out_features)
        self.top_k = int(block.top_k)

    @property
    def weight(self) -> torch.Tensor:
        return self.inner.layer.weight

    def forward(self, hidden_states: torch.Tensor):
        router_logits = self.inner(hidden_states)
        topk_weights, topk_idx = self.__dict__["_block"].route_tokens_to_experts(router_logits)
        return router_logits, topk_weights, topk_idx


class DbrxExpertsView(ExpertsView):
    """``DbrxExperts`` called as ``experts(hidden[N, H], topk_idx[N, k], topk_weights[N, k])`` -> [N, H], with its
    2-D weights seen per expert (views of the library's parameters, no copies)."""

    def __init__(self, experts: nn.Module):
        super().__init__(experts)
        self.ffn_hidden_size = int(experts.ffn_hidden_size)

    def _per_expert(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.view(self.num_experts, self.ffn_hidden_size, weight.shape[-1])

    @property
    def gate_up_proj(self) -> None:  # two separate matrices, gate_proj and up_proj
        return None

    @property
    def gate_proj(self) -> torch.Tensor:
        return self._per_expert(self.inner.mlp.w1)

    @property
    def up_proj(self) -> torch.Tensor:
        return self._per_expert(self.inner.mlp.v1)

    @property
    def down_proj(self) -> torch.Tensor:
        return self._per_expert(self.inner.mlp.w2).transpose(1, 2)

    def forward(self, hidden_states: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor):
        return self.inner(hidden_states, topk_idx, topk_weights).reshape(hidden_states.shape)


def dbrx_block_forward(block: nn.Module, hidden_states: torch.Tensor):
    """``DbrxFFN.forward`` through the views (bound to the block as its ``forward``)."""
    router, experts = block.__dict__["_moeaudit_view"]
    _, topk_weights, topk_idx = router(hidden_states)
    flat = hidden_states.reshape(-1, hidden_states.shape[-1])
    return experts(flat, topk_idx, topk_weights).reshape(hidden_states.shape)


class DbrxAdapter(FamilyAdapter):
    family = "dbrx"
    model_types = ("dbrx",)
    architectures = ("DbrxForCausalLM",)
    block_attr = "ffn"
    router_attr = "router"

    def backbone(self, model: nn.Module) -> nn.Module:
        return model.transformer

    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        return self.backbone(model).blocks

    def describe_layer(self, config, index: int, block: nn.Module) -> MoELayer:
        router, experts = attached_view(
            block, lambda: (DbrxRouterView(block.router, block), DbrxExpertsView(block.experts)), dbrx_block_forward)
        return MoELayer(layer=index, block=block, router=router, experts=experts, num_experts=router.num_experts,
                        top_k=router.top_k, routing_rule=self.routing_rule(config), adapter=self)

    def routing_rule(self, config) -> str:
        return "softmax_topk_pnorm"

    def routing_parameters(self, layer: MoELayer) -> dict:
        return {"p": _norm_p(layer)}

    def _route(self, layer: MoELayer, router_logits: torch.Tensor, logits: torch.Tensor,
               removed: torch.Tensor | None) -> Routing:
        # Mirrors DbrxFFN.route_tokens_to_experts op for op: the softmax in the logits' dtype, its top-k, the
        # division by the k weights' p-norm.
        probs = F.softmax(logits, dim=1, dtype=logits.dtype)
        top_value, topk_idx = torch.topk(probs, layer.top_k, dim=-1)
        p = _norm_p(layer)
        combine_weight = top_value if p is None else top_value / torch.norm(top_value, p=p, dim=-1, keepdim=True)
        router_probs = probs.float()
        return Routing(router_logits, router_probs, topk_idx, router_probs.gather(-1, topk_idx), combine_weight)

    def router_probs(self, layer: MoELayer, router_logits: torch.Tensor) -> torch.Tensor:
        """The softmax over all experts, in the logits' dtype as the block computes it, as float32."""
        return F.softmax(router_logits, dim=-1, dtype=router_logits.dtype).float()

    def check_block(self, layer: MoELayer, hidden: torch.Tensor) -> None:
        """The re-expressed block forward equals the library's ``DbrxFFN.forward`` bit for bit."""
        check_same_as_library(layer.block, (hidden.unsqueeze(0),), layer.layer, "DBRX FFN")

    def expert_rows(self, layer: MoELayer) -> int:
        """Each expert owns ``ffn_hidden_size`` consecutive rows of ``w1``, ``v1`` and ``w2``."""
        return layer.experts.ffn_hidden_size

    def expert_count_config(self, text_config):
        """The expert count is ``ffn_config.moe_num_experts``."""
        return text_config.ffn_config


def _norm_p(layer: MoELayer) -> float | None:
    p = layer.block.moe_normalize_expert_weights
    return None if p is None else float(p)
