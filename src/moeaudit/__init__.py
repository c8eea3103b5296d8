"""moeaudit: audit which experts in a Mixture-of-Experts language model actually matter.

Heavy modules (torch, transformers) are imported on first use so that ``moeaudit --help`` stays instant.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_LAZY = {
    "load_model": "moeaudit.models",
    "wrap_model": "moeaudit.models",
    "MoEModel": "moeaudit.models",
    "MoELayer": "moeaudit.models",
    "Ablation": "moeaudit.models",
    "AuditConfig": "moeaudit.config",
    "RunDir": "moeaudit.rundir",
    "run_pipeline": "moeaudit.pipeline",
    "PipelineResult": "moeaudit.pipeline",
}

#: Sub-packages reachable as attributes (``moeaudit.intervene.compute_effects``) without an import of their own.
SUBMODULES = frozenset({"audit", "calibration", "config", "data", "errors", "interactions", "intervene", "metrics",
                        "models", "observe", "pipeline", "prune", "report", "rundir", "stats", "tables"})

if TYPE_CHECKING:  # pragma: no cover
    from moeaudit.config import AuditConfig
    from moeaudit.models import Ablation, MoELayer, MoEModel, load_model, wrap_model
    from moeaudit.pipeline import PipelineResult, run_pipeline
    from moeaudit.rundir import RunDir


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    if name in SUBMODULES:
        return import_module(f"moeaudit.{name}")
    raise AttributeError(f"module 'moeaudit' has no attribute {name!r}")


__all__ = ["__version__", "load_model", "wrap_model", "MoEModel", "MoELayer", "Ablation", "AuditConfig", "RunDir",
           "run_pipeline", "PipelineResult"]


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY) | SUBMODULES)
