"""The clean pass over one window: everything the engines reuse, captured in a single native forward.

One forward of the unmodified model (transformers' own attention and experts kernels, so the clean
logits are bit-identical to a plain forward) with three sets of observers attached:

* the adapter's capture hooks (``keep_outputs=True``): per MoE layer the router logits, the active set
  ``topk_idx``, ``raw_gate``, ``combine_weight``, the ungated expert outputs f_e(x) [T, k, H], the block
  input, the routed output and the block output;
* forward hooks on every decoder layer: its input and output hidden states (the residual stream);
* the record mode of :mod:`moeaudit.intervene.attention`: each attention layer's keys, values and mask;
  a recurrent layer's states are swept from its recorded inputs when rows need them
  (:mod:`moeaudit.intervene.recurrent`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from moeaudit.intervene.attention import AttentionState, LayerCache, attention_mode
from moeaudit.intervene.recurrent import CleanStates, MixerLayout, mixer_layout
from moeaudit.models.hooks import LayerRecord
from moeaudit.models.moe_model import MoEModel


#: Rows whose log-softmax and full-vocabulary products (the KL's p · log q) are formed at once: bounds those
#: temporaries to a few rows instead of a whole call's R x V (:func:`moeaudit.intervene.fast.token_outcomes`).
OUTCOME_ROWS = 16


@dataclass
class CleanWindow:
    """The clean state of one window (batch of one), as the engines need it.

    Attributes
    ----------
    input_ids : LongTensor [T]
    valid_next : bool Tensor [T]
        True where position t has a real next token (not the last position, not padding).
    logits : Tensor [T, V] float32 (float64 for a float64 model)
    logprobs : Tensor [T, V]
    nll : Tensor [T] (NaN where ``valid_next`` is False)
    top1 : LongTensor [T]
    records : dict[int, LayerRecord]
        Per MoE layer, the adapter's capture with ``keep_outputs=True``, as rows (:attr:`LayerRecord.rows`, N = T).
    layer_input, layer_output : list of Tensor [T, H]
        The residual stream entering and leaving every decoder layer.
    caches : dict[int, LayerCache] or None
        Clean keys/values and masks per attention layer (None when not recorded).
    layout : MixerLayout or None
        Which decoder layers attend and which carry recurrent states (None when not recorded).
    states : CleanStates or None
        The clean conv/recurrent states of the recurrent layers after any position (None without such
        layers or when not recorded).
    layer_extras : dict[int, Tensor [T, ...]]
        Per decoder layer, the per-position input its family's backbone hands it beside the residual stream
        (Gemma 4's per-layer input; :meth:`moeaudit.models.FamilyAdapter.recording_layer_extras`), which the
        fast engine's rows pass on; empty for every other family.
    """

    input_ids: torch.Tensor
    valid_next: torch.Tensor
    logits: torch.Tensor
    logprobs: torch.Tensor
    nll: torch.Tensor
    top1: torch.Tensor
    records: dict[int, LayerRecord]
    layer_input: list[torch.Tensor]
    layer_output: list[torch.Tensor]
    caches: dict[int, LayerCache] | None
    layout: MixerLayout | None = None
    states: CleanStates | None = None
    layer_extras: dict[int, torch.Tensor] = field(default_factory=dict)
    _neg_entropy: torch.Tensor | None = None

    def probs_at(self, positions: torch.Tensor | slice) -> torch.Tensor:
        """Clean next-token probabilities [len(positions), V] at ``positions`` (``logprobs.exp()``, formed per
        call: a [T, V] copy kept for the whole window would be a third full-vocabulary tensor)."""
        return self.logprobs[positions].exp()

    @property
    def neg_entropy(self) -> torch.Tensor:
        """Σ_v p log p of the clean next-token distribution per position, [T] float64 (computed once, a few
        rows at a time: :data:`OUTCOME_ROWS`)."""
        if self._neg_entropy is None:
            out = torch.empty(self.seq_len, dtype=torch.float64, device=self.logprobs.device)
            for lo in range(0, self.seq_len, OUTCOME_ROWS):
                rows = slice(lo, lo + OUTCOME_ROWS)
                out[rows] = torch.sum(self.probs_at(rows) * self.logprobs[rows], dim=-1, dtype=torch.float64)
            self._neg_entropy = out
        return self._neg_entropy

    @property
    def seq_len(self) -> int:
        return int(self.input_ids.shape[0])


def upcast(tensor: torch.Tensor) -> torch.Tensor:
    """float32 for half/bfloat16/float32 tensors; float64 stays float64."""
    return tensor if tensor.dtype == torch.float64 else tensor.float()


def valid_next_mask(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """[B, T] bool: position t has a next token that is not padding (and is not padding itself)."""
    valid = torch.zeros(input_ids.shape, dtype=torch.bool, device=input_ids.device)
    valid[:, :-1] = True
    if attention_mask is not None:
        real = attention_mask.bool()
        valid[:, :-1] &= real[:, :-1] & real[:, 1:]
    return valid


@torch.no_grad()
def capture_clean(moe: MoEModel, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                  record_attention: bool = True) -> CleanWindow:
    """Run the clean forward of one window and capture what the engines reuse.

    Parameters
    ----------
    moe : MoEModel
    input_ids : LongTensor [1, T]
    attention_mask : Tensor [1, T], optional
    record_attention : bool
        Also record keys/values/masks (needed by the fast engine only).

    Raises
    ------
    moeaudit.intervene.attention.UnsupportedAttention
        When the attention cannot be replayed exactly (the caller falls back to the reference engine).
    """
    model = moe.model
    num_layers = moe.num_decoder_layers
    state = AttentionState(mode="record", native=str(model.config._attn_implementation))
    with moe.intervene((), capture="all", keep_outputs=True, residual=True) as trace, \
            moe.adapter.recording_layer_extras(moe) as layer_extras:
        if record_attention:
            with attention_mode(model, state):
                logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
        else:
            logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    # One call per decoder layer; the last one is the window's (a layer never runs twice in one forward).
    layer_input = [trace.layer_inputs[index][-1][0] for index in range(num_layers)]
    layer_output = [trace.layer_outputs[index][-1][0] for index in range(num_layers)]
    logits = upcast(logits[0])
    logprobs = torch.log_softmax(logits, dim=-1)
    valid = valid_next_mask(input_ids, attention_mask)[0]
    targets = torch.roll(input_ids[0], -1)
    nll = -logprobs.gather(-1, targets[:, None])[:, 0]
    nll = nll.masked_fill(~valid, float("nan"))
    layout = None
    if record_attention:
        layout = mixer_layout(moe)
        missing = [i for i in layout.attention if i not in state.caches]
        if missing:
            from moeaudit.intervene.attention import UnsupportedAttention

            raise UnsupportedAttention(f"no attention call was recorded for decoder layers {missing}")
    states = None
    if layout is not None and layout.recurrent:
        recorded = [logits, logprobs, *layer_input, *layer_output, *(t for c in state.caches.values()
                                                                  for t in (c.key, c.value, c.allowed))]
        recorded += [t for record in trace.records.values() for call in record for t in vars(call).values()
                     if isinstance(t, torch.Tensor)]
        states = CleanStates(moe, layer_input, layout.recurrent,
                             record_bytes=sum(t.numel() * t.element_size() for t in recorded))
        states.check()
    return CleanWindow(
        input_ids=input_ids[0],
        valid_next=valid,
        logits=logits,
        logprobs=logprobs,
        nll=nll,
        top1=logits.argmax(dim=-1),
        records={index: trace[index].rows for index in moe.moe_layer_indices},
        layer_input=layer_input,
        layer_output=layer_output,
        caches=state.caches if record_attention else None,
        layout=layout,
        states=states,
        layer_extras={index: extra[0] for index, extra in layer_extras.items()},
    )
