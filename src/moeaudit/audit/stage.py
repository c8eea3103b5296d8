"""The audit stage on a run directory: ``effects`` + ``expert_metrics`` -> ``tests``."""

from __future__ import annotations

from typing import Any

from moeaudit.audit import AuditSettings, audit
from moeaudit.errors import RunDirectoryError
from moeaudit.rundir import RunDir


def single_expert_effects(effects, kind: str, scope: str):
    """Exact single-expert rows of one kind and scope (no estimates, no progressive or shared rows)."""
    rows = (effects["kind"] == kind) & (effects["scope"] == scope)
    if "estimate" in effects.columns:
        rows &= ~effects["estimate"].astype(bool)
    for column in ("j", "n_removed"):
        if column in effects.columns:
            rows &= effects[column].isna() | (effects[column] == 1) if column == "n_removed" else effects[column].isna()
    if "selection" in effects.columns:
        rows &= ~effects["selection"].isin(["progressive", "shared"])
    return effects[rows]


def run_audit(run: RunDir, settings: AuditSettings | None = None) -> dict[str, Any]:
    config = run.config
    settings = settings or AuditSettings(metrics=config.audit_metrics, n=config.audit_n, seed=config.seed,
                                         correction=config.correction, alpha=config.alpha)
    effects = single_expert_effects(run.read("effects"), config.kind, config.scope)
    if effects.empty:
        raise RunDirectoryError(f"effects.parquet in {run.path} has no exact {config.kind}/{config.scope} rows; "
                                "run `moeaudit intervene` with that kind and scope first")
    result = audit(effects, run.read("expert_metrics"), settings)
    run.write_frame("tests", result.tests)
    info = dict(result.counters, kind=config.kind, scope=config.scope, n=settings.n, correction=settings.correction,
                alpha=settings.alpha)
    info["untestable_tokens"] = {k: v for k, v in info.get("untestable_tokens", {}).items() if v}
    run.record_stage("audit", info)
    return info
