"""The interactions stage and `moeaudit interactions` on a small real run of the built-in model."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from moeaudit.rundir import RunDir
from tests.calibration.conftest import HAS_BUILTIN, copy_run, small_run

pytestmark = pytest.mark.skipif(not HAS_BUILTIN, reason="built-in model weights not present")
TOKEN = ["layer", "seq", "pos"]


@pytest.fixture(scope="module")
def observed(tmp_path_factory):
    """observe + metrics of tiny-olmoe (4 MoE layers, top-4): 6 calibration and 6 held-out windows."""
    return small_run(tmp_path_factory.mktemp("interactions") / "run", max_windows=6).path


@pytest.fixture
def run_dir(observed, tmp_path):
    return copy_run(observed, tmp_path / "run")


def write_pruning(run_dir) -> pd.DataFrame:
    """A pruning table's set columns: one criterion and two random draws at layers 0 and 3."""
    sets = pd.DataFrame({
        "criterion": ["reap", "reap", "random", "random", "random", "random"], "ratio": [0.25] * 6,
        "seed": pd.array([None, None, 1, 1, 2, 2], dtype="Int64"), "mode": "all_layers", "layer": [0, 3, 0, 3, 0, 3],
        "dropped": [list(range(8)), list(range(8, 16)), list(range(16, 24)), list(range(0, 32, 4)),
                    list(range(1, 32, 4)), list(range(2, 32, 4))],
    })
    sets.to_parquet(run_dir / "pruning.parquet", index=False)
    return sets


def test_stage_writes_the_tables_on_held_out_tokens(run_dir):
    from moeaudit.config import AuditConfig
    from moeaudit.interactions import measure_interactions, run_interactions
    from moeaudit.intervene.stage import windows_from_tokens
    from moeaudit.models.loading import model_from_config

    write_pruning(run_dir)
    run = RunDir(run_dir)
    run = RunDir(run_dir, run.config.replace(interactions_n=15, interactions_layers=[0, 3]))
    info = run_interactions(run)
    shapley, pairs, sets = run.read("shapley"), run.read("interactions"), run.read("interaction_sets")
    tokens = run.read("tokens", columns=["seq", "split"])
    heldout = set(tokens.loc[tokens["split"] == "heldout", "seq"])
    assert set(shapley["seq"]) <= heldout and set(pairs["seq"]) <= heldout
    assert info["tokens"] == {"0": 15, "3": 15} and info["split"] == "heldout" and info["engine"] == "fast"
    assert len(shapley) == 2 * 15 * 4 and len(pairs) == 2 * 15 * 6 and len(sets) == 2 * 15 * 3
    assert info["removals"] == 2 * 15 * 16 and info["sets"] == 6
    assert run.has("shapley_tests") and set(run.read("shapley_tests")["outcome"]) == {"single", "shapley"}
    assert [row["layer"] for row in info["summary"]] == [0, 3]
    assert run.manifest["stages"]["interactions"]["settings"]["interactions_n"] == 15
    # the same numbers as the library on the same windows (seq mapped back to the run's numbering)
    chosen, _ = run.intervened_tokens(["pos", "token_id"])
    seqs, ids, _ = windows_from_tokens(chosen)
    moe = model_from_config(AuditConfig(model="tiny-olmoe"))
    direct = measure_interactions(moe, ids, layers=[0, 3], n=15, seed=run.config.seed).shapley
    direct["seq"] = seqs[direct["seq"].to_numpy()]
    merged = shapley.merge(direct, on=TOKEN + ["expert"], suffixes=("", "_direct"))
    assert len(merged) == len(shapley) and np.allclose(merged["shapley"], merged["shapley_direct"], atol=1e-6)
    # a later run without a pruning table leaves no stale set table behind
    (run_dir / "pruning.parquet").unlink()
    run_interactions(RunDir(run_dir))
    assert not (run_dir / "interaction_sets.parquet").exists()


def test_the_report_section_shows_the_tables(run_dir, tmp_path):
    import html
    import re

    from moeaudit.interactions import interaction_summary, run_interactions
    from moeaudit.report import write_report

    write_pruning(run_dir)
    run = RunDir(run_dir)
    run_interactions(RunDir(run_dir, run.config.replace(interactions_n=10, interactions_layers=[0, 3])))
    page = write_report(run_dir, tmp_path / "report.html").read_text()
    start = page.index("<h3>Experts removed together</h3>")
    body = page[start:page.find("</section>", start)]
    assert "could not be drawn" not in body and "Not available" not in body and body.count("<img ") == 1
    tables = body.split("<tbody>")[1:]
    assert len(tables) == 2  # the per-layer summary and the pruned sets
    rows = re.findall(r"<tr><th>(\d+)</th>(.*?)</tr>", tables[0])
    summary = interaction_summary(run.read("interactions"), run.read("shapley"))
    assert [int(layer) for layer, _ in rows] == [0, 3]
    first = re.findall(r"<td>(.*?)</td>", rows[0][1])
    assert first[2] == format(summary.loc[0, "mean_interaction"], "+.3g")
    assert html.unescape(first[4]) == f"{100 * summary.loc[0, 'share_positive']:.0f} %"
    assert len(re.findall(r"<tr>", tables[1])) == 2  # ratio 0.25 at layers 0 and 3
    assert "on single effects" in body and "on Shapley values" in body
    assert list((tmp_path / "figures").glob("*interactions.png"))


def test_an_interrupted_stage_resumes_to_the_uninterrupted_tables(run_dir, tmp_path, monkeypatch):
    """Units of 2 windows: a Ctrl-C after the first unit keeps it; the re-run computes only the others and writes
    the tables an uninterrupted run writes (bit for bit), on a copy of the same run. Other interactions settings
    make other unit ids, so a changed re-run starts afresh instead of merging stale units."""
    from moeaudit.errors import RunInterrupted
    from moeaudit.interactions import run_interactions
    from moeaudit.scale.units import UnitStore

    write_pruning(run_dir)
    other = copy_run(run_dir, tmp_path / "other")

    def configured(path, **changes):
        run = RunDir(path)
        return RunDir(path, run.config.replace(interactions_n=12, interactions_layers=[0, 3], unit_windows=2,
                                               **changes))

    commit = UnitStore.commit

    def interrupted_commit(self, unit_id, result):
        commit(self, unit_id, result)
        if self.stage == "interactions" and len(self.entry["done"]) == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(UnitStore, "commit", interrupted_commit)
    with pytest.raises(RunInterrupted, match="1 of 3 work units are finished"):
        run_interactions(configured(run_dir))
    assert not (run_dir / "shapley.parquet").exists()
    monkeypatch.setattr(UnitStore, "commit", commit)
    resumed = run_interactions(configured(run_dir))
    assert (resumed["units"], resumed["computed"], resumed["resumed"]) == (3, 2, 1)
    whole = run_interactions(configured(other))
    assert whole["computed"] == 3 and whole["tokens"] == resumed["tokens"] == {"0": 12, "3": 12}
    for table in ("interactions", "shapley", "interaction_sets", "shapley_tests"):
        pd.testing.assert_frame_equal(RunDir(run_dir).read(table), RunDir(other).read(table), check_exact=True)
    # other settings: other unit ids, the stored units dropped; the same settings again: nothing recomputed
    changed = run_interactions(configured(run_dir, interactions_kind="renorm"))
    assert changed["computed"] == 3 and set(RunDir(run_dir).read("shapley")["kind"]) == {"renorm"}
    again = run_interactions(configured(run_dir, interactions_kind="renorm"))
    assert again["computed"] == 0 and again["resumed"] == 3


def test_a_unit_out_of_memory_is_retried_with_smaller_batches(run_dir, tmp_path, monkeypatch):
    """As the intervene stage: rows per call halved until the unit fits, the size that ran recorded, the same
    tables (rows are computed independently; only rounding may differ)."""
    import moeaudit.interactions.measure as measure_module
    from moeaudit.interactions import run_interactions
    from tests.scale.test_faults import _oom

    other = copy_run(run_dir, tmp_path / "other")

    def configured(path):
        run = RunDir(path)
        return RunDir(path, run.config.replace(interactions_n=8, interactions_layers=[1]))

    plain = run_interactions(configured(other))
    real = measure_module.removal_outcomes
    seen = []

    def limited(*args, config, **kwargs):
        seen.append(config.rows_per_call)
        if config.rows_per_call > 64:
            raise _oom()
        return real(*args, config=config, **kwargs)

    monkeypatch.setattr(measure_module, "removal_outcomes", limited)
    info = run_interactions(configured(run_dir))
    assert (plain["rows_per_call_used"], info["rows_per_call_used"]) == (256, 64) and seen[:3] == [256, 128, 64]
    got, expected = RunDir(run_dir).read("shapley"), RunDir(other).read("shapley")
    pd.testing.assert_frame_equal(got.drop(columns=["shapley", "delta_nll_single", "delta_nll_all"]),
                                  expected.drop(columns=["shapley", "delta_nll_single", "delta_nll_all"]))
    np.testing.assert_allclose(got["shapley"], expected["shapley"], atol=1e-5)
