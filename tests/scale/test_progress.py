"""Progress within a work unit: stages report finished windows, and the bar moves per window."""

from __future__ import annotations

import io
import logging
import sys

import pyarrow as pa
import torch

from moeaudit.config import AuditConfig
from moeaudit.rundir import RunDir
from moeaudit.scale import LocalExecutor, UnitResult, WorkUnit, run_units, window_done
from moeaudit.scale.units import _WINDOW_HOOK


def test_run_units_reports_windows_inside_each_unit(tmp_path):
    run = RunDir(tmp_path / "run", AuditConfig(model="tiny-olmoe"))

    def compute(moe, payload):
        for _ in range(payload):
            window_done()
        window_done(5)  # a stage that over-reports is capped at what its units hold
        return UnitResult({"t": pa.table({"x": [payload]})}, {})

    units = [WorkUnit(f"u{i}", 4, windows=4) for i in range(3)]
    calls = []
    run_units(run, "demo", units, ("t",), compute, LocalExecutor(None), on_unit=lambda d, t: calls.append((d, t)))
    done = [d for d, _ in calls]
    assert calls[0] == (0, 12) and calls[-1] == (12, 12) and {t for _, t in calls} == {12}
    assert [1, 2, 3, 3, 3, 4] == done[1:7]  # per window inside the first unit; whole only once committed
    assert done == sorted(done) and max(done) == 12
    assert _WINDOW_HOOK.get() is None  # the hook does not outlive the stage


def test_compute_effects_and_observe_report_every_window():
    from moeaudit.intervene import compute_effects
    from moeaudit.models import wrap_model
    from moeaudit.models.testing import tiny_model
    from moeaudit.observe.forward import observe_batches

    moe = wrap_model(tiny_model("olmoe", seed=0))
    ids = torch.randint(3, 96, (3, 10), generator=torch.Generator().manual_seed(0))
    seen = []
    token = _WINDOW_HOOK.set(seen.append)
    try:
        compute_effects(moe, ids)
        assert seen == [1, 1, 1]
        seen.clear()
        windows = [type("W", (), {"seq": i, "token_ids": ids[i % 3].tolist()[: 6 + i % 2], "domain": None,
                                  "split": None})() for i in range(5)]
        list(observe_batches(moe, windows, batch_size=2))
        assert sum(seen) == 5 and max(seen) <= 2  # per batch of windows, every window once
    finally:
        _WINDOW_HOOK.reset(token)


def test_log_records_go_to_the_stderr_of_the_moment(monkeypatch):
    """While a rich progress bar is live, sys.stderr is rich's redirect: warnings must go there, not to the
    stream the handler saw when it was made."""
    from moeaudit.cli import configure_logging

    logger = logging.getLogger("moeaudit")
    saved = (list(logger.handlers), logger.level, logger.propagate)
    try:
        configure_logging(False, False)
        captured = io.StringIO()
        monkeypatch.setattr(sys, "stderr", captured)
        logging.getLogger("moeaudit.test").warning("above the bar")
        assert "WARNING moeaudit.test: above the bar" in captured.getvalue()
    finally:
        logger.handlers[:], logger.level, logger.propagate = saved
