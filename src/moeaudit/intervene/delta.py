"""The exact change an intervention makes to one MoE layer's output, from the clean pass's captures.

An intervention at MoE layer ℓ changes nothing before the block's output: the router and the experts
see the same input x_t. So its whole effect enters the residual stream as

    Δy_t = y_t^(intervened) - y_t = Σ_s (w'_s - w_s) f_s(x_t) + (replacement terms)

with w the clean combine weights and f_s the ungated outputs of the active experts (both captured):

``zero``     w'_s = 0 for the removed slots, unchanged otherwise.
``renorm``   removed slots 0, survivors rescaled by (Σ_s w_s) / (Σ_kept w_s).
``mean``     removed slots' f_s replaced by the expert's mean output: Δy = Σ_removed w_s (mean_e - f_s).
(Where a weight scales the expert's input — Llama 4 — the block is not linear in w: ``zero`` and
``renorm`` call the experts module on the edited weights, Δy = experts(x, idx, w') - routed_output, and
``mean`` is refused.)
``reroute``  the family's own routing rule re-run on the logits with the removed experts masked; the
             experts module is called on the new selection (so a newly selected expert's output is
             computed by the library's kernel), Δy = experts(x, new_idx, new_w) - routed_output.
shared       ``index=None``: Δy = -(gated shared output); ``index=j``: minus shared expert j's part,
             computed from its slice of the fused shared MLP (times the sigmoid gate where there is one).

The weight edits are :func:`moeaudit.models.edits.edited_combine_weight` and
:func:`~moeaudit.models.edits.mean_replacement`, the same functions the intervention hooks apply.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moeaudit.models.base import MoELayer
from moeaudit.models.edits import edited_combine_weight, mean_refusal, mean_replacement
from moeaudit.models.hooks import LayerRecord


def routed_delta(layer: MoELayer, record: LayerRecord, positions: torch.Tensor, removed: torch.Tensor,
                 kind: str, mean_output: torch.Tensor | None = None) -> torch.Tensor:
    """Δy at ``positions`` for removing ``removed`` experts with ``kind``.

    Parameters
    ----------
    layer : MoELayer
    record : LayerRecord
        The clean capture of ``layer`` for the window (``keep_outputs=True``).
    positions : LongTensor [N]
    removed : bool Tensor [N, E]
        Experts removed at each position (several for progressive ablation).
    kind : {"zero", "renorm", "reroute", "mean"}
    mean_output : Tensor [E, H], optional
        Required for ``mean``.

    Returns
    -------
    Tensor [N, H]
        In the model's dtype. An intervention that removes no slot gives exactly 0.
    """
    edit = _RoutedEdit(layer, record, positions, removed, kind, mean_output)
    if edit.new_output is not None:
        return edit.new_output - record.routed_output[positions]
    if kind == "mean":
        w = (edit.weights.float() * edit.slot_removed).unsqueeze(-1)
        return (edit.replaced - (w * edit.ungated.float()).sum(dim=1)).to(edit.ungated.dtype)
    return ((edit.new_weights - edit.weights).unsqueeze(-1) * edit.ungated).sum(dim=1)


def routed_output_after(layer: MoELayer, record: LayerRecord, positions: torch.Tensor, removed: torch.Tensor,
                        kind: str, mean_output: torch.Tensor | None = None) -> torch.Tensor:
    """The routed output y' at ``positions`` after removing ``removed`` experts with ``kind``, formed from its
    remaining terms (arguments as :func:`routed_delta`).

    Not ``y + Δy``: where the block's output passes a norm before the residual stream (the fast engine's
    restart mode, :func:`moeaudit.intervene.fast.restarts_at_block`), a remainder much smaller than y (the
    removed expert held most of the weight) would keep only the digits that y and Δy do not cancel.
    """
    edit = _RoutedEdit(layer, record, positions, removed, kind, mean_output)
    if edit.new_output is not None:
        return edit.new_output
    if kind == "mean":
        kept = edit.weights.float().masked_fill(edit.slot_removed, 0.0).unsqueeze(-1)
        return (edit.replaced + (kept * edit.ungated.float()).sum(dim=1)).to(edit.ungated.dtype)
    return (edit.new_weights.unsqueeze(-1) * edit.ungated).sum(dim=1)


class _RoutedEdit:
    """What an intervention does to the routed terms at ``positions``: new weights (``zero``, ``renorm``),
    replacement terms (``mean``), or the experts module's new output where the edit is not a reweighting of
    the clean terms (``reroute``; any edit where the weights scale the experts' input)."""

    def __init__(self, layer: MoELayer, record: LayerRecord, positions: torch.Tensor, removed: torch.Tensor,
                 kind: str, mean_output: torch.Tensor | None):
        self.topk_idx = topk_idx = record.topk_idx[positions]
        self.weights = weights = record.combine_weight[positions]
        self.new_output = self.new_weights = self.replaced = self.ungated = None
        if kind == "reroute":
            rerouted = layer.route(record.router_logits[positions], removed)
            self.new_output = type(layer.experts).forward(layer.experts, record.moe_input[positions],
                                                          rerouted.topk_idx, rerouted.combine_weight.to(weights.dtype))
            return
        self.slot_removed = slot_removed = removed.gather(-1, topk_idx)
        if layer.weights_scale_input:  # Llama 4: the block is not linear in its weights; call the experts
            if kind == "mean":
                raise mean_refusal(layer)
            new_weights = edited_combine_weight(kind, weights, slot_removed)
            self.new_output = type(layer.experts).forward(layer.experts, record.moe_input[positions], topk_idx,
                                                          new_weights)
            return
        self.ungated = record.ungated[positions]  # [N, k, H]
        if kind == "mean":
            assert mean_output is not None
            self.replaced = mean_replacement(weights, slot_removed, topk_idx, mean_output)
            return
        self.new_weights = edited_combine_weight(kind, weights, slot_removed)


def shared_delta(layer: MoELayer, record: LayerRecord, positions: torch.Tensor, index: int | None) -> torch.Tensor:
    """Δy at ``positions`` for removing all shared experts (``index=None``) or shared expert ``index``."""
    if index is None:
        return -record.shared_output[positions]
    shared = layer.shared
    x = record.moe_input[positions]
    act_fn = shared.act_fn if hasattr(shared, "act_fn") else shared.activation_fn  # Llama 4's shared MLP
    gate = getattr(shared, "gate_proj", None)  # Nemotron-H's shared MLP is ungated: down(act(up(x)))
    inter = act_fn(shared.up_proj(x)) if gate is None else act_fn(gate(x)) * shared.up_proj(x)
    lo, hi = index * layer.shared_intermediate, (index + 1) * layer.shared_intermediate
    part = F.linear(inter[:, lo:hi], shared.down_proj.weight[:, lo:hi])
    if layer.shared_gate is not None:
        part = torch.sigmoid(layer.shared_gate(x)) * part
    return -part


def gap_statistics(record: LayerRecord, positions: torch.Tensor,
                   delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Gap norm ‖y_t - y_t^(-e)‖ and compensation cosine cos(y_t - y_t^(-e), y_t^(-e)).

    Returns two float32 tensors [N]; the cosine is NaN where either vector is zero.
    """
    gap = -delta.float()
    remaining = record.moe_output[positions].float() + delta.float()
    gap_norm = torch.linalg.vector_norm(gap, dim=-1)
    rem_norm = torch.linalg.vector_norm(remaining, dim=-1)
    denom = gap_norm * rem_norm
    cosine = (gap * remaining).sum(dim=-1) / denom
    cosine = torch.where(denom > 0, cosine, torch.full_like(cosine, float("nan")))
    return gap_norm, cosine
