"""Shared pieces of :mod:`moeaudit.stats`: the degenerate-input warning, the result base class,
argument checks with the house message shape, and the scipy random-generator keyword.

Every public function in the package runs exactly one private ``_validate_*`` step built from the
checkers below; after it, internal code trusts its inputs.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import numbers
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np

from moeaudit.errors import InvalidParameterError, invalid

ALTERNATIVES = ("two-sided", "greater", "less")


class DegenerateInputWarning(RuntimeWarning):
    """The input cannot support the statistic (n too small, zero variance, all-zero differences).

    The affected result fields are NaN; the message says which and why. It subclasses
    :class:`RuntimeWarning`, so ``warnings.simplefilter("error", RuntimeWarning)`` catches it too.
    """


def warn_degenerate(message: str, stacklevel: int = 3) -> None:
    """Emit one :class:`DegenerateInputWarning` pointing at the caller of the public function."""
    warnings.warn(message, DegenerateInputWarning, stacklevel=stacklevel)


@dataclasses.dataclass(frozen=True)
class ConfidenceInterval:
    """A confidence interval: ``low`` and ``high`` bounds (infinite on the open side of a one-sided one)."""

    low: float
    high: float

    def to_dict(self) -> dict[str, float]:
        """Return ``{"low": ..., "high": ...}`` with plain Python floats."""
        return {"low": float(self.low), "high": float(self.high)}


class ResultMixin:
    """``to_dict()`` for the frozen result dataclasses: public fields only, numpy scalars as Python ones."""

    def to_dict(self) -> dict[str, Any]:
        """Return the public fields as a flat ``dict`` (ready for one row of a pandas/Arrow table)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            if f.name.startswith("_"):
                continue
            out[f.name] = _plain(getattr(self, f.name))
        return out


def _plain(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    return value


# ----------------------------------------------------------------------------------------------------
# Checkers. Each raises InvalidParameterError with "`name` must be <allowed>; got <value>."
# ----------------------------------------------------------------------------------------------------


def check_open_unit(name: str, value: Any) -> float:
    """A real number strictly inside (0, 1) — an alpha, a power, a confidence level."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 < float(value) < 1.0:
        raise invalid(name, "in (0, 1)", value)
    return float(value)


def check_choice(name: str, value: Any, choices: Iterable[str]) -> str:
    """One of a fixed set of strings (the same set as the ``Literal`` in the signature)."""
    choices = tuple(choices)
    if not isinstance(value, str) or value not in choices:
        raise invalid(name, "one of " + ", ".join(repr(c) for c in choices), value)
    return value


def check_int(name: str, value: Any, minimum: int) -> int:
    """An integer (not a bool) at least ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or int(value) < minimum:
        raise invalid(name, f"an integer >= {minimum}", value)
    return int(value)


def check_finite(name: str, value: Any, *, positive: bool = False) -> float:
    """A finite real number, optionally > 0."""
    ok = not isinstance(value, bool) and isinstance(value, numbers.Real) and math.isfinite(float(value))
    if ok and positive:
        ok = float(value) > 0.0
    if not ok:
        raise invalid(name, "a finite number > 0" if positive else "a finite number", value)
    return float(value)


def check_seed(name: str, value: Any) -> int | None:
    """A non-negative integer seed, or None for fresh OS entropy."""
    if value is None:
        return None
    return check_int(name, value, 0)


def as_1d_float(name: str, values: Any, *, allow_nan: bool = True) -> np.ndarray:
    """A 1-D float array; NaN marks a missing value (allowed unless ``allow_nan=False``), ±inf is refused."""
    try:
        arr = np.asarray(values, dtype=float)
    except (TypeError, ValueError):
        raise InvalidParameterError(
            f"`{name}` must be a 1-D array of numbers; got {type(values).__name__}."
        ) from None
    if arr.ndim != 1:
        raise InvalidParameterError(f"`{name}` must be a 1-D array; got shape {arr.shape}.")
    if np.isinf(arr).any():
        where = int(np.flatnonzero(np.isinf(arr))[0])
        raise InvalidParameterError(
            f"`{name}` must be finite (NaN marks a missing value); got {arr[where]} at index {where}."
        )
    if not allow_nan and np.isnan(arr).any():
        where = int(np.flatnonzero(np.isnan(arr))[0])
        raise InvalidParameterError(f"`{name}` must not contain NaN; got NaN at index {where}.")
    return arr


def check_same_length(names: tuple[str, str], a: np.ndarray, b: np.ndarray) -> None:
    """Two paired arrays must have one entry per pair."""
    if a.shape[0] != b.shape[0]:
        raise InvalidParameterError(
            f"`{names[0]}` and `{names[1]}` must have the same length; got {a.shape[0]} and {b.shape[0]}."
        )


# ----------------------------------------------------------------------------------------------------
# scipy's random-generator keyword: `rng` from scipy 1.15, `random_state` before.
# ----------------------------------------------------------------------------------------------------


def rng_kwargs(func: Callable[..., Any], seed: int) -> dict[str, Any]:
    """Keyword arguments that seed ``func`` (``scipy.stats.bootstrap``/``permutation_test``) with ``seed``."""
    generator = np.random.default_rng(seed)
    if "rng" in inspect.signature(func).parameters:
        return {"rng": generator}
    return {"random_state": generator}  # pragma: no cover - scipy < 1.15


def resolve_seed(seed: int | None) -> int:
    """Turn ``None`` into a fresh recorded seed so a result can be reproduced from itself."""
    if seed is None:
        return int(np.random.SeedSequence().entropy % (2**63))
    return seed
