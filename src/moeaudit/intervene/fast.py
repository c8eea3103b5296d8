"""The fast engine: recompute only what an intervention can change, many interventions per call.

Token scope (position t, MoE layer ℓ)
    Positions < t are untouched at every layer, and position t is untouched up to layer ℓ's MoE block.
    So the intervened hidden state leaving decoder layer ℓ at t is the clean one plus Δy_t
    (:mod:`moeaudit.intervene.delta`; times Granite's residual multiplier,
    :func:`moeaudit.intervene.replay.residual_scale`), and only that single position is run through decoder layers
    ℓ+1 .. L-1, the final norm and the LM head, attending to the clean keys/values of positions < t
    (shared, never copied) and to its own key/value at t. Each intervention is one row of a
    [R, 1, H] batch through the model's own decoder layers
    (:func:`moeaudit.intervene.attention.rows_attention` supplies the attention).

Sequence scope (expert e removed wherever it is active at layer ℓ)
    Positions before e's first use p0 are untouched; one row of [T - p0] positions from layer ℓ+1 gives
    the effect at every later position at once. Several removed experts are batched as rows that share
    one start position.

Cost per token-scope intervention ≈ one single-token decode step through the remaining layers plus the
LM head, instead of a full forward over the window.

Where the MoE block's output does not enter the residual stream additively (a norm after the block:
FlexOlmo, Kolibri-1, A.X-K1), the rows restart at decoder layer ℓ itself, from its clean input, with the
block's output there replaced by the intervened one (:func:`restarts_at_block`; formed from its remaining
terms, :func:`moeaudit.intervene.delta.routed_output_after`): the layer then computes whatever it does after
its block, at the cost of one more layer per row. A probe of the first MoE layer chooses the mode; the fast
engine's self-check switches it where the chosen one disagrees with the reference engine
(:mod:`moeaudit.intervene.spotcheck`).
"""

from __future__ import annotations

import weakref
from contextlib import contextmanager
from typing import Callable, Iterator, Mapping

import torch

from moeaudit.intervene.attention import AttentionState, attention_mode
from moeaudit.intervene.clean import OUTCOME_ROWS, CleanWindow, upcast
from moeaudit.intervene.delta import gap_statistics
from moeaudit.intervene.recurrent import row_cache, saved_states_copied
from moeaudit.intervene.replay import (call_decoder_layer, final_hidden, layer_position_embeddings, residual_scale,
                                       rotary_module, scaled_logits)
from moeaudit.models.base import block_hidden
from moeaudit.models.moe_model import MoEModel

_RESTART: "weakref.WeakKeyDictionary[torch.nn.Module, bool]" = weakref.WeakKeyDictionary()
#: Tokens of the coupling probe (:func:`restarts_at_block`).
PROBE_TOKENS = 4


def restarts_at_block(moe: MoEModel) -> bool:
    """Whether the rows of ``moe`` restart at the intervened MoE layer with its block's output replaced, rather
    than at the next layer with Δy added to the residual stream.

    Decided once per model by a probe (:func:`couples_additively`), unless the fast engine's self-check has
    set it (:func:`set_restart_at_block`)."""
    restart = _RESTART.get(moe.model)
    if restart is None:
        restart = _RESTART[moe.model] = not couples_additively(moe)
    return restart


def set_restart_at_block(moe: MoEModel, restart: bool) -> None:
    """Choose how the rows of ``moe`` start (:func:`restarts_at_block`), for the model's lifetime; the fast
    engine's self-check sets it (:func:`moeaudit.intervene.spotcheck.fast_disagreement`)."""
    _RESTART[moe.model] = bool(restart)


class _Stop(Exception):
    """Ends the probe's forward after the layer it looks at."""


@torch.no_grad()
def couples_additively(moe: MoEModel, *, rtol: float = 1e-3) -> bool:
    """Whether a change δ of the first MoE layer's block output changes that decoder layer's output by
    exactly ``residual_scale * δ`` (:func:`moeaudit.intervene.replay.residual_scale`).

    The probe runs the model's own forward on :data:`PROBE_TOKENS` tokens twice up to that layer (the rest is
    skipped), the second time with a random δ added to the block's output at the last position, as large as
    the larger of that output and the layer's (so the residual stream's rounding stays small beside it), and
    compares the layer's output change with the scaled δ to ``rtol`` plus 8 units in the last place of the
    model's dtype, of its norm. A norm after the block (FlexOlmo, Kolibri-1, A.X-K1) or any other transform
    between the block and the residual stream misses by far; every additive family passes to rounding. A
    decoder layer whose output has another shape than its block's (several residual streams, each receiving
    the block's output with its own input-dependent weight: Hy4's, GLM-5.3-Next's and DeepSeek-V4's
    hyper-connections) is not additive, without a second run."""
    layer = moe.layers[0]
    decoder = moe.adapter.decoder_layers(moe.model)[layer.layer]
    vocab = int(moe.config.vocab_size)
    ids = (torch.arange(PROBE_TOKENS, device=moe.device) % max(vocab - 1, 1) + 1)[None]
    outputs, deltas, shapes = [], [], []

    def perturb(module, args, output):
        if not deltas:
            return None
        hidden = block_hidden(output)
        new = hidden.clone()
        new.reshape(-1, new.shape[-1])[-1] += deltas[0].to(new.dtype)
        return (new, *output[1:]) if isinstance(output, tuple) else new

    def stop(module, args, output):
        shapes.append(block_hidden(output).shape)
        outputs.append(block_hidden(output).reshape(-1, block_hidden(output).shape[-1])[-1].float())
        raise _Stop

    def run() -> None:
        handles = [layer.block.register_forward_hook(perturb), decoder.register_forward_hook(stop)]
        try:
            moe.model(input_ids=ids)
        except _Stop:
            pass
        finally:
            for handle in handles:
                handle.remove()

    with moe.intervene((), blocks=[layer.layer]) as trace:
        run()
    block_out = trace.block_outputs[layer.layer][-1]
    if block_out.shape != shapes[0]:  # several residual streams (hyper-connections) beside one block output
        return False
    block_out = block_out.reshape(-1, block_out.shape[-1])[-1].float()
    size = max(float(block_out.norm()), float(outputs[0].norm()), 1e-3)
    generator = torch.Generator(device="cpu").manual_seed(0)
    delta = torch.randn(block_out.shape, generator=generator).to(block_out.device)
    deltas.append(delta * (size / float(delta.norm())))
    run()
    change = outputs[1] - outputs[0]
    expected = residual_scale(moe) * deltas[0]
    bound = (rtol + 8 * torch.finfo(moe.dtype).eps) * float(expected.norm())
    return bool((change - expected).norm() <= bound)


@contextmanager
def _patched_blocks(moe: MoEModel, patch: Mapping[int, tuple] | None) -> Iterator[None]:
    """Patch the output of MoE layers' blocks while the rows run: ``patch[layer] = (values, where)``, values
    [R, S, H]; ``where`` [R, S] bool replaces the block's output there by ``values``, ``where`` None adds
    ``values`` everywhere."""
    handles = []

    def hook(values, where):
        def patched(module, args, output):
            hidden = block_hidden(output)
            new = values.reshape(hidden.shape).to(hidden.dtype)
            if where is None:
                new = hidden + new
            else:
                new = torch.where(where.reshape(*hidden.shape[:-1], 1), new, hidden)
            return (new, *output[1:]) if isinstance(output, tuple) else new

        return patched

    try:
        for layer, (values, where) in (patch or {}).items():
            handles.append(moe.layer(layer).block.register_forward_hook(hook(values, where)))
        yield
    finally:
        for handle in handles:
            handle.remove()


def forward_rows(moe: MoEModel, clean: CleanWindow, first_layer: int, hidden: torch.Tensor,
                 row_start: torch.Tensor, *, add_after: Mapping[int, torch.Tensor] | None = None,
                 patch: Mapping[int, tuple] | None = None) -> torch.Tensor:
    """Run rows of one window from decoder layer ``first_layer`` to the logits.

    Parameters
    ----------
    moe : MoEModel
    clean : CleanWindow
        Supplies the clean keys/values and masks of the window, and the clean states of its recurrent
        layers (:class:`moeaudit.intervene.recurrent.CleanStates`).
    first_layer : int
        First decoder layer to run (``len(layers)`` runs only the final norm and the LM head).
    hidden : Tensor [R, S, H] or [R, S, N, H]
        The residual stream entering ``first_layer`` at positions ``row_start[r] .. row_start[r] + S - 1``
        (N streams where the decoder layers carry several: hyper-connections).
    row_start : LongTensor [R]
    add_after : mapping int -> Tensor [R, S, H], optional
        Added to the output of the given decoder layers (used by the gradient estimate).
    patch : mapping int -> (values [R, S, H], where [R, S] bool or None), optional
        The given MoE layers' blocks' output replaced by ``values`` where ``where`` (added everywhere when
        None: the gradient estimate's differentiation point) (:func:`restarts_at_block`).

    Returns
    -------
    Tensor [R, S, V] float32 (float64 for a float64 model)
        Next-token logits at the rows' positions.
    """
    model = moe.model
    n_layers = moe.num_decoder_layers
    span = hidden.shape[1]
    position_ids = row_start[:, None] + torch.arange(span, device=hidden.device)[None, :]
    state = AttentionState(mode="rows", native=str(model.config._attn_implementation), caches=clean.caches)
    state.set_rows(row_start, span)
    cache = None
    later = [] if clean.states is None else [index for index in clean.states.layers if index >= first_layer]
    stepped = set()  # recurrent layers whose multi-token pass ignores a cached state: one position at a time
    if later:
        cache = row_cache(moe, clean.states.after(row_start - 1, later), clean.layout)
        if span > 1:
            stepped = {index for index in later if not clean.states.continues_from_state(index)}
    rotary = rotary_module(moe) is not None
    arguments = moe.adapter.row_layer_arguments(moe, clean, position_ids, first_layer)
    with attention_mode(model, state), saved_states_copied(cache), _patched_blocks(moe, patch):
        if first_layer < n_layers:
            position_embeddings = layer_position_embeddings(moe, hidden, position_ids, n_layers)
        for index in range(first_layer, n_layers):
            extra = None if arguments is None else arguments(index)
            if index in stepped:
                hidden = torch.cat([call_decoder_layer(
                    moe, index, hidden[:, i:i + 1], position_ids[:, i:i + 1], None, cache, rotary=rotary,
                    extra=_position(extra, i)) for i in range(span)], dim=1)  # (a recurrent layer reads no rotary)
            else:
                hidden = call_decoder_layer(moe, index, hidden, position_ids, position_embeddings[index], cache,
                                            rotary=rotary, extra=extra)
            if add_after is not None and index in add_after:
                hidden = hidden + add_after[index]
        hidden = final_hidden(moe, hidden)
        logits = scaled_logits(moe, model.get_output_embeddings()(hidden))
    return upcast(logits)


def _position(extra: dict | None, i: int) -> dict | None:
    """A layer's extra row arguments (:meth:`moeaudit.models.FamilyAdapter.row_layer_arguments`) at the rows'
    position ``i`` alone: per-position tensors [R, S, ...] sliced, anything else as it is."""
    if extra is None:
        return None
    return {name: value[:, i:i + 1] if isinstance(value, torch.Tensor) else value for name, value in extra.items()}


def token_outcomes(logits: torch.Tensor, clean: CleanWindow, positions: torch.Tensor):
    """ΔNLL, KL(clean ‖ intervened) and top-1 flip at each row's target position.

    Parameters
    ----------
    logits : Tensor [R, V] float32
    positions : LongTensor [R]
        Target positions (each with a valid next token).

    Returns
    -------
    (delta_nll, kl, top1_flip) : float32 [R], float32 [R], bool [R]

    Notes
    -----
    The log-softmax and the KL's products are formed :data:`OUTCOME_ROWS` rows at a time, so the only
    rows x vocabulary tensor is the caller's ``logits`` (a whole call's log-probabilities would be a
    second one). Each row's log-softmax is the same whatever the rows around it, so a null intervention
    still gives exactly 0.
    """
    n = len(positions)
    targets = clean.input_ids[positions + 1]
    nll = torch.empty(n, dtype=logits.dtype, device=logits.device)
    cross = torch.empty(n, dtype=torch.float64, device=logits.device)
    flip = torch.empty(n, dtype=torch.bool, device=logits.device)
    for lo in range(0, n, OUTCOME_ROWS):
        rows = slice(lo, lo + OUTCOME_ROWS)
        logprobs = torch.log_softmax(logits[rows], dim=-1)
        nll[rows] = -logprobs.gather(-1, targets[rows, None])[:, 0]
        # KL = Σ p log p - Σ p log q, both sums of float32 products accumulated in float64 (the first is
        # cached per position), so a null intervention gives exactly 0 and small KLs keep their digits.
        cross[rows] = torch.sum(clean.probs_at(positions[rows]) * logprobs, dim=-1, dtype=torch.float64)
        flip[rows] = logprobs.argmax(dim=-1) != clean.top1[positions[rows]]
    kl = (clean.neg_entropy[positions] - cross).to(logits.dtype)
    return nll - clean.nll[positions], kl, flip


def token_rows_per_call(clean: CleanWindow, first_layer: int, rows_per_call: int,
                        max_logit_elements: int | None, max_state_bytes: int | None = None) -> int:
    """Rows of one token-scope call from decoder layer ``first_layer``: ``rows_per_call``, fewer when rows x
    vocabulary logits would pass ``max_logit_elements`` (a 256k vocabulary: 1 GiB of float32 logits at 1,024
    rows), or when the rows' own recurrent states would pass ``max_state_bytes``
    (:func:`state_rows_cap`)."""
    per_call = rows_per_call
    if max_logit_elements is not None:
        per_call = max(1, min(per_call, max_logit_elements // max(1, int(clean.logits.shape[-1]))))
    return min(per_call, state_rows_cap(clean, first_layer, max_state_bytes) or per_call)


def state_rows_cap(clean: CleanWindow, first_layer: int, max_state_bytes: int | None) -> int | None:
    """Rows of one call from decoder layer ``first_layer`` whose recurrent states fit ``max_state_bytes``
    (None: the default budget of :meth:`moeaudit.intervene.recurrent.CleanStates.rows_per_call`); None when
    no recurrent layer is at or after ``first_layer``: each row carries its own states through every later
    recurrent layer."""
    if clean.states is None:
        return None
    return clean.states.rows_per_call(first_layer, budget=max_state_bytes)


def run_token_rows(moe: MoEModel, clean: CleanWindow, layer: int, positions: torch.Tensor,
                   make_delta: Callable[[torch.Tensor], torch.Tensor], *, rows_per_call: int,
                   max_logit_elements: int | None = None, max_state_bytes: int | None = None,
                   make_output: Callable[[torch.Tensor], torch.Tensor] | None = None):
    """Token-scope effects of N interventions at MoE layer ``layer`` of one window.

    Parameters
    ----------
    positions : LongTensor [N]
        Target positions (each with a valid next token).
    make_delta : callable
        ``make_delta(rows)`` returns Δy [len(rows), H] of the interventions with indices ``rows``.
    rows_per_call : int
        Interventions per batched call (rows are sorted by position, so a call reads a short clean prefix).
    max_logit_elements : int, optional
        Cap on rows x vocabulary of one call's logits (:func:`token_rows_per_call`).
    max_state_bytes : int, optional
        Cap on the recurrent states of one call's rows (:func:`state_rows_cap`; default: half the clean
        record).
    make_output : callable, optional
        ``make_output(rows)``: the intervened MoE output [len(rows), H], used where the rows restart at the
        block (:func:`restarts_at_block`); default the clean output plus Δy.

    Returns
    -------
    dict of float32/bool tensors [N]
        ``delta_nll``, ``kl``, ``top1_flip``, ``gap_norm``, ``compensation_cos``.
    """
    n = positions.shape[0]
    out = outcome_buffers(n)
    record = clean.records[layer]
    order = torch.argsort(positions, stable=True)
    restart = restarts_at_block(moe)
    first = layer if restart else layer + 1
    base = clean.layer_input[layer] if restart else clean.layer_output[layer]
    scale = residual_scale(moe)
    per_call = token_rows_per_call(clean, first, rows_per_call, max_logit_elements, max_state_bytes)
    for lo in range(0, n, per_call):
        rows = order[lo:lo + per_call]
        pos = positions[rows]
        delta = make_delta(rows)
        if restart:  # layer ℓ again, from its clean input, its block's output replaced by the intervened one
            output = make_output(rows) if make_output is not None else record.moe_output[pos] + delta
            hidden = base[pos].unsqueeze(1)
            patch = {layer: (output.unsqueeze(1), torch.ones(hidden.shape[:2], dtype=torch.bool, device=hidden.device))}
        else:
            hidden, patch = (base[pos] + scale * delta).unsqueeze(1), None
        # the logits are referenced by token_outcomes alone: freed before the next call's are formed
        dn, kl, flip = token_outcomes(forward_rows(moe, clean, first, hidden, pos, patch=patch)[:, 0], clean, pos)
        gap_norm, cosine = gap_statistics(record, pos, delta)
        for name, value in zip(out, (dn, kl, flip, gap_norm, cosine)):
            out[name][rows] = value.to("cpu", out[name].dtype)
    return out


def run_sequence_rows(moe: MoEModel, clean: CleanWindow, layer: int,
                      changes: list[tuple[torch.Tensor, torch.Tensor]], *, max_logit_elements: int,
                      max_rows: int = 16, max_state_bytes: int | None = None,
                      outputs: list[torch.Tensor] | None = None):
    """Sequence-scope passes: ΔNLL at every position for several interventions at MoE layer ``layer``.

    Parameters
    ----------
    changes : list of (positions LongTensor [n_i], delta Tensor [n_i, H])
        For each intervention, where the MoE output changes and by how much.
    max_logit_elements : int
        Cap on rows x positions x vocabulary of one call (the logits' memory).
    max_rows : int
        Interventions per call at most; rows of one call share the earliest start among them.
    max_state_bytes : int, optional
        Cap on the recurrent states of one call's rows (:func:`state_rows_cap`).
    outputs : list of Tensor [n_i, H], optional
        For each intervention, the intervened MoE output at its positions, used where the rows restart at
        the block (:func:`restarts_at_block`); default the clean output plus Δy.

    Returns
    -------
    list of (delta_nll [T], kl [T], top1_flip [T]) per intervention
        Positions before the intervention's first change (and positions without a next token) hold 0 /
        False; they are not recomputed because they cannot change.
    """
    seq_len = clean.seq_len
    vocab = clean.logits.shape[-1]
    restart = restarts_at_block(moe)  # (see run_token_rows)
    first = layer if restart else layer + 1
    base = clean.layer_input[layer] if restart else clean.layer_output[layer]
    scale = residual_scale(moe)
    max_rows = min(max_rows, state_rows_cap(clean, first, max_state_bytes) or max_rows)
    starts = [int(pos.min()) if pos.numel() else seq_len for pos, _ in changes]
    order = sorted(range(len(changes)), key=lambda i: starts[i])
    results: list = [None] * len(changes)
    i = 0
    while i < len(order):
        start = starts[order[i]]
        if start >= seq_len:
            results[order[i]] = _no_change(seq_len)
            i += 1
            continue
        span = seq_len - start
        per_call = max(1, min(max_rows, max_logit_elements // max(1, span * vocab)))
        batch = order[i:i + per_call]
        i += len(batch)
        hidden = base[start:].unsqueeze(0).repeat(len(batch), *[1] * base.dim())  # [R, S, H] or [R, S, N, H]
        patch = None
        if restart:  # layer ℓ again, its block's output replaced at the changed positions
            values = hidden.new_zeros(*hidden.shape[:2], hidden.shape[-1])
            where = torch.zeros(hidden.shape[:2], dtype=torch.bool, device=hidden.device)
            for row, index in enumerate(batch):
                pos, delta = changes[index]
                values[row, pos - start] = (outputs[index] if outputs is not None
                                            else clean.records[layer].moe_output[pos] + delta).to(values.dtype)
                where[row, pos - start] = True
            patch = {layer: (values, where)}
        else:
            for row, index in enumerate(batch):
                pos, delta = changes[index]
                hidden[row, pos - start] += scale * delta
        row_start = torch.full((len(batch),), start, dtype=torch.long, device=hidden.device)
        logits = forward_rows(moe, clean, first, hidden, row_start, patch=patch)  # [R, S, V]
        positions = torch.arange(start, seq_len, device=hidden.device)
        valid = clean.valid_next[start:]
        safe = positions.clamp(max=seq_len - 2)
        for row, index in enumerate(batch):
            # rows batched behind an earlier start recompute a few positions they cannot change: keep those 0
            keep = valid & (positions >= starts[index])
            dn, kl, flip = token_outcomes(logits[row], clean, safe)
            full = _no_change(seq_len)
            full[0][start:] = torch.where(keep, dn, torch.zeros_like(dn)).cpu()
            full[1][start:] = torch.where(keep, kl, torch.zeros_like(kl)).cpu()
            full[2][start:] = (flip & keep).cpu()
            results[index] = full
        del logits, hidden, patch  # before the next call forms its own
    return results


def outcome_buffers(n: int, names=("delta_nll", "kl", "top1_flip", "gap_norm", "compensation_cos")):
    """Empty per-intervention result tensors (float64; ``top1_flip`` bool)."""
    return {name: torch.empty(n, dtype=torch.bool if name == "top1_flip" else torch.float64) for name in names}


def _no_change(seq_len: int):
    return (torch.zeros(seq_len, dtype=torch.float64), torch.zeros(seq_len, dtype=torch.float64),
            torch.zeros(seq_len, dtype=torch.bool))
