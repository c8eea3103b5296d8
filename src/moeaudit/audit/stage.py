"""The audit stage on a run directory: ``effects`` + ``expert_metrics`` -> ``tests``."""

from __future__ import annotations

import dataclasses
from typing import Any

import pandas as pd

from moeaudit.audit import AuditSettings, audit
from moeaudit.audit.designs import cluster_kind
from moeaudit.data.positions import run_position_sets
from moeaudit.config import AuditConfig
from moeaudit.stats import cliff, progressive_summary
from moeaudit.errors import RunDirectoryError
from moeaudit.rundir import RunDir
from moeaudit.tables import single_expert_rows


def single_expert_effects(effects: pd.DataFrame, kind: str, scope: str) -> pd.DataFrame:
    """Exact removals of one routed expert, of one kind and scope (no estimates, progressive or shared rows)."""
    rows = single_expert_rows(effects)
    return rows[(rows["kind"] == kind) & (rows["scope"] == scope)]


def audit_settings(config: AuditConfig) -> AuditSettings:
    """The :class:`AuditSettings` of a run: its ``audit`` part, and the run's ``seed`` for the sampling."""
    part = config.audit
    return AuditSettings(metrics=part.audit_metrics, designs=tuple(part.designs), n=part.audit_n, seed=config.seed,
                         correction=part.correction, alpha=part.alpha, ci=part.ci,
                         equivalence_bound=part.equivalence_bound, n_permutations=part.n_permutations,
                         cluster=part.audit_cluster, mixed=part.audit_mixed, dz_ddof=part.dz_ddof)


def run_audit(run: RunDir, settings: AuditSettings | None = None) -> dict[str, Any]:
    """Write ``tests.parquet`` (every design × metric × layer) and ``redundancy.parquet`` into ``run``.

    ``settings`` default to the run's ``audit`` part (:func:`audit_settings`); the settings in effect are
    recorded in the manifest under ``stages.audit.settings``.
    """
    config = run.config
    settings = settings or audit_settings(config)
    documents = window_documents(run)
    position_sets = run_position_sets(config, run.intervened_tokens()[0]) if config.position_sets != "per_layer" \
        else None
    if settings.cluster == "document" and documents is None:
        raise RunDirectoryError(f"{run.path} holds no windows.parquet (observed before moeaudit recorded each "
                                "window's document), so tests cannot cluster by document; re-run `moeaudit observe` "
                                "with --overwrite, or set audit_cluster = \"window\"")
    all_effects = run.read("effects")
    effects = single_expert_effects(all_effects, config.kind, config.scope)
    if effects.empty:
        raise RunDirectoryError(f"effects.parquet in {run.path} has no exact {config.kind}/{config.scope} rows; "
                                "run `moeaudit intervene` with that kind and scope first")
    result = audit(effects, run.read("expert_metrics"), settings, documents=documents, position_sets=position_sets)
    run.write_frame("tests", result.tests)
    redundancy = redundancy_table(all_effects)
    if not redundancy.empty:
        run.write_frame("redundancy", redundancy)
    info = dict(result.counters, kind=config.kind, scope=config.scope,
                n=settings.n if position_sets is None else config.intervene_n, position_sets=config.position_sets, correction=settings.correction,
                alpha=settings.alpha, cluster_by=cluster_kind(settings.cluster, documents))
    info["untestable_tokens"] = {k: v for k, v in info.get("untestable_tokens", {}).items() if v}
    info["settings"] = {name: list(value) if isinstance(value, tuple) else value
                        for name, value in dataclasses.asdict(settings).items()}
    run.record_stage("audit", info)
    return info


def window_documents(run: RunDir) -> pd.Series | None:
    """Each observed window's document id, indexed by ``seq`` (the ``windows`` table); None for a run
    observed before the table existed."""
    if not run.has("windows"):
        return None
    windows = run.read("windows", columns=["seq", "doc_id"])
    return windows.set_index("seq")["doc_id"]


def redundancy_table(effects: pd.DataFrame, threshold: float = 0.1) -> pd.DataFrame:
    """Progressive ablation per layer: n, mean, median, p95 ΔNLL for j = 1..k-1 removed by gate, and the
    cliff (first j whose mean ΔNLL exceeds ``threshold`` nats; the paper's 0.1), from progressive rows."""
    rows = effects[(effects["selection"] == "progressive") & ~effects["estimate"].astype(bool)]
    frames = []
    for layer, group in rows.groupby("layer"):
        by_j = {int(j): g["delta_nll"].to_numpy() for j, g in group.groupby("j")}
        summary = progressive_summary(by_j).reset_index().rename(columns={"index": "j"})
        layer_cliff = cliff(summary["mean"].to_numpy(), threshold=threshold)
        frames.append(summary.assign(layer=int(layer), cliff=layer_cliff if layer_cliff is not None else pd.NA))
    if not frames:
        return pd.DataFrame()
    table = pd.concat(frames, ignore_index=True)
    return table[["layer"] + [c for c in table.columns if c != "layer"]]
