"""The reference engine: a full forward of the window per intervention, through the adapter's hooks.

This is the ground truth every fast path is tested against (``--engine reference``). Each intervention is
an :class:`~moeaudit.models.Ablation` (or :class:`~moeaudit.models.SharedAblation`) active during one
complete forward of its window; several interventions of the same layer and kind may be stacked as batch
rows of one forward (``batch`` > 1, each row its own [T, E] removal mask), which is still exact.
"""

from __future__ import annotations

import torch

from moeaudit.intervene.clean import CleanWindow
from moeaudit.models import Ablation, SharedAblation
from moeaudit.models.moe_model import MoEModel


def reference_logits(moe: MoEModel, clean: CleanWindow, layer: int, kind: str, removal: list[torch.Tensor],
                     *, shared_index: int | None = None, shared: bool = False, mean_output=None,
                     attention_mask: torch.Tensor | None = None, batch: int = 1):
    """Full-forward logits and MoE outputs for a list of interventions at one layer.

    Parameters
    ----------
    removal : list of bool Tensor [T, E] (routed) or [T] (shared)
        Where each intervention removes what: routed experts per position, or shared-expert positions.
    batch : int
        Interventions stacked per forward.

    Yields
    ------
    (index, logits [T, V] float32, moe_output [T, H])
        Per intervention, in order.
    """
    seq_len = clean.seq_len
    for lo in range(0, len(removal), batch):
        chunk = removal[lo:lo + batch]
        rows = len(chunk)
        ids = clean.input_ids[None].expand(rows, -1)
        mask = None if attention_mask is None else attention_mask.expand(rows, -1)
        stacked = torch.stack(chunk)
        if shared:
            ablation = SharedAblation(layer, positions=stacked, index=shared_index)
        else:
            ablation = Ablation(layer, mask=stacked, kind=kind, mean_output=mean_output)
        with torch.no_grad(), moe.intervene([ablation], blocks=[layer], warn_unchanged=False) as trace:
            logits = moe.model(input_ids=ids, attention_mask=mask).logits.float()
        moe_output = trace.block_outputs[layer][0].reshape(rows, seq_len, -1)
        for row in range(rows):
            yield lo + row, logits[row], moe_output[row]
