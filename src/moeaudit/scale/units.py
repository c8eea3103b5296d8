"""Work units: a stage's work cut into deterministic pieces, each written atomically and marked done.

The plan (the ordered unit ids) and every finished unit (its files' sizes and SHA-256 digests, its
counters) are recorded in ``manifest.json`` under ``units.<stage>``. A unit's tables live in
``units/<stage>/<unit>.<table>.parquet`` until the stage is complete; then they are merged, in plan
order, into the stage's tables and removed. Hence:

* a killed run loses at most the units in flight (files are renamed into place only when complete, and
  a unit counts as done only once the manifest says so);
* a re-run skips every unit whose files still match their recorded digests, and recomputes (with a
  warning) a unit whose file is missing, truncated or corrupted — it is never merged;
* the merged tables do not depend on how often the run was interrupted or which worker ran which unit.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from moeaudit.errors import RunDirectoryError, RunInterrupted
from moeaudit.rundir import RunDir, atomic_path

logger = logging.getLogger(__name__)

UNITS_DIR = "units"
LOCK_FILE = ".lock"

#: Called with a count of windows a unit in flight has just finished (set by :func:`run_units` around each
#: unit run in this process; unset elsewhere, e.g. in a Ray worker or a plain library call).
_WINDOW_HOOK: ContextVar[Callable[[int], None] | None] = ContextVar("moeaudit_window_hook", default=None)


@contextmanager
def windows_not_counted() -> Iterator[None]:
    """Within the block, :func:`window_done` counts nothing (work that is not the unit's windows, e.g. a check
    that runs a window through both engines)."""
    token = _WINDOW_HOOK.set(None)
    try:
        yield
    finally:
        _WINDOW_HOOK.reset(token)


def window_done(count: int = 1) -> None:
    """Report that ``count`` windows of the unit being computed are finished, so that a progress bar advances
    per window rather than per unit. A no-op outside :func:`run_units` (library calls, remote workers)."""
    hook = _WINDOW_HOOK.get()
    if hook is not None:
        hook(count)


@dataclass(frozen=True)
class WorkUnit:
    """One deterministic piece of a stage: ``id`` names it in the manifest, ``payload`` is its input.

    The payload holds everything the compute function needs (token ids, not file paths), so a worker on
    another machine needs no access to the run directory.
    """

    id: str
    payload: Any
    windows: int = 0


@dataclass
class UnitResult:
    """What a unit produces: Arrow tables by name and JSON-serialisable counters."""

    tables: dict[str, pa.Table]
    stats: dict[str, Any] = field(default_factory=dict)


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _file_record(path: Path) -> dict[str, Any]:
    return {"bytes": path.stat().st_size, "sha256": file_digest(path)}


def _file_problem(path: Path, record: dict[str, Any]) -> str | None:
    """Why ``path`` no longer is the file recorded (None when it is)."""
    if not path.is_file():
        return "missing"
    size = path.stat().st_size
    if size != record["bytes"]:
        return f"truncated or altered ({size} bytes, {record['bytes']} recorded)"
    if file_digest(path) != record["sha256"]:
        return "corrupted (SHA-256 differs from the recorded digest)"
    return None


class UnitStore:
    """The units of one stage in one run directory.

    Parameters
    ----------
    run : RunDir
    stage : str
    plan : sequence of str
        The stage's unit ids in merge order. A stored plan that differs (other windows, another unit
        size) is discarded with its units.
    tables : sequence of str
        The tables every unit writes (and the stage's merged outputs).
    """

    def __init__(self, run: RunDir, stage: str, plan: Sequence[str], tables: Sequence[str]):
        self.run, self.stage, self.tables = run, stage, tuple(tables)
        self.dir = run.path / UNITS_DIR / stage
        units = run.manifest.setdefault("units", {})
        entry = units.get(stage)
        if entry is None or entry.get("plan") != list(plan) or entry.get("tables") != list(self.tables):
            if entry is not None:
                logger.warning("%s: the work-unit plan changed (other settings, windows or unit size); starting the "
                               "stage afresh", stage)
            shutil.rmtree(self.dir, ignore_errors=True)
            entry = {"plan": list(plan), "tables": list(self.tables), "done": {}, "complete": None}
            units[stage] = entry
            run.save()
        self.entry = entry
        # A killed run leaves its in-flight temporary files behind; nothing else writes here.
        for stale in self.dir.glob(".*.tmp-*") if self.dir.is_dir() else ():
            stale.unlink(missing_ok=True)

    # ------------------------------------------------------------------ state
    @property
    def plan(self) -> list[str]:
        return self.entry["plan"]

    def unit_path(self, unit_id: str, table: str) -> Path:
        return self.dir / f"{unit_id}.{table}.parquet"

    def complete(self) -> bool:
        """True when the merged tables exist and match their digests (else the stage is reopened)."""
        complete = self.entry.get("complete")
        if not complete:
            return False
        # A run killed right after its merge was recorded may have left the unit files behind.
        shutil.rmtree(self.dir, ignore_errors=True)
        for table, record in complete.items():
            problem = _file_problem(self.run.table_path(table), record)
            if problem is not None:
                logger.warning("%s: %s.parquet is %s; recomputing the stage", self.stage, table, problem)
                self.entry.update(complete=None, done={})
                self.run.save()
                return False
        return True

    def verified_done(self) -> set[str]:
        """Ids of finished units whose files still match the manifest; bad units are dropped (recomputed)."""
        done = self.entry["done"]
        for unit_id in list(done):
            for table, record in done[unit_id]["files"].items():
                problem = _file_problem(self.unit_path(unit_id, table), record)
                if problem is not None:
                    logger.warning("%s: unit %s (%s) is %s; recomputing it", self.stage, unit_id, table, problem)
                    self.unit_path(unit_id, table).unlink(missing_ok=True)
                    del done[unit_id]
                    break
        self.run.save()
        return set(done)

    # ------------------------------------------------------------------ writing
    def commit(self, unit_id: str, result: UnitResult) -> None:
        """Write the unit's tables atomically, then mark it done in the manifest."""
        missing = set(self.tables) - set(result.tables)
        if missing:
            raise RuntimeError(f"unit {unit_id} of {self.stage} returned no {sorted(missing)} table")
        self.dir.mkdir(parents=True, exist_ok=True)
        files = {}
        for table in self.tables:
            path = self.unit_path(unit_id, table)
            with atomic_path(path) as tmp:
                pq.write_table(result.tables[table], tmp)
            files[table] = _file_record(path)
        self.entry["done"][unit_id] = {"files": files, "stats": result.stats}
        self.run.save()

    def merge(self) -> None:
        """Concatenate every unit, in plan order, into the stage's tables; then remove the unit files."""
        done = self.entry["done"]
        complete = {}
        for table in self.tables:
            paths = [self.unit_path(unit_id, table) for unit_id in self.plan]
            for unit_id, path in zip(self.plan, paths):
                problem = _file_problem(path, done[unit_id]["files"][table])
                if problem is not None:
                    del done[unit_id]
                    self.run.save()
                    raise RunDirectoryError(f"unit {unit_id} of {self.stage} became {problem} during the run; "
                                            "re-run the same command to recompute it")
            schema = pa.unify_schemas([pq.read_schema(p) for p in paths], promote_options="permissive")
            with self.run.writing(table) as tmp:
                with pq.ParquetWriter(tmp, schema) as writer:
                    for path in paths:
                        part = pq.read_table(path)
                        writer.write_table(part.cast(schema) if part.schema != schema else part)
            complete[table] = _file_record(self.run.table_path(table))
        self.entry["complete"] = complete
        self.run.save()
        shutil.rmtree(self.dir, ignore_errors=True)

    def stats(self) -> list[dict[str, Any]]:
        """Each unit's counters, in plan order."""
        return [self.entry["done"][unit_id]["stats"] for unit_id in self.plan]


@contextmanager
def exclusive(run: RunDir, stage: str) -> Iterator[None]:
    """Hold the run directory's lock: two processes writing one manifest would lose each other's units.

    The lock is an OS file lock, so a killed process (even by SIGKILL) releases it.
    """
    import fcntl
    import os

    path = run.path / LOCK_FILE
    try:
        handle = open(path, "a+")
    except OSError as err:
        raise RunDirectoryError(f"cannot write to {run.path} ({err.strerror or err}); make it writable or copy the "
                                "run directory somewhere writable") from None
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise RunDirectoryError(f"{run.path} is in use by {holder}; wait for it to finish or use another "
                                    "run directory") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"moeaudit pid {os.getpid()} ({stage})")
        handle.flush()
        yield
    finally:
        handle.close()


STAGE_ORDER = ("observe", "metrics", "intervene", "audit", "prune")


def lock_holder(run: RunDir) -> str | None:
    """Who holds the run directory's lock now (None when no process does)."""
    import fcntl

    path = run.path / LOCK_FILE
    if not path.exists():
        return None
    try:
        handle = open(path, "r")  # read-only: status works on a read-only run directory (flock needs no write)
    except OSError:
        return None
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return handle.read().strip() or "another process"
        return None


def run_status(run: RunDir):
    """One row per stage: ``stage``, ``state`` (done, running, interrupted), ``units_done``,
    ``units_planned`` (null for stages without units) and ``finished`` (when the stage last finished)."""
    import pandas as pd

    holder = lock_holder(run)
    running = holder.rsplit("(", 1)[-1].rstrip(")") if holder else None
    stages, units = run.manifest.get("stages", {}), run.manifest.get("units", {})
    names = [s for s in STAGE_ORDER if s in stages or s in units]
    names += sorted((set(stages) | set(units)) - set(names))
    rows = []
    for name in names:
        entry = units.get(name)
        complete = bool(entry and entry.get("complete"))
        done = (len(entry["plan"]) if complete else len(entry["done"])) if entry else None
        if name == running:
            state = "running"
        elif entry is not None and not complete:
            state = "interrupted"
        else:
            state = "done"
        rows.append({"stage": name, "state": state, "units_done": done,
                     "units_planned": len(entry["plan"]) if entry else None,
                     "finished": stages.get(name, {}).get("finished") if state == "done" else None})
    return pd.DataFrame(rows, columns=["stage", "state", "units_done", "units_planned", "finished"]).astype(
        {"units_done": "Int64", "units_planned": "Int64"})


def run_units(run: RunDir, stage: str, units: Sequence[WorkUnit], tables: Sequence[str],
              compute: Callable[[Any, Any], UnitResult], executor, *,
              on_unit: Callable[[int, int], None] | None = None) -> tuple[UnitStore, dict[str, int]]:
    """Run the units of ``stage`` that are not done yet through ``executor`` and merge the tables.

    Returns the store (its ``stats()`` are every unit's counters) and how many units were computed now
    and taken from an earlier, interrupted run. Refused while another process works on the same run.
    """
    with exclusive(run, stage):
        # Another process may have finished units since this one read the manifest.
        run.reload()
        return _run_units(run, stage, units, tables, compute, executor, on_unit)


def _run_units(run, stage, units, tables, compute, executor, on_unit):
    store = UnitStore(run, stage, [u.id for u in units], tables)
    total_windows = sum(u.windows for u in units)
    if store.complete():
        if on_unit is not None:
            on_unit(total_windows, total_windows)
        return store, {"units": len(units), "computed": 0, "resumed": len(units)}
    done = store.verified_done()
    pending = [u for u in units if u.id not in done]
    windows_done = total_windows - sum(u.windows for u in pending)
    if done:
        logger.warning("%s: resuming %s — %d of %d units already done", stage, run.path, len(done), len(units))
    if on_unit is not None:
        on_unit(windows_done, total_windows)
    # windows reported by the unit in flight (units run in plan order in this process), never more than it holds
    in_flight, finished = [0], [0]

    def advance(count: int) -> None:
        current = pending[min(finished[0], len(pending) - 1)].windows
        in_flight[0] = min(current - 1, in_flight[0] + count)  # a unit counts whole only once it is committed
        if on_unit is not None:
            on_unit(windows_done + in_flight[0], total_windows)

    token = _WINDOW_HOOK.set(advance)
    try:
        for unit, result in executor.map(compute, pending):
            store.commit(unit.id, result)
            windows_done += unit.windows
            in_flight[0] = 0
            finished[0] += 1
            if on_unit is not None:
                on_unit(windows_done, total_windows)
    except KeyboardInterrupt:
        finished = len(store.entry["done"])
        raise RunInterrupted(f"interrupted during {stage}: {finished} of {len(units)} work units are finished "
                             f"and kept in {run.path}; re-run the same command to resume") from None
    finally:
        _WINDOW_HOOK.reset(token)
    store.merge()
    return store, {"units": len(units), "computed": len(pending), "resumed": len(units) - len(pending)}


def chunks(count: int, size: int) -> Iterator[tuple[int, int]]:
    """``(start, stop)`` of consecutive chunks of ``size`` covering ``range(count)``."""
    for start in range(0, count, size):
        yield start, min(start + size, count)


def unit_id(prefix: str, start: int, stop: int) -> str:
    """A stable, file-name-safe id such as ``census-w000016-000031`` (windows start..stop-1)."""
    safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in prefix)
    return f"{safe}-w{start:06d}-{stop - 1:06d}"

