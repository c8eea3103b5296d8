"""The one definition of each combine-weight edit.

An MoE block's routed output is :math:`y_t = \\sum_s w_s f_{e_s}(x_t)` over the k slots of token t, with
:math:`w` the combine weights the experts module receives. Removing experts by ``zero``, ``renorm`` or
``mean`` edits :math:`w` (``mean`` also adds a replacement term); ``reroute`` edits the selection and is
the adapter's routing rule (:meth:`moeaudit.models.MoELayer.route`). The hooks that run an intervention
(:mod:`moeaudit.models.hooks`) and the fast engine that computes its exact output change
(:mod:`moeaudit.intervene.delta`) both call these functions, so the two can never disagree.
"""

from __future__ import annotations

import torch

from moeaudit.errors import invalid
from moeaudit.options import WEIGHT_EDIT_KINDS


def edited_combine_weight(kind: str, combine_weight: torch.Tensor, slot_removed: torch.Tensor) -> torch.Tensor:
    """The combine weights after removing the marked slots.

    Parameters
    ----------
    kind : {"zero", "renorm", "mean"}
    combine_weight : Tensor [N, k]
        What the experts module would multiply each selected expert's output by.
    slot_removed : bool Tensor [N, k]
        Slots whose expert is removed.

    Returns
    -------
    Tensor [N, k]
        Same dtype. ``zero`` and ``mean``: removed slots get weight 0 (``mean`` adds its replacement
        term separately, :func:`mean_replacement`). ``renorm``: removed slots 0, the survivors of a row
        with a removal rescaled by :math:`\\sum_s w_s / \\sum_{kept} w_s` so the row's total weight is
        unchanged; a row whose every slot is removed gets all zeros.
    """
    if kind not in WEIGHT_EDIT_KINDS:
        raise ValueError(f"{kind!r} is not a combine-weight edit ({', '.join(WEIGHT_EDIT_KINDS)})")
    kept = combine_weight.masked_fill(slot_removed, 0.0)
    if kind != "renorm":
        return kept
    total = combine_weight.sum(dim=-1, keepdim=True)
    kept_total = kept.sum(dim=-1, keepdim=True)
    scale = torch.where(kept_total != 0, total / kept_total, torch.zeros_like(total))
    return torch.where(slot_removed.any(dim=-1, keepdim=True), kept * scale, combine_weight)


def mean_replacement(combine_weight: torch.Tensor, slot_removed: torch.Tensor, topk_idx: torch.Tensor,
                     mean_output: torch.Tensor) -> torch.Tensor:
    """The ``mean`` ablation's replacement term :math:`\\sum_{s\\ removed} w_s\\, \\bar f_{e_s}`.

    Parameters
    ----------
    combine_weight : Tensor [N, k]
        The unedited combine weights.
    slot_removed : bool Tensor [N, k]
    topk_idx : LongTensor [N, k]
    mean_output : Tensor [E, H]
        Per-expert replacement outputs.

    Returns
    -------
    Tensor [N, H], float32
    """
    replacement = mean_output.to(combine_weight.device, torch.float32)[topk_idx]  # [N, k, H]
    weight = (combine_weight.float() * slot_removed).unsqueeze(-1)
    return (weight * replacement).sum(dim=1)


def mean_refusal(layer) -> Exception:
    """The one-line refusal of ``mean`` at a layer whose weights scale the experts' input (Llama 4)."""
    return invalid("kind", "'zero', 'renorm' or 'reroute' (the router's weight scales the expert's input, so there "
                   "is no output term w * f_e(x) to replace by a mean)", "mean", f"Llama 4 layer {layer.layer}")
