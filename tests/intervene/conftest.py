"""Shared fixtures: tiny random models of every family (one thread, so the suite stays fast on 2 cores)."""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest
import torch

from moeaudit.models import wrap_model
from moeaudit.models.testing import FAST_FAMILIES, tiny_model

torch.set_num_threads(1)

BATCH, SEQ, VOCAB = 2, 20, 96
#: Mixtral gets a sliding window shorter than the windows so the sliding mask is exercised
#: (GPT-OSS's tiny config already alternates sliding_window=16 and full attention, with sinks).
OVERRIDES = {"mixtral": {"sliding_window": 6}}


def make_moe(family: str, **kwargs):
    return wrap_model(tiny_model(family, seed=3, **{**OVERRIDES.get(family, {}), **kwargs}), name=family)


@pytest.fixture(scope="module", params=FAST_FAMILIES)  # the others: tests/intervene/test_spotcheck.py
def moe(request):
    return make_moe(request.param)


@pytest.fixture(scope="module")
def input_ids():
    return torch.randint(3, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(0))
