"""Recurrent and convolutional token mixers in the fast engine: the clean state entering a position.

A recurrent layer (Gated DeltaNet in Qwen3-Next / Qwen3.5, Mamba in Jamba, Mamba-2 in Granite-4-H and
Nemotron-H, KDA in Kimi-Linear and Ling/Bailing, MiniMax-Text-01's Lightning attention, the short
convolutions of LFM2) keeps no per-position keys and values. What position t reads from the past is a
**state**: the conv state (the last inputs of the layer's causal convolution) and the recurrent state
S(t-1). In token scope every position before t is clean at every layer (:mod:`moeaudit.intervene.fast`), and
in sequence scope every position before the first changed one, so the state a row needs is the *clean* run's
state after the position before its start: it plays the role the clean key/value prefix plays for attention.

How the states are obtained
    The clean pass records the residual stream entering every decoder layer. :class:`CleanStates` feeds
    the recurrent layers their clean inputs through the model's own decoder layers, with a batch-one
    transformers cache (``DynamicCache(config=...)``: the uniform linear-attention cache API,
    ``get_conv_state`` / ``get_recurrent_state``, transformers ``cache_utils.LinearAttentionLayer``), and
    snapshots the cached states after each position a call asks for. Rows are sorted by position, so the
    states sweep forward: memory is one running state per layer plus the snapshots of one call's
    distinct positions, never a state per position of the window.

How the rows use them
    :func:`row_cache` builds a cache of batch R whose recurrent layers hold each row's own snapshot (zeros
    for a row starting at position 0: the state before any token) and whose attention layers pass keys
    and values through untouched (the rows' attention is :mod:`moeaudit.intervene.attention`'s). The
    model's own decoder layers then take their single-token decode path (token scope) or their chunked
    prefill from an initial state (sequence scope); no recurrence is re-implemented here.

Exactness
    The clean forward uses the chunked kernels over the whole window, the sweep and the rows the
    decode-step kernels (or chunks from an initial state); the two agree to rounding, not bit for bit.
    The engine's null-intervention noise floor and its self-check against the reference engine
    (:mod:`moeaudit.intervene.spotcheck`) measure that rounding on every run.
"""

from __future__ import annotations

import functools
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from moeaudit.intervene.attention import UnsupportedAttention
from moeaudit.intervene.replay import call_decoder_layer, rotary_module
from moeaudit.models.moe_model import MoEModel


#: The decode step of a recurrent layer holds a few copies of its state per row at once (decayed state,
#: outer-product update, new state): rows per call are budgeted at this many times the states.
STEP_TEMPORARIES = 8


@dataclass(frozen=True)
class MixerLayout:
    """Which decoder layers mix tokens how, as transformers' cache for the model's config lays them out.

    Attributes
    ----------
    attention : tuple of int
        Layers with keys/values (a ``DynamicLayer``-like cache layer).
    recurrent : tuple of int
        Layers with conv / recurrent states (``LinearAttentionCacheLayerMixin``).
    both : tuple of int
        Layers with both in one cache layer (not replayed by the fast engine).
    """

    attention: tuple[int, ...]
    recurrent: tuple[int, ...]
    both: tuple[int, ...]


def mixer_layout(moe: MoEModel) -> MixerLayout:
    """Classify ``moe``'s decoder layers by their cache layer in ``DynamicCache(config=moe.config)``.

    A layer whose cache layer is transformers' ``DummyLayer`` mixes no tokens (Nemotron-H's MoE-only
    blocks) and is in no group, unless it has an attention module: Gemma 4's layers that reuse an earlier
    layer's keys and values (``num_kv_shared_layers``) keep no cache of their own but attend.
    """
    from transformers.cache_utils import CacheLayerMixin, DummyLayer, LinearAttentionCacheLayerMixin

    cache_layers = _fresh_cache(moe).layers
    decoder_layers = moe.adapter.decoder_layers(moe.model)
    attention, recurrent, both = [], [], []
    for index in range(moe.num_decoder_layers):
        layer = cache_layers[index] if index < len(cache_layers) else None
        if isinstance(layer, DummyLayer):
            if hasattr(decoder_layers[index], "self_attn"):
                attention.append(index)
            continue
        linear = isinstance(layer, LinearAttentionCacheLayerMixin)
        keyed = layer is None or isinstance(layer, CacheLayerMixin)
        (both if linear and keyed else recurrent if linear else attention).append(index)
    return MixerLayout(tuple(attention), tuple(recurrent), tuple(both))


def _fresh_cache(moe: MoEModel):
    return _bridge_class()(config=moe.config)


@functools.cache
def _bridge_class():
    from transformers import DynamicCache

    class LinearCacheBridge(DynamicCache):
        """transformers' ``DynamicCache`` for the model's config, that also answers MiniMax's Lightning attention
        (``MiniMaxLightningAttention`` reads and writes its key-value state through ``get_linear_cache`` /
        ``set_linear_cache`` of its own ``MiniMaxCache``, ``models/minimax/modeling_minimax.py``): the state is the
        layer's recurrent state in the uniform linear-attention cache layer, so the sweep, the snapshots and
        :func:`row_cache` handle it as every other recurrent state. Every other family never calls the two."""

        def get_linear_cache(self, layer_idx: int):
            layer = self.layers[layer_idx]
            if not getattr(layer, "is_recurrent_states_initialized", {}).get(0, False):
                return None  # the state before any token: the layer's chunked prefill from zeros
            return layer.recurrent_states[0]

        def set_linear_cache(self, layer_idx: int, linear_cache: torch.Tensor) -> None:
            self.layers[layer_idx].update_recurrent_state(linear_cache)
            self.layers[layer_idx].has_previous_state[0] = True

    return LinearCacheBridge


@dataclass
class LayerState:
    """A snapshot of one recurrent layer's cached states (per ``state_idx``), batch first; None where unset."""

    conv: dict[int, torch.Tensor | None]
    recurrent: dict[int, torch.Tensor | None]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.conv.values(), *self.recurrent.values())
                   if t is not None)


class CleanStates:
    """The clean states of every recurrent layer of one window after any position, by a forward sweep.

    Parameters
    ----------
    moe : MoEModel
    layer_input : list of Tensor [T, H]
        The residual stream entering every decoder layer in the clean pass.
    layers : sequence of int
        The recurrent decoder layers (:attr:`MixerLayout.recurrent`).
    record_bytes : int
        The size of the clean pass's own record (logits, residual stream, captures, keys/values). Memory
        beyond it is budgeted against it, so a token census stays within about twice the clean pass:
        snapshots up to a quarter of it are kept and served again without sweeping (the engine runs one MoE
        layer after another, and each sweeps the window's positions from the start; :meth:`release` drops
        those no remaining layer reads), and a call's rows carry states of at most half of it unless the
        caller sets another budget (:meth:`rows_per_call`, ``InterveneConfig.max_state_bytes``). 0 keeps
        none and allows one row a call.

    Notes
    -----
    :meth:`after` answers in increasing position order; a request before the sweep's position (and not
    kept) restarts the sweep of that layer from the window's start (counted in :attr:`restarts`).
    """

    def __init__(self, moe: MoEModel, layer_input: list[torch.Tensor], layers, *, record_bytes: int = 0):
        self.moe = moe
        self.layer_input = layer_input
        self.layers = tuple(layers)
        self.restarts = 0
        self.steps = 0
        self._template: dict[int, LayerState] = {}
        self._continues: dict[int, bool] = {}
        self._rotary = rotary_module(moe) is not None
        self.record_bytes = int(record_bytes)
        self.keep_bytes = self.record_bytes // 4
        self.kept_bytes = 0
        self._kept: dict[int, dict[int, LayerState]] = {}
        self._reset()

    def _reset(self, index: int | None = None) -> None:
        """Forget the states of layer ``index`` (all layers when None): its next request starts at position 0."""
        if index is None:
            self.cache = _fresh_cache(self.moe)
            self.position = dict.fromkeys(self.layers, -1)  # per layer, the last position fed to it
            return
        self.cache.layers[index] = _fresh_cache(self.moe).layers[index]
        self.position[index] = -1

    def release(self, below: int) -> None:
        """Forget the kept snapshots and the sweep state of the recurrent layers before decoder layer
        ``below``, whose states no row of the engine's remaining MoE layers reads (rows of MoE layer ℓ start
        at ℓ + 1). Their budget goes to the later layers' snapshots; a later request for a released layer
        sweeps it again from the window's start (correct, only slower).
        """
        for index in self.layers:
            if index >= below:
                continue
            kept = self._kept.pop(index, {})
            self.kept_bytes -= sum(state.nbytes() for state in kept.values())
            if self.position[index] >= 0:
                self._reset(index)

    def _advance(self, index: int, to: int) -> None:
        """Feed layer ``index`` its clean inputs up to and including position ``to``: in one multi-token
        call when the layer's prefill starts from a cached state (:meth:`continues_from_state`), else one
        decode step per position."""
        start = self.position[index] + 1
        if to < start:
            return
        stretches = [(start, to)] if to == start or self.continues_from_state(index) else \
            [(p, p) for p in range(start, to + 1)]
        for lo, hi in stretches:
            self._feed(self.cache, index, lo, hi)
        self.position[index] = to

    def _feed(self, cache, index: int, lo: int, hi: int) -> None:
        hidden = self.layer_input[index][lo:hi + 1].unsqueeze(0)
        position_ids = torch.arange(lo, hi + 1, device=hidden.device)[None]
        # a recurrent layer reads no rotary embedding; the output is not needed, only the cache's new state
        call_decoder_layer(self.moe, index, hidden, position_ids, None, cache, rotary=self._rotary)
        self.steps += 1

    @torch.no_grad()
    def continues_from_state(self, index: int) -> bool:
        """Whether layer ``index``'s multi-token pass starts from the state in its cache, as its decode step
        does: Jamba's Mamba layers do not (transformers' ``mamba_selective_scan`` takes no initial state,
        ``models/jamba/modeling_jamba.py``), so they are swept, and sequence-scope rows run through them,
        one position at a time.

        Probed once per layer on the window's first positions: the state after a decode step per position
        against the state after one step and a multi-token pass; rounding agrees to ~1e-6, a dropped
        state differs at order one.
        """
        if index not in self._continues:
            n = min(4, len(self.layer_input[index]))
            if n < 3:
                return False
            stepped, chunked = _fresh_cache(self.moe), _fresh_cache(self.moe)
            for p in range(n):
                self._feed(stepped, index, p, p)
            self._feed(chunked, index, 0, 0)
            self._feed(chunked, index, 1, n - 1)
            a, b = stepped.layers[index], chunked.layers[index]
            same = all(torch.allclose(x.float(), y.float(), rtol=1e-3, atol=1e-4)
                       for i in range(a.number_of_states)
                       for x, y in ((a.conv_states[i], b.conv_states[i]), (a.recurrent_states[i], b.recurrent_states[i]))
                       if x is not None and y is not None)
            self._continues[index] = same
        return self._continues[index]

    def _snapshot(self, index: int) -> LayerState:
        layer = self.cache.layers[index]
        return LayerState(
            {i: layer.conv_states[i].clone() if layer.is_conv_states_initialized[i] else None
             for i in range(layer.number_of_states)},
            {i: layer.recurrent_states[i].clone() if layer.is_recurrent_states_initialized[i] else None
             for i in range(layer.number_of_states)})

    def _empty(self, index: int) -> LayerState:
        """The state before any token: zeros shaped like a real one (the layers' prefill starts from zeros)."""
        if index not in self._template:
            probe = CleanStates(self.moe, self.layer_input, [index])
            probe._advance(index, 0)
            state = probe._snapshot(index)
            self.steps += probe.steps
            self._template[index] = LayerState(
                {i: None if t is None else torch.zeros_like(t) for i, t in state.conv.items()},
                {i: None if t is None else torch.zeros_like(t) for i, t in state.recurrent.items()})
        return self._template[index]

    def rows_per_call(self, first_layer: int, budget: int | None = None) -> int | None:
        """Rows of one call from decoder layer ``first_layer`` on whose states, with the decode step's
        temporaries (:data:`STEP_TEMPORARIES` times the states), fit ``budget`` bytes (None: half the clean
        record); None when no recurrent layer is at or after ``first_layer``. A Mamba-2 layer of the
        benchmark's Granite-4-H shape holds 12 KiB per row; real Qwen3-Next about 2 MiB per linear layer and
        row."""
        per_row = sum(self._empty(index).nbytes() for index in self.layers if index >= first_layer)
        if not per_row:
            return None
        budget = self.record_bytes // 2 if budget is None else budget
        return max(1, budget // (STEP_TEMPORARIES * per_row))

    @torch.no_grad()
    def check(self) -> None:
        """Read every recurrent layer's state once (after the first position); a layer that leaves none in
        transformers' cache cannot be replayed from its clean state.

        Raises
        ------
        moeaudit.intervene.attention.UnsupportedAttention
            Naming the layer (the engine falls back to the reference engine and logs why).
        """
        for index in self.layers:
            state = self._empty(index)
            if all(t is None for t in (*state.conv.values(), *state.recurrent.values())):
                raise UnsupportedAttention(
                    f"decoder layer {index} mixes tokens recurrently but keeps no conv or recurrent state in "
                    "transformers' cache (get_conv_state / get_recurrent_state), so its rows cannot start from "
                    "the clean state")

    @torch.no_grad()
    def after(self, positions: torch.Tensor, layers=None) -> dict[int, LayerState]:
        """Per recurrent layer, the states after each of ``positions`` (-1: before the first token).

        Parameters
        ----------
        positions : LongTensor [R]
            Any order, repeats allowed; each row gets the snapshot of its own position.
        layers : iterable of int, optional
            The recurrent layers wanted (default: all); only these advance.

        Returns
        -------
        dict layer -> LayerState
            Tensors with R rows (batch dimension first), fresh copies the caller may update in place.
        """
        wanted = sorted(set(int(p) for p in positions.tolist()))
        asked = None if layers is None else set(layers)
        chosen = self.layers if asked is None else [i for i in self.layers if i in asked]
        out = {}
        for index in chosen:
            kept = self._kept.setdefault(index, {})
            real = [p for p in wanted if p >= 0 and p not in kept]
            if real and real[0] < self.position[index]:  # behind the sweep: start again from the window's start
                self.restarts += 1
                self._reset(index)
            snapshots = {p: self._empty(index) for p in wanted if p < 0}
            snapshots.update({p: kept[p] for p in wanted if p in kept})
            for position in real:
                self._advance(index, position)
                snapshots[position] = state = self._snapshot(index)
                size = state.nbytes()
                if self.kept_bytes + size <= self.keep_bytes:  # served again without a sweep (next MoE layer)
                    kept[position] = state
                    self.kept_bytes += size
            order = [snapshots[int(p)] for p in positions.tolist()]
            out[index] = LayerState(_stack([s.conv for s in order]), _stack([s.recurrent for s in order]))
        return out


def _stack(states: list[dict[int, torch.Tensor | None]]) -> dict[int, torch.Tensor | None]:
    return {i: None if states[0][i] is None else torch.cat([s[i] for s in states], dim=0) for i in states[0]}


class _PassThroughLayer:
    """A cache layer for an attention layer in a rows pass: keys and values go back unchanged (the rows'
    attention against the clean prefix is :mod:`moeaudit.intervene.attention`'s)."""

    is_sliding = False
    is_compileable = False
    #: The keys last handed through (GLM-5.3-Next's indexer reads the key length off its cache layer).
    keys = None

    def update(self, key_states, value_states, *args, **kwargs):
        self.keys = key_states
        return key_states, value_states

    def update_indexer(self, indexer_states, *args, **kwargs):
        """A sparse-attention indexer's keys (``DynamicIndexedLayer.update_indexer``: Hy4's, GLM-5.3-Next's), back
        unchanged: the rows run only where the indexer keeps every key, and their attention does not read its
        selection (:func:`moeaudit.intervene.replay.indexer_arguments`)."""
        return indexer_states

    def get_seq_length(self, *args, **kwargs) -> int:
        return 0


@contextmanager
def saved_states_copied(cache):
    """Under autograd (the gradient estimate's rows), let the recurrent layers of ``cache`` (a
    :func:`row_cache`; None: no recurrent layer) overwrite their states in place.

    A decode step overwrites the state it started from: transformers' cache layers ``copy_`` the new state
    into the stored tensor (``cache_utils.LinearAttentionLayer``), and the PyTorch versions of mamba_ssm's
    ``selective_state_update`` (Granite-4-H, Jamba) write it inside the kernel, after ``state * dA`` has
    saved it for the backward. A tensor saved for the backward that lives in a state's storage is copied
    when it is saved; every other saved tensor keeps autograd's own check that it was not modified in place
    (``torch.autograd.graph.saved_tensors_hooks`` replaces that check, so it is redone here).
    """
    if cache is None or not torch.is_grad_enabled():  # every census call: nothing to hook
        yield
        return
    from transformers.cache_utils import LinearAttentionCacheLayerMixin

    # the rows' states, written in place for the whole call (a layer that swapped in a new tensor would not be
    # copied, and the version check in unpack would name it instead of a wrong gradient)
    states = {tensor.untyped_storage().data_ptr() for layer in cache.layers
              if isinstance(layer, LinearAttentionCacheLayerMixin)
              for tensor in (*layer.conv_states.values(), *layer.recurrent_states.values()) if tensor is not None}

    def pack(tensor):
        if tensor.untyped_storage().data_ptr() in states:
            return tensor.clone(), None
        return tensor, tensor._version

    def unpack(packed):
        tensor, version = packed
        if version is not None and tensor._version != version:
            raise RuntimeError(f"a tensor of shape {tuple(tensor.shape)} saved for the gradient estimate's backward "
                               "was modified in place")
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        yield


def row_cache(moe: MoEModel, states: dict[int, LayerState], layout: MixerLayout):
    """A transformers cache of R rows: each recurrent layer holds the rows' own ``states``
    (:meth:`CleanStates.after`), each attention layer passes keys/values through."""
    cache = _fresh_cache(moe)
    for index in layout.attention:
        cache.layers[index] = _PassThroughLayer()
    for index, state in states.items():
        layer = cache.layers[index]
        for i in range(layer.number_of_states):
            conv, recurrent = state.conv.get(i), state.recurrent.get(i)
            if conv is not None:
                layer.conv_states[i] = conv
                layer.conv_kernel_size[i] = conv.shape[-1]
                layer.is_conv_states_initialized[i] = True
                layer.dtype, layer.device = conv.dtype, conv.device
            if recurrent is not None:
                layer.recurrent_states[i] = recurrent
                layer.is_recurrent_states_initialized[i] = True
            layer.has_previous_state[i] = conv is not None or recurrent is not None
    return cache
