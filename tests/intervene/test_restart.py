"""Families whose MoE block output passes a norm before the residual stream, or enters several residual streams
with input-dependent weights (hyper-connections): the fast engine's rows restart at the intervened layer
(:func:`moeaudit.intervene.fast.restarts_at_block`), and what they measure is the model without the expert."""

from __future__ import annotations

import pytest
import torch

from moeaudit.intervene import InterveneConfig, Selection, compute_effects
from moeaudit.intervene.fast import restarts_at_block
from moeaudit.models import wrap_model
from moeaudit.models.testing import tiny_model

from tests.conftest import assert_sequence_removal_is_brute_force

#: A norm after the block (FlexOlmo, Kolibri-1, AFMoE: its attention also gates and `.view`s the rows' output),
#: inside it (A.X-K1), or two beside a dense MLP, with per-layer inputs and shared keys/values (Gemma 4).
NORM_AFTER_BLOCK = ("flex_olmo", "kolibri1", "afmoe", "axk1", "gemma4_text", "beam")
#: Several residual streams: Hy4 (2, beside DSA attention), GLM-5.3-Next (4, beside KDA and a pooled indexer),
#: DeepSeek-V4 (2, beside compressed attention and a hash-routed layer).
STREAMS = ("hy_v4", "glm5_next", "deepseek_v4")
IDS = torch.randint(3, 96, (1, 12), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("family", NORM_AFTER_BLOCK + STREAMS)
def test_sequence_removal_equals_the_model_without_the_expert(family):
    """Brute force: the zero kind in sequence scope removes the expert's term wherever it is active, which is
    the model whose expert has a zero down projection (its absence then passes the norm), at every MoE layer."""
    moe = wrap_model(tiny_model(family, seed=3), name=family)
    result = compute_effects(moe, IDS, Selection.sample(4, seed=0), config=InterveneConfig(scopes=("sequence",)))
    effects = result.effects
    assert set(effects["engine"]) == {"fast"} and result.stats.fallback_reason is None and restarts_at_block(moe)
    assert effects["layer"].nunique() == len(moe.layers) and len(effects) >= 8
    assert_sequence_removal_is_brute_force(moe, IDS, effects)


@pytest.mark.parametrize("family, factor", [("granitemoe", 0.5), ("minimax", 0.7)])
def test_a_scaled_block_output_is_added_not_restarted(family, factor):
    """Granite's ``residual_multiplier`` and MiniMax's ``mlp_beta_factor`` scale the block's output on its way
    into the residual stream (``residual * mlp_alpha_factor + block * mlp_beta_factor``): the coupling probe
    finds the layer's output moving by exactly that factor times a change of the block's output, so the rows
    start at the next layer with the scaled Δy, as for every additive family; a factor read as 1 would make
    the probe fail and the rows restart (slower, never wrong)."""
    from moeaudit.intervene.replay import residual_scale

    moe = wrap_model(tiny_model(family, seed=3), name=family)
    assert residual_scale(moe) == factor and not restarts_at_block(moe)


@pytest.mark.parametrize("family", STREAMS)
def test_several_residual_streams_restart_at_the_block_without_a_second_probe_run(family):
    """The coupling probe sees a decoder layer whose output [1, T, N, H] has another shape than its block's
    [1, T, H] and answers "not additive" at once: Δy reaches each stream with its own input-dependent weight."""
    from moeaudit.intervene.fast import couples_additively

    moe = wrap_model(tiny_model(family, seed=3), name=family)
    calls = []
    handle = moe.layers[0].block.register_forward_hook(lambda *args: calls.append(1))
    try:
        assert couples_additively(moe) is False
    finally:
        handle.remove()
    assert len(calls) == 1
