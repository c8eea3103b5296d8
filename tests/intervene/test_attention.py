"""The row attention kernel against transformers' eager attention (GQA, sliding windows, sinks)."""

from __future__ import annotations

import pytest
import torch

from moeaudit.intervene.attention import AttentionState, attention_mode, rows_attention


def eager_reference(query, key, value, allowed, scaling, sinks=None):
    """Plain softmax attention of full sequences: query [Hq, T, D], key/value [Hkv, T, D], allowed [T, T]."""
    groups = query.shape[0] // key.shape[0]
    key = key.repeat_interleave(groups, 0)
    value = value.repeat_interleave(groups, 0)
    logits = (query @ key.transpose(1, 2)) * scaling
    logits = logits.masked_fill(~allowed, float("-inf"))
    if sinks is not None:
        logits = torch.cat([logits, sinks[:, None, None].expand(-1, logits.shape[1], 1)], dim=-1)
    probs = torch.softmax(logits, dim=-1)[..., :allowed.shape[-1]]
    return probs @ value  # [Hq, T, Dv]


@pytest.mark.parametrize("window", [None, 4])
@pytest.mark.parametrize("with_sinks", [False, True])
@pytest.mark.parametrize("span", [1, 3])
def test_rows_attention_equals_full_attention(window, with_sinks, span):
    gen = torch.Generator().manual_seed(0)
    seq, hq, hkv, d, dv = 12, 4, 2, 8, 6
    query = torch.randn(hq, seq, d, generator=gen)
    key = torch.randn(hkv, seq, d, generator=gen)
    value = torch.randn(hkv, seq, dv, generator=gen)
    sinks = torch.randn(hq, generator=gen) if with_sinks else None
    i = torch.arange(seq)
    allowed = i[None, :] <= i[:, None]
    if window is not None:
        allowed &= i[None, :] > i[:, None] - window
    full = eager_reference(query, key, value, allowed, 0.3, sinks)
    starts = torch.tensor([0, 2, 5, seq - span])
    span_idx = starts[:, None] + torch.arange(span)[None]
    q_rows = query[:, span_idx].permute(1, 0, 2, 3)  # [R, Hq, S, D]
    k_rows = key[:, span_idx].permute(1, 0, 2, 3)
    v_rows = value[:, span_idx].permute(1, 0, 2, 3)
    prefix = int(starts.max())
    allow_clean = allowed[span_idx][..., :prefix] & (torch.arange(prefix)[None, None] < starts[:, None, None])
    allow_own = allowed[span_idx].gather(-1, span_idx[:, None, :].expand(-1, span, -1))
    out, _ = rows_attention(q_rows, k_rows, v_rows, key, value, allow_clean, allow_own, scaling=0.3, sinks=sinks)
    expected = full[:, span_idx].permute(1, 2, 0, 3)  # [R, S, Hq, Dv]
    assert torch.allclose(out, expected, atol=1e-6)


def test_attention_mode_restores_on_error(moe, input_ids):
    original = moe.model.config._attn_implementation
    with pytest.raises(RuntimeError, match="boom"):
        with attention_mode(moe.model, AttentionState(mode="record", native=original)):
            raise RuntimeError("boom")
    assert moe.model.config._attn_implementation == original
    with torch.no_grad():
        moe.model(input_ids[:1])  # still runs natively


def test_dense_causal_pattern_check():
    """The record pass's check on layers with an indexer: the causal pattern over the real keys passes (right or
    left padding included); a dropped key, a sliding window or a pattern with no real query does not."""
    from moeaudit.intervene.attention import _dense_causal

    causal = torch.ones(6, 6, dtype=torch.bool).tril()
    assert _dense_causal(causal)
    right = causal.clone()
    right[:, 4:] = False  # two padded keys; padded queries see the real keys before them
    assert _dense_causal(right)
    left = causal.clone()
    left[:, :2] = False
    left[:2] = False
    assert _dense_causal(left)
    dropped = causal.clone()
    dropped[5, 1] = False
    assert not _dense_causal(dropped)
    sliding = causal & ~torch.ones(6, 6, dtype=torch.bool).tril(-3)
    assert not _dense_causal(sliding)
    assert not _dense_causal(torch.zeros(6, 6, dtype=torch.bool))
