"""The fast engine through recurrent and convolutional layers: Gated DeltaNet, Mamba, Mamba-2, KDA, short convs.

Rows start from the clean run's conv / recurrent state after the position before them
(:mod:`moeaudit.intervene.recurrent`); the clean pass runs chunked kernels and the rows decode steps, so
the engines agree to rounding. Windows here are longer than the Mamba-2 chunk (16 in the tiny configs) and
than the Gated DeltaNet / KDA chunk (64), and a multiple of neither.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from moeaudit.intervene import InterveneConfig, Selection, compute_effects
from moeaudit.intervene.clean import capture_clean
from moeaudit.intervene.recurrent import mixer_layout
from moeaudit.models import ABLATION_KINDS
from moeaudit.models.testing import RECURRENT_FAMILIES

from .conftest import VOCAB, make_moe

KEYS = ["layer", "seq", "pos", "expert", "kind", "scope"]
LONG = 70  # > 64 and > 16, a multiple of neither


def _ids(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module", params=sorted(RECURRENT_FAMILIES))
def hybrid(request):
    return make_moe(request.param)


def test_every_hybrid_family_is_replayed_fast(hybrid):
    layout = mixer_layout(hybrid)
    assert layout.recurrent and not layout.both
    assert set(layout.recurrent).isdisjoint(layout.attention)


def test_census_equals_the_reference_engine_every_kind_and_scope(hybrid):
    """Every active expert at every position of a 37-token window (past the Mamba-2 chunk of 16)."""
    ids = _ids(1, 37)
    kinds = tuple(k for k in ABLATION_KINDS if not (k == "mean" and hybrid.layers[0].weights_scale_input))
    config = dict(kinds=kinds, scopes=("token", "sequence"))
    fast = compute_effects(hybrid, ids, config=InterveneConfig(**config))
    ref = compute_effects(hybrid, ids, config=InterveneConfig(engine="reference", reference_batch=8, **config))
    assert fast.stats.engine == "fast" and fast.stats.fallback_reason is None
    merged = fast.effects.merge(ref.effects, on=KEYS, suffixes=("", "_ref"), validate="one_to_one")
    assert len(merged) == len(fast.effects) == len(ref.effects) > 0
    assert merged.delta_nll.abs().max() > 1e-2  # the interventions do something
    assert np.abs(merged.delta_nll - merged.delta_nll_ref).max() <= 1e-4
    assert np.abs(merged.kl - merged.kl_ref).max() <= 1e-4
    later = np.abs(merged.delta_nll_later_sum - merged.delta_nll_later_sum_ref)
    assert np.nanmax(later) <= 1e-3


def test_long_windows_past_every_chunk_size(hybrid):
    """Sampled targets over two 70-token windows: chunk boundaries of 16 and 64 inside, neither a divisor."""
    ids = _ids(2, LONG, seed=1)
    selection = Selection.sample(6, seed=3)
    config = dict(kinds=("zero", "reroute"), scopes=("token", "sequence"))
    fast = compute_effects(hybrid, ids, selection, config=InterveneConfig(**config))
    ref = compute_effects(hybrid, ids, selection, config=InterveneConfig(engine="reference", reference_batch=8,
                                                                         **config))
    assert fast.stats.engine == "fast"
    merged = fast.effects.merge(ref.effects, on=KEYS, suffixes=("", "_ref"), validate="one_to_one")
    assert len(merged) == len(ref.effects) > 0 and merged.pos.max() > 64
    assert np.abs(merged.delta_nll - merged.delta_nll_ref).max() <= 1e-4


def _own_states(cache, index: int) -> dict:
    """Per state index, (conv, recurrent) of decoder layer ``index`` in the cache the model's own forward built:
    the uniform linear-attention cache layer, or MiniMax's ``MiniMaxCache.linear_cache`` (its Lightning
    attention's key-value state, ``models/minimax/modeling_minimax.py``)."""
    if hasattr(cache, "linear_cache"):
        return {0: (None, cache.linear_cache[index])}
    layer = cache.layers[index]
    return {i: (layer.conv_states[i], layer.recurrent_states[i]) for i in range(layer.number_of_states)}


@torch.no_grad()
def test_swept_states_equal_transformers_own_cache(hybrid):
    """The sweep's state after position p equals the state transformers' cache holds after a forward over
    positions 0..p with ``use_cache=True`` (to rounding: chunked prefill vs decode steps)."""
    ids = _ids(1, 40, seed=2)
    clean = capture_clean(hybrid, ids)
    states = clean.states
    for p in (0, 5, 17, 39):
        ours = states.after(torch.tensor([p]))
        theirs = hybrid.model(input_ids=ids[:, :p + 1], use_cache=True).past_key_values
        for index, state in ours.items():
            compared = 0
            for i, (conv, recurrent) in _own_states(theirs, index).items():
                for mine, own in ((state.conv[i], conv), (state.recurrent[i], recurrent)):
                    if own is None or not torch.is_tensor(own):
                        continue
                    torch.testing.assert_close(mine.float(), own.float(), rtol=1e-4, atol=1e-5)
                    compared += 1
            assert compared, f"no state of layer {index} was compared"
    assert states.restarts == 0  # increasing requests never restart the sweep
    again = states.after(torch.tensor([3]))  # behind the sweep: restarts from the window's start
    assert states.restarts == len(states.layers)
    fresh = capture_clean(hybrid, ids).states.after(torch.tensor([3]))
    for index in again:
        for i, t in again[index].recurrent.items():
            if t is not None:
                assert torch.equal(t, fresh[index].recurrent[i])


@torch.no_grad()
def test_rows_get_the_state_of_their_own_position():
    """A batch of rows at different positions, in any order and with repeats, gets each row its own state."""
    moe = make_moe("qwen3_next")
    clean = capture_clean(moe, _ids(1, 30))
    positions = torch.tensor([7, -1, 12, 7, 29])
    batched = clean.states.after(positions)
    for row, p in enumerate(positions.tolist()):
        alone = capture_clean(moe, _ids(1, 30)).states.after(torch.tensor([p]))
        for index in batched:
            for i, t in batched[index].recurrent.items():
                if t is not None:
                    # equal to rounding (the sweep reached p in other stretches); other positions differ at O(0.1)
                    torch.testing.assert_close(t[row:row + 1], alone[index].recurrent[i], rtol=1e-4, atol=1e-6)
                    if p == -1:
                        assert not t[row].any()  # before the first token: the zero state


def test_a_layer_that_keeps_no_state_falls_back_with_the_reason_logged(caplog, monkeypatch):
    """A recurrent layer that ignores transformers' cache cannot be replayed from its clean state: the run
    uses the reference engine and logs why, naming the layer."""
    moe = make_moe("qwen3_next")
    layer = moe.adapter.decoder_layers(moe.model)[0].linear_attn
    original = layer.forward
    monkeypatch.setattr(layer, "forward", lambda hidden_states, cache_params=None, **kw: original(hidden_states, **kw))
    with caplog.at_level(logging.WARNING):
        result = compute_effects(moe, _ids(1, 20), Selection.sample(2, seed=0))
    assert result.stats.engine == "reference"
    assert "decoder layer 0 mixes tokens recurrently but keeps no conv or recurrent state" in result.stats.fallback_reason
    assert "decoder layer 0 mixes tokens recurrently" in caplog.text


def test_granite_residual_multiplier_and_logit_scaling_are_replayed():
    """Granite scales the MoE output into the residual stream and divides the logits; the fast engine does
    both (its self-check would fall back otherwise), with a multiplier far from 1 so a miss shows."""
    moe = make_moe("granitemoehybrid", residual_multiplier=0.3, logits_scaling=4.0)
    ids = _ids(1, 24, seed=4)
    config = dict(kinds=("zero",), scopes=("token", "sequence"))
    fast = compute_effects(moe, ids, Selection.sample(5, seed=1), config=InterveneConfig(**config))
    ref = compute_effects(moe, ids, Selection.sample(5, seed=1), config=InterveneConfig(engine="reference", **config))
    assert fast.stats.engine == "fast" and fast.stats.fallback_reason is None
    merged = fast.effects.merge(ref.effects, on=KEYS, suffixes=("", "_ref"))
    assert np.abs(merged.delta_nll - merged.delta_nll_ref).max() <= 1e-5


def test_rows_per_call_are_capped_by_their_recurrent_states(monkeypatch):
    """Each row carries its own states through every later recurrent layer: a call's rows hold at most half
    the clean record in states (times the decode step's temporaries), however many rows_per_call allows."""
    from moeaudit.intervene import fast
    from moeaudit.intervene.recurrent import STEP_TEMPORARIES

    moe = make_moe("granitemoehybrid")
    clean = capture_clean(moe, _ids(1, 40))
    states = clean.states
    first = moe.moe_layer_indices[0]
    per_row = sum(states._empty(i).nbytes() for i in states.layers if i > first)
    cap = states.rows_per_call(first + 1)
    assert cap == max(1, states.record_bytes // 2 // (STEP_TEMPORARIES * per_row)) and cap < 39
    assert states.rows_per_call(moe.num_decoder_layers) is None  # no recurrent layer left: no cap
    sizes = []
    real = fast.forward_rows
    monkeypatch.setattr(fast, "forward_rows", lambda *a, **k: sizes.append(a[3].shape[0]) or real(*a, **k))
    positions = torch.arange(39)
    with torch.no_grad():
        fast.run_token_rows(moe, clean, first, positions, lambda rows: torch.zeros(len(rows), 32), rows_per_call=256)
    assert max(sizes) == cap and sum(sizes) == 39


@torch.no_grad()
def test_released_layers_free_their_snapshots_and_sweep_again_to_the_same_states():
    """``release(below)`` drops the kept snapshots of the recurrent layers before ``below`` (their bytes go
    back to the budget) and leaves the later layers' snapshots; a released layer asked again is swept from
    the window's start and gives the states it gave before."""
    moe = make_moe("granitemoehybrid")
    clean = capture_clean(moe, _ids(1, 40, seed=5))
    states = clean.states
    first, *rest = states.layers
    positions = torch.tensor([3, 11, 30])
    before = states.after(positions)
    assert set(states._kept) == set(states.layers) and all(len(kept) == 3 for kept in states._kept.values())
    per_layer = {index: sum(s.nbytes() for s in states._kept[index].values()) for index in states.layers}
    assert states.kept_bytes == sum(per_layer.values())
    states.release(below=first + 1)
    assert first not in states._kept and all(len(states._kept[index]) == 3 for index in rest)
    assert states.kept_bytes == sum(per_layer[index] for index in rest)
    steps = states.steps
    again = states.after(positions, [first])
    assert states.steps > steps  # swept again, not served from a snapshot
    for i, t in before[first].recurrent.items():
        if t is not None:
            torch.testing.assert_close(again[first].recurrent[i], t, rtol=1e-5, atol=1e-7)


def test_the_census_releases_each_layers_snapshots_once_no_remaining_row_reads_them(monkeypatch):
    """Rows of MoE layer ℓ start at decoder layer ℓ + 1: while they run, no snapshot of a recurrent layer
    before ℓ + 1 is kept (it would sit beside the rows' logits at the census's peak), and the results equal
    the reference engine's."""
    from moeaudit.intervene import fast

    moe = make_moe("granitemoehybrid")
    ids = _ids(1, 40, seed=6)
    kept_before_first = []
    real = fast.forward_rows

    def checked(moe_, clean, first_layer, *args, **kwargs):
        kept_before_first.append(sorted(i for i, kept in clean.states._kept.items() if kept and i < first_layer))
        return real(moe_, clean, first_layer, *args, **kwargs)

    monkeypatch.setattr(fast, "forward_rows", checked)
    config = dict(kinds=("zero",), scopes=("token", "sequence"), noise_positions=0)
    result = compute_effects(moe, ids, config=InterveneConfig(**config))
    assert len(kept_before_first) > len(moe.moe_layer_indices) and not any(kept_before_first)
    monkeypatch.setattr(fast, "forward_rows", real)
    ref = compute_effects(moe, ids, config=InterveneConfig(engine="reference", reference_batch=8, **config))
    merged = result.effects.merge(ref.effects, on=KEYS, suffixes=("", "_ref"), validate="one_to_one")
    assert np.abs(merged.delta_nll - merged.delta_nll_ref).max() <= 1e-4


def test_gradient_estimate_rows_are_capped_by_their_recurrent_states(monkeypatch):
    """The estimate's rows carry their states through every later recurrent layer, like the census's: its
    calls are capped the same way (:func:`moeaudit.intervene.fast.token_rows_per_call`)."""
    from moeaudit.intervene import estimate

    moe = make_moe("granitemoehybrid")
    clean = capture_clean(moe, _ids(1, 40))
    first = moe.moe_layer_indices[0]
    cap = clean.states.rows_per_call(first)
    assert cap < 39
    sizes = []
    real = estimate.forward_rows
    monkeypatch.setattr(estimate, "forward_rows", lambda *a, **k: sizes.append(a[3].shape[0]) or real(*a, **k))
    estimate.nll_gradients(moe, clean, moe.moe_layer_indices, torch.arange(39), rows_per_call=256)
    assert max(sizes) == cap and sum(sizes) == 39


@pytest.mark.parametrize("planted", [0, 1, 2])
def test_noise_floor_takes_the_null_rows_of_every_layer(monkeypatch, planted):
    """The fast engine's noise floor is max |ΔNLL| over the null rows (Δy = 0) of every MoE layer (run
    layer by layer with the census, while that layer's swept states are kept): a ΔNLL of 0.5 planted in the
    null rows of any one layer is the floor."""
    from moeaudit.intervene import engine

    moe = make_moe("granitemoehybrid")
    layer_index = moe.moe_layer_indices[planted]
    real = engine.run_token_rows

    def planting(moe_, clean, layer, positions, make_delta, **kwargs):
        out = real(moe_, clean, layer, positions, make_delta, **kwargs)
        if layer == layer_index and not make_delta(torch.arange(len(positions))).any():
            out["delta_nll"] += 0.5
        return out

    monkeypatch.setattr(engine, "run_token_rows", planting)
    result = compute_effects(moe, _ids(1, 30, seed=7), Selection.sample(3, seed=0),
                             config=InterveneConfig(noise_positions=4))
    assert result.stats.engine == "fast" and result.stats.noise_floor == pytest.approx(0.5, abs=1e-5)




@pytest.mark.parametrize("scope", ["token", "sequence"])
def test_max_state_bytes_sets_the_rows_a_call_carries_and_not_the_results(monkeypatch, scope):
    """``max_state_bytes`` replaces the default state budget (half the clean record): a larger one lets more
    rows share a call, a smaller one fewer, in both scopes and through ``compute_effects``; the effects do
    not depend on it."""
    from moeaudit.intervene import fast
    from moeaudit.intervene.recurrent import STEP_TEMPORARIES

    moe = make_moe("granitemoehybrid")
    ids = _ids(1, 40, seed=8)
    states = capture_clean(moe, ids).states
    first = moe.moe_layer_indices[0]
    per_row = sum(states._empty(i).nbytes() for i in states.layers if i > first)
    default = states.rows_per_call(first + 1)
    assert 1 < default < 39
    sizes = []
    real = fast.forward_rows

    def recording(moe_, clean, first_layer, hidden, *args, **kwargs):
        if first_layer == first + 1:
            sizes.append(hidden.shape[0])
        return real(moe_, clean, first_layer, hidden, *args, **kwargs)

    monkeypatch.setattr(fast, "forward_rows", recording)
    results = {}
    for rows in (1, 2 * default):
        sizes.clear()
        budget = rows * STEP_TEMPORARIES * per_row
        config = InterveneConfig(scopes=(scope,), max_state_bytes=budget, noise_positions=0,
                                 rows_per_call=256)
        results[rows] = compute_effects(moe, ids, Selection.census(layers=[first]), config=config).effects
        assert max(sizes) == rows if scope == "token" else (max(sizes) == 1) == (rows == 1)
    merged = results[1].merge(results[2 * default], on=KEYS, suffixes=("", "_wide"), validate="one_to_one")
    assert np.abs(merged.delta_nll - merged.delta_nll_wide).max() <= 1e-5


@pytest.mark.parametrize("padding", ["left", "right"])
def test_padded_windows_are_exact_left_padding_by_the_reference_engine(caplog, padding):
    """A recurrent layer's clean pass masks padded inputs, the fast engine's state sweep does not: right
    padding is never swept (no row starts after it) and runs fast; left padding (where the sweep was off by
    up to 0.5 nats) runs on the reference engine with the reason logged. Both equal the reference engine."""
    moe = make_moe("qwen3_next")
    ids = _ids(2, 24, seed=9)
    mask = torch.ones_like(ids)
    if padding == "left":
        mask[1, :6] = 0
    else:
        mask[1, -6:] = 0
    config = dict(scopes=("token", "sequence"))
    with caplog.at_level(logging.WARNING):
        fast = compute_effects(moe, ids, Selection.sample(6, seed=0), config=InterveneConfig(**config),
                               attention_mask=mask)
    ref = compute_effects(moe, ids, Selection.sample(6, seed=0), config=InterveneConfig(engine="reference", **config),
                          attention_mask=mask)
    if padding == "left":
        assert fast.stats.engine == "reference"
        assert "padded before a real token (left padding)" in fast.stats.fallback_reason
        assert "left padding" in caplog.text
    else:
        assert fast.stats.engine == "fast" and fast.stats.fallback_reason is None
    merged = fast.effects.merge(ref.effects, on=KEYS, suffixes=("", "_ref"), validate="one_to_one")
    assert len(merged) == len(ref.effects) > 0 and (merged.seq == 1).any()
    assert np.abs(merged.delta_nll - merged.delta_nll_ref).max() <= 1e-4


def test_saved_states_are_copied_and_other_saved_tensors_still_checked():
    """Under :func:`saved_states_copied` a row's state, saved by an op and then overwritten in place (as the
    decode steps do), gives the gradient of the value it had when saved; any other saved tensor modified in
    place still fails the backward, as autograd's own check would."""
    from moeaudit.intervene.recurrent import row_cache, saved_states_copied

    moe = make_moe("granitemoehybrid")
    clean = capture_clean(moe, _ids(1, 12))
    cache = row_cache(moe, clean.states.after(torch.tensor([3, 7])), clean.layout)
    state = cache.layers[clean.states.layers[0]].recurrent_states[0]
    before = state.clone()
    other = torch.randn(state.shape)
    x = torch.randn(state.shape, requires_grad=True)
    with torch.enable_grad(), saved_states_copied(cache):
        through_state = (state * x).sum()
        through_other = (other * x).sum()
    state.add_(1.0)
    other.add_(1.0)
    (grad,) = torch.autograd.grad(through_state, [x])
    assert torch.equal(grad, before) and not torch.equal(grad, state)
    with pytest.raises(RuntimeError, match="modified in place"):
        torch.autograd.grad(through_other, [x])
