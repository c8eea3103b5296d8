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

from moeaudit.intervene import InterveneConfig, Selection, compute_effects, single_expert_rows
from moeaudit.models.moe_model import MoEModel
from moeaudit.rundir import RunDir

WINDOWS_PER_CALL = 8


def windows_from_tokens(tokens: pd.DataFrame, pad_id: int = 0) -> tuple[np.ndarray, torch.Tensor, torch.Tensor]:
    """(seqs, input_ids [B, T], attention_mask [B, T]) from a tokens table, windows in ``seq`` order."""
    tokens = tokens.sort_values(["seq", "pos"])
    seqs = tokens["seq"].unique()
    lengths = tokens.groupby("seq", sort=True).size().to_numpy()
    ids = torch.full((len(seqs), int(lengths.max())), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    flat = torch.from_numpy(np.array(tokens["token_id"], dtype=np.int64))  # a writable copy
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    for row, n in enumerate(lengths):
        ids[row, :n] = flat[offsets[row] : offsets[row] + n]
        mask[row, :n] = 1
    return seqs, ids, mask


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
    return merged


def run_intervene(run: RunDir, *, moe: MoEModel | None = None,
                  on_batch: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Census of single-expert removals (config ``kind`` / ``scope``), plus progressive ablation."""
    from moeaudit.observe.stage import model_from_config

    config = run.config
    moe = moe or model_from_config(config)
    tokens = run.read("tokens", columns=["seq", "pos", "token_id", "split"])
    split = "heldout" if (tokens["split"] == "heldout").any() and not config.in_sample else None
    chosen = tokens[tokens["split"] == split] if split else tokens
    seqs, input_ids, attention_mask = windows_from_tokens(chosen, getattr(moe.config, "pad_token_id", None) or 0)
    if bool(attention_mask.all()):
        attention_mask = None
    engine_config = InterveneConfig(kinds=(config.kind,), scopes=(config.scope,), engine=config.engine)
    selections = [Selection.census(layers=config.layers) if config.intervene_n is None
                  else Selection.sample(config.intervene_n, seed=config.seed, layers=config.layers)]
    if config.progressive:
        selections.append(Selection.progressive(layers=config.layers, n=config.audit_n, seed=config.seed))
    frames, parts = [], []
    total = len(seqs) * len(selections)
    done = 0
    for selection in selections:
        # A sampled selection draws its n positions per call, so it must see every window at once; the
        # engine walks windows one by one either way, chunks only give the progress bar something to show.
        step = len(seqs) if selection.n is not None else WINDOWS_PER_CALL
        for start in range(0, len(seqs), step):
            stop = start + step
            mask = None if attention_mask is None else attention_mask[start:stop]
            result = compute_effects(moe, input_ids[start:stop], selection, config=engine_config,
                                     attention_mask=mask)
            effects = result.effects
            effects["seq"] = seqs[start:stop][effects["seq"].to_numpy()]
            frames.append(effects)
            parts.append(result.stats.to_dict())
            done += min(stop, len(seqs)) - start
            if on_batch is not None:
                on_batch(done, total)
    effects = pd.concat(frames, ignore_index=True)
    run.write_frame("effects", effects)
    info = dict(_merge_stats(parts), split=split or "all", kind=config.kind, scope=config.scope,
                selections=[s.name for s in selections], rows=len(effects))
    census = effects[effects["selection"] == selections[0].name]
    info["interventions_per_second"] = (len(census) / info["seconds_exact"]) if info["seconds_exact"] else None
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
