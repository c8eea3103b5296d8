"""Work units: kill a real `moeaudit run` (SIGTERM, SIGINT, SIGKILL) at several points, resume it, and get
the uninterrupted run's tables bit for bit; damaged unit files are detected and recomputed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from moeaudit.config import AuditConfig
from moeaudit.errors import RunDirectoryError, RunInterrupted
from moeaudit.intervene.stage import run_intervene
from moeaudit.models import load_model
from moeaudit.observe.stage import run_observe
from moeaudit.rundir import RunDir
from tests.cli.conftest import cli  # noqa: F401  (fixture)
from tests.conftest import HANG_GUARD_S
from tests.scale.conftest import SMALL_RUN, assert_same_tables

pytestmark = pytest.mark.slow  # end-to-end: deselected by -m "not slow"


#: Runs the moeaudit CLI with one change: once ``stage`` has ``units`` finished units, the process writes
#: ``marker`` and waits there. The test signals it then, so the signal always lands at that point, however
#: busy the machine (the run cannot finish first).
_PAUSED_CLI = """
import signal, sys, time
# Ctrl-C as in a terminal, whatever this process inherited: a shell starts background jobs with SIGINT
# ignored, and Python then keeps it ignored, so the SIGINT below would never arrive.
signal.signal(signal.SIGINT, signal.default_int_handler)
from moeaudit.scale.units import UnitStore
stage, units, marker = sys.argv[1], int(sys.argv[2]), sys.argv[3]
commit = UnitStore.commit
def paused_commit(self, unit_id, result):
    commit(self, unit_id, result)
    if self.stage == stage and len(self.entry["done"]) >= units:
        open(marker, "w").close()
        while True:
            time.sleep(0.05)
UnitStore.commit = paused_commit
sys.argv = ["moeaudit", *sys.argv[4:]]
from moeaudit.cli import main
main()
"""


def _moeaudit(*args: str, pause: tuple[str, int, Path] | None = None) -> subprocess.Popen:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if pause is None:
        command = [sys.executable, "-m", "moeaudit", *args]
    else:
        stage, units, marker = pause
        command = [sys.executable, "-c", _PAUSED_CLI, stage, str(units), str(marker), *args]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _interrupted_run(out: Path, args: tuple[str, ...], stage: str, units: int, sig: int) -> tuple[int, str]:
    """Run ``moeaudit run --out out *args``, send ``sig`` once ``stage`` has ``units`` finished units (the
    process waits there); return (exit code, stderr)."""
    marker = out.parent / f".paused-{stage}-{units}-{int(sig)}"
    marker.unlink(missing_ok=True)
    proc = _moeaudit("run", "--out", str(out), *args, pause=(stage, units, marker))
    try:
        while not marker.exists():  # the paused process waits for the signal; one that ends early fails here
            assert proc.poll() is None, f"the run ended before {units} {stage} units were done: {proc.stderr.read()}"
            time.sleep(0.05)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=HANG_GUARD_S)
    finally:  # a failed test leaves no paused process behind
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    return proc.returncode, err


def test_killed_run_resumes_to_identical_tables(tmp_path):
    reference, out = tmp_path / "reference", tmp_path / "interrupted"
    args = (*SMALL_RUN, "--unit-windows", "2")
    done = _moeaudit("run", "--out", str(reference), *args)
    _, err = done.communicate(timeout=HANG_GUARD_S)
    assert done.returncode == 0, err

    # SIGTERM in the middle of observe: the message says where to resume.
    code, err = _interrupted_run(out, args, "observe", 3, signal.SIGTERM)
    assert code == 130, err
    assert "interrupted during observe" in err and "re-run the same command to resume" in err
    # SIGINT in the middle of intervene (observe was resumed, not recomputed).
    code, err = _interrupted_run(out, args, "intervene", 1, signal.SIGINT)
    assert code == 130, err
    assert "interrupted during intervene" in err
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["stages"]["observe"]["resumed"] >= 3
    # SIGKILL: no handler runs at all; the manifest and the finished units must still be consistent.
    code, _ = _interrupted_run(out, args, "intervene", 3, signal.SIGKILL)
    assert code == -signal.SIGKILL

    final = _moeaudit("run", "--out", str(out), *args)
    _, err = final.communicate(timeout=HANG_GUARD_S)
    assert final.returncode == 0, err
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["stages"]["intervene"]["resumed"] >= 3
    assert manifest["stages"]["intervene"]["computed"] >= 1
    assert_same_tables(reference, out)
    assert not (out / "units").exists() or not any((out / "units").rglob("*")), "unit files left behind"
    assert not list(out.glob(".*tmp*")), "temporary files left behind"


@pytest.fixture(scope="module")
def moe():
    return load_model("tiny-olmoe")


def _config(**overrides) -> AuditConfig:
    values = dict(model="tiny-olmoe", max_windows=6, max_len=48, unit_windows=2, progressive=False)
    return AuditConfig(**dict(values, **overrides))


def _interrupt_after(units: int, windows_per_unit: int | None = None):
    """Interrupt once ``units`` work units are committed. Stages that report windows inside a unit call
    back per window too; their windows reach a unit's full count only at its commit, so with
    ``windows_per_unit`` the interrupt fires at the first report of ``units`` whole units."""
    calls = []

    def on_unit(done, total):
        calls.append(done)
        if windows_per_unit is None:
            if len(calls) > units:  # the first call reports the starting point
                raise KeyboardInterrupt
        elif done - calls[0] >= units * windows_per_unit:
            raise KeyboardInterrupt

    return on_unit


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, moe):
    run = RunDir(tmp_path_factory.mktemp("reference"), _config())
    run_observe(run, moe=moe)
    run_intervene(run, moe=moe)
    return run.path


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete"])
def test_damaged_unit_is_recomputed_not_merged(tmp_path, moe, reference_run, damage, caplog):
    run = RunDir(tmp_path, _config())
    run_observe(run, moe=moe)
    with pytest.raises(RunInterrupted, match="2 of 3 work units are finished"):
        run_intervene(run, moe=moe, on_batch=_interrupt_after(2, 2))
    unit = next((tmp_path / "units" / "intervene").glob("census-fast-w000000-000001.effects.parquet"))
    data = unit.read_bytes()
    if damage == "truncate":
        unit.write_bytes(data[: len(data) // 2])
    elif damage == "flip":
        unit.write_bytes(data[:100] + bytes([data[100] ^ 0xFF]) + data[101:])
    else:
        unit.unlink()
    info = run_intervene(RunDir(tmp_path), moe=moe)
    assert (info["resumed"], info["computed"]) == (1, 2)
    assert "census-fast-w000000-000001" in caplog.text and "recomputing it" in caplog.text
    assert_same_tables(reference_run, tmp_path, tables=("tokens", "routing", "effects"))


def test_damaged_merged_table_reopens_the_stage(tmp_path, moe, reference_run, caplog):
    run = RunDir(tmp_path, _config())
    run_observe(run, moe=moe)
    again = run_observe(RunDir(tmp_path), moe=moe)
    assert (again["computed"], again["resumed"]) == (0, 6)
    routing = tmp_path / "routing.parquet"
    routing.write_bytes(routing.read_bytes()[:-50])
    info = run_observe(RunDir(tmp_path), moe=moe)
    assert info["computed"] == 6 and "routing.parquet is truncated" in caplog.text
    assert_same_tables(reference_run, tmp_path, tables=("tokens", "routing", "router_probs"))


def test_changed_plan_starts_the_stage_afresh(tmp_path, moe, reference_run):
    run = RunDir(tmp_path, _config())
    run_observe(run, moe=moe)
    with pytest.raises(RunInterrupted):
        run_intervene(run, moe=moe, on_batch=_interrupt_after(1, 2))
    info = run_intervene(RunDir(tmp_path, _config(unit_windows=3)), moe=moe)
    assert (info["units"], info["resumed"], info["computed"]) == (2, 0, 2)
    assert_same_tables(reference_run, tmp_path, tables=("effects",))


def test_changed_model_is_refused(tmp_path, moe):
    import torch
    from transformers import AutoTokenizer

    from moeaudit.models.builtin import tokenizer_path

    checkpoint = tmp_path / "ckpt"
    moe.model.save_pretrained(checkpoint)
    AutoTokenizer.from_pretrained(tokenizer_path()).save_pretrained(checkpoint)
    config = _config(model=str(checkpoint), max_windows=2)
    run = RunDir(tmp_path / "run", config)
    run_observe(run)
    changed = load_model(str(checkpoint))
    with torch.no_grad():
        changed.model.lm_head.weight.mul_(1.01)
    changed.model.save_pretrained(checkpoint)
    with pytest.raises(RunDirectoryError, match="changed since .* was made .* pass --overwrite"):
        run_intervene(RunDir(tmp_path / "run", config))


PRUNE_ARGS = dict(ratios=[0.25], criteria=["reap", "frequency", "random"], random_seeds=3, single_layer=True)


def test_interrupted_prune_resumes_to_identical_tables(tmp_path, moe, reference_run):
    from moeaudit.metrics.stage import run_metrics
    from moeaudit.prune import run_prune
    from moeaudit.prune.evaluate import evaluate_pruned
    from moeaudit.prune.stage import _windows, kept_from_table

    for path in (tmp_path / "whole", tmp_path / "resumed"):
        run = RunDir(path, _config())
        run_observe(run, moe=moe)
        run_metrics(run, moe=moe)
    whole = run_prune(RunDir(tmp_path / "whole"), moe=moe, **PRUNE_ARGS)
    assert whole["distinct_configurations"] > 16  # so the stage has more than one unit
    with pytest.raises(RunInterrupted, match="interrupted during prune: 1 of 2 work units"):
        run_prune(RunDir(tmp_path / "resumed"), moe=moe, on_batch=_interrupt_after(1), **PRUNE_ARGS)
    run_prune(RunDir(tmp_path / "resumed"), moe=moe, **PRUNE_ARGS)
    assert_same_tables(tmp_path / "whole", tmp_path / "resumed", tables=("pruning", "jaccard", "pruning_evals"))

    # The units give what one pass over every configuration gives, bit for bit.
    run = RunDir(tmp_path / "whole")
    table = run.read("pruning")
    kept = kept_from_table(table, "reap", 0.25)
    ids, mask, domains = _windows(run.read("tokens"), "heldout", moe.config.pad_token_id)
    results, clean = evaluate_pruned(moe, ids, {"reap": kept}, attention_mask=None if bool(mask.all()) else mask,
                                     domains=domains, batch_size=run.config.batch_size)
    row = table[(table["criterion"] == "reap") & (table["mode"] == "all_layers")].iloc[0]
    assert (row["heldout_nll"], row["mean_kl"], row["unpruned_nll"]) == (
        results["reap"].heldout_nll, results["reap"].mean_kl, clean.heldout_nll)


def test_changed_corpus_is_refused(tmp_path, moe):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(f"Document {i}: routers send tokens to experts, " * 4 for i in range(30)))
    config = _config(corpus=str(corpus), max_windows=None)
    with pytest.raises(RunInterrupted):
        run_observe(RunDir(tmp_path / "run", config), moe=moe, on_batch=_interrupt_after(1, config.unit_windows))
    corpus.write_text(corpus.read_text().replace("Document 7:", "Document seven:"))
    with pytest.raises(RunDirectoryError, match="the corpus .* changed since .* pass --overwrite"):
        run_observe(RunDir(tmp_path / "run", config), moe=moe)
    assert run_observe(RunDir(tmp_path / "run", config, overwrite=True), moe=moe)["computed"] > 1


def test_switching_engine_recomputes_intervene_only(tmp_path, moe):
    small = dict(max_windows=2, max_len=24, unit_windows=1)
    run = RunDir(tmp_path, _config(**small))
    run_observe(run, moe=moe)
    run_intervene(run, moe=moe)
    fast = run.read("effects")
    info = run_intervene(RunDir(tmp_path, _config(engine="reference", **small)), moe=moe)
    assert (info["engine"], info["computed"], info["resumed"]) == ("reference", 2, 0)
    reference = RunDir(tmp_path).read("effects")
    assert set(reference["engine"]) == {"reference"} and set(fast["engine"]) == {"fast"}
    floats = ["delta_nll", "kl", "gap_norm", "compensation_cos", "engine"]
    pd.testing.assert_frame_equal(reference.drop(columns=floats), fast.drop(columns=floats))
    np.testing.assert_allclose(reference["delta_nll"], fast["delta_nll"], atol=1e-5)
    assert RunDir(tmp_path).stage("observe")["computed"] == 4  # observe was not redone


def test_interrupt_outside_a_unit_also_says_how_to_resume(cli, tmp_path, monkeypatch):  # noqa: F811
    import moeaudit.models.loading as loading

    def interrupted(config):
        raise KeyboardInterrupt

    monkeypatch.setattr(loading, "model_from_config", interrupted)
    code, _, err = cli("run", "--out", str(tmp_path), *SMALL_RUN)
    assert code == 130
    assert err.strip() == (f"interrupted; finished work units are kept in {tmp_path}; re-run the same command to "
                           "resume")


def test_status_shows_what_is_done_interrupted_and_running(cli, tmp_path, moe):  # noqa: F811
    from moeaudit.scale.units import exclusive, run_status

    run = RunDir(tmp_path, _config())
    run_observe(run, moe=moe)
    with pytest.raises(RunInterrupted):
        run_intervene(run, moe=moe, on_batch=_interrupt_after(2, 2))
    status = run_status(RunDir(tmp_path)).set_index("stage")
    assert status.loc["observe", ["state", "units_done", "units_planned"]].tolist() == ["done", 6, 6]
    assert status.loc["intervene", ["state", "units_done", "units_planned"]].tolist() == ["interrupted", 2, 3]
    code, out, _ = cli("status", str(tmp_path))
    assert code == 0 and "interrupted" in out and "re-run the command that made it" in out
    with exclusive(RunDir(tmp_path), "intervene"):
        assert run_status(RunDir(tmp_path)).set_index("stage").loc["intervene", "state"] == "running"
        code, out, _ = cli("status", str(tmp_path))
        assert f"in use by moeaudit pid {os.getpid()} (intervene)" in out
