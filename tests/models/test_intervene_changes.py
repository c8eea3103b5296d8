"""`moe.intervene` says what it changed: slots removed per layer, and a warning when an ablation removed nothing."""

from __future__ import annotations

import warnings

import pytest
import torch

from moeaudit.models import Ablation, UnchangedWarning, load_model


@pytest.fixture(scope="module")
def moe():
    return load_model("tiny-olmoe")


@pytest.fixture(scope="module")
def clean(moe):
    ids = torch.randint(3, 8000, (2, 24), generator=torch.Generator().manual_seed(0))
    layer = moe.layers[1].layer
    with torch.no_grad(), moe.capture([layer]) as trace:
        logits = moe.model(ids).logits
    return ids, layer, trace[layer].topk_idx, logits


@pytest.mark.parametrize("kind", ["zero", "renorm", "reroute"])
def test_an_active_expert_changes_its_slots_and_the_logits(moe, clean, kind):
    ids, layer, topk, logits = clean
    expert = int(topk[0, 17, 0])  # the router chose it at position 17 of the first window
    expected = int((topk[:, 17] == expert).any(-1).sum())  # positions apply to every batch row
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnchangedWarning)
        with torch.no_grad(), moe.intervene([Ablation(layer=layer, experts=expert, positions=[17], kind=kind)]) as t:
            edited = moe.model(ids).logits
    assert t.slots_changed[layer] == expected >= 1
    assert (edited[0, 17] - logits[0, 17]).abs().max() > 1e-2
    # earlier positions are untouched up to rounding (the expert's matmul runs on one token fewer)
    assert torch.allclose(edited[:, :17], logits[:, :17], atol=1e-5, rtol=0)


def test_an_inactive_expert_changes_nothing_and_says_so(moe, clean):
    ids, layer, topk, logits = clean
    inactive = next(e for e in range(moe.layer(layer).num_experts) if not (topk[:, 17] == e).any())
    with pytest.warns(UnchangedWarning, match=rf"removed no slot \(layer {layer}: experts \[{inactive}\]\)"):
        with torch.no_grad(), moe.intervene([Ablation(layer=layer, experts=inactive, positions=[17])]) as trace:
            edited = moe.model(ids).logits
    assert trace.slots_changed[layer] == 0 and torch.equal(edited, logits)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnchangedWarning)
        with torch.no_grad(), moe.intervene([Ablation(layer=layer, experts=inactive, positions=[17])],
                                            warn_unchanged=False):
            moe.model(ids)
        with moe.intervene([Ablation(layer=layer, experts=inactive, positions=[17])]):
            pass  # no forward ran: nothing to judge
