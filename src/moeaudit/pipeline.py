"""The whole audit as one call: observe → metrics → intervene → audit → prune → report.

:func:`run_pipeline` sequences the stage functions (:func:`moeaudit.observe.stage.run_observe`,
:func:`moeaudit.metrics.stage.run_metrics`, :func:`moeaudit.intervene.stage.run_intervene`,
:func:`moeaudit.audit.stage.run_audit`, :func:`moeaudit.prune.run_prune`,
:func:`moeaudit.report.write_report`) on one run directory, the way ``moeaudit run`` and ``moeaudit demo``
do. Each stage resumes as it does when called alone (finished work units are kept and skipped), so
calling :func:`run_pipeline` again on an interrupted run finishes it.

Progress is reported as small frozen events (:class:`StageStarted`, :class:`StageProgress`,
:class:`StageFinished`, :class:`StageFailed`) to an optional callback; the library prints nothing. Each
stage's counters (the dict the stage function returns, also recorded in the manifest) are wrapped in a
frozen record (:class:`ObserveRecord`, ...) that reads like that dict (``record["tokens"]``) and has the
main numbers as typed fields.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Callable, Iterator, Optional, Union

if TYPE_CHECKING:  # pragma: no cover
    from moeaudit.models import MoEModel
    from moeaudit.rundir import RunDir

#: Every stage :func:`run_pipeline` can run, in the order it runs them.
STAGES = ("observe", "metrics", "intervene", "audit", "prune", "report")

#: The stages that run work units on the executor (and report progress over them).
EXECUTOR_STAGES = ("observe", "intervene", "prune")


# ---------------------------------------------------------------------------------------------- records


@dataclass(frozen=True)
class StageRecord(Mapping):
    """What one stage did: its counters, read-only, readable as a mapping.

    Parameters
    ----------
    stage : str
        The stage's name, one of :data:`STAGES`.
    counters : mapping
        Everything the stage function returned (for the computing stages, also recorded in the run's
        manifest under ``stages``); ``record[key]``, ``dict(record)`` and ``key in record`` read it.
    """

    stage: str
    counters: Mapping[str, Any] = field(repr=False)

    def __getitem__(self, key: str) -> Any:
        return self.counters[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.counters)

    def __len__(self) -> int:
        return len(self.counters)

    @classmethod
    def from_counters(cls, counters: Mapping[str, Any]) -> "StageRecord":
        """The record for a stage function's returned dict (copied, so the record stays unchanged)."""
        values = {name: counters.get(name) for name in cls._typed_fields()}
        return cls(stage=cls._stage, counters=MappingProxyType(dict(counters)), **values)

    _stage = ""

    @classmethod
    def _typed_fields(cls) -> tuple[str, ...]:
        from dataclasses import fields

        return tuple(f.name for f in fields(cls) if f.name not in ("stage", "counters"))


@dataclass(frozen=True)
class ObserveRecord(StageRecord):
    """Observe: windows and tokens written, routing rows, mean next-token NLL (nats), work units."""

    windows: Optional[int] = None
    tokens: Optional[int] = None
    routing_rows: Optional[int] = None
    mean_nll: Optional[float] = None
    units: Optional[int] = None
    resumed: Optional[int] = None
    _stage = "observe"


@dataclass(frozen=True)
class MetricsRecord(StageRecord):
    """Metrics: the split the metrics were computed on, its window count, the layers covered."""

    split: Optional[str] = None
    windows: Optional[int] = None
    layers: Optional[list] = None
    _stage = "metrics"


@dataclass(frozen=True)
class InterveneRecord(StageRecord):
    """Intervene: exact interventions, the noise floor (nats), engine, kind, scope and split."""

    interventions: Optional[int] = None
    noise_floor: Optional[float] = None
    engine: Optional[str] = None
    kind: Optional[str] = None
    scope: Optional[str] = None
    split: Optional[str] = None
    _stage = "intervene"


@dataclass(frozen=True)
class AuditRecord(StageRecord):
    """Audit: test cells, significant cells, positions per cell, the multiple-testing rule."""

    cells: Optional[int] = None
    significant: Optional[int] = None
    n: Optional[int] = None
    correction: Optional[str] = None
    alpha: Optional[float] = None
    _stage = "audit"


@dataclass(frozen=True)
class PruneRecord(StageRecord):
    """Prune: pruned configurations evaluated and the unpruned held-out perplexity."""

    configurations: Optional[int] = None
    unpruned_ppl: Optional[float] = None
    _stage = "prune"


@dataclass(frozen=True)
class ReportRecord(StageRecord):
    """Report: the HTML file written."""

    path: Optional[Path] = None
    _stage = "report"


RECORDS: dict[str, type[StageRecord]] = {
    "observe": ObserveRecord, "metrics": MetricsRecord, "intervene": InterveneRecord, "audit": AuditRecord,
    "prune": PruneRecord, "report": ReportRecord,
}


# ----------------------------------------------------------------------------------------------- events


@dataclass(frozen=True)
class StageStarted:
    """A stage begins."""

    stage: str


@dataclass(frozen=True)
class StageProgress:
    """Progress inside a stage that runs work units: ``done`` of ``total`` (windows or forward passes)."""

    stage: str
    done: int
    total: int


@dataclass(frozen=True)
class StageFinished:
    """A stage ended; ``record`` holds its counters, ``seconds`` its wall-clock time."""

    stage: str
    record: StageRecord
    seconds: float


@dataclass(frozen=True)
class StageFailed:
    """A stage raised ``error`` after ``seconds``; :func:`run_pipeline` re-raises it after this event."""

    stage: str
    error: BaseException
    seconds: float


ProgressEvent = Union[StageStarted, StageProgress, StageFinished, StageFailed]


@dataclass(frozen=True)
class PipelineResult:
    """What :func:`run_pipeline` did.

    Parameters
    ----------
    run : RunDir
        The run directory the tables were written to.
    records : mapping stage -> StageRecord
        One record per stage that ran, in stage order.
    seconds : mapping stage -> float
        Wall-clock seconds per stage that ran.
    """

    run: Any
    records: Mapping[str, StageRecord]
    seconds: Mapping[str, float]

    @property
    def stages(self) -> tuple[str, ...]:
        """The stages that ran, in order."""
        return tuple(self.records)

    @property
    def total_seconds(self) -> float:
        return float(sum(self.seconds.values()))

    def _repr_html_(self) -> str:
        import pandas as pd

        from moeaudit.tables import html_summary

        frame = pd.DataFrame({"stage": list(self.records), "seconds": [self.seconds.get(s, float("nan"))
                                                                          for s in self.records]})
        return html_summary(f"pipeline run in {self.run.path}", frame,
                            [f"{self.total_seconds:.1f} s in all; tables: RunDir(...).read(name)"])

    def __getitem__(self, stage: str) -> StageRecord:
        return self.records[stage]


# --------------------------------------------------------------------------------------------- pipeline


def run_pipeline(
    run: "RunDir",
    *,
    moe: "MoEModel | None" = None,
    corpus=None,
    executor=None,
    prune: bool = True,
    prune_options: Mapping[str, Any] | None = None,
    report: bool = True,
    on_progress: Callable[[ProgressEvent], None] | None = None,
) -> PipelineResult:
    """Run observe → metrics → intervene → audit → prune → report on ``run``.

    Each stage resumes as when it is called alone: finished work units of an interrupted run are kept
    and skipped, so the same call finishes it. The tables are those of calling the stage functions one by
    one with the same arguments.

    Parameters
    ----------
    run : RunDir
        The run directory (its config names the model, corpus and settings).
    moe : MoEModel, optional
        The loaded model. Default: loaded from the run's config when its executor is ``local``; with the
        ``ray`` executor the workers hold the model and the driver loads it only for the stages that need
        the weights (metrics, prune).
    corpus : optional
        Windows already built for this config (:func:`moeaudit.observe.stage.build_corpus`); default:
        built from the config and checked (:func:`moeaudit.observe.stage.prepare_corpus`) before the model
        loads.
    executor : optional
        Runs the work units of observe, intervene and prune. A given executor stays open (the caller
        closes it); by default one is made from the config and closed after the last stage that uses it,
        also when a stage fails.
    prune : bool
        Run the pruning stage (:func:`moeaudit.prune.run_prune`) after the audit.
    prune_options : mapping, optional
        Keyword arguments for :func:`moeaudit.prune.run_prune` (``ratios``, ``criteria``,
        ``random_seeds``, ``single_layer``, ``guard``, ...).
    report : bool
        Write ``report.html`` (and its figures) into the run directory at the end.
    on_progress : callable(event), optional
        Receives :class:`StageStarted`, :class:`StageProgress`, :class:`StageFinished` and
        :class:`StageFailed` events, in stage order.

    Returns
    -------
    PipelineResult
        The record and wall-clock seconds of every stage that ran.

    Raises
    ------
    Exception
        Whatever a stage raises, after a :class:`StageFailed` event; the tables of the stages that
        finished before it (and the finished work units of the failing one) stay in ``run``.
    """
    from moeaudit.audit.stage import run_audit
    from moeaudit.intervene.stage import run_intervene
    from moeaudit.metrics.stage import run_metrics
    from moeaudit.observe.stage import run_observe

    emit = on_progress or (lambda event: None)
    stages = [s for s in STAGES if (s != "prune" or prune) and (s != "report" or report)]
    last_executor_stage = [s for s in stages if s in EXECUTOR_STAGES][-1]
    records: dict[str, StageRecord] = {}
    seconds: dict[str, float] = {}

    from moeaudit.metrics.registry import check_audit_metrics

    check_audit_metrics(run.config.audit.audit_metrics)  # before any model loads or stage runs
    if corpus is None:  # a bad corpus, field or max_len: refused before the model loads
        from moeaudit.observe.stage import prepare_corpus

        corpus = prepare_corpus(run.config, moe or getattr(executor, "moe", None))
    if moe is None and executor is None and run.config.executor == "local":
        from moeaudit.models.loading import model_from_config

        moe = model_from_config(run.config)
    own_executor = executor is None
    if own_executor:
        from moeaudit.scale import make_executor

        executor = make_executor(run.config, moe)

    def progress(stage: str) -> Callable[[int, int], None]:
        return lambda done, total: emit(StageProgress(stage, int(done), int(total)))

    def compute(stage: str) -> Mapping[str, Any]:
        if stage == "observe":
            return run_observe(run, moe=moe, corpus=corpus, on_batch=progress(stage), executor=executor)
        if stage == "metrics":
            return run_metrics(run, moe=moe)
        if stage == "intervene":
            return run_intervene(run, moe=moe, on_batch=progress(stage), executor=executor)
        if stage == "audit":
            return run_audit(run)
        if stage == "prune":
            from moeaudit.prune import run_prune

            return run_prune(run, moe=moe, on_batch=progress(stage), executor=executor, **dict(prune_options or {}))
        from moeaudit.report import write_report

        return {"path": write_report(run.path, run.path / "report.html")}

    try:
        for stage in stages:
            emit(StageStarted(stage))
            started = time.perf_counter()
            try:
                counters = compute(stage)
            except BaseException as error:
                emit(StageFailed(stage, error, time.perf_counter() - started))
                raise
            finally:
                if own_executor and stage == last_executor_stage:
                    executor.close()
                    own_executor = False
            seconds[stage] = time.perf_counter() - started
            records[stage] = RECORDS[stage].from_counters(counters)
            emit(StageFinished(stage, records[stage], seconds[stage]))
    finally:
        if own_executor:  # a stage before the last executor stage failed
            executor.close()
    return PipelineResult(run=run, records=MappingProxyType(records), seconds=MappingProxyType(seconds))
