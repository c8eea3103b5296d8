"""`run_pipeline`: the stage functions in sequence, with progress events and records; the same tables as
calling the stages one by one, and a failing stage keeps what finished before it."""

from __future__ import annotations

import pandas as pd
import pytest

from moeaudit.audit.stage import run_audit
from moeaudit.config import AuditConfig
from moeaudit.intervene.stage import run_intervene
from moeaudit.metrics.stage import run_metrics
from moeaudit.models import builtin, load_model
from moeaudit.observe.stage import run_observe
from moeaudit.pipeline import (STAGES, AuditRecord, InterveneRecord, ObserveRecord, PipelineResult, StageFailed,
                               StageFinished, StageProgress, StageStarted, run_pipeline)
from moeaudit.prune import run_prune
from moeaudit.rundir import RunDir

pytestmark = [
    pytest.mark.slow,  # whole pipelines on the built-in model: deselected by -m "not slow"
    pytest.mark.skipif(not (builtin.builtin_path("tiny-olmoe") / "model.safetensors").exists(),
                       reason="built-in model weights not present"),
]

PRUNE = dict(ratios=(0.25,), criteria=["reap", "frequency", "random"], random_seeds=2, single_layer=False)


def _config() -> AuditConfig:
    return AuditConfig(model="tiny-olmoe", corpus="builtin", max_windows=4, max_len=32, unit_windows=2)


@pytest.fixture(scope="module")
def moe():
    return load_model("tiny-olmoe")


@pytest.fixture(scope="module")
def piped(moe, tmp_path_factory):
    events = []
    run = RunDir(tmp_path_factory.mktemp("pipeline") / "run", _config())
    result = run_pipeline(run, moe=moe, prune_options=PRUNE, on_progress=events.append)
    return run, result, events


@pytest.fixture(scope="module")
def by_hand(moe, tmp_path_factory):
    run = RunDir(tmp_path_factory.mktemp("stages") / "run", _config())
    run_observe(run, moe=moe)
    run_metrics(run, moe=moe)
    run_intervene(run, moe=moe)
    run_audit(run)
    run_prune(run, moe=moe, **PRUNE)
    return run


def _tables(run: RunDir) -> list[str]:
    return sorted(path.stem for path in run.path.glob("*.parquet"))


def test_pipeline_tables_equal_the_stages_called_one_by_one(piped, by_hand):
    run, _, _ = piped
    assert _tables(run) == _tables(by_hand)
    assert {"tokens", "routing", "expert_metrics", "effects", "tests", "pruning", "jaccard"} <= set(_tables(run))
    for table in _tables(run):
        pd.testing.assert_frame_equal(run.read(table), by_hand.read(table), check_exact=True, obj=table)
    assert (run.path / "report.html").exists()


def test_events_arrive_in_stage_order(piped):
    run, result, events = piped
    assert [e.stage for e in events if isinstance(e, StageStarted)] == list(STAGES)
    assert [e.stage for e in events if isinstance(e, StageFinished)] == list(STAGES)
    assert not any(isinstance(e, StageFailed) for e in events)
    current = None
    for event in events:  # every stage's events lie between its start and its finish
        if isinstance(event, StageStarted):
            assert current is None
            current = event.stage
        else:
            assert event.stage == current
            if isinstance(event, StageFinished):
                current = None
    progress = [e for e in events if isinstance(e, StageProgress)]
    assert {e.stage for e in progress} == {"observe", "intervene", "prune"}
    assert all(0 <= e.done <= e.total for e in progress)
    finished = {e.stage: e for e in events if isinstance(e, StageFinished)}
    assert {stage: e.record for stage, e in finished.items()} == dict(result.records)
    assert {stage: e.seconds for stage, e in finished.items()} == dict(result.seconds)


def test_result_holds_a_record_per_stage(piped):
    run, result, _ = piped
    assert isinstance(result, PipelineResult) and result.stages == STAGES and result.run is run
    observed, intervened, audited = result["observe"], result["intervene"], result["audit"]
    assert isinstance(observed, ObserveRecord) and isinstance(intervened, InterveneRecord)
    assert isinstance(audited, AuditRecord)
    assert observed.tokens == observed["tokens"] == len(run.read("tokens"))
    assert dict(observed) == {k: v for k, v in run.manifest["stages"]["observe"].items() if k in observed}
    assert intervened.interventions > 0 and audited.cells == len(run.read("tests"))
    assert result["report"].path == run.path / "report.html"
    with pytest.raises(Exception):
        result["observe"].counters["tokens"] = 0  # records are read-only
    assert result.total_seconds >= max(result.seconds.values())


def test_a_failing_stage_propagates_and_keeps_the_finished_tables(moe, by_hand, tmp_path, monkeypatch):
    import moeaudit.audit.stage
    import moeaudit.scale

    closed = []
    made = moeaudit.scale.make_executor

    def tracked(config, moe=None):
        executor = made(config, moe)
        executor.close = lambda: closed.append(True)
        return executor

    def broken(run, settings=None):
        raise RuntimeError("audit broke")

    monkeypatch.setattr(moeaudit.scale, "make_executor", tracked)
    monkeypatch.setattr(moeaudit.audit.stage, "run_audit", broken)
    events = []
    run = RunDir(tmp_path / "run", _config())
    with pytest.raises(RuntimeError, match="audit broke"):
        run_pipeline(run, moe=moe, on_progress=events.append)
    assert isinstance(events[-1], StageFailed) and events[-1].stage == "audit"
    assert [e.stage for e in events if isinstance(e, StageFinished)] == ["observe", "metrics", "intervene"]
    assert closed == [True], "the pipeline closes the executor it made, once"
    assert set(run.manifest["stages"]) == {"observe", "metrics", "intervene"}
    for table in ("tokens", "routing", "router_probs", "expert_metrics", "effects"):
        pd.testing.assert_frame_equal(run.read(table), by_hand.read(table), check_exact=True, obj=table)
    assert not run.has("tests")

    # the same call, with the stage mended, resumes: observe and intervene reuse their work units
    monkeypatch.undo()
    result = run_pipeline(RunDir(tmp_path / "run"), moe=moe, prune=False, report=False)
    assert result.stages == ("observe", "metrics", "intervene", "audit")
    assert result["observe"]["computed"] == 0 and result["intervene"]["computed"] == 0
    pd.testing.assert_frame_equal(RunDir(tmp_path / "run").read("tests"), by_hand.read("tests"), check_exact=True)


def test_a_given_executor_stays_open(moe, tmp_path):
    from moeaudit.scale import make_executor

    executor = make_executor(_config(), moe)
    closed = []
    executor.close = lambda: closed.append(True)
    run_pipeline(RunDir(tmp_path / "run", _config()), moe=moe, executor=executor, prune=False, report=False)
    assert closed == []


def test_top_level_export_is_lazy():
    import subprocess
    import sys

    code = "import sys, moeaudit\nassert 'moeaudit.pipeline' not in sys.modules\nprint(moeaudit.run_pipeline.__module__)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "moeaudit.pipeline"
