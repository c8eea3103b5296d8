"""The fast engine's passes against full forwards: clean replay, token rows, sequence rows."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from moeaudit.intervene.clean import capture_clean
from moeaudit.intervene.delta import routed_delta, routed_output_after
from moeaudit.intervene.fast import forward_rows, run_sequence_rows
from moeaudit.models import Ablation
from moeaudit.models.testing import RECURRENT_FAMILIES


def test_clean_pass_is_bit_identical_and_restores_the_model(moe, input_ids):
    original = moe.model.config._attn_implementation
    with torch.no_grad():
        plain = moe.model(input_ids[:1]).logits[0]
    clean = capture_clean(moe, input_ids[:1])
    assert torch.equal(clean.logits, plain)
    assert moe.model.config._attn_implementation == original
    # keys/values for every attention layer, a state sweep over every recurrent one, nothing missing
    layout = clean.layout
    # caches are keyed by the attention modules' layer_idx: LongCat-Flash has two per decoder layer, 2i and 2i + 1
    attention_ids = ({2 * i + j for i in layout.attention for j in (0, 1)} if moe.name == "longcat_flash"
                     else set(layout.attention))
    assert set(clean.caches) == attention_ids and not layout.both
    assert set(layout.attention) | set(layout.recurrent) <= set(range(moe.num_decoder_layers))
    assert (clean.states is None) == (not layout.recurrent)
    assert bool(layout.recurrent) == (moe.name in RECURRENT_FAMILIES)
    assert clean.valid_next.tolist() == [True] * (input_ids.shape[1] - 1) + [False]


def test_null_rows_reproduce_clean_logits(moe, input_ids):
    """Every position restarted from every layer, with no change, gives back the clean logits."""
    clean = capture_clean(moe, input_ids[:1])
    positions = torch.arange(clean.seq_len)
    # a recurrent layer's clean pass runs its chunked kernel, the rows its decode step: rounding apart (~1e-5
    # of logits ~4 here), where attention rows and the native attention agree to a few 1e-6
    atol = 1e-4 if moe.name in RECURRENT_FAMILIES else 2e-5
    for first in range(moe.num_decoder_layers + 1):
        hidden = (clean.layer_input[first] if first < moe.num_decoder_layers else clean.layer_output[-1])[positions]
        with torch.no_grad():
            logits = forward_rows(moe, clean, first, hidden.unsqueeze(1), positions)[:, 0]
        assert torch.allclose(logits, clean.logits, atol=atol, rtol=1e-5), first


def intervened_output(layer, record, positions, removed, kind="zero"):
    """The block's output after the intervention, from its parts, as the engine forms it for rows that restart
    at the block (a norm after it: FlexOlmo, Kolibri-1, A.X-K1)."""
    routed = routed_output_after(layer, record, positions, removed, kind)
    return routed if record.shared_output is None else routed + record.shared_output[positions]


def test_sequence_scope_exact_and_untouched_before_first_use(moe, input_ids):
    clean = capture_clean(moe, input_ids[:1])
    layer = moe.layers[-1]
    record = clean.records[layer.layer]
    expert = int(record.topk_idx[6, 0])  # active at position 6
    where = torch.nonzero((record.topk_idx == expert).any(-1))[:, 0]
    first_use = int(where.min())
    removed = torch.zeros(len(where), layer.num_experts, dtype=torch.bool)
    removed[:, expert] = True
    with torch.no_grad():
        delta = routed_delta(layer, record, where, removed, "zero")
        output = intervened_output(layer, record, where, removed)
        (fast_dn, _, _), = run_sequence_rows(moe, clean, layer.layer, [(where, delta)], max_logit_elements=1 << 20,
                                             outputs=[output])
        with moe.intervene([Ablation(layer.layer, experts=expert, positions=where.tolist())]):
            logits = moe.model(input_ids[:1]).logits[0].float()
    logprobs = torch.log_softmax(logits, -1)
    ref_dn = -logprobs[:-1].gather(-1, input_ids[0, 1:, None])[:, 0] - clean.nll[:-1]
    assert torch.all(ref_dn[:first_use] == 0)  # bit-identical before e's first use (batched_mm)
    assert torch.all(fast_dn[:first_use] == 0)
    assert (fast_dn[:-1] - ref_dn).abs().max() <= 1e-5
    assert ref_dn[first_use:].abs().max() > 1e-4


@pytest.mark.parametrize("max_logit_elements", [1, 1 << 20])
def test_sequence_rows_batching_does_not_change_results(input_ids, max_logit_elements):
    from .conftest import make_moe

    moe = make_moe("mixtral")
    clean = capture_clean(moe, input_ids[:1])
    layer = moe.layers[0]
    record = clean.records[layer.layer]
    changes = []
    for expert in range(layer.num_experts):
        where = torch.nonzero((record.topk_idx == expert).any(-1))[:, 0]
        removed = torch.zeros(len(where), layer.num_experts, dtype=torch.bool)
        removed[:, expert] = True
        with torch.no_grad():
            changes.append((where, routed_delta(layer, record, where, removed, "renorm")))
    with torch.no_grad():
        batched = run_sequence_rows(moe, clean, layer.layer, changes, max_logit_elements=max_logit_elements)
        alone = [run_sequence_rows(moe, clean, layer.layer, [change], max_logit_elements=1 << 20)[0]
                 for change in changes]
    for (a, _, _), (b, _, _) in zip(batched, alone):
        assert (a - b).abs().max() <= 1e-5


@pytest.mark.parametrize("scope", ["token", "sequence"])
def test_every_fast_call_keeps_its_logits_under_the_budget(moe, input_ids, monkeypatch, scope):
    """The logits of one call (rows x [positions x] vocabulary) stay within ``max_logit_elements``, however
    many rows ``rows_per_call`` asks for, and the results do not depend on the budget."""
    import moeaudit.intervene.fast as fast

    clean = capture_clean(moe, input_ids[:1])
    vocab = clean.logits.shape[-1]
    layer = moe.layers[0]
    record = clean.records[layer.layer]
    positions = torch.nonzero(clean.valid_next)[:, 0]
    removed = torch.zeros(len(positions), layer.num_experts, dtype=torch.bool)
    removed[torch.arange(len(positions)), record.topk_idx[positions, 0]] = True
    with torch.no_grad():
        delta = routed_delta(layer, record, positions, removed, "zero")
        output = intervened_output(layer, record, positions, removed)
    shapes = []
    real = fast.forward_rows

    def recording(*args, **kwargs):
        logits = real(*args, **kwargs)
        shapes.append(tuple(logits.shape))
        return logits

    def run(budget):
        shapes.clear()
        with torch.no_grad():
            if scope == "token":
                out = fast.run_token_rows(moe, clean, layer.layer, positions, lambda rows: delta[rows],
                                          rows_per_call=256, max_logit_elements=budget,
                                          make_output=lambda rows: output[rows])
                return out["delta_nll"]
            changes = [(positions[i:i + 1], delta[i:i + 1]) for i in range(len(positions))]
            outputs = [output[i:i + 1] for i in range(len(positions))]
            return torch.stack([dn for dn, _, _ in fast.run_sequence_rows(moe, clean, layer.layer, changes,
                                                                          max_logit_elements=budget, outputs=outputs)])

    monkeypatch.setattr(fast, "forward_rows", recording)
    roomy = run(1 << 30)
    budget = 3 * vocab * (clean.seq_len if scope == "sequence" else 1)  # three rows' worth per call
    tight = run(budget)
    assert len(shapes) > 1 and all(torch.Size(shape).numel() <= budget for shape in shapes)
    # three rows per call, or fewer where the rows' recurrent states cap them (tests/intervene/test_recurrent.py)
    state_cap = clean.states.rows_per_call(layer.layer + 1) if clean.states is not None else None
    assert max(shape[0] for shape in shapes) == min(3, state_cap or 3) or scope == "sequence"
    # batch shapes round differently; rows restarting at a block with a norm after it (FlexOlmo) carry one more
    # layer's rounding through that norm
    assert torch.equal(roomy, tight) or (roomy - tight).abs().max() <= (2e-5 if fast.restarts_at_block(moe) else 1e-5)


def test_null_rows_give_exactly_zero_outcomes_whatever_the_chunking(input_ids):
    """The clean logits fed back as rows (any order, more rows than one KL chunk) give ΔNLL = 0 and KL = 0
    exactly: the KL's two float64 sums are formed row by row the same way (``OUTCOME_ROWS`` at a time)."""
    from moeaudit.intervene.fast import OUTCOME_ROWS, token_outcomes

    from .conftest import make_moe

    clean = capture_clean(make_moe("olmoe"), input_ids[:1])
    positions = torch.arange(clean.seq_len - 1).flip(0).repeat(3)  # reversed, repeated
    assert len(positions) > 2 * OUTCOME_ROWS
    delta_nll, kl, flip = token_outcomes(clean.logits[positions], clean, positions)
    assert torch.all(delta_nll == 0) and torch.all(kl == 0) and not flip.any()


def test_token_outcomes_equal_a_float64_brute_force_on_random_logits(input_ids):
    """ΔNLL, KL(clean ‖ rows) and the top-1 flip of rows far from the clean ones (more rows than one
    log-softmax chunk, so several chunks are formed) equal scipy's float64 log-softmax and relative entropy."""
    from scipy.special import log_softmax, rel_entr

    from moeaudit.intervene.fast import OUTCOME_ROWS, token_outcomes

    from .conftest import make_moe

    clean = capture_clean(make_moe("olmoe"), input_ids[:1])
    positions = torch.arange(clean.seq_len - 1).repeat(3)
    assert len(positions) > 2 * OUTCOME_ROWS
    logits = clean.logits[positions] + 3 * torch.randn(len(positions), clean.logits.shape[-1],
                                                       generator=torch.Generator().manual_seed(1))
    delta_nll, kl, flip = token_outcomes(logits, clean, positions)
    q = log_softmax(logits.double().numpy(), axis=-1)
    p = log_softmax(clean.logits[positions].double().numpy(), axis=-1)
    targets = clean.input_ids[positions + 1].numpy()
    rows = range(len(positions))
    expected_nll = -q[rows, targets] + p[rows, targets]
    expected_kl = rel_entr(np.exp(p), np.exp(q)).sum(-1)
    np.testing.assert_allclose(delta_nll.numpy(), expected_nll, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(kl.numpy(), expected_kl, rtol=1e-5, atol=1e-6)
    assert expected_kl.min() > 0.1  # far from the clean rows: a KL of 0 would fail
    assert flip.numpy().tolist() == (q.argmax(-1) != p.argmax(-1)).tolist() and flip.any() and not flip.all()


@pytest.mark.parametrize("scope", ["token", "sequence", "estimate"])
def test_one_calls_logits_are_freed_before_the_next_call_forms_its_own(input_ids, monkeypatch, scope):
    """At most one call's rows x vocabulary logits are alive at a time: a loop variable that still held the
    previous call's logits while the next were formed doubled the census's peak over the clean pass."""
    import weakref

    import moeaudit.intervene.estimate as estimate
    import moeaudit.intervene.fast as fast

    from .conftest import make_moe

    moe = make_moe("olmoe")
    clean = capture_clean(moe, input_ids[:1])
    layer = moe.layers[0]
    record = clean.records[layer.layer]
    alive, calls = [], []
    real = fast.forward_rows

    def tracked(*args, **kwargs):
        calls.append([ref() is not None for ref in alive])
        logits = real(*args, **kwargs)
        alive.append(weakref.ref(logits))
        return logits

    monkeypatch.setattr(fast, "forward_rows", tracked)
    monkeypatch.setattr(estimate, "forward_rows", tracked)
    positions = torch.nonzero(clean.valid_next)[:, 0]
    if scope == "token":
        with torch.no_grad():
            fast.run_token_rows(moe, clean, layer.layer, positions, lambda rows: record.moe_output[positions[rows]],
                                rows_per_call=4)
    elif scope == "sequence":
        changes = [(positions[i:], record.moe_output[positions[i:]]) for i in range(6)]
        with torch.no_grad():
            fast.run_sequence_rows(moe, clean, layer.layer, changes, max_logit_elements=clean.logits.shape[-1] * 20,
                                   max_rows=1)
    else:
        estimate.nll_gradients(moe, clean, [layer.layer], positions, rows_per_call=4)
    assert len(calls) > 3 and not any(any(previous) for previous in calls)


def test_a_recurrent_layer_stepped_one_position_at_a_time_gets_that_positions_extra_arguments():
    """Rows through a recurrent layer run one position at a time; a family's per-position layer arguments
    (Gemma 4's per-layer inputs) follow them, while shared objects (its shared keys/values) are passed as they
    are."""
    from moeaudit.intervene.fast import _position

    per_position = torch.arange(2 * 3 * 4).reshape(2, 3, 4)
    shared: dict = {}
    step = _position({"per_layer_input": per_position, "shared_kv_states": shared}, 1)
    assert torch.equal(step["per_layer_input"], per_position[:, 1:2]) and step["shared_kv_states"] is shared
    assert _position(None, 0) is None
