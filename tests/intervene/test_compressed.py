"""DeepSeek-V4's compressed attention in the fast engine's rows (:mod:`moeaudit.intervene.compressed`): each row's
compressed entries are the clean ones before its first position's block and recomputed from there."""

from __future__ import annotations

import pytest
import torch

from moeaudit.intervene import InterveneConfig, Selection, compute_effects
from moeaudit.intervene import compressed as compressed_module
from moeaudit.intervene.attention import UnsupportedAttention
from moeaudit.intervene.clean import capture_clean
from moeaudit.models import wrap_model
from moeaudit.models.testing import tiny_model

IDS = torch.randint(3, 96, (1, 21), generator=torch.Generator().manual_seed(2))
KEYS = ["layer", "seq", "pos", "expert", "kind", "scope"]


@pytest.fixture(scope="module")
def moe():
    """Sliding, CSA (entries of 4 positions) and HCA (of 8) layers; hash-routed MoE in the first."""
    return wrap_model(tiny_model("deepseek_v4", seed=3), name="deepseek_v4")


def test_the_clean_pass_records_each_compressed_layer(moe):
    clean = capture_clean(moe, IDS)
    assert clean.caches[0].compressed is None  # sliding only
    csa, hca = clean.caches[1].compressed, clean.caches[2].compressed
    assert csa.entries.shape[0] == 21 // 4 and hca.entries.shape[0] == 21 // 8
    assert csa.kv.shape == (21, 2 * 16) and hca.kv.shape == (21, 16)  # CSA's two series, HCA's one
    assert clean.caches[1].key.shape[1] == 21  # the positions' keys alone


@pytest.mark.parametrize("start", [0, 3, 4, 7, 8, 13, 19])
def test_rows_of_clean_hidden_states_see_the_clean_entries(moe, start):
    """A row holding the clean attention inputs of positions start.. (a null intervention) recomputes exactly
    the clean entries, and its query p sees entry w iff w < (p + 1) // m."""
    inputs: dict = {}
    found = compressed_module.compressors(moe.model)
    handles = [c.register_forward_pre_hook(lambda module, args, layer=layer: inputs.__setitem__(layer, args[0]))
               for layer, c in found.items()]
    try:
        clean = capture_clean(moe, IDS)
    finally:
        for handle in handles:
            handle.remove()
    span = 21 - start
    positions = torch.arange(start, 21)[None]
    for layer, compressor in found.items():
        cache = clean.caches[layer].compressed
        entries, allowed = compressed_module.row_entries(compressor, cache, inputs[layer][:, start:], positions)
        torch.testing.assert_close(entries[0], cache.entries, rtol=0, atol=1e-6)
        m = int(compressor.compress_rate)
        expected = torch.tensor([[w < (p + 1) // m for w in range(entries.shape[1])] for p in range(start, 21)])
        assert torch.equal(allowed[0], expected) and allowed.shape == (1, span, 21 // m)


def test_the_rows_need_their_recomputed_entries(moe):
    """Every active expert at every position, both scopes: the fast engine equals the reference to rounding;
    rows that kept the clean entries instead (stale where the row's own position closes a block) would miss
    by far more, and the engine's self-check would send such a model to the reference engine."""
    config = dict(kinds=("zero",), scopes=("token", "sequence"))
    reference = compute_effects(moe, IDS, Selection.census(), config=InterveneConfig(engine="reference", **config))
    fast = compute_effects(moe, IDS, Selection.census(), config=InterveneConfig(**config))
    assert fast.stats.engine == "fast" and fast.stats.fallback_reason is None
    merged = fast.effects.merge(reference.effects, on=KEYS, suffixes=("", "_ref"), validate="one_to_one")
    assert len(merged) == len(reference.effects) and (merged.delta_nll - merged.delta_nll_ref).abs().max() < 1e-5

    def stale(compressor, cache, hidden, position_ids):
        m = int(compressor.compress_rate)
        count = int(((position_ids[:, 0] + position_ids.shape[1]) // m).max())
        entries = cache.entries[:count].unsqueeze(0).expand(position_ids.shape[0], -1, -1)
        return entries, compressed_module.visible(position_ids, count, m)

    from moeaudit.intervene import spotcheck

    original = compressed_module.row_entries
    compressed_module.row_entries = stale
    spotcheck._VERDICTS[moe.model] = None  # no self-check: the raw rows
    try:
        wrong = compute_effects(moe, IDS, Selection.census(), config=InterveneConfig(**config))
    finally:
        compressed_module.row_entries = original
        del spotcheck._VERDICTS[moe.model]
    merged = wrong.effects.merge(reference.effects, on=KEYS, suffixes=("", "_ref"), validate="one_to_one")
    assert (merged.delta_nll - merged.delta_nll_ref).abs().max() > 1e-2


def test_a_replay_that_differs_from_the_library_is_refused(moe, monkeypatch):
    """The clean pass checks moeaudit's replay of the entries against the library's own on every window."""
    original = compressed_module.pooled_entries
    monkeypatch.setattr(compressed_module, "pooled_entries",
                        lambda *args: original(*args) * (1 + 1e-3))
    with pytest.raises(UnsupportedAttention, match="replay of the compressed attention does not reproduce"):
        capture_clean(moe, IDS)


def test_a_window_shorter_than_a_block_has_no_entries(moe):
    """An HCA layer of 8-position blocks on 6 tokens: no entry in the clean pass nor in the rows; still fast."""
    ids = IDS[:, :6]
    clean = capture_clean(moe, ids)
    assert clean.caches[2].compressed.entries.shape[0] == 0 and clean.caches[1].compressed.entries.shape[0] == 1
    config = dict(kinds=("zero",), scopes=("token", "sequence"))
    fast = compute_effects(moe, ids, Selection.census(), config=InterveneConfig(**config))
    reference = compute_effects(moe, ids, Selection.census(), config=InterveneConfig(engine="reference", **config))
    assert fast.stats.engine == "fast"
    merged = fast.effects.merge(reference.effects, on=KEYS, suffixes=("", "_ref"), validate="one_to_one")
    assert len(merged) == len(reference.effects) and (merged.delta_nll - merged.delta_nll_ref).abs().max() < 1e-5
