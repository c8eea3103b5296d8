"""Llama 4 (``Llama4ForCausalLM``; Llama-4-Scout / Maverick text model): the router (``feed_forward.router``)
takes the top-k of its raw logits and gives each chosen expert the *sigmoid* of its logit; the block
multiplies each expert's **input** by that score and runs every expert densely (one batched matmul over
all experts, the unchosen ones on zero rows), then adds an ungated shared MLP
(``transformers/models/llama4/modeling_llama4.py``, ``Llama4Router`` and ``Llama4TextMoe``).

Two things differ from moeaudit's contract, and the adapter bridges both without touching the weights:

* the router returns ``(router_scores[N, E], router_logits)`` and the experts module takes the scaled
  rows only. The adapter gives the block two thin views — :class:`Llama4RouterView`, returning
  ``(router_logits, topk_weights, topk_idx)``, and :class:`Llama4ExpertsView`, called as
  ``experts(hidden, topk_idx, topk_weights)`` — and re-expresses the block's six-line forward through them
  op for op (:func:`llama4_block_forward`). The views hold the library's own router and experts, which
  still do all the work; they are not registered as submodules (the state dict is unchanged), and the
  load-time check (:meth:`Llama4Adapter.check_block`) requires the re-expressed forward to equal the
  library's ``Llama4TextMoe.forward`` bit for bit.
* a score scales the expert's input, so the block is not linear in its weights: the term of slot s is
  :math:`f_e(w_s x)`, not :math:`w_s f_e(x)`. ``FamilyAdapter.weights_scale_input`` says so, and every
  routed output after an edit of the weights (``zero``, ``renorm``) is computed by calling the experts with
  the edited weights. A zero weight removes the term exactly (:math:`f_e(0) = 0`: SwiGLU without biases);
  ``mean`` replacement (``w_s \\bar f_e``) has no meaning here and is refused. ``ungated_outputs`` are
  :math:`f_e(x)` (score 1), so ``act_norm`` is the expert's output norm at unit score.

Removing an expert masks its logit to -inf: the top-k then never chooses it, as a router without its row.
"""

from __future__ import annotations

import torch
from torch import nn

from moeaudit.models.base import ExpertsView, FamilyAdapter, MoELayer, Routing, attached_view, check_same_as_library


class Llama4RouterView(nn.Module):
    """``Llama4Router`` seen through moeaudit's router contract: ``(router_logits, topk_weights, topk_idx)``.

    The chosen experts are the top-k of the logits (the router's own ``torch.topk``, recomputed on the same
    tensor, so identical) and the weights its scores there (``sigmoid`` of the chosen logits, in float32,
    cast back).
    """

    def __init__(self, router: nn.Module):
        super().__init__()
        self.inner = router
        self.num_experts = int(router.num_experts)
        self.top_k = int(router.top_k)

    @property
    def weight(self) -> torch.Tensor:
        return self.inner.weight

    def forward(self, hidden_states: torch.Tensor):
        router_scores, router_logits = self.inner(hidden_states)
        _, topk_idx = torch.topk(router_logits, self.top_k, dim=1)
        return router_logits, router_scores.gather(1, topk_idx), topk_idx


class Llama4ExpertsView(ExpertsView):
    """``Llama4TextExperts`` called as ``experts(hidden[N, H], topk_idx[N, k], topk_weights[N, k])``.

    Rebuilds the router's dense score matrix (exactly 0 off the chosen experts, as ``sigmoid(-inf)``), scales
    each expert's copy of the input by it and sums the library's batched expert outputs over experts —
    ``Llama4TextMoe.forward``'s own operations.
    """

    def forward(self, hidden_states: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor):
        scores = torch.zeros((hidden_states.shape[0], self.num_experts), dtype=topk_weights.dtype,
                             device=topk_weights.device).scatter_(1, topk_idx, topk_weights)
        routed_in = hidden_states.repeat(self.num_experts, 1)
        routed_in = routed_in * scores.transpose(0, 1).reshape(-1, 1)
        routed_out = self.inner(routed_in)
        return routed_out.reshape(self.num_experts, -1, routed_out.shape[-1]).sum(dim=0)


def llama4_block_forward(block: nn.Module, hidden_states: torch.Tensor):
    """``Llama4TextMoe.forward`` through the views (bound to the block as its ``forward``)."""
    router, experts = block.__dict__["_moeaudit_view"]
    hidden_states = hidden_states.reshape(-1, block.hidden_dim)
    router_logits, topk_weights, topk_idx = router(hidden_states)
    routed_out = experts(hidden_states, topk_idx, topk_weights)
    out = block.shared_expert(hidden_states)
    out.add_(routed_out)
    return out, router_logits


class Llama4Adapter(FamilyAdapter):
    family = "llama4"
    model_types = ("llama4_text", "llama4")
    architectures = ("Llama4ForCausalLM", "Llama4ForConditionalGeneration")
    block_attr = "feed_forward"
    router_attr = "router"
    shared_attr = "shared_expert"
    weights_scale_input = True

    def is_moe_block(self, mlp: nn.Module) -> bool:
        return hasattr(mlp, "experts") and hasattr(mlp, "router")

    def describe_layer(self, config, index: int, block: nn.Module) -> MoELayer:
        router, experts = attached_view(
            block, lambda: (Llama4RouterView(block.router), Llama4ExpertsView(block.experts)), llama4_block_forward)
        return MoELayer(
            layer=index, block=block, router=router, experts=experts, num_experts=router.num_experts,
            top_k=router.top_k, routing_rule=self.routing_rule(config), shared=block.shared_expert,
            num_shared=1, shared_intermediate=int(config.intermediate_size), adapter=self,
        )

    def routing_rule(self, config) -> str:
        return "sigmoid_topk_logits_input"

    def routing_parameters(self, layer: MoELayer) -> dict:
        return {"score": "sigmoid", "selection": "top-k of the logits", "weight_scales": "expert input"}

    def router_probs(self, layer: MoELayer, router_logits: torch.Tensor) -> torch.Tensor:
        """The family's score of every expert: the sigmoid of its logit (float32)."""
        return torch.sigmoid(router_logits.float())

    def _route(self, layer: MoELayer, router_logits: torch.Tensor, logits: torch.Tensor,
               removed: torch.Tensor | None) -> Routing:
        # Mirrors Llama4Router.forward: top-k of the logits, sigmoid of the chosen ones in float32, cast back.
        top_value, topk_idx = torch.topk(logits, layer.top_k, dim=1)
        combine_weight = torch.sigmoid(top_value.float()).to(top_value.dtype)
        router_probs = self.router_probs(layer, logits)
        return Routing(router_logits, router_probs, topk_idx, router_probs.gather(-1, topk_idx), combine_weight)

    def check_block(self, layer: MoELayer, hidden: torch.Tensor) -> None:
        """The re-expressed block forward equals the library's ``Llama4TextMoe.forward`` bit for bit."""
        check_same_as_library(layer.block, (hidden.unsqueeze(0),), layer.layer, "Llama 4 MoE block")
