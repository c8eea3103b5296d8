"""Gradient estimate of the token-scope ``zero`` effect (attribution patching).

For target position t and MoE layer ℓ, removing active expert e changes the MoE output by
Δy = -w_e f_e(x_t); to first order

    ΔNLL_t ≈ ∇_{y_{ℓ,t}} NLL_t · (-w_e f_e(x_t)).

Only NLL_t's own gradient is wanted (not that of later positions, which a plain backward of Σ_t NLL_t
would mix in). The row machinery of the fast engine makes every target independent: each target
position is one row that restarts at the first selected MoE layer and attends to the *constant* clean
keys/values of earlier positions, so in Σ_rows NLL_row the row r term depends only on row r's own path,
and one backward gives ∂NLL_t/∂y_{ℓ,t} for every target t and every selected layer ℓ at once
(a zero tensor z_ℓ added after each selected layer is the differentiation point: ∂/∂y_ℓ = c ∂/∂z_ℓ
because the MoE output enters the residual stream additively, scaled by c, 1 but for Granite's residual
multiplier: :func:`moeaudit.intervene.replay.residual_scale`; where it does not, a norm after the block,
the zero tensor is added to the block's output itself and the rows restart at that layer,
:func:`moeaudit.intervene.fast.restarts_at_block`).

Cost: one row-forward of every target position from the first selected MoE layer upward plus its
backward, i.e. about 3x one clean forward of the window (plus O(T²) attention against the clean cache),
independent of k and of the number of experts; the exact census costs one row-forward per
(layer, target, expert). Estimates are stored with ``estimate=True`` and never replace exact rows.
"""

from __future__ import annotations

import torch

from moeaudit.intervene.clean import CleanWindow, upcast
from moeaudit.intervene.fast import forward_rows, restarts_at_block, token_rows_per_call
from moeaudit.intervene.replay import residual_scale
from moeaudit.models.moe_model import MoEModel


def nll_gradients(moe: MoEModel, clean: CleanWindow, layers: list[int], positions: torch.Tensor, *,
                  rows_per_call: int, max_logit_elements: int | None = None,
                  max_state_bytes: int | None = None) -> dict[int, torch.Tensor]:
    """∂NLL_t/∂y_{ℓ,t} for every target position t and MoE layer ℓ.

    Parameters
    ----------
    layers : list of int
        MoE layers (decoder-layer indices).
    positions : LongTensor [N]
        Target positions (each with a valid next token).
    rows_per_call, max_logit_elements, max_state_bytes
        Rows per backward pass and their caps (:func:`moeaudit.intervene.fast.token_rows_per_call`).

    Returns
    -------
    dict layer -> Tensor [N, H] float32 (float64 for a float64 model)
    """
    first = min(layers)
    dtype = upcast(clean.layer_output[first]).dtype
    grads = {layer: torch.empty(len(positions), clean.layer_output[layer].shape[-1], dtype=dtype) for layer in layers}
    base = clean.layer_input[first]
    restart = restarts_at_block(moe)
    scale = 1.0 if restart else residual_scale(moe)
    per_call = token_rows_per_call(clean, first, rows_per_call, max_logit_elements, max_state_bytes)
    for lo in range(0, len(positions), per_call):
        pos = positions[lo:lo + per_call]
        hidden = base[pos].unsqueeze(1)
        with torch.enable_grad():
            shape = (*hidden.shape[:2], hidden.shape[-1])  # a block's output: one stream, where the layers carry N
            leaves = {layer: hidden.new_zeros(shape, requires_grad=True) for layer in layers}
            if restart:  # the differentiation point at the block's output, not the layer's
                logits = forward_rows(moe, clean, first, hidden, pos,
                                      patch={layer: (leaf, None) for layer, leaf in leaves.items()})[:, 0]
            else:
                logits = forward_rows(moe, clean, first, hidden, pos, add_after=leaves)[:, 0]
            targets = clean.input_ids[pos + 1]
            nll = -torch.log_softmax(logits, dim=-1).gather(-1, targets[:, None]).sum()
            values = torch.autograd.grad(nll, [leaves[layer] for layer in layers])
        del logits, nll, leaves  # before the next call forms its own
        for layer, value in zip(layers, values):
            grads[layer][lo:lo + len(pos)] = upcast(value[:, 0] * scale).cpu()
    return grads


def zero_estimates(grad: torch.Tensor, record, positions: torch.Tensor) -> torch.Tensor:
    """First-order ΔNLL of removing each active slot: [N, k] = -w_s (∇ · f_s)."""
    ungated = upcast(record.ungated[positions])  # [N, k, H]
    weights = upcast(record.combine_weight[positions])
    return -weights * torch.einsum("nkh,nh->nk", ungated, grad.to(ungated.device))
