"""Scaling and reliability: resumable work units, executors (local, Ray), out-of-memory recovery."""

from moeaudit.scale.executors import LocalExecutor, RayExecutor, describe_model, make_executor
from moeaudit.scale.memory import is_out_of_memory, with_halving
from moeaudit.scale.units import UnitResult, UnitStore, WorkUnit, run_units, window_done

__all__ = ["LocalExecutor", "RayExecutor", "UnitResult", "UnitStore", "WorkUnit", "describe_model",
           "is_out_of_memory", "make_executor", "run_units", "window_done", "with_halving"]
