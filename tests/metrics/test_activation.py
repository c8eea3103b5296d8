"""ean_sum, ean_mean, msan, act_std, max_act against the hand-worked table (conftest.py)."""

from __future__ import annotations

import math

import numpy as np
from numpy.testing import assert_allclose

from moeaudit.metrics.activation import act_std, ean_mean, ean_sum, max_act, msan


def test_ean_sum(routing):
    # expert 0: 2 + 4 + 6; expert 1: 4 + 2; expert 2: 1; expert 3 never routed: 0
    assert_allclose(ean_sum(routing.expert, routing.act_norm, num_experts=4), [12.0, 6.0, 1.0, 0.0])


def test_ean_mean(routing):
    assert_allclose(ean_mean(routing.expert, routing.act_norm, num_experts=4), [4.0, 3.0, 1.0, np.nan])


def test_msan(routing):
    want = [(4 + 16 + 36) / 3, (16 + 4) / 2, 1.0, np.nan]
    assert_allclose(msan(routing.expert, routing.act_norm, num_experts=4), want)


def test_act_std_uses_ddof_1_and_needs_two_tokens(routing):
    # expert 0: norms 2, 4, 6 -> mean 4, squared deviations 4 + 0 + 4 = 8, / (3 - 1) = 4 -> 2
    # expert 1: norms 4, 2 -> mean 3, squared deviations 1 + 1 = 2, / (2 - 1) = 2 -> sqrt(2)
    # expert 2: one token -> NaN; expert 3: none -> NaN
    assert_allclose(act_std(routing.expert, routing.act_norm, num_experts=4), [2.0, math.sqrt(2), np.nan, np.nan])


def test_act_std_is_stable_for_large_offsets():
    norms = 1e8 + np.array([1.0, 2.0, 3.0])
    assert_allclose(act_std([0, 0, 0], norms, num_experts=1), [1.0])


def test_max_act(routing):
    assert_allclose(max_act(routing.expert, routing.act_max_abs, num_experts=4), [4.0, 3.0, 0.5, np.nan])
