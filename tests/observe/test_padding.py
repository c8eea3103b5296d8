"""paper_code_padding: the released scripts' padding rows (arXiv 2606.10703 pooled them into every metric)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from numpy.testing import assert_allclose

from moeaudit.config import AuditConfig
from moeaudit.errors import InvalidParameterError
from moeaudit.metrics.stage import run_metrics
from moeaudit.models import load_model
from moeaudit.observe import read_router_logits
from moeaudit.observe.stage import run_observe
from moeaudit.rundir import RunDir

from tests.metrics.test_papercode import script_style


@pytest.fixture(scope="module")
def padded_run(tmp_path_factory):
    moe = load_model("tiny-olmoe")
    config = AuditConfig(model="tiny-olmoe", corpus="builtin", max_windows=3, max_len=192, in_sample=True,
                         truncate=True, router_logits_layers="all", paper_code_padding=True, batch_size=2)
    run = RunDir(tmp_path_factory.mktemp("padded") / "run", config)
    info = run_observe(run, moe=moe)
    run_metrics(run, moe=moe)
    return moe, run, info


def test_padding_rows_are_the_padded_forward_pass_at_padding_positions(padded_run):
    moe, run, info = padded_run
    tokens = run.read("tokens")
    lengths = tokens.groupby("seq").size()
    pad_to = int(lengths.max())
    assert lengths.min() < pad_to  # the built-in documents differ in length, so some windows are padded
    padding = run.read("padding_routing")
    k = moe.layers[0].top_k
    expected_rows = int((pad_to - lengths).sum()) * len(moe.layers) * k
    assert len(padding) == expected_rows == info["padding_routing_rows"]
    assert (padding.merge(lengths.rename("n").reset_index(), on="seq").eval("pos >= n")).all()
    logits = read_router_logits(run.table_path("padding_router_logits"))
    # transformers' own forward pass on the right-padded batch, with its attention mask
    ids = torch.full((len(lengths), pad_to), moe.model.config.pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, seq in enumerate(lengths.index):
        own = tokens[tokens.seq == seq].sort_values("pos").token_id.to_numpy()
        ids[row, :len(own)] = torch.from_numpy(own.copy())
        mask[row, :len(own)] = 1
    with torch.no_grad():
        reference = [r for r in moe.model(ids, attention_mask=mask, output_router_logits=True).router_logits
                     if r is not None]
    pads = (mask.reshape(-1) == 0).numpy()
    for layer, want in zip(moe.layers, reference):
        assert_allclose(logits[layer.layer], want.float().numpy()[pads], atol=1e-5)


def test_metrics_pool_padding_as_the_scripts_did(padded_run):
    moe, run, _ = padded_run
    table = run.read("expert_metrics")
    real = read_router_logits(run.table_path("router_logits"))
    pad = read_router_logits(run.table_path("padding_router_logits"))
    n_real = run.read("tokens").shape[0]
    for layer in moe.layers:
        pooled = np.concatenate([real[layer.layer], pad[layer.layer]]).astype(np.float64)
        utilization, when_active = script_style(pooled, layer.top_k)  # order does not matter to either
        scores = table[table.layer == layer.layer].set_index("expert")
        assert_allclose(scores.paper_code_utilization, utilization, rtol=1e-9)
        assert_allclose(scores.paper_code_mean_weight_active, when_active, rtol=1e-9)
        assert_allclose(scores["count"].sum(), len(pooled) * layer.top_k)  # every padding row counted
        assert len(pooled) > n_real


def test_padding_needs_a_pad_token(tmp_path):
    moe = load_model("tiny-olmoe")
    from moeaudit.observe.forward import WindowInput, observe_padding

    moe.model.config.pad_token_id = None
    try:
        with pytest.raises(InvalidParameterError, match="pad_token_id"):
            observe_padding(moe, [WindowInput(0, np.arange(3, 8), None, None)], pad_to=8, layers=[moe.layers[0].layer])
    finally:
        moe.model.config.pad_token_id = load_model("tiny-olmoe").model.config.pad_token_id
