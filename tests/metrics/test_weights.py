"""aimer and router_row_norm (weight-only metrics)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from numpy.testing import assert_allclose

from moeaudit.errors import InvalidParameterError
from moeaudit.metrics import LayerWeights, compute_expert_metrics
from moeaudit.metrics.weights import aimer, router_row_norm


def _two_experts():
    """E = 2, H = 2, I = 1: gate_up [E, 2I, H], down [E, H, I] -> 6 weights per expert."""
    gate_up = np.array([[[1.0, -1.0], [1.0, -1.0]], [[3.0, 0.0], [0.0, 0.0]]])
    down = np.array([[[-1.0], [1.0]], [[0.0], [-3.0]]])
    return gate_up, down


def test_aimer_hand_worked():
    gate_up, down = _two_experts()
    # expert 0: six weights of magnitude 1 -> mean|w| = 1, rms = 1 -> 1
    # expert 1: weights (3, 0, 0, 0, 0, -3) -> mean|w| = 6/6 = 1, rms = sqrt(18/6) = sqrt(3)
    assert_allclose(aimer(gate_up, down), [1.0, 1.0 / math.sqrt(3)])


def test_aimer_ignores_layout_and_accepts_torch_tensors():
    torch = pytest.importorskip("torch")
    gate_up, down = _two_experts()
    want = aimer(gate_up, down)
    assert_allclose(aimer(gate_up.transpose(0, 2, 1), down.transpose(0, 2, 1)), want)
    assert_allclose(aimer(torch.tensor(gate_up, dtype=torch.bfloat16), torch.tensor(down)), want)


def test_aimer_of_a_zero_expert_is_nan_and_sizes_must_agree():
    assert np.isnan(aimer(np.zeros((1, 2, 2))))[0]
    with pytest.raises(ValueError, match="leading"):
        aimer(np.ones((2, 2, 2)), np.ones((3, 2, 2)))


def test_router_row_norm():
    assert_allclose(router_row_norm(np.array([[3.0, 4.0], [0.0, 1.0]])), [5.0, 1.0])


def test_weights_through_compute(routing):
    gate_up, down = _two_experts()
    e4 = np.concatenate([gate_up, gate_up])  # 4 experts at layer 0
    d4 = np.concatenate([down, down])
    router = np.array([[3.0, 4.0], [0.0, 1.0], [1.0, 0.0], [0.0, 2.0]])
    want_aimer = [1.0, 1 / math.sqrt(3), 1.0, 1 / math.sqrt(3)]
    for w in ({"gate_up_proj": e4, "down_proj": d4, "router": router}, LayerWeights((e4, d4), router)):
        table = compute_expert_metrics(routing, {0: 4}, weights={0: w})
        assert_allclose(table.aimer, want_aimer)
        assert_allclose(table.router_row_norm, [5.0, 1.0, 1.0, 2.0])
    no_weights = compute_expert_metrics(routing, {0: 4})
    assert no_weights[["aimer", "router_row_norm"]].isna().all().all()


def test_weights_with_the_wrong_expert_count_are_refused(routing):
    with pytest.raises(InvalidParameterError, match=r"`weights\[0\]` must be tensors with leading"):
        compute_expert_metrics(routing, {0: 4}, weights={0: {"router": np.ones((3, 2))}})
