"""The calibration stage on a run directory: ``routing`` (+ ``router_probs``, ``expert_metrics_by_domain``) ->
``calibration``.

It needs the observe and metrics stages: it resamples the same calibration windows the metrics stage
computed ``expert_metrics`` on (the ``calibration`` split, or every observed window for an ``in_sample``
run) and never runs the model. Documents are read from ``windows.parquet``; for a run observed before that
table existed they are found by rebuilding the run's corpus windows (tokenizer only) and checking them
against the observed windows' fingerprint in the manifest.
"""

from __future__ import annotations

import time
import warnings
from typing import Any

import numpy as np
import pandas as pd

from moeaudit.calibration.sensitivity import calibration_metrics, calibration_sensitivity
from moeaudit.errors import CorpusError, MoeAuditError, RunDirectoryError, first_line
from moeaudit.rundir import RunDir

__all__ = ["calibration_summary", "calibration_windows", "run_calibration"]


def calibration_windows(run: RunDir) -> tuple[np.ndarray, pd.DataFrame]:
    """The windows the metrics stage computed ``expert_metrics`` on, and the run's ``tokens`` (seq, pos, domain,
    split): the calibration split, or every window when the run is ``in_sample`` or observed no calibration
    window (as :func:`moeaudit.metrics.stage.run_metrics` chooses)."""
    tokens = run.read("tokens", columns=["seq", "pos", "domain", "split"])
    calibration = np.unique(tokens.loc[tokens["split"] == "calibration", "seq"].to_numpy())
    if len(calibration) and not run.config.in_sample:
        return calibration.astype(np.int64), tokens
    return np.unique(tokens["seq"].to_numpy()).astype(np.int64), tokens


def _check_stages(run: RunDir) -> None:
    for stage, tables in (("observe", ("tokens", "routing")), ("metrics", ("expert_metrics",))):
        missing = [t for t in tables if not run.has(t)]
        if not run.stage(stage) or missing:
            raise RunDirectoryError(f"{run.path} has no finished {stage} stage"
                                    + (f" ({', '.join(t + '.parquet' for t in missing)} missing)" if missing else "")
                                    + f"; run `moeaudit {stage} {run.path}` first")


def _documents(run: RunDir, seqs: np.ndarray, corpus: Any) -> dict[int, str]:
    """seq -> document id of the observed windows: the ``windows`` table, else ``corpus`` or the run's corpus
    rebuilt from its config."""
    from moeaudit.audit.stage import window_documents
    from moeaudit.data.windows import windows_fingerprint
    from moeaudit.observe.stage import build_corpus, observed_windows

    hint = "; pass --unit window to resample windows instead"
    stored_documents = window_documents(run) if corpus is None else None
    if stored_documents is not None:
        lacking = [int(s) for s in seqs if int(s) not in stored_documents.index]
        if lacking:
            raise RunDirectoryError(f"observed windows {lacking[:5]} of {run.path} are not in its windows.parquet; "
                                    f"re-run `moeaudit observe` with --overwrite{hint}")
        return {int(s): str(stored_documents.loc[int(s)]) for s in seqs}
    if corpus is None:
        from moeaudit.models.loading import tokenizer_for

        try:
            corpus = build_corpus(run.config, tokenizer_for(run.config.model))
        except MoeAuditError as err:
            raise CorpusError(f"cannot rebuild the corpus windows of {run.path} to find their documents "
                              f"({first_line(err).rstrip('.')}){hint}") from None
    windows = observed_windows(corpus, run.config)
    stored = (run.manifest.get("corpus") or {}).get("fingerprint_observed")
    if stored is None or windows_fingerprint(windows) != stored:
        raise RunDirectoryError(f"the corpus windows of {run.path} cannot be matched to its observed windows (the "
                                f"corpus or tokenizer changed since the run was observed){hint}")
    documents = {int(w.seq): str(w.doc_id) for w in windows}
    lacking = [int(s) for s in seqs if int(s) not in documents]
    if lacking:
        raise RunDirectoryError(f"observed windows {lacking[:5]} of {run.path} are not in its corpus{hint}")
    return {int(s): documents[int(s)] for s in seqs}


def run_calibration(run: RunDir, *, corpus: Any = None) -> dict[str, Any]:
    """Write ``calibration.parquet`` into ``run`` and record the stage in its manifest.

    Parameters
    ----------
    run : RunDir
        A run with the observe and metrics stages done. Its ``calibration`` settings
        (:class:`moeaudit.config.CalibrationConfig`), ``seed``, ``reap_gate`` default and prune ``directions``
        are used.
    corpus : WindowedCorpus, optional
        The corpus windows the run observed (:func:`moeaudit.observe.stage.build_corpus`); default: rebuilt
        from the run's config (with ``resample_unit = "document"`` only).

    Returns
    -------
    dict
        What the manifest records: units, unit, windows, tokens, metrics, layers, the settings, the
        degenerate-input warnings (their messages), seconds.

    Raises
    ------
    RunDirectoryError
        One line, before anything is written: a missing stage, windows that cannot be matched to documents,
        fewer than two calibration units.
    """
    from moeaudit.observe.forward import read_router_probs

    started = time.perf_counter()
    _check_stages(run)
    settings = run.config.calibration
    seqs, tokens = calibration_windows(run)
    documents = _documents(run, seqs, corpus) if settings.resample_unit == "document" else None
    n_units = len(set(documents.values())) if documents is not None else len(seqs)
    if n_units < 2:
        other = "; pass --unit window" if documents is not None and len(seqs) >= 2 else ""
        raise RunDirectoryError(f"the calibration windows of {run.path} come from {n_units} "
                                f"{settings.resample_unit}; resampling needs at least 2: observe more calibration "
                                f"windows (--max-windows, a larger corpus){other}")
    expert_metrics = run.read("expert_metrics", columns=["layer", "expert"])
    num_experts = {int(layer): int(n) for layer, n in expert_metrics.groupby("layer").size().items()}
    routing = run.read("routing")
    routing = routing[routing["layer"].isin(list(num_experts))]
    routing = routing.astype({"layer": "int64", "seq": "int64", "pos": "int64", "expert": "int64"})
    probs = read_router_probs(run.table_path("router_probs")) if run.has("router_probs") else {}
    by_domain = run.read("expert_metrics_by_domain") if run.has("expert_metrics_by_domain") else None
    directions = run.config.prune.directions
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RuntimeWarning)
        table = calibration_sensitivity(
            routing, num_experts, router_probs=probs or None, documents=documents, seqs=seqs, by_domain=by_domain,
            n_resamples=settings.resamples, ratio=settings.flip_ratio, tau_target=settings.tau_target,
            points=settings.curve_points, repeats=settings.curve_repeats, seed=run.config.seed,
            directions=directions, reap_gate=run.stage("metrics").get("reap_gate", "combine"))
    _write(run, table)
    written = set(table["metric"])
    info = {
        "unit": settings.resample_unit, "units": n_units, "windows": int(len(seqs)),
        "tokens": int(table["n_tokens"].iloc[0]), "metrics": sorted(written, key=list(table["metric"]).index),
        "weight_only": [m for m in _metric_columns(run) if m not in calibration_metrics()],
        "layers": sorted(num_experts), "resamples": settings.resamples, "flip_ratio": settings.flip_ratio,
        "tau_target": settings.tau_target, "curve_points": settings.curve_points,
        "curve_repeats": settings.curve_repeats, "seed": run.config.seed,
        "warnings": list(dict.fromkeys(str(w.message) for w in caught)),
        "seconds": round(time.perf_counter() - started, 3),
    }
    run.record_stage("calibration", info)
    return info


def _metric_columns(run: RunDir) -> list[str]:
    import pyarrow.parquet as pq

    names = pq.read_schema(run.table_path("expert_metrics")).names
    return [n for n in names if n not in ("layer", "expert")]


def _write(run: RunDir, table: pd.DataFrame) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from moeaudit.tables import CALIBRATION_SCHEMA

    arrow = pa.Table.from_pandas(table, schema=CALIBRATION_SCHEMA, preserve_index=False)
    with run.writing("calibration") as tmp:
        pq.write_table(arrow, tmp)


def calibration_summary(table: pd.DataFrame) -> pd.DataFrame:
    """One row per metric over the layers of a ``calibration`` table, for a terminal or a report.

    Columns: ``metric``; ``tau`` (mean over layers of the bootstrap mean τ); ``tau_p05_min`` (the worst
    layer's 5th percentile); ``flips`` (mean share of flipped prune/keep decisions); ``tokens_to_target``
    (the largest over layers: the calibration size at which every layer reaches the target; NaN when some
    layer never does); ``reached`` (layers reaching the target, ``"k/L"``); ``domain_tau`` (mean over layers
    of the mean pairwise domain τ) and ``domain_tau_min`` (the smallest pair τ over layers).
    """
    rows = []
    for metric, group in table.groupby("metric", sort=False):
        reached = group["tokens_to_target"].notna()
        rows.append({
            "metric": metric,
            "tau": _nanmean(group["tau_mean"]),
            "tau_p05_min": _nanmin(group["tau_p05"]),
            "flips": _nanmean(group["flip_share"]),
            "tokens_to_target": float(group["tokens_to_target"].max()) if reached.all() else float("nan"),
            "reached": f"{int(reached.sum())}/{len(group)}",
            "domain_tau": _nanmean(group["domain_tau_mean"]),
            "domain_tau_min": _nanmin(group["domain_tau_min"]),
        })
    return pd.DataFrame(rows)


def _nanmean(values: pd.Series) -> float:
    values = values.astype(float)
    return float(values.mean()) if values.notna().any() else float("nan")


def _nanmin(values: pd.Series) -> float:
    values = values.astype(float)
    return float(values.min()) if values.notna().any() else float("nan")
