"""frequency and mean_gate_active on the routing of a tiny random OLMoE, against numpy on its logits."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from numpy.testing import assert_allclose, assert_array_equal

from moeaudit.metrics import compute_expert_metrics

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


def test_tiny_olmoe_routing():
    torch.manual_seed(0)
    config = transformers.OlmoeConfig(
        vocab_size=64, hidden_size=32, intermediate_size=16, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, num_experts=8, num_experts_per_tok=2,
        bos_token_id=None, eos_token_id=None, pad_token_id=None,
    )
    model = transformers.OlmoeForCausalLM(config).eval()
    batch, length, k = 3, 6, config.num_experts_per_tok
    input_ids = torch.randint(0, config.vocab_size, (batch, length))
    with torch.no_grad():
        out = model(input_ids=input_ids, output_router_logits=True)
    assert len(out.router_logits) == config.num_hidden_layers

    rows, want = [], {}
    for layer, logits in enumerate(out.router_logits):
        probs = torch.softmax(logits.float(), dim=-1)  # [batch * length, E]
        gate, idx = torch.topk(probs, k, dim=-1)
        for t in range(batch * length):
            for slot in range(k):
                rows.append((layer, t // length, t % length, slot, int(idx[t, slot]), float(gate[t, slot])))
        # direct numpy computation from the logits
        p = np.exp(logits.double().numpy())
        p /= p.sum(axis=1, keepdims=True)
        active = np.argsort(-p, axis=1)[:, :k]
        mask = np.zeros_like(p, dtype=bool)
        np.put_along_axis(mask, active, True, axis=1)
        with np.errstate(invalid="ignore"):
            want[layer] = (mask.mean(axis=0), np.where(mask.any(0), (p * mask).sum(0) / mask.sum(0), np.nan))

    routing = pd.DataFrame(rows, columns=["layer", "seq", "pos", "slot", "expert", "raw_gate"])
    routing = routing.assign(combine_weight=routing.raw_gate, act_norm=1.0)  # norm_topk_prob=False
    table = compute_expert_metrics(routing, {0: 8, 1: 8})
    for layer, (frequency, mean_gate) in want.items():
        part = table[table.layer == layer]
        assert_array_equal(part.expert, np.arange(8))
        assert_allclose(part.frequency, frequency)
        assert_allclose(part.mean_gate_active, mean_gate, rtol=1e-5)
        assert_allclose(part.ean_mean[part["count"] > 0], 1.0)
    assert_allclose(table.groupby("layer").frequency.sum(), [k, k])
