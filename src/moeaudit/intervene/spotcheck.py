"""The fast engine checks itself against the reference engine before it measures anything.

The fast engine assumes what every supported decoder layer does: the MoE block's output enters the
residual stream additively (or, where a probe finds it does not, the rows restart at the block), and
the final norm and LM head make the logits. A family that breaks an assumption (a coupling the probe
misreads, a logit transform the rows do not see) would give silently wrong effects, and the
null-intervention noise floor cannot see it (a null intervention changes nothing to scale). So, once
per model, real interventions — the top expert at one position of every MoE layer, in token and sequence
scope — run through both engines on a short stretch of the first window; if they disagree beyond
rounding, the check tries the fast engine's other way of starting its rows (after the intervened layer with
Δy added to the residual stream, or at it with the block's output replaced:
:func:`moeaudit.intervene.fast.restarts_at_block`, which a probe chooses first) and keeps it if it agrees;
otherwise the run uses the reference engine and says why.

Near ties (:func:`near_ties`) are the other numerical hazard: a routing decision that rounding alone can
flip. An intervention upstream of one may change that later layer's routing through rounding, which is not
an effect of the removed expert; the run counts them per MoE layer so a reader knows how many there are.
"""

from __future__ import annotations

import functools
import inspect
import logging
import weakref
from typing import Callable

import torch

from moeaudit.errors import first_line
from moeaudit.intervene.selection import Selection
from moeaudit.models.moe_model import MoEModel

logger = logging.getLogger(__name__)

#: Tokens of the first window used by the check (a short stretch keeps the reference passes cheap).
CHECK_TOKENS = 48
#: Rounding allowed between the engines, by dtype (nats), plus :data:`RELATIVE` of the reference effect: in
#: float32 and float64 the absolute bound alone (the engines agree to ~1e-6 nats in float32); in half
#: precision the two engines' different kernels round differently enough to need a relative share too.
#: float64 gets float32's bound: transformers' RMS norms compute in float32 whatever the model's dtype.
ABSOLUTE = {torch.float64: 1e-4, torch.float32: 1e-4, torch.bfloat16: 5e-2, torch.float16: 2e-2}
RELATIVE = {torch.float64: 0.0, torch.float32: 0.0, torch.bfloat16: 0.05, torch.float16: 0.05}

#: Keyword arguments of a decoder layer that the fast engine supplies itself (per row) or that do not change
#: its output; a layer that receives any other is not replayed (the rows would run without it). GLM-5's
#: ``prev_topk_indices`` (an earlier layer's sparse-attention selection) is supplied by
#: :func:`moeaudit.intervene.replay.indexer_arguments`.
REPLAYED_LAYER_ARGUMENTS = frozenset({"attention_mask", "past_key_values", "position_embeddings", "position_ids",
                                      "use_cache", "cache_position", "output_router_logits", "output_attentions",
                                      "prev_topk_indices"})

#: What a decoder layer raises when it cannot run on the fast engine's rows (an argument or a shape the rows do
#: not give it): a reason to measure with the reference engine, not a crash.
ROW_ERRORS = (TypeError, RuntimeError, ValueError, LookupError, AttributeError)

_VERDICTS: "weakref.WeakKeyDictionary[torch.nn.Module, str | None]" = weakref.WeakKeyDictionary()


@functools.cache
def _none_defaults(layer_type: type) -> frozenset[str]:
    """The keyword arguments of a decoder layer class whose default is None (ERNIE-4.5-VL's
    ``moe_mm_token_type_ids`` on text): handed None, they are what the rows' call, which omits them, passes."""
    parameters = inspect.signature(layer_type.forward).parameters.values()
    return frozenset(p.name for p in parameters if p.default is None)


def checked_layers(moe: MoEModel) -> list[int]:
    """The MoE layers the check intervenes on: every one (a family may treat some layers differently)."""
    return list(moe.moe_layer_indices)


def fast_disagreement(moe: MoEModel, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                      compute: Callable, config) -> str | None:
    """Why the fast engine cannot be trusted on ``moe``, or None when it agrees with the reference.

    Parameters
    ----------
    moe : MoEModel
    input_ids, attention_mask : Tensor [B, T]
        The windows of the run; the check uses the first :data:`CHECK_TOKENS` real tokens of the first.
    compute : callable
        :func:`moeaudit.intervene.compute_effects` (passed in: this module sits below the engine).
    config : InterveneConfig
        The run's settings; the check uses its batching with ``zero`` removals in both scopes.

    Returns
    -------
    str or None
        The reason, naming the layer and the two ΔNLL values, when the engines disagree by more than
        ``ABSOLUTE[dtype] + RELATIVE[dtype] * |ΔNLL_reference|``; the verdict is kept for the model's lifetime.
    """
    if moe.model in _VERDICTS:
        return _VERDICTS[moe.model]
    _VERDICTS[moe.model] = None  # the fast run below must not check itself
    try:
        reason = _check(moe, input_ids, attention_mask, compute, config)
    except BaseException:
        del _VERDICTS[moe.model]
        raise
    _VERDICTS[moe.model] = reason
    return reason


def _check(moe, input_ids, attention_mask, compute, config) -> str | None:
    import dataclasses

    length = int(attention_mask[0].sum()) if attention_mask is not None else input_ids.shape[1]
    length = min(length, CHECK_TOKENS)
    if length < 3:
        return None  # nothing to check on: the run's own windows are this short
    ids = input_ids[:1, :length]
    layers = checked_layers(moe)
    pos = length // 2
    received: set[str] = set()

    def record(module, args, kwargs):  # an argument handed as None where the layer's default is None: the rows'
        defaults = _none_defaults(type(module))
        received.update(name for name, value in kwargs.items() if value is not None or name not in defaults)

    handles = [layer.register_forward_pre_hook(record, with_kwargs=True)
               for layer in moe.adapter.decoder_layers(moe.model)]
    try:
        with torch.no_grad(), moe.capture(layers) as trace:
            moe.model(input_ids=ids)
    finally:
        for handle in handles:
            handle.remove()
    unknown = sorted(received - REPLAYED_LAYER_ARGUMENTS - moe.adapter.replayed_layer_arguments)
    if unknown:
        return (f"this model's decoder layers receive arguments the fast engine does not replay per row "
                f"({', '.join(unknown)}), so every effect is measured with full forward passes")
    items = []
    for layer in layers:
        record = trace[layer].rows
        slot = int(torch.argmax(record.combine_weight[pos].float()))
        items.append((layer, 0, pos, int(record.topk_idx[pos, slot])))
    base = dataclasses.replace(config, kinds=("zero",), scopes=("token", "sequence"), estimate=False,
                               noise_positions=0)
    selection = Selection.explicit(items)
    try:
        fast = compute(moe, ids, selection, config=dataclasses.replace(base, engine="fast")).effects
    except ROW_ERRORS as err:  # rows a layer cannot run
        first = first_line(err)
        return (f"the fast engine cannot run this model's decoder layers on single rows ({type(err).__name__}: "
                f"{first[:160]}), so every effect is measured with full forward passes")
    reference = compute(moe, ids, selection, config=dataclasses.replace(base, engine="reference")).effects
    bad = _disagreeing(moe, fast, reference)
    if bad.empty:
        return None
    from moeaudit.intervene.fast import restarts_at_block, set_restart_at_block

    restart = restarts_at_block(moe)  # the other way of starting the rows may replay what this one does not
    set_restart_at_block(moe, not restart)
    try:
        other = compute(moe, ids, selection, config=dataclasses.replace(base, engine="fast")).effects
    except ROW_ERRORS:  # e.g. Δy added to several residual streams
        other = None
    if other is not None and _disagreeing(moe, other, reference).empty:
        logger.info("the fast engine's rows %s", "restart at the intervened MoE layer with the block's output "
                    "replaced" if not restart else "start after the intervened MoE layer")
        return None
    set_restart_at_block(moe, restart)
    row = bad.iloc[0]
    return (f"the fast engine disagrees with the reference engine on this model (layer {int(row.layer)}, "
            f"{row.scope} scope: ΔNLL {row.delta_nll_fast:.3g} vs {row.delta_nll_ref:.3g} nats), its rows starting "
            "after the intervened layer or at its block alike: something between its MoE blocks and the logits is "
            "not replayed (e.g. a logit transform), so every effect is measured with full forward passes")


def _disagreeing(moe, fast, reference):
    """The (layer, pos, expert, scope) rows whose ΔNLL differs between the engines beyond rounding."""
    keys = ["layer", "pos", "expert", "scope"]
    merged = fast[keys + ["delta_nll"]].merge(reference[keys + ["delta_nll"]], on=keys, suffixes=("_fast", "_ref"))
    tolerance = ABSOLUTE.get(moe.dtype, 1e-4) + RELATIVE.get(moe.dtype, 0.05) * merged["delta_nll_ref"].abs()
    return merged[(merged["delta_nll_fast"] - merged["delta_nll_ref"]).abs() > tolerance]


#: A routing decision is a near tie when moving the router logits by this many units in the last place of
#: the model's dtype (relative to the token's largest |logit|) changes the selected set.
NEAR_TIE_ULPS = 4


def near_ties(layer, router_logits: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    r"""Which tokens' routing at ``layer`` a rounding-sized change of the router logits would flip.

    Parameters
    ----------
    layer : MoELayer
    router_logits : Tensor [N, E]
        The clean router logits.
    dtype : torch.dtype
        The model's dtype (its rounding sets the scale).

    Returns
    -------
    bool Tensor [N]
        True where routing the logits moved by :math:`\tau = 4\,\epsilon_{dtype} \max_e |z_e|` *against*
        the current choice (the selected experts' logits lowered, the others' raised) selects another set.
        Every rule moeaudit adapts ranks experts by a quantity that increases with their own logit, so this
        one perturbation is the most adverse of all with that size.
    """
    z = router_logits.float()
    chosen = layer.route(router_logits).topk_idx
    selected = torch.zeros_like(z, dtype=torch.bool).scatter_(1, chosen, True)
    tau = NEAR_TIE_ULPS * torch.finfo(dtype).eps * z.abs().amax(dim=-1, keepdim=True)
    moved = torch.where(selected, z - tau, z + tau).to(router_logits.dtype)
    other = layer.route(moved).topk_idx
    return (other.sort(dim=-1).values != chosen.sort(dim=-1).values).any(dim=-1)
