"""Compressed attention (DeepSeek-V4) in the fast engine's rows: each row's compressed key/value entries.

DeepSeek-V4's attention layers (``DeepseekV4Attention``, ``models/deepseek_v4/modeling_deepseek_v4.py``) attend to
a sliding window of raw keys and, in its compressed layers, to *entries* that each pool a block of ``m``
positions (``DeepseekV4HCACompressor`` / ``DeepseekV4CSACompressor`` in transformers 5.23):

* Heavily Compressed Attention (``DeepseekV4HCACompressor``): entry w pools positions ``w·m .. w·m + m - 1``,
  ``kv_norm(Σ_j softmax_j(gate_j + b_j) ⊙ kv_j)`` with ``kv = kv_proj(x)``, ``gate = gate_proj(x)`` and a
  learned position bias ``b``, rotated at position ``w·m``;
* Compressed Sparse Attention (``DeepseekV4CSACompressor``): the same over ``2m`` slots, the second half of
  each position's projection (``Cb``) over window w and the first half (``Ca``) over window w - 1 (zero /
  ``-inf`` before the first window); its Lightning Indexer keeps each query's ``index_topk`` best entries.

Query position p sees entry w once its block is closed: ``w < (p + 1) // m``. So an intervention at position
t changes the entries whose blocks hold a position at or after t, and only those a later query sees.

What the rows do here. The clean pass records each compressed layer's per-position ``kv_proj`` / ``gate_proj``
outputs and the library's clean entries (:func:`recording`); it checks that moeaudit's replay of the
entries (:func:`pooled_entries`, the library's arithmetic on the library's own submodules: ``kv_norm``,
``rotary_emb``, ``position_bias`` and the modeling file's ``apply_rotary_pos_emb``) gives the library's clean
entries, and refuses the window otherwise. While rows run (:func:`replaying`), each compressor returns, per
row starting at position s, the clean entries before block ``s // m`` and the entries from there on recomputed
from the clean projections before s and the row's own from s; the attention appends them to the row's keys,
and the rows' attention kernel (:func:`moeaudit.intervene.attention.rows_attention`) lets query p see entry w
when ``w < (p + 1) // m``. The Lightning Indexer is not run: the fast engine takes only windows on which it
keeps every entry (:func:`moeaudit.intervene.engine.indexer_key_budget`), and the clean pass checks that it did.
"""

from __future__ import annotations

import sys
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch


@dataclass
class CompressedCache:
    """One compressed layer's clean state in one window.

    Attributes
    ----------
    kv, gate : Tensor [T, C]
        ``kv_proj`` / ``gate_proj`` of the layer's attention input at every position (C = D for HCA, 2D for CSA).
    entries : Tensor [N, D]
        The library's clean entries (N = T // m).
    """

    kv: torch.Tensor
    gate: torch.Tensor
    entries: torch.Tensor


def compressors(model) -> dict[int, torch.nn.Module]:
    """The compressed attention layers' compressors by decoder layer index (DeepSeek-V4's CSA / HCA layers:
    an attention module with a ``compressor`` holding ``compress_rate`` and ``position_bias``); empty for
    every other family. Found once per model."""
    found = model.__dict__.get("_moeaudit_compressors")
    if found is None:
        found = {}
        for module in model.modules():
            compressor = getattr(module, "compressor", None)
            if isinstance(compressor, torch.nn.Module) and hasattr(compressor, "position_bias") \
                    and hasattr(compressor, "compress_rate") and hasattr(module, "layer_idx"):
                found[int(module.layer_idx)] = compressor
        model.__dict__["_moeaudit_compressors"] = found
    return found


def _is_sparse(compressor) -> bool:
    """CSA (two overlapping series and an indexer) rather than HCA."""
    return getattr(compressor, "indexer", None) is not None


def pooled_entries(compressor, kv: torch.Tensor, gate: torch.Tensor, first: torch.Tensor) -> torch.Tensor:
    """Entries ``first_r .. first_r + E - 1`` of each row from the projections of their blocks.

    Parameters
    ----------
    compressor : DeepseekV4HCACompressor or DeepseekV4CSACompressor
    kv, gate : Tensor [R, (E + 1) · m, C]
        ``kv_proj`` / ``gate_proj`` of positions ``(first_r - 1) · m .. (first_r + E) · m - 1`` (the block before
        the first entry's, which CSA's ``Ca`` series reads; any values where that block is before position 0).
    first : LongTensor [R]

    Returns
    -------
    Tensor [R, E, D]
        As the compressor's forward computes them (``DeepseekV4CSACompressor.forward``'s layout of the two
        series, the softmax over the slots in float32, ``kv_norm``, the rotation at position ``w · m``).
    """
    m = int(compressor.compress_rate)
    rows, length, width = kv.shape
    count = length // m - 1
    kv = kv.view(rows, count + 1, m, width)
    gate = gate.view(rows, count + 1, m, width) + compressor.position_bias
    if _is_sparse(compressor):
        dim = width // 2
        before = (first[:, None] + torch.arange(count, device=kv.device)[None]) > 0  # block w - 1 exists
        ca_kv = torch.where(before[..., None, None], kv[:, :-1, :, :dim], torch.zeros_like(kv[:, :-1, :, :dim]))
        ca_gate = torch.where(before[..., None, None], gate[:, :-1, :, :dim],
                              torch.full_like(gate[:, :-1, :, :dim], float("-inf")))
        slots_kv = torch.cat([ca_kv, kv[:, 1:, :, dim:]], dim=2)  # [R, E, 2m, D]
        slots_gate = torch.cat([ca_gate, gate[:, 1:, :, dim:]], dim=2)
    else:
        slots_kv, slots_gate = kv[:, 1:], gate[:, 1:]
    pooled = compressor.kv_norm((slots_kv * slots_gate.softmax(dim=2, dtype=torch.float32).to(slots_kv.dtype))
                                .sum(dim=2))
    positions = (first[:, None] + torch.arange(count, device=kv.device)[None]) * m
    cos, sin = compressor.rotary_emb(pooled, position_ids=positions, layer_type=compressor.rope_layer_type)
    rotate = sys.modules[type(compressor).__module__].apply_rotary_pos_emb
    return rotate(pooled.unsqueeze(1), cos, sin).squeeze(1)


def visible(position_ids: torch.Tensor, count: int, m: int) -> torch.Tensor:
    """[R, S, count] bool: query position p sees entry w when its block is closed, ``w < (p + 1) // m``."""
    return torch.arange(count, device=position_ids.device)[None, None, :] < ((position_ids + 1) // m)[..., None]


def row_entries(compressor, cache: CompressedCache, hidden: torch.Tensor, position_ids: torch.Tensor):
    """The entries the rows' queries may see, and which: ([R, N, D], allowed [R, S, N]).

    Rows start at ``s_r = position_ids[r, 0]`` and hold S positions; entries before block ``s_r // m`` are the
    clean ones, later ones are pooled (:func:`pooled_entries`) from the clean projections before ``s_r`` and
    the rows' own (``kv_proj`` / ``gate_proj`` of ``hidden``) from there."""
    m = int(compressor.compress_rate)
    rows, span = position_ids.shape
    start = position_ids[:, 0]
    seen = (start + span) // m  # entries the row's last query sees
    count = int(seen.max())
    entries = cache.entries[:count].unsqueeze(0).expand(rows, -1, -1).clone()
    first = start // m
    redo = int((seen - first).max()) if count else 0
    if redo > 0:
        own_kv, own_gate = compressor.kv_proj(hidden), compressor.gate_proj(hidden)  # [R, S, C]
        positions = (first - 1)[:, None] * m + torch.arange((redo + 1) * m, device=hidden.device)[None]
        offset = positions - start[:, None]
        own = (offset >= 0) & (offset < span)
        index = offset.clamp(0, span - 1)[..., None].expand(-1, -1, own_kv.shape[-1])
        clean = positions.clamp(0, cache.kv.shape[0] - 1)
        kv = torch.where(own[..., None], own_kv.gather(1, index), cache.kv[clean].to(own_kv.dtype))
        gate = torch.where(own[..., None], own_gate.gather(1, index), cache.gate[clean].to(own_gate.dtype))
        pooled = pooled_entries(compressor, kv, gate, first)  # [R, redo, D]
        slot = first[:, None] + torch.arange(redo, device=hidden.device)[None]  # entry index of each pooled one
        slot = torch.where(slot < seen[:, None], slot, torch.full_like(slot, count))  # not seen: a spare column
        spare = torch.cat([entries, entries[:, :1]], dim=1)
        index = slot[..., None].expand(-1, -1, entries.shape[-1])
        entries = spare.scatter(1, index, pooled.to(entries.dtype))[:, :count]
    return entries, visible(position_ids, count, m)


@contextmanager
def recording(model, pending: dict[int, dict]) -> Iterator[None]:
    """While the clean pass runs: each compressor's ``kv_proj`` / ``gate_proj`` outputs into ``pending[layer]``
    (read by the attention's record step, :func:`recorded`)."""
    handles = []
    for layer, compressor in compressors(model).items():
        for name in ("kv", "gate"):
            def hook(module, args, output, layer=layer, name=name):
                pending.setdefault(layer, {})[name] = output.detach()

            handles.append(getattr(compressor, f"{name}_proj").register_forward_hook(hook))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def recorded(pending: dict, entries: torch.Tensor) -> CompressedCache:
    """The clean state of one compressed layer: its projections from ``pending`` (:func:`recording`) and the
    library's ``entries`` [N, D] that its attention received after the raw keys."""
    return CompressedCache(kv=pending["kv"][0], gate=pending["gate"][0], entries=entries)


def replay_problem(compressor, cache: CompressedCache, allowed: torch.Tensor) -> str | None:
    """Why the rows cannot replay this compressed layer on this window, or None: some query did not see a
    closed entry (the indexer dropped it; ``allowed`` [T, N] is the mask the attention applied to the entries),
    or :func:`pooled_entries` does not reproduce the library's entries (to 8 units in the last place of the
    model's dtype)."""
    m = int(compressor.compress_rate)
    kv, gate, entries = cache.kv, cache.gate, cache.entries
    positions = torch.arange(kv.shape[0], device=kv.device)
    if not bool((allowed == visible(positions[None], entries.shape[0], m)[0]).all()):
        return "keeps a selection of its entries on this window, which the rows would have to redo"
    if entries.shape[0]:
        count = entries.shape[0]
        span = torch.cat([torch.zeros_like(kv[:m]), kv[:count * m]])[None]
        span_gate = torch.cat([torch.zeros_like(gate[:m]), gate[:count * m]])[None]
        again = pooled_entries(compressor, span, span_gate, torch.zeros(1, dtype=torch.long, device=kv.device))[0]
        tolerance = 8 * torch.finfo(entries.dtype).eps * float(entries.abs().max()) + 1e-30
        if float((again.float() - entries.float()).abs().max()) > tolerance:
            return ("has entries that moeaudit's replay of the compressed attention does not reproduce "
                    "(transformers changed DeepseekV4's compressors)")
    return None


@contextmanager
def replaying(model, state) -> Iterator[None]:
    """While rows run: each compressor returns the rows' entries (:func:`row_entries`) and no mask of its own,
    and leaves which query sees which entry in ``state.appended[layer]`` for the rows' attention."""
    found = compressors(model)

    def make(layer, compressor):
        def forward(hidden_states, q_residual, position_ids, past_key_values, layer_idx):
            entries, allowed = row_entries(compressor, state.caches[layer].compressed, hidden_states, position_ids)
            state.appended[layer] = allowed
            return entries.unsqueeze(1), None

        return forward

    for layer, compressor in found.items():
        compressor.forward = make(layer, compressor)
    try:
        yield
    finally:
        for compressor in found.values():
            compressor.__dict__.pop("forward", None)
