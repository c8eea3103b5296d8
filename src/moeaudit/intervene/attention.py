"""Attention against a shared clean key/value cache, registered with transformers' ``AttentionInterface``.

The fast engine recomputes a few positions ("rows") of one window from some decoder layer upward while
every other position keeps its clean state. Causality makes that exact: a position only attends to
positions at or before it, so for a row that restarts at position ``p`` the keys and values of positions
``< p`` are the clean ones at every layer, and only the row's own positions ``p .. p + S - 1`` carry new
keys and values. This module supplies the attention function that scores each row against

* the **shared** clean keys/values of the window (one tensor per layer, never copied per row), and
* the row's own keys/values (computed by the model's own attention module from the row's hidden state),

with the mask the model itself built for the clean pass (causal, sliding window, padding), and with
GPT-OSS's attention sinks. The model's own decoder layers do everything else (projections, rotary
embeddings, DeepSeek's MLA expansion, norms, MoE blocks), so no architecture is re-implemented here.

Two modes, both selected by :func:`attention_mode`:

``record``
    Used during the clean forward: every attention call is delegated unchanged to the model's native
    implementation (``sdpa`` or ``eager``, with the mask the native mask builder made), so the clean
    logits are bit-identical to a plain forward; the keys, values and the boolean mask are kept per layer.
    DeepSeek Sparse Attention hands a non-native implementation its indexer's top-k ``indices`` instead of a
    sparsified mask (``modeling_deepseek_v32.py``, ``DeepseekV32Attention.forward``), MiniMax-M3 its selected
    key blocks (``block_indices``, ``MiniMaxM3VLAttention.forward``); a window no longer than the indexer's
    budget keeps every key, where the native branch's mask is the unsparsified one, so the selection is
    dropped. A window whose indexer drops keys raises :class:`UnsupportedAttention`, whether the selection comes
    as indices or folded into the mask (every layer with an indexer, or reusing an earlier layer's selection:
    ``skip_topk``, must record the dense causal pattern).
``rows``
    Used for the interventions: the row kernel below (eager arithmetic: ``softmax(q k^T * scaling)`` in
    float32, sinks appended as an extra logit and dropped after the softmax).
"""

from __future__ import annotations

import sys
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Iterator

import torch

from moeaudit.intervene import compressed as compressed_attention
from moeaudit.intervene.compressed import CompressedCache

IMPLEMENTATION = "moeaudit_rows"
#: Native attention implementations whose masks and outputs the record mode can reproduce.
SUPPORTED_NATIVE = ("sdpa", "eager")


class UnsupportedAttention(RuntimeError):
    """Raised inside the record pass when the model's attention cannot be replayed exactly."""


@dataclass
class LayerCache:
    """Clean keys/values and the model's own mask for one decoder layer of one window.

    Attributes
    ----------
    key : Tensor [Hkv, T, Dk]
    value : Tensor [Hkv, T, Dv]
        As the model's attention function received them (after rotary embeddings and, for DeepSeek's
        MLA, after the latent expansion).
    allowed : bool Tensor [T, T]
        ``allowed[q, j]``: query position q may attend to key position j (the model's own mask).
    compressed : CompressedCache, optional
        A compressed attention layer's clean projections and entries (DeepSeek-V4:
        :mod:`moeaudit.intervene.compressed`), whose keys follow the positions' in the attention's input.
    """

    key: torch.Tensor
    value: torch.Tensor
    allowed: torch.Tensor
    compressed: "CompressedCache | None" = None


@dataclass
class AttentionState:
    """What the registered attention function does in the current ``with attention_mode(...)`` block."""

    mode: str  # "record" | "rows"
    native: str
    caches: dict[int, LayerCache] = field(default_factory=dict)
    # record mode: compressed layers' per-position projections, until their attention records them
    pending: dict = field(default_factory=dict)
    # rows mode: which row query sees which entry a compressed layer appended to its keys in this call
    appended: dict = field(default_factory=dict)
    # rows mode: start position of each row [R] and the number of positions per row
    row_start: torch.Tensor | None = None
    row_len: int = 1
    _mask_cache: dict = field(default_factory=dict)

    def set_rows(self, row_start: torch.Tensor, row_len: int) -> None:
        self.row_start = row_start
        self.row_len = int(row_len)
        self._mask_cache = {}

    # ------------------------------------------------------------------ record
    def record(self, module, query, key, value, attention_mask, **kwargs):
        layer_idx = getattr(module, "layer_idx", None)
        if layer_idx is None:
            raise UnsupportedAttention(f"{type(module).__name__} has no `layer_idx`")
        if key.shape[0] != 1:
            raise UnsupportedAttention("the record pass runs one window at a time")
        if kwargs.get("softcap") is not None:
            raise UnsupportedAttention("attention logit soft-capping is not replayed by the row kernel")
        if layer_idx in self.caches:
            raise UnsupportedAttention(f"attention of layer {layer_idx} ran twice in one forward")
        seq_len = query.shape[2]
        compressed = None
        if key.shape[2] != seq_len or layer_idx in self.pending:  # a compressed layer (DeepSeek-V4): entries
            # appended after the positions' keys, none on a window shorter than one block
            compressed = self._record_entries(module, layer_idx, key, attention_mask, seq_len)
        indices = kwargs.pop("indices", None)  # DeepSeek Sparse Attention's key selection [B, S, topk]
        if indices is not None and indices.shape[-1] < seq_len:
            raise UnsupportedAttention(f"the indexer of layer {layer_idx} keeps {indices.shape[-1]} of {seq_len} keys "
                                       "per query, a selection the rows would have to redo")
        blocks = kwargs.pop("block_indices", None)  # MiniMax-M3's key-block selection [B, H, S, topk_blocks]
        if blocks is not None:
            size = int(module.indexer.block_size)
            if blocks.shape[-1] < -(-seq_len // size):
                raise UnsupportedAttention(f"the indexer of layer {layer_idx} keeps {blocks.shape[-1]} of "
                                           f"{-(-seq_len // size)} blocks of {size} keys per query, a selection the "
                                           "rows would have to redo")
        raw_mask = attention_mask if compressed is None else attention_mask[..., :seq_len]
        allowed = _allowed_from_mask(raw_mask, seq_len, key.device)
        selects = getattr(module, "indexer", None) is not None or getattr(module, "skip_topk", False)
        if selects and not _dense_causal(allowed):  # an indexer's selection (or an earlier one reused) in the mask
            raise UnsupportedAttention(f"the indexer of layer {layer_idx} drops keys of this window from some "
                                       "query's attention, a selection the rows would have to redo")
        self.caches[layer_idx] = LayerCache(key[0, :, :seq_len].detach(), value[0, :, :seq_len].detach(), allowed,
                                            compressed)
        family_eager = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
        if family_eager is None:
            raise UnsupportedAttention(f"{type(module).__module__} defines no eager_attention_forward")
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        native = ALL_ATTENTION_FUNCTIONS.get_interface(self.native, family_eager)
        return native(module, query, key, value, attention_mask, **kwargs)

    def _record_entries(self, module, layer_idx: int, key, attention_mask, seq_len: int):
        """The clean state of a compressed layer whose attention received ``key.shape[2] - seq_len`` entries after
        the positions' keys (:func:`moeaudit.intervene.compressed.recorded`), refused where the rows could not
        replay it (:func:`~moeaudit.intervene.compressed.replay_problem`); any other layer with more keys than
        queries is refused too."""
        compressor = getattr(module, "compressor", None)
        entries = key.shape[2] - seq_len
        if compressor is None or layer_idx not in self.pending or (entries and attention_mask is None):
            raise UnsupportedAttention(f"the attention of layer {layer_idx} receives {key.shape[2]} keys for "
                                       f"{seq_len} positions")
        if attention_mask is None:  # no entry to mask
            tail = torch.zeros(seq_len, 0, dtype=torch.bool, device=key.device)
        else:
            tail = attention_mask[..., seq_len:]
            tail = (tail[:, 0] if tail.dim() == 4 else tail)[0]
            if tail.dtype != torch.bool:
                if not bool(((tail == 0) | (tail == float("-inf")) | (tail == torch.finfo(tail.dtype).min)).all()):
                    raise UnsupportedAttention(f"the mask of layer {layer_idx}'s compressed entries carries a bias")
                tail = tail == 0
        cache = compressed_attention.recorded(self.pending.pop(layer_idx), key[0, 0, seq_len:].detach())
        problem = compressed_attention.replay_problem(compressor, cache, tail)
        if problem is not None:
            raise UnsupportedAttention(f"the compressed attention of layer {layer_idx} {problem}")
        return cache

    # ------------------------------------------------------------------ rows
    def rows(self, module, query, key, value, scaling, sinks):
        cache = self.caches[module.layer_idx]
        allow_clean, allow_own = self._row_masks(cache.allowed)
        appended = self.appended.pop(module.layer_idx, None)
        extra = None
        if key.shape[2] != self.row_len:  # a compressed layer's entries after the rows' own keys
            if appended is None or key.shape[2] != self.row_len + appended.shape[-1]:
                raise UnsupportedAttention(f"the attention of layer {module.layer_idx} receives {key.shape[2]} keys "
                                           f"for rows of {self.row_len} positions")
            extra = (key[:, :, self.row_len:], value[:, :, self.row_len:], appended)
            key, value = key[:, :, :self.row_len], value[:, :, :self.row_len]
        return rows_attention(query, key, value, cache.key, cache.value, allow_clean, allow_own,
                              scaling=scaling, sinks=sinks, extra=extra)

    def _row_masks(self, allowed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-row masks against the clean prefix [R, S, P] and within the row's own block [R, S, S]."""
        key = id(allowed)
        if key not in self._mask_cache:
            start = self.row_start
            span = torch.arange(self.row_len, device=start.device)
            query_pos = start[:, None] + span[None, :]  # [R, S]
            prefix = int(start.max().item())
            keys = torch.arange(prefix, device=start.device)
            allow_clean = allowed[query_pos][..., :prefix] & (keys[None, None, :] < start[:, None, None])
            own_pos = query_pos[:, None, :].expand(-1, self.row_len, -1)  # [R, S(q), S(k)]
            allow_own = allowed[query_pos].gather(-1, own_pos)
            self._mask_cache[key] = (allow_clean, allow_own)
        return self._mask_cache[key]


_ACTIVE: ContextVar[AttentionState | None] = ContextVar("moeaudit_attention_state", default=None)


def _dense_causal(allowed: torch.Tensor) -> bool:
    """Whether a recorded [T, T] pattern lets every real query see every real key up to itself: the causal
    pattern over the keys that attend to themselves (padding attends to nothing real). An indexer's selection
    that an ``eager`` / ``sdpa`` attention receives folded into its mask (GLM-5.3-Next's
    ``build_attention_mask_from_topk``) shows here as a missing key."""
    real = allowed.diagonal()
    if not bool(real.any()):
        return False
    expected = torch.ones_like(allowed).tril() & real[None, :]
    return bool((allowed[real] == expected[real]).all())


def _allowed_from_mask(attention_mask, seq_len: int, device) -> torch.Tensor:
    """The boolean [T, T] pattern of a native mask (None = plain causal, as sdpa's ``is_causal`` skip)."""
    if attention_mask is None:
        return torch.ones(seq_len, seq_len, dtype=torch.bool, device=device).tril()
    mask = attention_mask
    if mask.dim() == 4:
        if mask.shape[1] != 1:
            raise UnsupportedAttention("per-head attention masks are not supported by the row kernel")
        mask = mask[:, 0]
    mask = mask[0]
    if tuple(mask.shape) != (seq_len, seq_len):
        raise UnsupportedAttention(f"attention mask of shape {tuple(attention_mask.shape)}")
    if mask.dtype == torch.bool:
        return mask.clone()
    floor = torch.finfo(mask.dtype).min
    if not bool(((mask == 0) | (mask == floor)).all()):
        raise UnsupportedAttention("the attention mask carries an additive bias, not only allowed/blocked")
    return mask == 0


def rows_attention(query, key, value, clean_key, clean_value, allow_clean, allow_own, *, scaling, sinks=None,
                   extra=None):
    """Attention of R rows against a shared clean prefix plus each row's own keys/values.

    Parameters
    ----------
    query : Tensor [R, Hq, S, Dk]
    key, value : Tensor [R, Hkv, S, Dk] and [R, Hkv, S, Dv]
        The rows' own keys/values (positions ``start_r .. start_r + S - 1``).
    clean_key, clean_value : Tensor [Hkv, T, Dk] and [Hkv, T, Dv]
        The window's clean keys/values (shared by all rows; only the first P positions are read).
    allow_clean : bool Tensor [R, S, P]
        Which clean positions each row's queries may attend to (already restricted to ``< start_r``).
    allow_own : bool Tensor [R, S, S]
        Which of its own positions each query may attend to (the model's mask on that block).
    scaling : float
    sinks : Tensor [Hq], optional
        GPT-OSS attention-sink logits: one extra logit per head, dropped after the softmax.
    extra : (Tensor [R, Hkv, N, Dk], Tensor [R, Hkv, N, Dv], bool Tensor [R, S, N]), optional
        Further keys/values of each row and which of its queries see them (DeepSeek-V4's compressed entries,
        :func:`moeaudit.intervene.compressed.row_entries`).

    Returns
    -------
    (Tensor [R, S, Hq, Dv], None)
        In the layout transformers' attention functions return.

    Notes
    -----
    Arithmetic follows transformers' eager attention: ``(q @ k^T) * scaling``, blocked logits excluded,
    softmax in float32 (float64 for a float64 model), probabilities cast to the value dtype. Query head h
    uses key/value head ``h // (Hq / Hkv)`` (``repeat_kv``'s order).
    """
    rows, heads, span, _ = query.shape
    kv_heads = key.shape[1]
    groups = heads // kv_heads
    prefix = allow_clean.shape[-1]
    q = query.reshape(rows, kv_heads, groups, span, -1)
    acc = torch.float64 if query.dtype == torch.float64 else torch.float32
    neg = torch.finfo(acc).min
    logits = []
    if prefix > 0:
        flat = q.permute(1, 0, 2, 3, 4).reshape(kv_heads, rows * groups * span, -1)
        clean = torch.matmul(flat, clean_key[:, :prefix].transpose(1, 2)) * scaling
        clean = clean.view(kv_heads, rows, groups, span, prefix).to(acc)
        logits.append(clean.masked_fill(~allow_clean[None, :, None], neg))
    own = torch.matmul(q, key.unsqueeze(2).transpose(-1, -2)) * scaling  # [R, Hkv, g, S, S]
    own = own.to(acc).masked_fill(~allow_own[:, None, None], neg).permute(1, 0, 2, 3, 4)
    logits.append(own)
    entries = 0 if extra is None else extra[0].shape[2]
    if entries:
        appended = torch.matmul(q, extra[0].unsqueeze(2).transpose(-1, -2)) * scaling  # [R, Hkv, g, S, N]
        appended = appended.to(acc).masked_fill(~extra[2][:, None, None], neg).permute(1, 0, 2, 3, 4)
        logits.append(appended)
    if sinks is not None:
        sink = sinks.to(acc).reshape(kv_heads, 1, groups, 1, 1).expand(-1, rows, -1, span, 1)
        logits.append(sink)
    probs = torch.softmax(torch.cat(logits, dim=-1), dim=-1).to(value.dtype)
    own_probs = probs[..., prefix:prefix + span]  # [Hkv, R, g, S, S]
    out = torch.matmul(own_probs, value.permute(1, 0, 2, 3).unsqueeze(2))  # [Hkv, R, g, S, Dv]
    if prefix > 0:
        clean_probs = probs[..., :prefix].reshape(kv_heads, rows * groups * span, prefix)
        out = out + torch.matmul(clean_probs, clean_value[:, :prefix]).view(kv_heads, rows, groups, span, -1)
    if entries:
        entry_probs = probs[..., prefix + span:prefix + span + entries]  # [Hkv, R, g, S, N]
        out = out + torch.matmul(entry_probs, extra[1].permute(1, 0, 2, 3).unsqueeze(2))
    # contiguous, as transformers' eager attention returns it: AFMoE's attention `.view`s the output
    out = out.permute(1, 3, 0, 2, 4).reshape(rows, span, heads, -1).contiguous()
    return out, None


def _attention_function(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    state = _ACTIVE.get()
    if state is None:  # pragma: no cover - only reachable if a config leaks the implementation name
        raise RuntimeError(f"attention implementation {IMPLEMENTATION!r} used outside moeaudit's engine")
    if state.mode == "record":
        return state.record(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    return state.rows(module, query, key, value, scaling, kwargs.get("s_aux"))


def _mask_function(*args, **kwargs):
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    state = _ACTIVE.get()
    native = state.native if state is not None else "sdpa"
    return ALL_MASK_ATTENTION_FUNCTIONS[native](*args, **kwargs)


_REGISTERED = False


def _register() -> None:
    global _REGISTERED
    if _REGISTERED:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(IMPLEMENTATION, _attention_function)
    AttentionMaskInterface.register(IMPLEMENTATION, _mask_function)
    _REGISTERED = True


def _returns_no_selection(*args, **kwargs) -> None:
    return None


@contextmanager
def _block_indexers_idle(model) -> Iterator[None]:
    """MiniMax-M3's block indexers (``MiniMaxM3VLIndexer``) select nothing while rows run: the rows' attention
    reads no selection, and the fast engine runs only windows where the selection is every key block
    (:func:`moeaudit.intervene.engine.indexer_key_budget`); the indexer's own forward numbers key blocks by the
    window's absolute positions, which a row's own keys (a suffix of the window) do not span."""
    indexers = model.__dict__.get("_moeaudit_block_indexers")
    if indexers is None:  # found once per model, not per rows call
        indexers = [m for m in model.modules() if hasattr(m, "topk_blocks") and hasattr(m, "build_block_mask")]
        model.__dict__["_moeaudit_block_indexers"] = indexers
    for indexer in indexers:
        indexer.forward = _returns_no_selection
    try:
        yield
    finally:
        for indexer in indexers:
            indexer.__dict__.pop("forward", None)


@contextmanager
def attention_mode(model, state: AttentionState) -> Iterator[AttentionState]:
    """Route ``model``'s attention through :class:`AttentionState` for the block; always restore it."""
    _register()
    config = model.config
    original = config._attn_implementation
    token = _ACTIVE.set(state)
    try:
        config._attn_implementation = IMPLEMENTATION
        if state.mode == "rows":
            with _block_indexers_idle(model), compressed_attention.replaying(model, state):
                yield state
        else:
            with compressed_attention.recording(model, state.pending):
                yield state
    finally:
        config._attn_implementation = original
        _ACTIVE.reset(token)
