"""Capture and intervention hooks on the library's own MoE modules.

Everything here edits what flows *into* transformers' modules, so the library's kernels keep doing the
work:

* a forward hook on the **router** re-routes (``reroute``) by masking logits and re-selecting with the
  family's rule; it returns the *original* logits so transformers' own output recorders stay clean;
* a forward pre-hook on the **experts** module edits the per-slot combine weights (``zero``, ``renorm``,
  ``mean``) and, when capturing, computes each selected expert's ungated output by re-invoking the
  experts' ``forward`` with weight 1;
* a forward hook on the **experts** adds the ``mean`` replacement term;
* hooks on the **shared expert** (or on its ``down_proj`` input, to remove one of several fused shared
  experts) ablate shared experts.

Rewriting indices to the sentinel ``E`` is kernel-dependent in transformers 5, so removal always zeroes
weights instead. All hooks are registered together and removed in a ``finally`` block.
"""

from __future__ import annotations

import warnings
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterable, Iterator, Literal, Sequence

import torch

from moeaudit.errors import ContractError, invalid
from moeaudit.models.base import MoELayer, block_hidden
from moeaudit.models.edits import edited_combine_weight, mean_refusal, mean_replacement
from moeaudit.options import ABLATION_KINDS, WEIGHT_EDIT_KINDS, AblationKind, one_of

if TYPE_CHECKING:  # pragma: no cover
    from moeaudit.models.moe_model import MoEModel


@dataclass(frozen=True)
class Ablation:
    """Remove routed experts at chosen (token, expert) pairs of one MoE layer.

    Parameters
    ----------
    layer : int
        Decoder-layer index of an MoE layer.
    experts : int or sequence of int, optional
        Experts to remove at ``positions``. Give either ``experts`` or ``mask``.
    positions : None, sequence of int, or bool Tensor [T] or [B, T]
        Where to remove them; None = every position (``sequence`` scope). Integers are positions within
        each window (applied to every batch row); a [B, T] mask selects per row.
    mask : bool Tensor [B, T, E] or [T, E], optional
        Full per-(row, position, expert) removal mask, for batching different interventions as rows.
    kind : {"zero", "renorm", "reroute", "mean"}
        ``zero`` drops the expert's term and keeps the other weights; ``renorm`` drops it and rescales the
        surviving weights so their sum is unchanged; ``reroute`` masks its router logit to -inf and
        re-selects top-k with the family's rule; ``mean`` replaces its output f_e(x) by ``mean_output[e]``.
    mean_output : Tensor [E, H], optional
        Per-expert replacement outputs, required for ``kind="mean"``.

    Examples
    --------
    >>> with moe.intervene([Ablation(layer=3, experts=5, positions=[17])]):  # doctest: +SKIP
    ...     logits = moe.model(input_ids).logits
    """

    layer: int
    experts: int | Sequence[int] | None = None
    positions: Sequence[int] | torch.Tensor | None = None
    mask: torch.Tensor | None = None
    kind: AblationKind = "zero"
    mean_output: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.kind not in ABLATION_KINDS:
            raise invalid("kind", one_of(ABLATION_KINDS), self.kind)
        if (self.experts is None) == (self.mask is None):
            raise invalid("experts", "given exactly when `mask` is not", self.experts)
        if self.kind == "mean" and self.mean_output is None:
            raise invalid("mean_output", "an [E, H] tensor for kind='mean'", None)

    def removal_mask(self, batch: int, seq_len: int, num_experts: int, device) -> torch.Tensor:
        """Resolve to a bool [batch * seq_len, num_experts] mask."""
        if self.mask is not None:
            mask = self.mask.to(device=device, dtype=torch.bool)
            if mask.dim() == 2:
                mask = mask.unsqueeze(0).expand(batch, -1, -1)
            if tuple(mask.shape) != (batch, seq_len, num_experts):
                raise invalid("mask", f"of shape ({batch}, {seq_len}, {num_experts}) or ({seq_len}, {num_experts})",
                              tuple(self.mask.shape), f"layer {self.layer}")
            return mask.reshape(batch * seq_len, num_experts)
        experts = [self.experts] if isinstance(self.experts, int) else list(self.experts)
        bad = [e for e in experts if not 0 <= int(e) < num_experts]
        if bad:
            raise invalid("experts", f"in [0, {num_experts - 1}]", bad[0], f"layer {self.layer}")
        where = torch.zeros(batch, seq_len, dtype=torch.bool, device=device)
        if self.positions is None:
            where[:] = True
        elif isinstance(self.positions, torch.Tensor) and self.positions.dtype == torch.bool:
            pos_mask = self.positions.to(device)
            where[:] = pos_mask if pos_mask.dim() == 2 else pos_mask.unsqueeze(0)
        else:
            pos = torch.as_tensor(list(self.positions) if not isinstance(self.positions, torch.Tensor)
                                  else self.positions, dtype=torch.long)
            if pos.numel() and (pos.min() < 0 or pos.max() >= seq_len):
                raise invalid("positions", f"in [0, {seq_len - 1}]", pos.tolist(), f"layer {self.layer}")
            where[:, pos.to(device)] = True
        mask = torch.zeros(batch, seq_len, num_experts, dtype=torch.bool, device=device)
        mask[..., experts] = where.unsqueeze(-1).expand(-1, -1, len(experts))
        return mask.reshape(batch * seq_len, num_experts)


@dataclass(frozen=True)
class SharedAblation:
    """Remove the shared expert(s) of one MoE layer at chosen positions.

    ``index`` selects one of several fused shared experts (DeepSeek-V2 fuses ``n_shared_experts`` into one
    MLP; removing index j zeroes its slice of the intermediate activations); None removes all of them.
    """

    layer: int
    positions: Sequence[int] | torch.Tensor | None = None
    index: int | None = None

    def position_mask(self, batch: int, seq_len: int, device) -> torch.Tensor:
        probe = Ablation(layer=self.layer, experts=0, positions=self.positions)
        return probe.removal_mask(batch, seq_len, 1, device)[:, 0]


@dataclass
class LayerRecord:
    """What one forward call through one MoE layer looked like.

    Tensors are shaped ``[batch, pos, ...]`` like TransformerLens's activation caches: ``topk_idx[b, t]``
    are the experts chosen at position ``t`` of sequence ``b``. A block called on flattened rows ``[N, H]``
    gives batch 1. :attr:`rows` is the same record flattened to ``N = batch * pos`` rows (views, no copy;
    row ``b * pos + t``), the layout the intervention engines work in.
    """

    layer: int
    batch_shape: tuple[int, int]
    router_logits: torch.Tensor  # [B, T, E], as the router returned them
    topk_idx: torch.Tensor  # [B, T, k], after any re-routing
    raw_gate: torch.Tensor  # [B, T, k] float32, router_probs gathered at topk_idx
    combine_weight: torch.Tensor  # [B, T, k], what the experts module actually received
    router_probs: torch.Tensor | None = None  # [B, T, E] float32, MoELayer.router_probs of the router logits
    act_norm: torch.Tensor | None = None  # [B, T, k] L2 norm of each selected expert's ungated output
    act_max_abs: torch.Tensor | None = None  # [B, T, k] max |f_e(x)_i|
    ungated: torch.Tensor | None = None  # [B, T, k, H] (keep_outputs=True)
    moe_input: torch.Tensor | None = None  # [B, T, H] (keep_outputs=True)
    routed_output: torch.Tensor | None = None  # [B, T, H] output of the experts module (keep_outputs=True)
    moe_output: torch.Tensor | None = None  # [B, T, H] output of the whole MoE block (keep_outputs=True)
    shared_output: torch.Tensor | None = None  # [B, T, H] gated shared part (keep_outputs=True)
    flat: bool = False  # True for the row view (:attr:`rows`): tensors [N, ...]

    @property
    def rows(self) -> "LayerRecord":
        """This record with every tensor flattened to ``N = batch * pos`` rows (row ``b * pos + t``)."""
        if self.flat:
            return self
        return self._relaid(lambda t: t.reshape(-1, *t.shape[2:]), flat=True)

    def shaped(self) -> "LayerRecord":
        """This record with every tensor ``[batch, pos, ...]`` (the inverse of :attr:`rows`)."""
        if not self.flat:
            return self
        return self._relaid(lambda t: t.reshape(*self.batch_shape, *t.shape[1:]), flat=False)

    def _relaid(self, reshape, *, flat: bool) -> "LayerRecord":
        from dataclasses import fields, replace

        tensors = {f.name: reshape(getattr(self, f.name)) for f in fields(self)
                   if isinstance(getattr(self, f.name), torch.Tensor)}
        return replace(self, flat=flat, **tensors)


@dataclass
class Trace:
    """Records captured inside :meth:`MoEModel.intervene`.

    Attributes
    ----------
    records : dict[int, list[LayerRecord]]
        Per captured MoE layer (``capture=``), one record per forward call, its tensors ``[batch, pos, ...]``.
    block_inputs, block_outputs : dict[int, list[Tensor]]
        Per MoE layer of ``blocks=``, the block's input and output hidden states per call, as the block
        saw and returned them (no copy; [B, T, H] or [N, H]).
    layer_inputs, layer_outputs : dict[int, list[Tensor]]
        With ``residual=True``, per decoder layer (every layer, dense ones too) the residual stream
        entering and leaving it per call.
    slots_changed : dict[int, int]
        Per MoE layer with routed-expert ablations, the (token, slot) pairs they removed, summed over calls:
        an ablation of an expert the router did not select at a position changes nothing there.
    """

    records: dict[int, list[LayerRecord]] = field(default_factory=lambda: defaultdict(list))
    block_inputs: dict[int, list[torch.Tensor]] = field(default_factory=lambda: defaultdict(list))
    block_outputs: dict[int, list[torch.Tensor]] = field(default_factory=lambda: defaultdict(list))
    layer_inputs: dict[int, list[torch.Tensor]] = field(default_factory=lambda: defaultdict(list))
    layer_outputs: dict[int, list[torch.Tensor]] = field(default_factory=lambda: defaultdict(list))
    slots_changed: dict[int, int] = field(default_factory=lambda: defaultdict(int))

    def __getitem__(self, layer: int) -> LayerRecord:
        """The single record of ``layer`` (raises when the layer was run more than once)."""
        calls = self.records.get(layer, [])
        if len(calls) != 1:
            raise KeyError(f"layer {layer} was captured {len(calls)} times; use trace.records[{layer}]")
        return calls[0]

    @property
    def layers(self) -> list[int]:
        return sorted(self.records)


class _LayerHooks:
    """All hooks for one MoE layer during one ``intervene`` context."""

    def __init__(self, layer: MoELayer, ablations: list[Ablation], shared: list[SharedAblation],
                 capture: bool, keep_outputs: bool, trace: Trace):
        self.layer = layer
        self.reroutes = [a for a in ablations if a.kind == "reroute"]
        self.weight_edits = [a for a in ablations if a.kind != "reroute"]
        self.shared = shared
        self.capture = capture
        self.keep_outputs = keep_outputs
        self.trace = trace
        self.batch_shape: tuple[int, int] | None = None
        self.record: LayerRecord | None = None
        self.mean_correction: torch.Tensor | None = None

    # ---------------------------------------------------------------- registration
    def register(self, handles: list) -> None:
        """Register every hook, appending each handle to ``handles`` at once so a failure leaks none."""
        layer = self.layer
        handles.append(layer.block.register_forward_pre_hook(self.block_pre))
        if self.capture or self.reroutes:
            handles.append(layer.router.register_forward_hook(self.router_post))
        if self.capture or self.weight_edits:
            handles.append(layer.experts.register_forward_pre_hook(self.experts_pre))
            handles.append(layer.experts.register_forward_hook(self.experts_post))
        if self.capture and self.keep_outputs:
            handles.append(layer.block.register_forward_hook(self.block_post))
            if layer.shared is not None:
                handles.append(layer.block.register_forward_hook(self.shared_capture))
        if layer.weights_scale_input and any(a.kind == "mean" for a in self.weight_edits):
            raise mean_refusal(layer)
        for ablation in self.shared:
            if layer.shared is None:
                raise invalid("layer", "an MoE layer with shared experts", ablation.layer, "a SharedAblation")
            if ablation.index is None:
                handles.append(layer.shared.register_forward_hook(self._shared_zero_hook(ablation)))
            else:
                if not 0 <= ablation.index < layer.num_shared:
                    raise invalid("index", f"in [0, {layer.num_shared - 1}]", ablation.index, f"layer {layer.layer}")
                handles.append(layer.shared.down_proj.register_forward_pre_hook(self._shared_slice_hook(ablation)))

    # ---------------------------------------------------------------- hooks
    def block_pre(self, module, args):
        hidden = args[0]
        self.batch_shape = (hidden.shape[0], hidden.shape[1]) if hidden.dim() == 3 else (1, hidden.shape[0])
        self.record = None
        self.mean_correction = None

    def _removal(self, ablations: Iterable[Ablation], device) -> torch.Tensor | None:
        batch, seq_len = self.batch_shape
        mask = None
        for ablation in ablations:
            m = ablation.removal_mask(batch, seq_len, self.layer.num_experts, device)
            mask = m if mask is None else mask | m
        return mask

    def router_post(self, module, args, output):
        if not isinstance(output, tuple) or len(output) != 3:
            raise ContractError(
                f"the router of layer {self.layer.layer} returned {type(output).__name__}, not "
                "(router_logits, topk_weights, topk_idx); install the transformers version in constraints.txt"
            )
        router_logits, topk_weights, topk_idx = output
        if self.reroutes:
            removed = self._removal(self.reroutes, router_logits.device)
            self.trace.slots_changed[self.layer.layer] += int(removed.gather(-1, topk_idx).sum())
            rows = removed.any(dim=-1)
            if rows.any():
                rerouted = self.layer.route(router_logits[rows], removed[rows])
                topk_weights = topk_weights.clone()
                topk_idx = topk_idx.clone()
                topk_weights[rows] = rerouted.combine_weight.to(topk_weights.dtype)
                topk_idx[rows] = rerouted.topk_idx
        if self.capture:
            probs = self.layer.router_probs(router_logits.detach())
            self.record = LayerRecord(  # built on the rows the kernels see; stored shaped
                flat=True,
                layer=self.layer.layer,
                batch_shape=self.batch_shape,
                router_logits=router_logits.detach(),
                topk_idx=topk_idx.detach(),
                raw_gate=probs.gather(-1, topk_idx.detach()),
                combine_weight=topk_weights.detach(),
                router_probs=probs,
            )
        # The original logits go back out so transformers' own router-logit recorders stay clean.
        return router_logits, topk_weights, topk_idx

    def experts_pre(self, module, args):
        if len(args) < 3:
            raise ContractError(
                f"the experts module of layer {self.layer.layer} was not called as experts(hidden, topk_idx, "
                "topk_weights); install the transformers version in constraints.txt"
            )
        hidden, topk_idx, topk_weights = args[0], args[1], args[2]
        if self.capture:
            if self.record is None:  # router not hooked through this block's call path
                raise ContractError(f"layer {self.layer.layer}: the experts ran without their router")
            with torch.no_grad():
                ungated = self.layer.ungated_outputs(hidden.detach(), topk_idx)
                self.record.act_norm = torch.linalg.vector_norm(ungated.float(), dim=-1)
                self.record.act_max_abs = ungated.float().abs().amax(dim=-1)
                if self.keep_outputs:
                    self.record.ungated = ungated
                    self.record.moe_input = hidden.detach()
        if not self.weight_edits:
            return None
        topk_weights = topk_weights.clone()
        slot_removed_any = torch.zeros_like(topk_weights, dtype=torch.bool)
        for kind in WEIGHT_EDIT_KINDS:
            edits = [a for a in self.weight_edits if a.kind == kind]
            if not edits:
                continue
            removed = self._removal(edits, hidden.device)
            slot_removed = removed.gather(-1, topk_idx) & ~slot_removed_any
            slot_removed_any |= slot_removed
            if kind == "mean":
                means = torch.zeros(hidden.shape[0], hidden.shape[-1], dtype=torch.float32, device=hidden.device)
                for ablation in edits:
                    own = ablation.removal_mask(*self.batch_shape, self.layer.num_experts, hidden.device)
                    own_slots = own.gather(-1, topk_idx) & slot_removed
                    means += mean_replacement(topk_weights, own_slots, topk_idx, ablation.mean_output)
                self.mean_correction = means
            topk_weights = edited_combine_weight(kind, topk_weights, slot_removed)
        self.trace.slots_changed[self.layer.layer] += int(slot_removed_any.sum())
        if self.record is not None:
            self.record.combine_weight = topk_weights.detach()
        return (hidden, topk_idx, topk_weights, *args[3:])

    def experts_post(self, module, args, output):
        if self.record is not None and self.keep_outputs:
            self.record.routed_output = output.detach()
        if self.mean_correction is not None:
            output = output + self.mean_correction.to(output.dtype)
            self.mean_correction = None
            return output
        return None

    def block_post(self, module, args, output):
        hidden = block_hidden(output)
        if self.record is not None:
            self.record.moe_output = hidden.detach().reshape(-1, hidden.shape[-1])
            self.trace.records[self.layer.layer].append(self.record.shaped())
            self.record = None

    def shared_capture(self, module, args, output):
        # Registered after block_post, so the record is already appended. The block adds the (gated) shared
        # part to the routed output, so their difference is the shared part up to one rounding step.
        calls = self.trace.records[self.layer.layer]
        if calls and calls[-1].shared_output is None and calls[-1].routed_output is not None:
            last = calls[-1]
            last.shared_output = last.moe_output - last.routed_output

    def finish_call(self):
        """Store the record of a call when no block_post hook did (keep_outputs=False)."""
        if self.record is not None and self.record.act_norm is not None:
            self.trace.records[self.layer.layer].append(self.record.shaped())
            self.record = None

    def _shared_zero_hook(self, ablation: SharedAblation):
        def hook(module, args, output):
            batch, seq_len = self.batch_shape
            keep = ~ablation.position_mask(batch, seq_len, output.device)
            shape = (batch, seq_len, 1) if output.dim() == 3 else (batch * seq_len, 1)
            return output * keep.reshape(shape).to(output.dtype)

        return hook

    def _shared_slice_hook(self, ablation: SharedAblation):
        width = self.layer.shared_intermediate
        lo, hi = ablation.index * width, (ablation.index + 1) * width

        def hook(module, args):
            intermediate = args[0].clone()
            batch, seq_len = self.batch_shape
            where = ablation.position_mask(batch, seq_len, intermediate.device)
            where = where.reshape((batch, seq_len) if intermediate.dim() == 3 else (batch * seq_len,))
            intermediate[..., lo:hi][where] = 0
            return (intermediate, *args[1:])

        return hook


@contextmanager
def intervene(
    moe: "MoEModel",
    ablations: Sequence[Ablation | SharedAblation] = (),
    *,
    capture: Iterable[int] | Literal["all"] | None = None,
    keep_outputs: bool = False,
    blocks: Iterable[int] | Literal["all"] | None = None,
    residual: bool = False,
    warn_unchanged: bool = True,
) -> Iterator[Trace]:
    """Attach ablation and capture hooks for the duration of a ``with`` block; always restore the model.

    See :meth:`moeaudit.models.MoEModel.intervene`. With ``warn_unchanged`` (the default) a block whose
    forwards ran the routed-expert ablations without removing a single slot (the experts were not selected
    at the given positions) ends with an :class:`UnchangedWarning`; the pipeline's own callers, which
    remove experts that may be inactive on purpose, turn it off.
    """
    capture_layers = set(moe.moe_layer_indices if capture == "all" else (capture or ()))
    block_layers = set(moe.moe_layer_indices if blocks == "all" else (blocks or ()))
    for index in capture_layers | block_layers:
        moe.layer(index)  # validates
    routed: dict[int, list[Ablation]] = defaultdict(list)
    shared: dict[int, list[SharedAblation]] = defaultdict(list)
    for ablation in ablations:
        moe.layer(ablation.layer)
        (shared if isinstance(ablation, SharedAblation) else routed)[ablation.layer].append(ablation)
    trace = Trace()
    handles: list = []
    layer_hooks: list[_LayerHooks] = []
    try:
        for index in sorted(capture_layers | set(routed) | set(shared)):
            hooks = _LayerHooks(moe.layer(index), routed[index], shared[index], index in capture_layers,
                                keep_outputs, trace)
            layer_hooks.append(hooks)
            hooks.register(handles)
            if index in capture_layers and not keep_outputs:
                handles.append(hooks.layer.block.register_forward_hook(lambda m, a, o, h=hooks: h.finish_call()))
        for index in sorted(block_layers):
            block = moe.layer(index).block
            handles.append(block.register_forward_pre_hook(
                lambda m, args, i=index: trace.block_inputs[i].append(args[0].detach())))
            handles.append(block.register_forward_hook(
                lambda m, args, output, i=index: trace.block_outputs[i].append(block_hidden(output).detach())))
        if residual:
            for index, decoder_layer in enumerate(moe.adapter.decoder_layers(moe.model)):
                handles.append(decoder_layer.register_forward_hook(_residual_hook(trace, index), with_kwargs=True))
        yield trace
        routed_ablations = [a for a in ablations if not isinstance(a, SharedAblation)]
        ran = any(hooks.batch_shape is not None for hooks in layer_hooks)
        if warn_unchanged and routed_ablations and ran and not any(
                trace.slots_changed.get(a.layer, 0) for a in routed_ablations):
            described = "; ".join(f"layer {a.layer}: " + (f"experts {_as_list(a.experts)}" if a.experts is not None
                                                           else "a mask") for a in routed_ablations)
            warnings.warn(f"intervene: the ablations removed no slot ({described}): the router did not select "
                          "those experts at those positions, so the forward pass ran unchanged; remove an "
                          "expert from trace[layer].topk_idx", UnchangedWarning, stacklevel=3)
    finally:
        for handle in handles:
            handle.remove()


def _as_list(experts) -> list[int]:
    return [int(experts)] if isinstance(experts, int) else [int(e) for e in experts]


class UnchangedWarning(UserWarning):
    """An :meth:`~moeaudit.models.MoEModel.intervene` block whose routed-expert ablations removed nothing."""


def _residual_hook(trace: Trace, index: int):
    """Record the residual stream entering and leaving decoder layer ``index``."""

    def hook(module, args, kwargs, output):
        hidden = args[0] if args else kwargs["hidden_states"]
        trace.layer_inputs[index].append(hidden.detach())
        trace.layer_outputs[index].append(block_hidden(output).detach())

    return hook
