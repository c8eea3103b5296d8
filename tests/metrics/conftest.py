"""Shared hand-worked routing table for the metric tests.

One layer (0), one sequence, 3 tokens, 4 routed experts, top-2; expert 3 is never routed.
combine_weight = 2 × renorm_gate (a DeepSeek-style routed_scaling_factor of 2), so the three gates
REAP can use all differ.

    token  slot  expert  raw_gate  renorm_gate  combine_weight  act_norm  act_max_abs
    0      0     0       0.5       0.625        1.25            2.0       1.0
    0      1     1       0.3       0.375        0.75            4.0       3.0
    1      0     0       0.4       0.5          1.0             4.0       2.5
    1      1     2       0.4       0.5          1.0             1.0       0.5
    2      0     1       0.6       0.75         1.5             2.0       1.5
    2      1     0       0.2       0.25         0.5             6.0       4.0
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

import moeaudit.metrics as M


def hand_routing() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "layer": [0, 0, 0, 0, 0, 0],
            "seq": [0, 0, 0, 0, 0, 0],
            "pos": [0, 0, 1, 1, 2, 2],
            "slot": [0, 1, 0, 1, 0, 1],
            "expert": [0, 1, 0, 2, 1, 0],
            "raw_gate": [0.5, 0.3, 0.4, 0.4, 0.6, 0.2],
            "renorm_gate": [0.625, 0.375, 0.5, 0.5, 0.75, 0.25],
            "combine_weight": [1.25, 0.75, 1.0, 1.0, 1.5, 0.5],
            "act_norm": [2.0, 4.0, 4.0, 1.0, 2.0, 6.0],
            "act_max_abs": [1.0, 3.0, 2.5, 0.5, 1.5, 4.0],
        }
    )


@pytest.fixture
def routing() -> pd.DataFrame:
    return hand_routing()


@pytest.fixture
def clean_registry():
    """Restore the registry after a test that registers metrics."""
    before = M.list_metrics()
    yield
    for name in M.list_metrics():
        if name not in before:
            M.unregister_metric(name)


def _random_case(seed: int):
    """A random multi-layer routing table with everything a reference re-computation needs.

    Layers 0 (E = 6, top-2) and 3 (E = 5, top-3); 4 sequences of different lengths; the last expert of
    each layer gets a logit of -10 so it is never selected. Rows are shuffled. Returns
    (routing, num_experts, router_probs, weights, tokens) where tokens[layer] lists (seq, pos) in
    ascending order, the row order of router_probs[layer].
    """
    rng = np.random.default_rng(seed)
    spec = {0: (6, 2), 3: (5, 3)}
    lengths = [5, 3, 4, 2]
    domains = ["wiki", "code", "wiki", "math"]
    tokens = [(s, p) for s, n in enumerate(lengths) for p in range(n)]
    rows, router_probs, weights = [], {}, {}
    for layer, (n_exp, k) in spec.items():
        logits = rng.normal(size=(len(tokens), n_exp))
        logits[:, -1] = -10.0
        probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
        router_probs[layer] = probs
        for t, (s, p) in enumerate(tokens):
            top = np.argsort(-probs[t])[:k]
            total = probs[t, top].sum()
            for slot, e in enumerate(top):
                norm = float(rng.gamma(2.0, 1.5))
                rows.append({
                    "layer": layer, "seq": s, "pos": p, "slot": slot, "expert": int(e),
                    "raw_gate": probs[t, e], "renorm_gate": probs[t, e] / total,
                    "combine_weight": 1.5 * probs[t, e] / total, "act_norm": norm,
                    "act_max_abs": norm * float(rng.uniform(0.1, 0.9)), "domain": domains[s],
                })
        weights[layer] = {
            "gate_up_proj": rng.normal(size=(n_exp, 4, 3)) * rng.uniform(0.5, 2, size=(n_exp, 1, 1)),
            "down_proj": rng.standard_t(3, size=(n_exp, 3, 2)),
            "router": rng.normal(size=(n_exp, 3)),
        }
    routing = pd.DataFrame(rows).sample(frac=1.0, random_state=seed).reset_index(drop=True)
    num_experts = {layer: n for layer, (n, _) in spec.items()}
    return routing, num_experts, router_probs, weights, {layer: tokens for layer in spec}


@pytest.fixture
def random_case():
    return _random_case
