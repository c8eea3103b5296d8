"""The gradient estimate is the first-order term of the exact effect, per (layer, token, active expert)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from moeaudit.intervene import InterveneConfig, Selection, compute_effects
from moeaudit.intervene.clean import capture_clean
from moeaudit.models.testing import RECURRENT_FAMILIES

from .conftest import make_moe


def nll_with_scaled_removal(moe, input_ids, layer, pos, term, scale):
    """NLL at ``pos`` after subtracting ``scale`` × ``term`` from layer ``layer``'s MoE output at ``pos``.

    Independent of the engine: a forward hook on the library's MoE block, on a full forward.
    """

    def hook(module, args, output):
        hidden = output[0] if isinstance(output, tuple) else output
        hidden = hidden.clone()
        hidden[0, pos] -= scale * term
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    handle = moe.layer(layer).block.register_forward_hook(hook)
    try:
        with torch.no_grad():
            logits = moe.model(input_ids).logits[0, pos]
    finally:
        handle.remove()
    return -torch.log_softmax(logits, -1)[input_ids[0, pos + 1]].item()


@pytest.mark.parametrize("family", ["olmoe", "deepseek_v2", "gpt_oss", "flex_olmo", "axk1", "gemma4_text", "hy_v4",
                                    *sorted(RECURRENT_FAMILIES)])
def test_estimate_is_the_first_order_term(family, input_ids):
    """Removing ε × (w_e f_e): (NLL(+ε) - NLL(-ε)) / 2ε equals the estimate, up to O(ε²).

    FlexOlmo, A.X-K1 and Gemma 4 normalise the block's output before the residual add: their rows restart at
    the block (:func:`moeaudit.intervene.fast.restarts_at_block`), and the estimate differentiates at the
    block's output (Gemma 4: through per-layer inputs, shared keys/values and soft-capped logits; Hy4 and
    GLM-5.3-Next: through several residual streams, the leaf one stream wide).

    The hybrid families' rows differentiate through their recurrent layers' decode steps, which overwrite
    their states in place (:func:`moeaudit.intervene.recurrent.saved_states_copied`); the finite difference
    runs the full forward's chunked kernels.

    The model runs in float64, but transformers' RMSNorm computes in float32, which bounds the finite
    difference's precision (≈1e-7 / ε); ε = 1e-2 balances that against the O(ε²) term. Top-k routing is
    piecewise constant, so a perturbation that flips a later layer's selection is not differentiable: each
    row is also differenced at ε / 10 (Bailing-hybrid's tiny config flips a selection between the two), and
    a few rows may still miss; most must agree to 1e-4.
    """
    moe = make_moe(family)
    moe.model.double()
    ids = input_ids[:1]
    result = compute_effects(moe, ids, Selection.sample(2, seed=4), config=InterveneConfig(estimate=True))
    est = result.effects[result.effects.estimate]
    assert result.stats.estimates == len(est) > 0 and (est.kind == "zero").all() and (est.scope == "token").all()
    clean = capture_clean(moe, ids, record_attention=False)
    eps, errors = 1e-2, []
    for row in est.itertuples():
        record = clean.records[row.layer]
        slot = record.topk_idx[row.pos].tolist().index(row.expert)
        term = record.combine_weight[row.pos, slot] * record.ungated[row.pos, slot]
        error = []
        for step in (eps, eps / 10):  # a selection flip within ±ε breaks that ε's difference, not both
            up = nll_with_scaled_removal(moe, ids, row.layer, row.pos, term, step)
            down = nll_with_scaled_removal(moe, ids, row.layer, row.pos, term, -step)
            error.append(abs((up - down) / (2 * step) - row.delta_nll) / max(abs(row.delta_nll), 1e-2))
        errors.append(min(error))
    errors = np.array(errors)
    assert np.median(errors) < 1e-3
    assert (errors < 1e-2).mean() >= 0.9


def test_estimate_rows_pair_with_exact_census(input_ids):
    moe = make_moe("olmoe")
    result = compute_effects(moe, input_ids, config=InterveneConfig(estimate=True))
    effects = result.effects
    exact, est = effects[~effects.estimate], effects[effects.estimate]
    assert len(exact) == len(est) == result.stats.interventions == result.stats.estimates
    keys = ["layer", "seq", "pos", "expert"]
    assert exact[keys].sort_values(keys).values.tolist() == est[keys].sort_values(keys).values.tolist()
    assert (est.engine == "gradient").all() and est.kl.isna().all()
    rho = result.stats.estimate_spearman
    assert rho is not None and -1 <= rho <= 1
    assert set(result.stats.estimate_spearman_by_layer) == set(moe.moe_layer_indices)
    # the estimate is exact to first order, so tiny effects agree closely
    small = exact.delta_nll.abs().values < 1e-3
    merged = exact.merge(est, on=keys, suffixes=("", "_est"))
    small = merged.delta_nll.abs() < 1e-3
    if small.any():
        assert np.abs(merged.delta_nll[small] - merged.delta_nll_est[small]).max() < 1e-4


def _builtin_available(name: str) -> bool:
    from moeaudit.models import builtin

    return name in builtin.BUILTIN_MODELS and (builtin.builtin_path(name) / "model.safetensors").exists()


@pytest.mark.skipif(not _builtin_available("tiny-olmoe"), reason="built-in tiny-olmoe not trained yet")
def test_builtin_model_census_exact_and_estimate_correlation():
    """On the trained tiny-olmoe: fast == reference on a sample, and the estimate's rank correlation."""
    import moeaudit

    moe = moeaudit.load_model("tiny-olmoe")
    ids = torch.randint(3, int(moe.config.vocab_size), (1, 48), generator=torch.Generator().manual_seed(1))
    result = compute_effects(moe, ids, config=InterveneConfig(estimate=True))
    sample = result.effects[~result.effects.estimate].sample(12, random_state=0)
    items = [(int(r.layer), 0, int(r.pos), int(r.expert)) for r in sample.itertuples()]
    ref = compute_effects(moe, ids, Selection.explicit(items), config=InterveneConfig(engine="reference")).effects
    merged = sample.merge(ref, on=["layer", "pos", "expert"], suffixes=("", "_ref"))
    assert len(merged) == 12 and (merged.delta_nll - merged.delta_nll_ref).abs().max() <= 1e-5
    rho = result.stats.estimate_spearman
    print(f"tiny-olmoe: gradient estimate vs exact census, Spearman rho = {rho:.3f} "
          f"(by layer {result.stats.estimate_spearman_by_layer})")
    assert rho > 0.5
