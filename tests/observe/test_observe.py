"""Observe: tables follow the data contract and agree with independent recomputation."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from moeaudit.config import AuditConfig
from moeaudit.data import Document, build_windows
from moeaudit.metrics.stage import run_metrics
from moeaudit.models import wrap_model
from moeaudit.models.testing import tiny_model
from moeaudit.observe import WindowInput, observe, read_router_probs
from moeaudit.observe.stage import run_observe
from moeaudit.rundir import RunDir

LENGTHS = [9, 14, 5, 14, 11]


@pytest.fixture(scope="module", params=["olmoe", "deepseek_v2", "gpt_oss"])
def moe(request):
    return wrap_model(tiny_model(request.param, seed=5), name=request.param)


@pytest.fixture(scope="module")
def windows():
    gen = np.random.default_rng(0)
    return [WindowInput(seq=i, token_ids=gen.integers(3, 96, n), domain=f"d{i % 2}", split="calibration")
            for i, n in enumerate(LENGTHS)]


def run(moe, windows, tmp_path, batch_size, name="a", **kwargs):
    paths = {k: tmp_path / f"{name}_{k}.parquet" for k in ("tokens", "routing", "probs")}
    stats = observe(moe, windows, tokens_path=paths["tokens"], routing_path=paths["routing"],
                    router_probs_path=paths["probs"], router_probs_layers="all", batch_size=batch_size, **kwargs)
    return stats, pd.read_parquet(paths["tokens"]), pd.read_parquet(paths["routing"]), paths["probs"]


def test_tables_follow_contract_and_skip_padding(moe, windows, tmp_path):
    stats, tokens, routing, _ = run(moe, windows, tmp_path, batch_size=3)
    assert list(tokens.columns[:4]) == ["seq", "pos", "token_id", "nll"]
    assert {"layer", "seq", "pos", "slot", "expert", "raw_gate", "combine_weight", "act_norm"} <= set(routing.columns)
    assert len(tokens) == sum(LENGTHS) == stats.tokens
    k = moe.layers[0].top_k
    assert len(routing) == sum(LENGTHS) * k * len(moe.layers) == stats.routing_rows
    for seq, n in enumerate(LENGTHS):  # no padding position ever written
        assert routing.loc[routing.seq == seq, "pos"].max() == n - 1
        assert tokens.loc[tokens.seq == seq, "nll"].isna().sum() == 1  # only the last position
    gates = routing.sort_values(["layer", "seq", "pos", "slot"]).raw_gate.to_numpy().reshape(-1, k)
    assert np.all(np.diff(gates, axis=1) <= 0)  # slot 0 = largest raw gate
    assert np.allclose(routing.groupby(["layer", "seq", "pos"]).renorm_gate.sum(), 1.0, atol=1e-6)


def test_routing_matches_transformers_router_logits(moe, windows, tmp_path):
    """Experts and raw gates recomputed from transformers' own output_router_logits, window by window."""
    _, tokens, routing, _ = run(moe, windows, tmp_path, batch_size=2)
    k = moe.layers[0].top_k
    for window in windows:
        ids = torch.as_tensor(window.token_ids, dtype=torch.long)[None]
        with torch.no_grad():
            out = moe.model(ids, output_router_logits=True)
        recorded = [r for r in out.router_logits if r is not None]
        # NLL recomputed directly from the logits
        logp = torch.log_softmax(out.logits[0, :-1].float(), -1)
        nll = -logp.gather(-1, ids[0, 1:, None]).squeeze(-1).numpy()
        ours = tokens[tokens.seq == window.seq].sort_values("pos").nll.to_numpy()[:-1]
        assert np.allclose(ours, nll, atol=1e-5)
        for layer, logits in zip(moe.layers, recorded):
            probs = torch.softmax(logits.float(), -1).numpy()
            rows = routing[(routing.layer == layer.layer) & (routing.seq == window.seq)].sort_values(["pos", "slot"])
            experts = rows.expert.to_numpy().reshape(-1, k)
            if layer.routing_rule != "softmax_group_limited_scaled":
                expected = np.argsort(-probs, axis=1, kind="stable")[:, :k]
                assert np.array_equal(np.sort(experts, 1), np.sort(expected, 1))
            gathered = np.take_along_axis(probs, experts, axis=1)
            assert np.allclose(rows.raw_gate.to_numpy().reshape(-1, k), gathered, atol=1e-6)


def test_act_norm_matches_hand_computed_expert(windows, tmp_path):
    moe = wrap_model(tiny_model("olmoe", seed=5))
    _, _, routing, _ = run(moe, windows[:1], tmp_path, batch_size=1)
    with torch.no_grad(), moe.capture([0], keep_outputs=True) as trace:
        moe.model(torch.as_tensor(windows[0].token_ids)[None])
    x = trace[0].moe_input[0]  # [pos, H] of the one window
    experts = moe.layer(0).experts
    row = routing[(routing.layer == 0) & (routing.pos == 3) & (routing.slot == 0)].iloc[0]
    e = int(row.expert)
    gate, up = (x[3] @ experts.gate_up_proj[e].T).chunk(2)
    expected = experts.down_proj[e] @ (torch.nn.functional.silu(gate) * up)
    assert row.act_norm == pytest.approx(expected.norm().item(), rel=1e-5)
    assert row.act_max_abs == pytest.approx(expected.abs().max().item(), rel=1e-5)


def test_streaming_equals_one_shot(moe, windows, tmp_path):
    _, tok_a, rout_a, probs_a = run(moe, windows, tmp_path, batch_size=1, name="stream")
    _, tok_b, rout_b, probs_b = run(moe, windows, tmp_path, batch_size=len(windows), name="once")
    key = ["layer", "seq", "pos", "slot"]
    a, b = rout_a.sort_values(key).reset_index(drop=True), rout_b.sort_values(key).reset_index(drop=True)
    assert a[key + ["expert"]].equals(b[key + ["expert"]])
    for column in ("raw_gate", "combine_weight", "act_norm"):
        assert np.allclose(a[column], b[column], rtol=1e-5, atol=1e-6)
    assert np.allclose(tok_a.sort_values(["seq", "pos"]).nll, tok_b.sort_values(["seq", "pos"]).nll,
                       atol=1e-5, equal_nan=True)
    pa_, pb_ = read_router_probs(probs_a), read_router_probs(probs_b)
    for layer in pa_:
        assert pa_[layer].shape == (sum(LENGTHS), moe.layers[0].num_experts)
        assert np.allclose(pa_[layer], pb_[layer], atol=1e-3)


def test_router_probs_rows_sorted_and_consistent(moe, windows, tmp_path):
    _, _, routing, probs_path = run(moe, windows, tmp_path, batch_size=2)
    probs = read_router_probs(probs_path)
    layer = moe.layers[0].layer
    top = routing[(routing.layer == layer) & (routing.slot == 0)].sort_values(["seq", "pos"])
    assert np.allclose(probs[layer][np.arange(len(top)), top.expert.to_numpy()], top.raw_gate, atol=2e-3)


def char_encoder(texts):
    return [[3 + (ord(c) % 90) for c in text] for text in texts]


def test_stage_on_run_directory(tmp_path):
    moe = wrap_model(tiny_model("qwen2_moe", seed=2), name="tiny-random-qwen2")
    docs = [Document(text=f"document number {i} " * (3 + i % 5), domain=["a", "b"][i % 2], doc_id=f"doc{i}")
            for i in range(60)]
    corpus = build_windows(docs, char_encoder, max_len=24, seed=0)
    config = AuditConfig(model="tiny-random-qwen2", corpus="test", max_len=24, batch_size=4)
    rundir = RunDir(tmp_path / "run", config)
    info = run_observe(rundir, moe=moe, corpus=corpus)
    tokens = rundir.read("tokens")
    assert set(tokens.split) == {"calibration", "heldout"}
    assert info["tokens"] == len(tokens)
    # windows.parquet: each observed window's document (the audit's clusters), as the corpus cut it
    windows = rundir.read("windows")
    expected = corpus.to_frame().drop(columns="token_ids")
    expected = expected[expected.seq.isin(tokens.seq)].reset_index(drop=True)
    pd.testing.assert_frame_equal(windows, expected, check_dtype=False)
    assert (windows.groupby("seq").n_tokens.first() == tokens.groupby("seq").size()).all()
    metrics_info = run_metrics(rundir, moe=moe)
    table = rundir.read("expert_metrics")
    assert len(table) == sum(layer.num_experts for layer in moe.layers)
    assert metrics_info["split"] == "calibration"
    # held-out respected: metrics equal a computation on the calibration windows only
    routing = rundir.read("routing")
    calib = set(tokens.loc[tokens.split == "calibration", "seq"])
    sub = routing[routing.seq.isin(calib)]
    layer = moe.layers[0].layer
    counts = sub[sub.layer == layer].groupby("expert").size()
    n_tokens = sub[sub.layer == layer].groupby(["seq", "pos"]).ngroups
    got = table[table.layer == layer].set_index("expert").frequency
    assert np.allclose(got.loc[counts.index], counts / n_tokens)
    assert rundir.read("expert_metrics_by_domain").domain.nunique() == 2
    assert np.isfinite(table.aimer).all() and np.isfinite(table.router_row_norm).all()
    # re-opening with another configuration is refused in one line
    from moeaudit.errors import RunDirectoryError

    with pytest.raises(RunDirectoryError, match="differs in max_len"):
        RunDir(tmp_path / "run", config.model_copy(update={"max_len": 32}))
    assert RunDir(tmp_path / "run").manifest["stages"]["observe"]["tokens"] == len(tokens)


def test_same_length_batches_never_mix_lengths():
    from moeaudit.observe.forward import same_length_batches

    lengths = [5, 7, 5, 5, 7, 3, 5]
    batches = same_length_batches(lengths, 2)
    assert sorted(i for batch in batches for i in batch) == list(range(len(lengths)))
    assert all(len({lengths[i] for i in batch}) == 1 and len(batch) <= 2 for batch in batches)
    assert batches == [[0, 2], [3, 6], [1, 4], [5]]


@pytest.mark.parametrize("family", ["olmoe", "deepseek_v2"])
def test_tables_do_not_depend_on_batch_size_or_work_units(tmp_path, family):
    """``batch_size`` and ``unit_windows`` are execution only: windows of many lengths, observed with 1 window
    per batch and per unit, 12 per batch, or 5 per batch in units of 3, give the same tables bit for bit, and
    so the same metrics (padded batches changed act_norm / nll / router probabilities by up to ~1e-5)."""
    moe = wrap_model(tiny_model(family, seed=3), name=f"tiny-{family}")
    docs = [Document(text=f"text {i} " * (2 + i % 7), domain=["a", "b"][i % 2], doc_id=f"doc{i}") for i in range(40)]
    corpus = build_windows(docs, char_encoder, max_len=32, seed=0)
    assert len({len(w.token_ids) for w in corpus.windows}) > 5  # ragged: the case padding used to change
    runs = {}
    for batch_size, unit_windows in ((1, 1), (12, 16), (5, 3)):
        config = AuditConfig(model=f"tiny-{family}", corpus="test", max_len=32, batch_size=batch_size,
                             unit_windows=unit_windows, router_probs_layers="all")
        run = RunDir(tmp_path / f"b{batch_size}u{unit_windows}", config)
        run_observe(run, moe=moe, corpus=corpus)
        run_metrics(run, moe=moe)
        runs[batch_size] = run
    tables = ("tokens", "routing", "router_probs", "expert_metrics", "expert_metrics_by_domain")
    for other in (12, 5):
        for table in tables:
            pd.testing.assert_frame_equal(runs[1].read(table), runs[other].read(table), check_exact=True, obj=table)
    assert runs[1].manifest["stages"]["observe"]["mean_nll"] == runs[12].manifest["stages"]["observe"]["mean_nll"]
    routing = runs[1].read("routing")
    keys = routing[["seq", "layer", "pos", "slot"]].to_numpy()
    assert (np.lexsort(keys.T[::-1]) == np.arange(len(keys))).all()  # rows in (seq, layer, pos, slot) order


def test_a_corpus_without_held_out_support_is_refused_before_any_table(tmp_path):
    """Metrics on calibration windows and effects on held-out ones: a corpus that fills neither used to
    make both stages fall back to the same windows without a word (exit 0, significant cells)."""
    from moeaudit.errors import CorpusError

    moe = wrap_model(tiny_model("olmoe", seed=2), name="tiny-olmoe")
    docs = [Document(text=f"only a few documents {i} " * 3, domain=None, doc_id=f"doc{i}") for i in range(40)]
    corpus = build_windows(docs, char_encoder, max_len=24, seed=0)
    splits = {w.split for w in corpus.windows}
    train = {w.doc_id for w in corpus.windows if w.split == "train"}
    few = build_windows([d for d in docs if d.doc_id in train][:3], char_encoder, max_len=24, seed=0)
    assert {w.split for w in few.windows} == {"train"} and {"calibration", "heldout"} <= splits
    config = AuditConfig(model="tiny-olmoe", corpus="test", max_len=24, observe_splits=["train", "calibration",
                                                                                          "heldout"])
    run = RunDir(tmp_path / "run", config)
    with pytest.raises(CorpusError, match=r"^the corpus gave no calibration and no heldout windows \(documents by "
                       r"split: train 3, calibration 0, heldout 0\), so metrics and effects would be measured on "
                       r"the same windows; .* set in_sample = true"):
        run_observe(run, moe=moe, corpus=few)
    assert not run.has("tokens") and not (run.path / "units").exists()
    with pytest.raises(CorpusError, match=r"^observe_splits \['train'\] leave out calibration and heldout"):
        run_observe(RunDir(tmp_path / "train", config.model_copy(update={"observe": config.observe.model_copy(
            update={"observe_splits": ["train"]})})), moe=moe, corpus=corpus)
    # the corrected command is accepted in the same directory: in sample on purpose, recorded as such
    fixed = RunDir(tmp_path / "run", config.replace(in_sample=True))
    run_observe(fixed, moe=moe, corpus=few)
    assert run_metrics(fixed, moe=moe)["split"] == "in_sample"
