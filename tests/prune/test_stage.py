"""The prune stage on a run directory: tables, planted truth, reproducibility, refusals, export round trip."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from moeaudit.errors import InvalidParameterError, RunDirectoryError
from moeaudit.intervene import compute_effects
from moeaudit.intervene.stage import windows_from_tokens
from moeaudit.models.moe_model import nll_from_logits
from moeaudit.prune import (PRUNING_COLUMNS, export_pruned, kept_from_table, pruning_summary, run_prune,
                            select_kept)

from tests.prune.conftest import make_moe, make_run, metrics_table, tokens_table

PLANTED = [1, 3, 4, 6]


def planted_gpt_oss():
    """GPT-OSS whose experts 1, 3, 4, 6 are never routed (router bias −1000) and nearly silent (down_proj
    x 1e-6): dropping them changes nothing, by construction. The `planted` metric ranks exactly them lowest."""
    moe = make_moe("gpt_oss", seed=5)
    with torch.no_grad():
        for layer in moe.layers:
            layer.router.bias[PLANTED] = -1000.0
            layer.experts.down_proj[PLANTED] *= 1e-6
    planted = np.ones((len(moe.layers), 8))
    planted[:, PLANTED] = 0.0
    return moe, metrics_table(moe, {"planted": planted})


def greedy_tokens(moe, n_held: int = 8, seq_len: int = 16) -> pd.DataFrame:
    """Held-out windows the model itself continues greedily (so the unpruned model is the one that predicts
    them best and any harmful pruning raises their NLL), plus random calibration windows."""
    ids = torch.randint(3, 96, (n_held, 1), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for _ in range(seq_len - 1):
            ids = torch.cat([ids, moe.model(input_ids=ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    calibration = tokens_table(n_cal=4, n_held=0)
    held = pd.DataFrame([dict(seq=4 + b, pos=t, token_id=int(ids[b, t]), nll=np.nan, domain=None, split="heldout")
                         for b in range(n_held) for t in range(seq_len)])
    return pd.concat([calibration, held], ignore_index=True)


def test_planted_criterion_beats_random_by_a_wide_margin(tmp_path):
    moe, metrics = planted_gpt_oss()
    run = make_run(tmp_path, moe, metrics, tokens=greedy_tokens(moe))
    info = run_prune(run, moe=moe, ratios=(0.25, 0.5), criteria=["planted", "aimer", "random"], random_seeds=20,
                     single_layer=True)
    table = run.read("pruning")
    assert list(table.columns) == list(PRUNING_COLUMNS)
    planted = table[table.criterion == "planted"]
    assert (planted.delta_nll.abs() < 1e-5).all() and (planted.mean_kl.abs() < 1e-6).all()
    assert all(set(d) <= set(PLANTED) for d in planted.dropped)
    random = table[(table.criterion == "random") & (table["mode"] == "all_layers")].drop_duplicates(["ratio", "seed"])
    for ratio, draws in random.groupby("ratio"):
        assert draws.delta_nll.median() > 0.1  # dropping used experts hurts
        row = planted[(planted.ratio == ratio) & (planted["mode"] == "all_layers")].iloc[0]
        assert row.random_percentile < 10
    single = planted[planted["mode"] == "single_layer"]
    assert len(single) == 2 * len(moe.layers) and (single.random_percentile < 25).all()
    assert info["random_seeds"] == 20 and info["distinct_configurations"] <= info["configurations"]
    summary = pruning_summary(table, run.read("jaccard"))
    assert list(summary.perplexity.index) == ["planted", "aimer"]
    assert summary.random.loc[0.5, "n_seeds"] == 20
    assert summary.random.loc[0.5, "p05"] <= summary.random.loc[0.5, "median"] <= summary.random.loc[0.5, "p95"]
    assert summary.perplexity.loc["planted", 0.5] < summary.random.loc[0.5, "p05"]
    whole, layers = summary.frames()
    assert list(whole.frame.criterion) == ["planted", "aimer", "random median [5-95%]"]
    assert "Jaccard criteria" in layers.frame.columns and "Jaccard" in layers.title
    assert set(summary.layers.layer) == {l.layer for l in moe.layers}
    assert run.stage("prune")["criteria"] == ["planted", "aimer", "random"]


def test_stage_tables_oracles_and_reproducibility(tmp_path):
    moe = make_moe("olmoe")
    tokens = tokens_table()
    held = tokens[tokens.split == "heldout"]
    seqs, ids, mask = windows_from_tokens(held, 0)
    effects = compute_effects(moe, ids, attention_mask=mask, seq_offset=int(seqs[0])).effects
    metrics = metrics_table(moe)
    runs = [make_run(tmp_path, moe, metrics, effects=effects, tokens=tokens, name=f"run{i}") for i in range(2)]
    infos = [run_prune(run, moe=moe, ratios=(0.25,), random_seeds=4, single_layer=True) for run in runs]
    first, second = (run.read("pruning") for run in runs)
    pd.testing.assert_frame_equal(first, second)  # seeded: the same draws and the same numbers
    assert infos[0]["skipped_criteria"] == {}
    assert set(first.criterion) == {"frequency", "max_act", "aimer", "oracle_delta_nll", "oracle_reconstruction",
                                    "random"}
    assert set(first["mode"]) == {"all_layers", "single_layer"}
    assert first.loc[first.criterion == "random", "seed"].nunique() == 4
    assert first.loc[first.criterion != "random", "seed"].isna().all()
    assert (first.n_dropped == 2).all() and all(len(k) == 6 for k in first.kept)
    assert all(sorted(set(k) | set(d)) == list(range(8)) for k, d in zip(first.kept, first.dropped))
    assert first.loc[first.criterion == "random", "random_percentile"].isna().all()
    assert first.loc[first.criterion == "oracle_delta_nll", "criterion_kind"].eq("oracle").all()
    assert first.loc[first.criterion == "aimer", "direction"].eq("high").all()
    jac = runs[0].read("jaccard")
    diagonal = jac[(jac.criterion_a == jac.criterion_b) & (jac.criterion_a != "random")]
    assert (diagonal.jaccard == 1.0).all()
    domains = runs[0].read("pruning_domains")
    assert set(domains.domain) == {"code", "prose"} and (domains.n_tokens > 0).all()
    scores = runs[0].read("pruning_scores")
    assert {"oracle_delta_nll", "oracle_reconstruction"} <= set(scores.columns)

    # masked pruning in the table == the exported checkpoint on the same held-out windows
    from transformers import AutoModelForCausalLM

    kept = kept_from_table(first, "frequency", 0.25)
    export_pruned(moe, kept, tmp_path / "export")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "export").eval()
    with torch.no_grad():
        nll = nll_from_logits(loaded(input_ids=ids, attention_mask=mask).logits, ids, mask)
    expected = first[(first.criterion == "frequency") & (first["mode"] == "all_layers")].heldout_nll.iloc[0]
    assert float(nll[~torch.isnan(nll)].double().mean()) == pytest.approx(expected, abs=1e-5)
    with pytest.raises(InvalidParameterError, match="`seed` must be"):
        kept_from_table(first, "random", 0.25)
    assert kept_from_table(first, "random", 0.25, seed=1).keys() == kept.keys()


@pytest.mark.parametrize("ratios, fragment", [((0.0,), "in (0, 1)"), ((1.0,), "in (0, 1)"),
                                              ((0.25, 0.9), "keeps at least top_k = 2")])
def test_bad_ratios_refused_before_any_work(tmp_path, ratios, fragment):
    moe = make_moe("olmoe")
    run = make_run(tmp_path, moe, metrics_table(moe))
    with pytest.raises(InvalidParameterError) as err:
        run_prune(run, moe=moe, ratios=ratios)
    assert fragment in str(err.value) and "\n" not in str(err.value)
    assert not run.has("pruning")


def test_bad_criteria_and_settings_refused(tmp_path):
    moe = make_moe("olmoe")
    run = make_run(tmp_path, moe, metrics_table(moe))
    with pytest.raises(InvalidParameterError, match="`criteria` must be drawn from frequency"):
        run_prune(run, moe=moe, criteria=["oracle_delta_nll"])  # no effects table in this run
    with pytest.raises(InvalidParameterError, match="`random_seeds` must be"):
        run_prune(run, moe=moe, random_seeds=-1)
    with pytest.raises(InvalidParameterError, match="`guard` must be"):
        run_prune(run, moe=moe, guard=-2)


def test_guard_and_weighted_budgets(tmp_path):
    moe = make_moe("olmoe")
    metrics = metrics_table(moe)
    run = make_run(tmp_path, moe, metrics)
    layers = [l.layer for l in moe.layers]
    info = run_prune(run, moe=moe, ratios=(0.25,), criteria=["frequency", "random"], random_seeds=3, guard=1,
                     budget_weights={layers[0]: 2.0, layers[1]: 1.0}, single_layer=False)
    table = run.read("pruning")
    for layer, top in info["protected"].items():
        rows = table[table.layer == int(layer)]
        assert all(top[0] not in d for d in rows.dropped)
    counts = table.drop_duplicates(["criterion", "seed", "layer"]).groupby("layer").n_dropped.first()
    assert counts[layers[0]] == 4 and counts[layers[1]] == 2 and counts[layers[2]] == 0
    assert set(table.budget) == {"weighted"}


def test_select_kept_for_export_validates_ratio_first(tmp_path):
    moe = make_moe("olmoe")
    planted = np.tile(np.arange(8, dtype=float), (len(moe.layers), 1))
    run = make_run(tmp_path, moe, metrics_table(moe, {"planted": planted}))
    kept = select_kept(run, "planted", 0.25, moe=moe)
    assert kept == {l.layer: [2, 3, 4, 5, 6, 7] for l in moe.layers}
    for bad, fragment in ((0.0, "in (0, 1)"), (1.2, "in (0, 1)"), (0.9, "keeps at least top_k = 2")):
        with pytest.raises(InvalidParameterError) as err:
            select_kept(run, "planted", bad, moe=moe)
        assert fragment in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(RunDirectoryError, match="run `moeaudit prune`"):
        select_kept(run, "oracle_reconstruction", 0.25, moe=moe)
    with pytest.raises(InvalidParameterError, match="`seed` must be"):
        select_kept(run, "random", 0.25, moe=moe)
    assert select_kept(run, "random", 0.25, moe=moe, seed=3) == select_kept(run, "random", 0.25, moe=moe, seed=3)


def test_ratios_validated_from_the_manifest_before_loading(tmp_path, monkeypatch):
    import moeaudit.models.loading as loading

    moe = make_moe("olmoe")
    run = make_run(tmp_path, moe, metrics_table(moe))
    run.set("model", {"name": "tiny", "num_experts": {str(l.layer): 8 for l in moe.layers},
                      "top_k": {str(l.layer): 2 for l in moe.layers}})

    def no_loading(config):
        raise AssertionError("the model was loaded before the settings were validated")

    monkeypatch.setattr(loading, "model_from_config", no_loading)
    with pytest.raises(InvalidParameterError, match="keeps at least top_k = 2"):
        run_prune(run, ratios=(0.9,))
    with pytest.raises(InvalidParameterError, match="`guard` must be"):
        run_prune(run, ratios=(0.5,), guard=5)


def test_prune_settings_come_from_the_config_tree_and_are_recorded(tmp_path):
    from moeaudit.config import AuditConfig
    from moeaudit.rundir import RunDir, config_fingerprint

    moe = make_moe("olmoe")
    toml = tmp_path / "audit.toml"
    toml.write_text('model = "tiny-olmoe"\nseed = 0\n[execution]\nbatch_size = 4\n'
                    '[prune]\nratios = [0.5]\ncriteria = ["frequency", "random"]\nrandom_seeds = 3\n'
                    'single_layer = false\n')
    config = AuditConfig.from_toml(toml)
    run = make_run(tmp_path, moe, metrics_table(moe), name="from-toml")
    run = RunDir(run.path, config)  # the prune part is not fingerprinted: same run, other prune settings
    info = run_prune(run, moe=moe)
    table = run.read("pruning")
    assert set(table.ratio) == {0.5} and set(table.criterion) == {"frequency", "random"}
    assert set(table["mode"]) == {"all_layers"} and table.seed.dropna().nunique() == 3
    recorded = RunDir(run.path).stage("prune")["config"]
    assert recorded == info["config"]
    assert recorded["ratios"] == [0.5] and recorded["criteria"] == ["frequency", "random"]
    assert recorded["random_seeds"] == 3 and recorded["single_layer"] is False and recorded["guard"] == 0
    # keyword arguments override the config setting by setting; the manifest says what ran
    run_prune(run, moe=moe, ratios=[0.25], random_seeds=[7, 9])
    recorded = RunDir(run.path).stage("prune")["config"]
    assert recorded["ratios"] == [0.25] and recorded["criteria"] == ["frequency", "random"]
    assert recorded["random_seeds"] == [7, 9] and set(run.read("pruning").seed.dropna()) == {7, 9}
    assert RunDir(run.path).manifest["config_fingerprint"] == config_fingerprint(config)


def test_identity_experts_are_never_pruned_and_not_counted_in_the_ratio(tmp_path):
    """LongCat-Flash's zero-computation experts (8 real + 4 identity per tiny layer) hold no weights: pruning
    one saves nothing. Even when a criterion ranks them lowest, every pruning keeps them, and the ratio counts
    the real experts only (0.25 of 8: 2 dropped); the export then counts each kind into its config field."""
    from moeaudit.prune import export_pruned, select_kept

    moe = make_moe("longcat_flash")
    frequency = np.tile(np.r_[np.arange(1.0, 9.0), np.zeros(4)], (len(moe.layers), 1))  # identity ranked lowest
    metrics = metrics_table(moe, {"frequency": frequency})
    run = make_run(tmp_path, moe, metrics)
    kept = select_kept(run, "frequency", 0.25, moe=moe)
    assert all(ids == [2, 3, 4, 5, 6, 7, 8, 9, 10, 11] for ids in kept.values())
    run_prune(run, moe=moe, ratios=(0.25,), criteria=["frequency", "random"], random_seeds=3, guard=1)
    table = run.read("pruning")
    assert all(len(d) == 2 and max(d) < 8 for d in table.dropped)
    assert export_pruned(moe, kept, tmp_path / "export").num_experts == 10


def test_group_balanced_selection_exports_deepseek_v3_exactly(tmp_path):
    """DeepSeek-V3's group-limited routing (the tiny model: 2 groups of 4, a group scored by its two best): a
    criterion ranking group 0's experts lowest drops them all at ratio 0.5, and that checkpoint is refused (its
    groups would differ in size). The group-balanced selection drops each group's two lowest instead; its
    export loads with plain transformers and equals the masked model."""
    from transformers import AutoModelForCausalLM

    from moeaudit.prune import pruning_ablations

    moe = make_moe("deepseek_v3")
    score = np.tile([0.1, 0.4, 0.2, 0.3, 5.0, 8.0, 7.0, 6.0], (len(moe.layers), 1))
    run = make_run(tmp_path, moe, metrics_table(moe, {"frequency": score}))
    plain = select_kept(run, "frequency", 0.5, moe=moe)
    assert all(ids == [4, 5, 6, 7] for ids in plain.values())
    with pytest.raises(InvalidParameterError, match="--group-balanced") as err:
        export_pruned(moe, plain, tmp_path / "refused")
    assert "\n" not in str(err.value) and not (tmp_path / "refused").exists()
    kept = select_kept(run, "frequency", 0.5, moe=moe, group_balanced=True)
    assert all(ids == [1, 3, 5, 6] for ids in kept.values())  # each group keeps its two best by frequency
    draws = select_kept(run, "random", 0.5, moe=moe, seed=4, group_balanced=True)
    assert all(sum(e < 4 for e in ids) == 2 for ids in draws.values())
    export_pruned(moe, kept, tmp_path / "balanced")
    ids = torch.randint(3, 96, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        with moe.intervene(pruning_ablations(moe, kept)):
            masked = nll_from_logits(moe.model(input_ids=ids).logits, ids)
        loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "balanced").eval()
        exported = nll_from_logits(loaded(input_ids=ids).logits, ids)
    assert torch.allclose(masked[:, :-1], exported[:, :-1], atol=1e-5, rtol=0)


def test_group_balanced_prune_stage_evaluates_what_exports(tmp_path):
    """With ``group_balanced`` the prune stage evaluates the selections an export can write: every criterion,
    random included, drops two of each group's four experts at ratio 0.5 (the global selection of the same
    criterion drops all of group 0), each row says so, and the held-out NLL of the exported checkpoint, loaded
    with plain transformers, equals the stage's number for that criterion."""
    from transformers import AutoModelForCausalLM

    from moeaudit.models.loading import model_record
    from moeaudit.prune import pruning_summary
    from moeaudit.prune.units import split_windows

    moe = make_moe("deepseek_v3")
    score = np.tile([0.1, 0.4, 0.2, 0.3, 5.0, 8.0, 7.0, 6.0], (len(moe.layers), 1))
    run = make_run(tmp_path, moe, metrics_table(moe, {"frequency": score}))
    run.set("model", model_record(moe))
    assert run.manifest["model"]["expert_groups"] == {str(l.layer): 2 for l in moe.layers}
    info = run_prune(run, moe=moe, ratios=(0.5,), criteria=["frequency", "random"], random_seeds=3,
                     single_layer=True, group_balanced=True)
    table = run.read("pruning")
    assert list(table.columns) == list(PRUNING_COLUMNS) and set(table.selection) == {"group_balanced"}
    assert all(sorted(e // 4 for e in d) == [0, 0, 1, 1] for d in table.dropped)
    assert all(list(d) == [0, 2, 4, 7] for d in table[table.criterion == "frequency"].dropped)
    assert info["selection"] == "group_balanced" and info["config"]["group_balanced"] is True
    assert "from each expert group" in pruning_summary(table).frames()[0].title
    from moeaudit.prune import expected_random_jaccard

    # the random reference of the Jaccard table is two group-balanced draws (4 of 8 as 2 + 2)
    assert np.allclose(run.read("jaccard").expected_random, expected_random_jaccard(8, 4, groups=2))
    whole = table[(table.criterion == "frequency") & (table["mode"] == "all_layers")].iloc[0]
    export_pruned(moe, select_kept(run, "frequency", 0.5, group_balanced=True), tmp_path / "balanced")
    ids, mask, _ = split_windows(run.read("tokens"), "heldout", 0)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "balanced").eval()
    with torch.no_grad():
        nll = nll_from_logits(loaded(input_ids=ids, attention_mask=mask).logits, ids, mask)
    assert float(torch.nanmean(nll.double())) == pytest.approx(whole.heldout_nll, abs=1e-5)
    run_prune(run, moe=moe, ratios=(0.5,), criteria=["frequency"], random_seeds=0)  # the default: global
    table = run.read("pruning")
    assert set(table.selection) == {"global"} and all(list(d) == [0, 1, 2, 3] for d in table.dropped)


def test_group_balanced_prune_stage_refusals_come_before_the_model_loads(tmp_path, monkeypatch):
    import moeaudit.models.loading as loading
    from moeaudit.models.loading import model_record

    def no_loading(config):
        raise AssertionError("the model was loaded before the settings were validated")

    moe, olmoe = make_moe("deepseek_v3"), make_moe("olmoe")
    max_act = np.tile([9.0, 8.0, 7.0, 0.0, 0.0, 0.0, 0.0, 0.0], (len(moe.layers), 1))
    run = make_run(tmp_path, moe, metrics_table(moe, {"max_act": max_act}))
    run.set("model", model_record(moe))
    other = make_run(tmp_path, olmoe, metrics_table(olmoe), name="olmoe")
    other.set("model", model_record(olmoe))
    monkeypatch.setattr(loading, "model_from_config", no_loading)
    for target, settings, fragment in [
            (run, dict(ratios=(0.375,)), "drops 3 of the 8 experts of layer 1, not a multiple of its 2 expert groups"),
            (run, dict(ratios=(0.5,), guard=3), "the guard protects experts [0, 1, 2] of layer 1 that group 0's "
                                                "share of 2 would drop"),
            (other, dict(ratios=(0.25,)), "routes without expert groups")]:
        with pytest.raises(InvalidParameterError) as err:
            run_prune(target, group_balanced=True, **settings)
        assert fragment in str(err.value) and "\n" not in str(err.value)
    assert not run.has("pruning") and not other.has("pruning")


def test_group_balanced_selection_refusals_are_one_line(tmp_path):
    moe = make_moe("deepseek_v3")
    run = make_run(tmp_path, moe, metrics_table(moe))
    with pytest.raises(InvalidParameterError, match="drops 3 of the 8 experts.*multiple of 2, e.g. 0.25 or 0.5"):
        select_kept(run, "frequency", 0.375, moe=moe, group_balanced=True)
    with pytest.raises(InvalidParameterError, match="`moe` must be the loaded model"):
        select_kept(run, "frequency", 0.25, group_balanced=True)
    olmoe = make_moe("olmoe")
    other = make_run(tmp_path, olmoe, metrics_table(olmoe), name="olmoe")
    with pytest.raises(InvalidParameterError, match="routes without expert groups"):
        select_kept(other, "frequency", 0.25, moe=olmoe, group_balanced=True)
