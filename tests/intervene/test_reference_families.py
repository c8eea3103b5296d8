"""Families whose adapter sends interventions to the reference engine (``FamilyAdapter.fast_refusal``):
Qwen4-Exp (gated-residual hyper-connections, n-gram embeddings and a QSA indexer) and Inkling-2 (a convolution after
the MoE block).
What they measure is the model without the expert, checked by brute force through those layers."""

from __future__ import annotations

import pytest
import torch

from moeaudit.intervene import InterveneConfig, Selection, compute_effects
from moeaudit.models import wrap_model
from moeaudit.models.testing import REFERENCE_ONLY, tiny_model

from tests.conftest import assert_sequence_removal_is_brute_force

IDS = torch.randint(3, 96, (1, 12), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("family", ["qwen4_exp", "inkling2"])
def test_sequence_removal_equals_the_model_without_the_expert(family):
    """The zero kind in sequence scope (reference engine, the fast engine's refusal logged) equals the model
    whose expert has a zero down projection, at every position."""
    moe = wrap_model(tiny_model(family, seed=3), name=family)
    result = compute_effects(moe, IDS, Selection.sample(3, seed=0), config=InterveneConfig(scopes=("sequence",)))
    assert result.stats.engine == "reference" and REFERENCE_ONLY[family] in result.stats.fallback_reason
    effects = result.effects
    assert effects["layer"].nunique() == len(moe.layers) and len(effects) >= 4
    assert_sequence_removal_is_brute_force(moe, IDS, effects)
