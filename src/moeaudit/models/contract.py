"""Check at load time that the installed transformers behaves as the adapters assume.

Silent nonsense is the failure mode of MoE tooling on transformers 5 (a router that starts returning
probabilities instead of logits, an experts module with a new calling convention): every later number
would be wrong without an error. So each MoE layer is probed on a few random hidden states:

1. the experts module holds fused 3-D weights with one slice per routed expert;
2. the router returns the 3-tuple ``(router_logits, topk_weights, topk_idx)`` and the logits are the raw
   linear map of the input (plus bias where the family has one; of the normed input where the router
   normalises it first, :meth:`~moeaudit.models.FamilyAdapter.router_linear_input`; soft-capped where the
   router caps it, :meth:`~moeaudit.models.FamilyAdapter.router_output_logits`);
3. the adapter's re-implemented routing reproduces the module's indices exactly and its weights to
   rounding;
4. ``experts(hidden, topk_idx, topk_weights)`` equals the sum of the slots' terms that moeaudit computes
   by calling the experts with weight 1 (:meth:`MoELayer.weighted_terms`; for Llama 4, whose weights scale
   the experts' input, on the scaled input);
5. the block's output is that routed output plus its (gated) shared experts (and a routing-independent
   offset, :meth:`~moeaudit.models.FamilyAdapter.block_offset`: JetMoE's bias), nothing else (the experts
   reading the block's input, or what the family's block makes of it for them,
   :meth:`~moeaudit.models.FamilyAdapter.experts_input`: Gemma 4 normalises it);
6. whatever the family's adapter checks of its block (:meth:`FamilyAdapter.check_block`: Llama 4's
   re-expressed block forward equals the library's bit for bit).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moeaudit.errors import ContractError
from moeaudit.models.base import MoELayer, block_hidden

_RTOL = {torch.float32: 1e-5, torch.float64: 1e-10, torch.bfloat16: 2e-2, torch.float16: 5e-3}


def _require_finite(values: torch.Tensor, subject: str) -> None:
    """Corrupt weights are not a contract break: say so instead of failing a comparison with NaN."""
    if not bool(torch.isfinite(values).all()):
        from moeaudit.errors import NonFiniteError

        raise NonFiniteError(f"{subject} NaN/inf on a random probe input: the checkpoint's weights are corrupt "
                             "(re-download or re-export it)")


def check_layer(layer: MoELayer, *, tokens: int = 6, seed: int = 0) -> None:
    """Raise ContractError naming the broken assumption for ``layer``; return None when it holds."""
    where = f"layer {layer.layer} ({type(layer.block).__name__})"
    fix = "install the versions in moeaudit's constraints.txt (transformers==5.23.0)"
    experts = layer.experts
    weighted = layer.num_experts - layer.adapter.identity_experts(layer)  # identity experts hold no weights
    for name in ("down_proj",):
        weight = getattr(experts, name, None)
        if not isinstance(weight, torch.Tensor) or weight.dim() != 3 or weight.shape[0] != weighted:
            raise ContractError(f"{where}: expected fused 3-D expert weights `{name}` [E, ., .]; {fix}")
    if getattr(experts, "gate_up_proj", None) is None and getattr(experts, "up_proj", None) is None:
        raise ContractError(f"{where}: expected fused expert weights `gate_up_proj`; {fix}")

    weight = layer.router_weight()
    generator = torch.Generator(device="cpu").manual_seed(seed)
    hidden = torch.randn(tokens, weight.shape[1], generator=generator).to(weight.device, weight.dtype)
    with torch.no_grad():
        output = layer.call_router(hidden)
        if not (isinstance(output, tuple) and len(output) == 3):
            raise ContractError(f"{where}: the router must return (router_logits, topk_weights, topk_idx); {fix}")
        router_logits, topk_weights, topk_idx = output
        if tuple(router_logits.shape) != (tokens, layer.num_experts) or tuple(topk_idx.shape) != (tokens, layer.top_k):
            raise ContractError(f"{where}: unexpected router output shapes; {fix}")
        bias = getattr(layer.router, "bias", None)
        linear_input = layer.adapter.router_linear_input(layer, hidden)
        expected = F.linear(linear_input.float(), weight.float(), None if bias is None else bias.float())
        expected = layer.adapter.router_output_logits(layer, expected)
        _require_finite(expected, f"{where}: the router gives")
        rtol = _RTOL.get(weight.dtype, 1e-3)
        if not torch.allclose(router_logits.float(), expected, rtol=rtol, atol=rtol * expected.abs().max().item()):
            raise ContractError(f"{where}: the router's first output is not its raw logits; {fix}")
        routing = layer.route(router_logits)
        if not torch.equal(routing.topk_idx, topk_idx):
            raise ContractError(f"{where}: moeaudit's {layer.routing_rule} routing selects other experts than "
                                f"the library's router; {fix}")
        if not torch.allclose(routing.combine_weight.float(), topk_weights.float(), rtol=rtol, atol=1e-7):
            raise ContractError(f"{where}: moeaudit's {layer.routing_rule} routing gives other weights than "
                                f"the library's router; {fix}")
        try:
            combined = experts(hidden, topk_idx, topk_weights)
        except RuntimeError as err:  # experts of another width (a latent space) than the block's input
            raise ContractError(f"{where}: the experts do not take the block's input of width {hidden.shape[-1]} "
                                f"({str(err).splitlines()[0][:120]}); experts working in another space need an "
                                "adapter that projects into it") from None
        terms = layer.weighted_terms(hidden, topk_idx, topk_weights)
        _require_finite(terms, f"{where}: the experts give")
        recomposed = terms.float().sum(dim=1)
        scale = recomposed.abs().max().item() + 1e-12
        if not torch.allclose(combined.float(), recomposed, rtol=rtol, atol=rtol * scale):
            raise ContractError(f"{where}: experts(hidden, topk_idx, topk_weights) is not the weighted sum of "
                                f"the experts' outputs; {fix}")
        experts_input = layer.adapter.experts_input(layer, hidden)
        if experts_input is not hidden:
            combined = experts(experts_input, topk_idx, topk_weights)
        _check_block_sum(layer, hidden, combined, rtol, where)
        layer.adapter.check_block(layer, hidden)


def _check_block_sum(layer: MoELayer, hidden: torch.Tensor, routed: torch.Tensor, rtol: float, where: str) -> None:
    """The block's output is its routed output plus its (gated) shared experts, nothing else: the hooks edit
    the routed part and the engines add their Δy to the block output, so a block that scales or transforms
    the sum (a latent projection, an output scale) would make every effect wrong."""
    out = block_hidden(layer.block(hidden.unsqueeze(0))).reshape(hidden.shape[0], -1).float()
    expected = routed.float()
    if layer.shared is not None:
        shared = layer.shared(hidden).float()
        if layer.shared_gate is not None:
            shared = torch.sigmoid(layer.shared_gate(hidden).float()) * shared
        expected = expected + shared
    offset = layer.adapter.block_offset(layer)
    if offset is not None:
        expected = expected + offset.float()
    scale = expected.abs().max().item() + 1e-12
    if not torch.allclose(out, expected, rtol=rtol, atol=rtol * scale):
        raise ContractError(f"{where}: the MoE block's output is not its experts' weighted sum plus its shared "
                            "experts (something between the experts and the block's output transforms it), so "
                            "moeaudit cannot edit it exactly")


def check_contract(layers: list[MoELayer]) -> None:
    for layer in layers:
        check_layer(layer)
