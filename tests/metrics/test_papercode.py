"""paper_code_utilization and paper_code_mean_weight_active against re-computations written the way the
released OLMoE script of arXiv 2606.10703 computes them (loops over experts and tokens on a logit matrix)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from numpy.testing import assert_allclose

from moeaudit.errors import InvalidParameterError
from moeaudit.metrics import compute_expert_metrics, paper_code_mean_weight_active, paper_code_utilization
from moeaudit.metrics.papercode import global_topk_threshold


def script_style(all_routing: np.ndarray, top_k: int) -> tuple[np.ndarray, np.ndarray]:
    """The script's loop: per expert, the mean over every row, and the OR-ed mask over every token's threshold."""
    utilization, when_active = [], []
    for expert_idx in range(all_routing.shape[1]):
        expert_routing = all_routing[:, expert_idx]
        utilization.append(float(expert_routing.mean()))
        active_mask = np.zeros(len(expert_routing), dtype=bool)
        for token_weights in all_routing:
            top_k_threshold = np.sort(token_weights)[-top_k]
            active_mask |= (expert_routing >= top_k_threshold)
        active_weights = expert_routing[active_mask]
        when_active.append(float(active_weights.mean()) if len(active_weights) > 0 else np.nan)
    return np.array(utilization), np.array(when_active)


def routing_from_logits(logits: np.ndarray, top_k: int, seqs: np.ndarray, poss: np.ndarray) -> pd.DataFrame:
    """moeaudit's routing rows (one per token and selected expert) for a logit matrix, softmax gates."""
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    rows = []
    for t in range(len(logits)):
        for slot, e in enumerate(np.argsort(-logits[t], kind="stable")[:top_k]):
            rows.append((0, seqs[t], poss[t], slot, int(e), probs[t, e]))
    return pd.DataFrame(rows, columns=["layer", "seq", "pos", "slot", "expert", "raw_gate"])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_metrics_equal_the_script_loops(seed):
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(40, 8)) * rng.uniform(0.5, 3.0, size=8)  # experts of different scales
    utilization, when_active = script_style(logits, top_k=3)
    assert_allclose(paper_code_utilization(logits), utilization, rtol=1e-12, atol=0)
    assert_allclose(paper_code_mean_weight_active(logits, 3), when_active, rtol=1e-12, atol=1e-15)
    # the mask is the batch's smallest threshold (hand count: the script's mask, recomputed, equals ours)
    tau = global_topk_threshold(logits, 3)
    assert tau == min(np.sort(row)[-3] for row in logits)


def test_hand_worked_case():
    # 3 tokens, 3 experts, top-1; thresholds 2, 1, 3 -> tau_min = 1
    z = np.array([[2.0, 0.0, 1.0],
                  [0.5, 1.0, -1.0],
                  [0.0, 3.0, 1.5]])
    assert_allclose(paper_code_utilization(z), [2.5 / 3, 4.0 / 3, 1.5 / 3])
    # active (z >= 1): expert 0 {2}, expert 1 {1, 3}, expert 2 {1, 1.5}
    assert_allclose(paper_code_mean_weight_active(z, 1), [2.0, 2.0, 1.25])
    # an expert that reaches no threshold is NaN, not the script's 0.0 (it is in no token's top-k)
    z2 = np.array([[2.0, -5.0], [3.0, -4.0]])
    assert np.isnan(paper_code_mean_weight_active(z2, 1)[1])


def test_differs_from_the_per_token_definitions():
    # expert 0 is routed at one token with a large logit; expert 1 at two tokens with small ones
    z = np.array([[4.0, 0.5, 0.0], [-3.0, 0.6, 0.0], [-3.0, 0.7, 0.0]])
    routing = routing_from_logits(z, 1, np.zeros(3, dtype=np.int64), np.arange(3))
    table = compute_expert_metrics(routing, {0: 3}, router_logits={0: z})
    # the paper's wording: expert 1 is used more (2/3 > 1/3); the script's "utilization": expert 0 (-2/3 < 0.6)
    assert table.frequency[1] > table.frequency[0]
    assert table.paper_code_utilization[1] > table.paper_code_utilization[0]  # here both agree ...
    z[1:, 0] = 2.0  # ... until expert 0's logits rise below the token's top-1: routing unchanged
    z[1:, 1] = 2.5
    routing = routing_from_logits(z, 1, np.zeros(3, dtype=np.int64), np.arange(3))
    table = compute_expert_metrics(routing, {0: 3}, router_logits={0: z})
    assert table.frequency[1] > table.frequency[0]
    assert table.paper_code_utilization[0] > table.paper_code_utilization[1]  # 8/3 > 5.5/3: the ranking flips


def test_registry_reads_router_logits_rows_in_seq_pos_order_and_seqs():
    rng = np.random.default_rng(5)
    seqs, poss = np.repeat([0, 1, 2], 5), np.tile(np.arange(5), 3)
    z = rng.normal(size=(15, 6))
    routing = routing_from_logits(z, 2, seqs, poss).sample(frac=1.0, random_state=0)  # row order is irrelevant
    table = compute_expert_metrics(routing, {0: 6}, router_logits={0: z},
                                   metrics=["paper_code_utilization", "paper_code_mean_weight_active"])
    u, w = script_style(z, 2)
    assert_allclose(table.paper_code_utilization, u, rtol=1e-12)
    assert_allclose(table.paper_code_mean_weight_active, w, rtol=1e-12)
    part = compute_expert_metrics(routing, {0: 6}, router_logits={0: z}, seqs=[0, 2])
    u, w = script_style(z[np.isin(seqs, [0, 2])], 2)
    assert_allclose(part.paper_code_utilization, u, rtol=1e-12)
    assert_allclose(part.paper_code_mean_weight_active, w, rtol=1e-12)
    # without logits the columns are NaN by default, and an explicit request names the missing input
    assert compute_expert_metrics(routing, {0: 6})[["paper_code_utilization", "paper_code_mean_weight_active"]
                                                   ].isna().all().all()
    from moeaudit.metrics import MissingInputError

    with pytest.raises(MissingInputError, match="router_logits"):
        compute_expert_metrics(routing, {0: 6}, metrics=["paper_code_utilization"])


def test_bad_inputs_are_one_line():
    with pytest.raises(InvalidParameterError, match="`router_logits` must be a 2-D array"):
        paper_code_utilization(np.zeros(4))
    with pytest.raises(InvalidParameterError, match="`router_logits` must be finite values"):
        paper_code_utilization(np.array([[0.0, np.nan]]))
    with pytest.raises(InvalidParameterError, match="`top_k` must be an int in \\[1, 2\\]"):
        paper_code_mean_weight_active(np.zeros((2, 2)), 3)
    routing = routing_from_logits(np.zeros((2, 3)), 1, np.zeros(2, dtype=np.int64), np.arange(2))
    with pytest.raises(InvalidParameterError, match=r"`router_logits\[0\]` must be an array of shape \(2, 3\)"):
        compute_expert_metrics(routing, {0: 3}, router_logits={0: np.zeros((3, 3))})
    with pytest.warns(RuntimeWarning, match="no tokens"):
        assert np.isnan(paper_code_utilization(np.zeros((0, 3)))).all()
    uneven = pd.concat([routing, routing.iloc[:1].assign(expert=2, slot=1)], ignore_index=True)  # k = 2, then 1
    with pytest.warns(RuntimeWarning, match="no single top-k"):
        table = compute_expert_metrics(uneven, {0: 3}, router_logits={0: np.zeros((2, 3))},
                                       metrics=["paper_code_mean_weight_active"])
    assert table.paper_code_mean_weight_active.isna().all()


@pytest.mark.skipif(not __import__("moeaudit.models.builtin", fromlist=["builtin_path"]).builtin_path("tiny-olmoe")
                    .joinpath("model.safetensors").exists(), reason="built-in model weights not present")
def test_builtin_model_logits_recorded_and_rankings_move(tmp_path):
    """On the built-in model: observe records the router logits transformers computes; the metrics stage gives
    the script's values; and the script's definitions pick another highest or lowest active expert than the
    corrected ones at some tokens (measured, so this fails if the two rank every active set alike)."""
    import torch

    from moeaudit.config import AuditConfig
    from moeaudit.metrics.stage import run_metrics
    from moeaudit.models import load_model
    from moeaudit.observe import read_router_logits
    from moeaudit.observe.stage import run_observe
    from moeaudit.rundir import RunDir

    moe = load_model("tiny-olmoe")
    config = AuditConfig(model="tiny-olmoe", corpus="builtin", max_windows=3, max_len=32, in_sample=True,
                         router_logits_layers="all")
    run = RunDir(tmp_path / "run", config)
    run_observe(run, moe=moe)
    run_metrics(run, moe=moe)
    tokens, routing, table = run.read("tokens"), run.read("routing"), run.read("expert_metrics")
    logits = read_router_logits(run.table_path("router_logits"))
    assert sorted(logits) == sorted(layer.layer for layer in moe.layers)
    seq = int(tokens.seq.min())
    ids = torch.tensor(tokens[tokens.seq == seq].sort_values("pos").token_id.to_numpy(), dtype=torch.long)[None]
    with torch.no_grad():
        reference = [r for r in moe.model(ids, output_router_logits=True).router_logits if r is not None]
    order = np.lexsort((tokens.pos, tokens.seq))
    first = (tokens.seq.to_numpy()[order] == seq)
    for layer, want in zip(moe.layers, reference):
        assert_allclose(logits[layer.layer][first], want.float().numpy().reshape(ids.shape[1], -1), atol=1e-5)
    flips = 0
    for layer in moe.layers:
        scores = table[table.layer == layer.layer].set_index("expert")
        u, w = script_style(logits[layer.layer].astype(np.float64), layer.top_k)
        assert_allclose(scores.paper_code_utilization, u, rtol=1e-9)
        assert_allclose(scores.paper_code_mean_weight_active, w, rtol=1e-9)
        for _, active in routing[routing.layer == layer.layer].groupby(["seq", "pos"]).expert:
            experts = np.sort(active.to_numpy())
            for corrected, code in (("frequency", "paper_code_utilization"),
                                    ("mean_gate_active", "paper_code_mean_weight_active")):
                a, b = scores.loc[experts, corrected].to_numpy(), scores.loc[experts, code].to_numpy()
                flips += int(experts[a.argmax()] != experts[b.argmax()] or experts[a.argmin()] != experts[b.argmin()])
    assert flips > 0
