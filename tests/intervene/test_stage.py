"""The intervene stage's choice of layers and windows: observe everything, intervene where it is affordable."""

from __future__ import annotations

import pandas as pd
import pytest

from moeaudit.config import AuditConfig
from moeaudit.errors import InvalidParameterError
from moeaudit.intervene.stage import run_intervene
from moeaudit.models import load_model
from moeaudit.observe.stage import run_observe
from moeaudit.rundir import RunDir


@pytest.fixture(scope="module")
def moe():
    return load_model("tiny-olmoe")


def _run(path, moe, **settings):
    config = AuditConfig(model="tiny-olmoe", max_len=24, max_windows=3, progressive=False, **settings)
    run = RunDir(path, config)
    run_observe(run, moe=moe)
    return run


def test_intervene_layers_and_windows_restrict_the_census_to_the_same_rows(tmp_path, moe):
    full = _run(tmp_path / "full", moe)
    run_intervene(full, moe=moe)
    layer = moe.layers[-1].layer
    part = _run(tmp_path / "part", moe, intervene_layers=[layer], intervene_windows=2)
    info = run_intervene(part, moe=moe)
    assert part.read("routing").layer.nunique() == len(moe.layers)  # observe still covers every layer
    effects = part.read("effects")
    heldout = sorted(full.read("tokens").query("split == 'heldout'").seq.unique())[:2]
    assert set(effects.layer) == {layer} and sorted(effects.seq.unique()) == heldout
    expected = full.read("effects")
    expected = expected[(expected.layer == layer) & expected.seq.isin(heldout)]
    columns = ["layer", "seq", "pos", "expert", "delta_nll", "kl"]
    pd.testing.assert_frame_equal(effects[columns].reset_index(drop=True),
                                  expected[columns].reset_index(drop=True), check_exact=True)
    assert info["interventions"] == len(effects) < len(full.read("effects"))


def test_intervene_layers_must_have_been_observed(tmp_path, moe):
    run = _run(tmp_path / "run", moe, layers=[moe.layers[0].layer], intervene_layers=[moe.layers[-1].layer])
    with pytest.raises(InvalidParameterError, match=r"`intervene_layers` must be observed MoE layers"):
        run_intervene(run, moe=moe)
    assert not run.has("effects")
