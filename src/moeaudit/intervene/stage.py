"""The intervene stage on a run directory: the exact census on the held-out windows -> ``effects``.

Windows are rebuilt from ``tokens.parquet`` (so the stage needs only the run directory and its config).
Effects are measured on the ``heldout`` split when the run observed it, so that the metrics (computed on
``calibration``) and the effects they are tested against come from different windows.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import pandas as pd
import torch

from moeaudit.errors import invalid
from moeaudit.intervene import InterveneConfig, Selection, compute_effects
from moeaudit.models.moe_model import MoEModel
from moeaudit.rundir import RunDir, token_windows
from moeaudit.tables import single_expert_rows

def windows_from_tokens(tokens: pd.DataFrame, pad_id: int = 0) -> tuple[np.ndarray, torch.Tensor, torch.Tensor]:
    """(seqs, input_ids [B, T], attention_mask [B, T]) from a tokens table, windows in ``seq`` order
    (:func:`moeaudit.rundir.token_windows` as tensors)."""
    windows = token_windows(tokens, pad_id)
    return windows.seqs, torch.from_numpy(windows.token_ids), torch.from_numpy(windows.attention_mask)


def model_windows(run: RunDir, executor, chosen: pd.DataFrame) -> tuple[np.ndarray, torch.Tensor, torch.Tensor | None]:
    """The executor's model checked against the run's (:meth:`moeaudit.rundir.RunDir.check_model`), then the
    windows of ``chosen`` padded with its pad token: (seqs, input_ids, attention_mask or None without padding)."""
    model = executor.describe_model()
    run.check_model(model)
    seqs, input_ids, attention_mask = windows_from_tokens(chosen, model.get("pad_token_id") or 0)
    return seqs, input_ids, None if bool(attention_mask.all()) else attention_mask


def _merge_stats(parts: list[dict[str, Any]]) -> dict[str, Any]:
    merged: dict[str, Any] = {"calls": len(parts)}
    for key in ("windows", "interventions", "estimates", "noise_interventions"):
        merged[key] = int(sum(p[key] for p in parts))
    for key in ("seconds", "seconds_clean", "seconds_exact", "seconds_estimate", "seconds_noise"):
        merged[key] = float(sum(p[key] for p in parts))
    floors = [p["noise_floor"] for p in parts if np.isfinite(p["noise_floor"])]
    merged["noise_floor"] = max(floors) if floors else float("nan")
    merged["engine"] = "+".join(sorted({p["engine"] for p in parts}))
    merged["fallback_reason"] = next((p["fallback_reason"] for p in parts if p["fallback_reason"]), None)
    skipped: dict[str, int] = {}
    for part in parts:
        for reason, count in part["skipped"].items():
            skipped[reason] = skipped.get(reason, 0) + int(count)
    merged["skipped"] = skipped
    ties: dict[str, int] = {}
    for part in parts:  # keys are str after a JSON round trip
        for layer, count in part.get("near_ties", {}).items():
            ties[str(layer)] = ties.get(str(layer), 0) + int(count)
    merged["near_ties"] = ties
    merged["near_tie_positions"] = int(sum(p.get("near_tie_positions", 0) for p in parts))
    return merged


def with_halved_batches(engine_config: InterveneConfig, compute: Callable[[InterveneConfig], Any]):
    """``compute(engine_config)``, retried on out-of-memory with the fast engine's rows per call and logit
    elements per call (or the reference engine's batch) halved each time
    (:func:`moeaudit.scale.with_halving`). Returns (result, counters): ``{"<field>_used": size that ran}``."""
    import dataclasses

    from moeaudit.scale import with_halving

    field = "reference_batch" if engine_config.engine == "reference" else "rows_per_call"
    first = getattr(engine_config, field)

    def attempt(size: int):
        sizes = {field: size}
        if field == "rows_per_call":
            # sequence-scope calls are bounded by logit elements instead of rows: shrink both alike
            sizes["max_logit_elements"] = max(1, engine_config.max_logit_elements * size // first)
        return compute(dataclasses.replace(engine_config, **sizes))

    result, used = with_halving(attempt, first, field)
    return result, {f"{field}_used": used}


def intervene_unit(moe: MoEModel, payload: dict[str, Any]):
    """Compute one intervene work unit: the effects of its selection on its windows, plus counters.

    On out-of-memory the unit is retried with smaller batches (:func:`with_halved_batches`); the counters
    record the size that ran.
    """
    import pyarrow as pa

    from moeaudit.scale import UnitResult

    result, used = with_halved_batches(payload["engine_config"], lambda config: compute_effects(
        moe, payload["input_ids"], payload["selection"], config=config, attention_mask=payload["attention_mask"]))
    effects = result.effects
    effects["seq"] = payload["seqs"][effects["seq"].to_numpy()]
    stats = dict(result.stats.to_dict(), **used)
    return UnitResult({"effects": pa.Table.from_pandas(effects, preserve_index=False)}, stats)


def intervene_work_units(seqs: np.ndarray, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                         selections: list[Selection], engine_config: InterveneConfig, unit_windows: int) -> list:
    """Per selection, chunks of ``unit_windows`` windows; a sampled selection draws its positions over all
    windows at once (and given positions count windows from the first), so it is one unit."""
    from moeaudit.scale import WorkUnit
    from moeaudit.scale.units import chunks, unit_id

    units = []
    for selection in selections:
        step = len(seqs) if selection.n is not None or selection.targets else unit_windows
        for start, stop in chunks(len(seqs), step):
            payload = {"selection": selection, "engine_config": engine_config, "seqs": seqs[start:stop],
                       "input_ids": input_ids[start:stop],
                       "attention_mask": None if attention_mask is None else attention_mask[start:stop]}
            units.append(WorkUnit(unit_id(f"{selection.name}-{engine_config.engine}", start, stop), payload,
                                  windows=stop - start))
    return units


def engine_config_for(config) -> InterveneConfig:
    """The engine settings of a run: its ``intervene`` part and the engine's ``execution`` settings."""
    return InterveneConfig(kinds=(config.intervene.kind,), scopes=(config.intervene.scope,),
                           engine=config.execution.engine, rows_per_call=config.execution.rows_per_call,
                           reference_batch=config.execution.reference_batch,
                           max_logit_elements=config.execution.max_logit_elements,
                           max_state_bytes=config.execution.max_state_bytes,
                           noise_positions=config.intervene.noise_positions)


def intervened_layers(run: RunDir) -> list[int] | None:
    """The MoE layers the intervene stage intervenes at: ``intervene_layers`` (each one the observe stage
    recorded: one line otherwise, before any model loads), else the observed ``layers``."""
    config = run.config
    if config.intervene_layers is None:
        return config.layers
    return observed_subset(run, "intervene_layers", config.intervene_layers)


def observed_subset(run: RunDir, name: str, wanted: list[int]) -> list[int]:
    """``wanted`` sorted, when each layer is one the observe stage recorded; else the one-line error naming
    the setting ``name`` (checked before any model loads)."""
    observed = run.manifest.get("stages", {}).get("observe", {}).get("layers")
    missing = [layer for layer in wanted if observed is not None and layer not in observed]
    if missing or not wanted:
        raise invalid(name, f"observed MoE layers, a non-empty subset of {observed}", missing[0] if missing else wanted)
    return sorted(set(wanted))


def run_intervene(run: RunDir, *, moe: MoEModel | None = None,
                  on_batch: Callable[[int, int], None] | None = None, executor=None) -> dict[str, Any]:
    """Census of single-expert removals (config ``kind`` / ``scope``), plus progressive ablation.

    The work is cut into units (selection × ``config.unit_windows`` windows); a re-run skips the units
    (or the whole stage) already done. ``executor`` (default: from the config) runs the units.
    """
    from moeaudit.scale import make_executor, run_units

    from moeaudit.data.positions import run_position_sets

    config = run.config
    layers = intervened_layers(run)
    chosen, split = run.intervened_tokens(["pos", "token_id"])
    position_sets = run_position_sets(config, chosen)  # checked before any model loads
    own_executor = executor is None
    executor = executor or make_executor(config, moe)
    try:
        seqs, input_ids, attention_mask = model_windows(run, executor, chosen)
        engine_config = engine_config_for(config)
        if position_sets is not None:  # the union of the sets, at every layer, windows counted from the first
            local = {int(seq): b for b, seq in enumerate(seqs)}
            union = {(int(seq), int(pos)) for part in position_sets for seq, pos in part}
            selections = [Selection.at(((local[seq], pos) for seq, pos in union), layers=layers)]
        elif config.intervene_n is None:
            selections = [Selection.census(layers=layers)]
        else:
            selections = [Selection.sample(config.intervene_n, seed=config.seed, layers=layers)]
        if config.progressive:
            selections.append(Selection.progressive(layers=layers, n=config.audit_n, seed=config.seed))
        units = intervene_work_units(seqs, input_ids, attention_mask, selections, engine_config,
                                     config.unit_windows)
        store, progress = run_units(run, "intervene", units, ("effects",), intervene_unit, executor,
                                    on_unit=on_batch)
    finally:
        if own_executor:
            executor.close()
    parts = store.stats()
    effects = run.read("effects", columns=["selection"])
    info = dict(_merge_stats(parts), split=split or "all", kind=config.kind, scope=config.scope,
                selections=[s.name for s in selections], rows=len(effects), executor=executor.name, **progress)
    for field in ("rows_per_call_used", "reference_batch_used"):
        if field in parts[0]:
            info[field] = min(p[field] for p in parts)
    census_rows = int((effects["selection"] == selections[0].name).sum())
    info["interventions_per_second"] = (census_rows / info["seconds_exact"]) if info["seconds_exact"] else None
    run.record_stage("intervene", info)
    return info


def effects_summary(effects: pd.DataFrame) -> pd.DataFrame:
    """Per layer, over single-expert removals: interventions, mean / p95 ΔNLL, mean KL, share of top-1 flips."""
    census = single_expert_rows(effects)
    grouped = census.groupby("layer")
    return pd.DataFrame({
        "interventions": grouped.size(),
        "mean dNLL": grouped["delta_nll"].mean(),
        "p95 dNLL": grouped["delta_nll"].quantile(0.95),
        "mean KL": grouped["kl"].mean(),
        "top-1 flips": grouped["top1_flip"].mean(),
        "mean gap norm": grouped["gap_norm"].mean(),
        "compensation cos": grouped["compensation_cos"].mean(),
    }).reset_index()
