"""The interactions stage on a run directory: held-out windows -> ``interactions``, ``shapley``,
``interaction_sets`` and ``shapley_tests``.

It needs the observe stage (the windows are rebuilt from ``tokens.parquet``, held-out split as the intervene
stage uses it); with ``pruning.parquet`` it also measures every pruning configuration's dropped sets jointly,
and with ``expert_metrics.parquet`` it runs the audit's designs on the Shapley values. Every setting is
checked against the run directory before the model loads.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import pandas as pd

from moeaudit.errors import RunDirectoryError
from moeaudit.rundir import RunDir

__all__ = ["interaction_layers", "run_interactions"]


def interaction_layers(run: RunDir) -> list[int] | None:
    """The MoE layers the stage measures: ``interactions_layers`` (each one observed), else the intervened
    layers (None: every MoE layer)."""
    from moeaudit.intervene.stage import intervened_layers, observed_subset

    wanted = run.config.interactions_layers
    return intervened_layers(run) if wanted is None else observed_subset(run, "interactions_layers", wanted)


def _pruning_sets(run: RunDir) -> pd.DataFrame | None:
    """The dropped set of every pruning configuration (criterion, ratio, seed) and layer, or None."""
    if not run.has("pruning"):
        return None
    pruning = run.read("pruning", columns=["criterion", "ratio", "seed", "layer", "dropped"])
    pruning = pruning.assign(dropped=[tuple(sorted(int(e) for e in d)) for d in pruning["dropped"]])
    return pruning.drop_duplicates(subset=["criterion", "ratio", "seed", "layer", "dropped"]).reset_index(drop=True)


#: The tables every work unit writes (``interaction_sets`` too when the run has a pruning table).
UNIT_TABLES = ("interactions", "shapley")


def interactions_unit(moe, payload: dict[str, Any]):
    """Compute one interactions work unit: :func:`moeaudit.interactions.measure_interactions` on its windows
    (the targets drawn over every window), its tables keyed by the run's window numbers, plus counters. On
    out-of-memory the unit is retried with smaller batches
    (:func:`moeaudit.intervene.stage.with_halved_batches`)."""
    import pyarrow as pa

    from moeaudit.interactions.measure import measure_interactions
    from moeaudit.intervene.stage import with_halved_batches
    from moeaudit.scale import UnitResult

    settings = dict(payload["settings"])
    result, used = with_halved_batches(settings.pop("config"), lambda config: measure_interactions(
        moe, payload["input_ids"], attention_mask=payload["attention_mask"], windows=payload["windows"],
        config=config, **settings))
    frames = {"interactions": result.pairs, "shapley": result.shapley}
    if payload["settings"].get("sets") is not None:
        frames["interaction_sets"] = result.sets
    tables = {}
    for name, frame in frames.items():
        if len(frame):
            frame["seq"] = payload["seqs"][frame["seq"].to_numpy(dtype=np.int64)]
        tables[name] = pa.Table.from_pandas(frame, preserve_index=False)
    stats = dict(result.stats.to_dict(), **used)
    stats["tokens"] = {str(layer): count for layer, count in stats["tokens"].items()}
    return UnitResult(tables, stats)


def _unit_prefix(settings: dict[str, Any]) -> str:
    """``interactions-<digest>``: the unit ids name the settings they were measured with, so a run whose
    interactions settings changed (they are not part of the run's fingerprint) starts its units afresh."""
    import dataclasses
    import hashlib
    import json

    sets = settings["sets"]
    described = dict(settings, config=dataclasses.asdict(settings["config"]),
                     sets=None if sets is None else sets.astype({"seed": "float64"}).to_dict(orient="split"))
    text = json.dumps(described, sort_keys=True, default=str)
    return "interactions-" + hashlib.sha256(text.encode()).hexdigest()[:12]


def _merged_stats(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """The counters of every unit as one call's (:class:`moeaudit.interactions.measure.InteractionsStats`)."""
    tokens: dict[str, int] = {}
    for part in parts:
        for layer, count in part["tokens"].items():
            tokens[str(layer)] = tokens.get(str(layer), 0) + int(count)
    floors = [p["noise_floor"] for p in parts if np.isfinite(p["noise_floor"])]
    engines = sorted({p["engine"] for p in parts if sum(int(c) for c in p["tokens"].values())})
    return {"engine": "+".join(engines) or parts[0]["engine"],
            "fallback_reason": next((p["fallback_reason"] for p in parts if p["fallback_reason"]), None),
            "tokens": tokens, **{name: int(sum(p[name] for p in parts))
                                 for name in ("removals", "exact_tokens", "estimated_tokens")},
            "noise_floor": max(floors) if floors else float("nan"),
            "seconds_measured": float(sum(p["seconds"] for p in parts)),
            "seconds_clean": float(sum(p["seconds_clean"] for p in parts)),
            **{field: min(p[field] for p in parts) for field in ("rows_per_call_used", "reference_batch_used")
               if field in parts[0]}}


def run_interactions(run: RunDir, *, moe=None, executor=None, on_batch=None) -> dict[str, Any]:
    """Measure pairwise interactions and Shapley values at sampled held-out tokens; write the tables.

    Writes ``interactions.parquet`` and ``shapley.parquet`` (:func:`moeaudit.interactions.measure_interactions`),
    ``interaction_sets.parquet`` when the run has ``pruning.parquet``, and ``shapley_tests.parquet``
    (:func:`moeaudit.interactions.summary.shapley_tests`) when it has ``expert_metrics.parquet``. The settings
    are the run's ``interactions`` part; the manifest's stage record holds them, the engine's counters and the
    per-layer summary.

    The windows are cut into work units of ``unit_windows`` (:mod:`moeaudit.scale.units`), run by ``executor``
    (default: from the config; ``on_batch(done, total)`` reports windows): an interrupted stage keeps its
    finished units and a re-run of the same command resumes, with the tables one uninterrupted run writes.
    """
    from moeaudit.audit.stage import audit_settings, window_documents
    from moeaudit.interactions.summary import interaction_summary, shapley_tests
    from moeaudit.intervene.stage import engine_config_for, model_windows
    from moeaudit.scale import WorkUnit, make_executor, run_units
    from moeaudit.scale.units import chunks, unit_id

    config = run.config
    if not run.stage("observe") or not run.has("tokens"):
        raise RunDirectoryError(f"{run.path} has no finished observe stage; run `moeaudit observe {run.path}` first")
    part = config.interactions
    layers = interaction_layers(run)
    kind = part.interactions_kind or config.kind
    chosen, split = run.intervened_tokens(["pos", "token_id"])
    sets = _pruning_sets(run)
    started = time.perf_counter()
    own_executor = executor is None
    executor = executor or make_executor(config, moe)
    try:
        seqs, input_ids, attention_mask = model_windows(run, executor, chosen)
        settings = dict(layers=layers, n=part.interactions_n, seed=config.seed, kind=kind,
                        config=engine_config_for(config), sets=sets, max_exact_players=part.shapley_exact_players,
                        permutations=part.shapley_permutations)
        prefix = _unit_prefix(settings)
        units = [WorkUnit(unit_id(prefix, start, stop),
                          {"input_ids": input_ids, "attention_mask": attention_mask, "seqs": seqs,
                           "windows": (start, stop), "settings": settings}, windows=stop - start)
                 for start, stop in chunks(len(seqs), config.unit_windows)]
        names = UNIT_TABLES + (("interaction_sets",) if sets is not None else ())
        store, progress = run_units(run, "interactions", units, names, interactions_unit, executor,
                                    on_unit=on_batch)
    finally:
        if own_executor:
            executor.close()
    stats = _merged_stats(store.stats())
    tested = 0
    shapley = run.read("shapley")
    if run.has("expert_metrics") and len(shapley):
        tests = shapley_tests(shapley, run.read("expert_metrics"), audit_settings(config),
                              documents=window_documents(run))
        run.write_frame("shapley_tests", tests)
        tested = len(tests)
    for name in ("interaction_sets", "shapley_tests"):  # an earlier run's tables that this one did not rewrite
        if not (name == "interaction_sets" and sets is not None) and not (name == "shapley_tests" and tested) \
                and run.has(name):
            run.table_path(name).unlink()
    summary = interaction_summary(run.read("interactions"), shapley)
    info = dict(stats, split=split or "all", kind=kind, n=part.interactions_n,
                layers=sorted(int(layer) for layer in stats["tokens"]),
                sets=0 if sets is None else int(len(sets)), shapley_tests=tested,
                seconds=time.perf_counter() - started, settings=part.model_dump(mode="json"),
                summary=summary.to_dict(orient="records"), executor=executor.name, **progress)
    run.record_stage("interactions", info)
    return info
