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


def run_interactions(run: RunDir, *, moe=None) -> dict[str, Any]:
    """Measure pairwise interactions and Shapley values at sampled held-out tokens; write the tables.

    Writes ``interactions.parquet`` and ``shapley.parquet`` (:func:`moeaudit.interactions.measure_interactions`),
    ``interaction_sets.parquet`` when the run has ``pruning.parquet``, and ``shapley_tests.parquet``
    (:func:`moeaudit.interactions.summary.shapley_tests`) when it has ``expert_metrics.parquet``. The settings
    are the run's ``interactions`` part; the manifest's stage record holds them, the engine's counters and the
    per-layer summary.
    """
    from moeaudit.audit.stage import audit_settings, window_documents
    from moeaudit.interactions.measure import measure_interactions
    from moeaudit.interactions.summary import interaction_summary, shapley_tests
    from moeaudit.intervene.stage import engine_config_for, windows_from_tokens
    from moeaudit.models.loading import model_from_config, model_record

    config = run.config
    if not run.stage("observe") or not run.has("tokens"):
        raise RunDirectoryError(f"{run.path} has no finished observe stage; run `moeaudit observe {run.path}` first")
    part = config.interactions
    layers = interaction_layers(run)
    kind = part.interactions_kind or config.kind
    chosen, split = run.intervened_tokens(["pos", "token_id"])
    sets = _pruning_sets(run)
    started = time.perf_counter()
    moe = moe or model_from_config(config)
    run.check_model(model_record(moe))
    seqs, input_ids, attention_mask = windows_from_tokens(chosen, moe.config.pad_token_id or 0)
    if bool(attention_mask.all()):
        attention_mask = None
    result = measure_interactions(
        moe, input_ids, layers=layers, n=part.interactions_n, seed=config.seed, kind=kind,
        config=engine_config_for(config), attention_mask=attention_mask, sets=sets,
        max_exact_players=part.shapley_exact_players, permutations=part.shapley_permutations)
    tables = {"interactions": result.pairs, "shapley": result.shapley}
    if sets is not None:
        tables["interaction_sets"] = result.sets
    for frame in tables.values():
        frame["seq"] = seqs[frame["seq"].to_numpy(dtype=np.int64)] if len(frame) else frame["seq"]
    for name, frame in tables.items():
        run.write_frame(name, frame)
    tested = 0
    if run.has("expert_metrics") and len(result.shapley):
        tests = shapley_tests(result.shapley, run.read("expert_metrics"), audit_settings(config),
                              documents=window_documents(run))
        run.write_frame("shapley_tests", tests)
        tested = len(tests)
    for name in ("interaction_sets", "shapley_tests"):  # an earlier run's tables that this one did not rewrite
        if name not in tables and not (name == "shapley_tests" and tested) and run.has(name):
            run.table_path(name).unlink()
    summary = interaction_summary(result.pairs, result.shapley)
    info = dict(result.stats.to_dict(), split=split or "all", kind=kind, n=part.interactions_n,
                layers=sorted(result.stats.tokens), sets=0 if sets is None else int(len(sets)),
                shapley_tests=tested, seconds=time.perf_counter() - started,
                settings=part.model_dump(mode="json"),
                summary=summary.to_dict(orient="records"))
    info["tokens"] = {str(layer): count for layer, count in info["tokens"].items()}
    run.record_stage("interactions", info)
    return info
