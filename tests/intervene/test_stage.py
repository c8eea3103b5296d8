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
    settings = {"max_windows": 3, **settings}
    config = AuditConfig(model="tiny-olmoe", max_len=24, progressive=False, **settings)
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


def test_paper_code_position_sets_are_intervened_and_tested_one_per_metric(tmp_path, moe):
    """position_sets = "paper_code": the scripts' four sets (one per metric, the same at every layer) are
    intervened at, and the paired design tests metric i on set i — not one per-layer sample for all."""
    from moeaudit.audit.stage import run_audit
    from moeaudit.data.positions import paper_code_positions
    from moeaudit.metrics.stage import run_metrics

    metrics = ["frequency", "ean_mean", "mean_gate_active", "act_std"]
    run = _run(tmp_path / "code", moe, max_windows=4, position_sets="paper_code", intervene_n=12,
               audit_metrics=metrics, audit_n=None, in_sample=True, audit_cluster="none",
               designs=["paired", "within_token"])
    run_metrics(run, moe=moe)
    run_intervene(run, moe=moe)
    tokens = run.read("tokens")
    sets = paper_code_positions(tokens.groupby("seq").size().to_dict(), n=12, seed=run.config.seed, draws=4)
    union = {tuple(map(int, row)) for part in sets for row in part}
    effects = run.read("effects")
    for layer in {layer.layer for layer in moe.layers}:
        rows = effects[effects.layer == layer]
        assert set(zip(rows.seq, rows.pos)) == union  # every set, at every layer
    run_audit(run)
    tests = run.read("tests").set_index(["design", "metric", "layer"])
    layer = moe.layers[0].layer
    for metric, part in zip(metrics, sets):
        assert tests.loc[("paired", metric, layer), "n"] <= len(part) == 12
    # each metric's cell is the paired contrast on its own set: frequency's equals a hand computation
    from moeaudit.audit import high_low
    from moeaudit.stats import paired_contrast

    frame = effects[effects.layer == layer].join(
        run.read("expert_metrics").query("layer == @layer").set_index("expert")["frequency"], on="expert")
    own = frame.merge(pd.DataFrame(sets[0], columns=["seq", "pos"]), on=["seq", "pos"])
    pairs, _ = high_low(own, "frequency")
    ref = paired_contrast(pairs["high"].to_numpy(), pairs["low"].to_numpy())
    assert tests.loc[("paired", "frequency", layer), "p_t"] == pytest.approx(ref.p_t, rel=1e-12)
    assert len(union) > 12  # the sets differ, so a shared sample would have tested other positions
    bad = _run(tmp_path / "bad", moe, position_sets="paper_code", audit_metrics=metrics)
    with pytest.raises(InvalidParameterError, match="`intervene_n` must be a number of positions per set"):
        run_intervene(bad, moe=moe)
    assert not bad.has("effects")


def test_the_engine_gets_every_engine_setting_of_the_run():
    """``engine_config_for`` hands the run's execution and intervene settings to the engine, each with a
    value unlike its default so a dropped one shows."""
    import dataclasses

    from moeaudit.intervene import InterveneConfig
    from moeaudit.intervene.stage import engine_config_for

    settings = dict(engine="reference", rows_per_call=7, reference_batch=3, max_logit_elements=1000,
                    max_state_bytes=123456, noise_positions=5, kind="renorm", scope="sequence")
    engine = engine_config_for(AuditConfig(**settings))
    defaults = InterveneConfig()
    got = dataclasses.asdict(engine)
    for name, value in settings.items():
        field = {"kind": "kinds", "scope": "scopes"}.get(name, name)
        expected = (value,) if field in ("kinds", "scopes") else value
        assert got[field] == expected != getattr(defaults, field), name
