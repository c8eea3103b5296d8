"""The metric registry: every per-(layer, expert) metric that :func:`compute_expert_metrics` runs.

A metric is a function of one :class:`LayerData` (one MoE layer's routing rows for the selected tokens,
plus optional router probabilities and weights) that returns one value per routed expert. Built-in
metrics are registered by :mod:`moeaudit.metrics._builtin`; users add their own with
:func:`register_metric`.

Examples
--------
>>> import numpy as np
>>> from moeaudit.metrics import register_metric, unregister_metric
>>> @register_metric("gate_x_norm_sum", needs=("raw_gate", "act_norm"))
... def gate_x_norm_sum(data):
...     w = data.column("raw_gate") * data.column("act_norm")
...     return np.bincount(data.expert, weights=w, minlength=data.num_experts)
>>> unregister_metric("gate_x_norm_sum")
"""

from __future__ import annotations

import keyword
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, overload

import numpy as np
import pandas as pd
from numpy.typing import ArrayLike, NDArray

from moeaudit.errors import InvalidParameterError, invalid
from moeaudit.metrics.weights import LayerWeights

__all__ = [
    "check_audit_metrics",
    "LayerData",
    "MetricFn",
    "MetricSpec",
    "MissingInputError",
    "get_metric",
    "list_metrics",
    "register_metric",
    "unregister_metric",
]

#: Inputs other than routing columns that a metric may need.
INPUT_NEEDS: tuple[str, ...] = ("router_probs", "router_logits", "weights")
#: Column names of the output table that metrics may not take.
KEY_COLUMNS: frozenset[str] = frozenset({"layer", "expert", "domain"})


class MissingInputError(InvalidParameterError):
    """A metric was asked for but an input it needs (a column, router probabilities, weights) is absent."""


@dataclass(frozen=True, eq=False)
class LayerData:
    """One MoE layer's inputs, restricted to the selected tokens; what a metric function receives.

    Attributes
    ----------
    layer : int
        The model's decoder-layer index.
    num_experts : int
        Number of routed experts E; a metric returns E values.
    n_tokens : int
        Number of distinct selected tokens (seq, pos) at this layer.
    expert : ndarray of int64, shape (n_rows,)
        Expert id of each routing row (one row = one token's use of one expert).
    token : ndarray of int64, shape (n_rows,)
        Token of each routing row as an index 0 .. n_tokens-1 (the row of ``router_probs``).
    routing : pandas.DataFrame
        This layer's routing rows for the selected tokens (all columns of the input table).
    router_probs : ndarray, shape (n_tokens, E), optional
        Full router probabilities of the selected tokens; None when not given.
    router_logits : ndarray, shape (n_tokens, E), optional
        Full router logits of the selected tokens (rows as ``router_probs``); None when not given.
    weights : LayerWeights, optional
        The layer's expert tensors and router weight; None when not given.
    options : mapping
        Run options, e.g. ``{"reap_gate": "combine"}``.
    """

    layer: int
    num_experts: int
    n_tokens: int
    expert: NDArray[np.int64]
    token: NDArray[np.int64]
    routing: pd.DataFrame
    router_probs: NDArray[np.floating] | None = None
    weights: LayerWeights | None = None
    router_logits: NDArray[np.floating] | None = None
    options: Mapping[str, Any] = field(default_factory=dict)

    def column(self, name: str) -> NDArray[np.float64]:
        """The routing column ``name`` as float64, one value per row; MissingInputError if absent."""
        if name not in self.routing.columns:
            raise MissingInputError(
                f"the routing column `{name}` is needed at layer {self.layer}; "
                f"got columns {sorted(map(str, self.routing.columns))}."
            )
        return self.routing[name].to_numpy(dtype=np.float64)

    def has(self, need: str) -> bool:
        """Whether the input ``need`` ("router_probs", "router_logits", "weights" or a routing column) is
        present."""
        if need == "router_probs":
            return self.router_probs is not None
        if need == "router_logits":
            return self.router_logits is not None
        if need == "weights":
            return self.weights is not None
        return need in self.routing.columns


MetricFn = Callable[[LayerData], ArrayLike]


@dataclass(frozen=True)
class MetricSpec:
    """A registered metric: its output column name, its function and the inputs it needs."""

    name: str
    fn: MetricFn
    needs: tuple[str, ...] = ()

    def missing(self, data: LayerData) -> list[str]:
        """The declared inputs that ``data`` lacks."""
        return [n for n in self.needs if not data.has(n)]

    def __call__(self, data: LayerData) -> NDArray[Any]:
        """Run the metric on one layer and check that it returned one value per expert."""
        lacking = self.missing(data)
        if lacking:
            raise MissingInputError(
                f"metric `{self.name}` needs {', '.join(f'`{n}`' for n in lacking)} at layer {data.layer}, "
                "which was not given."
            )
        out = np.asarray(self.fn(data))
        if out.shape != (data.num_experts,):
            raise ValueError(
                f"metric `{self.name}` must return one value per expert, shape ({data.num_experts},) "
                f"at layer {data.layer}; got shape {out.shape}."
            )
        return out


_REGISTRY: dict[str, MetricSpec] = {}


def _check_name(name: object) -> str:
    if not isinstance(name, str) or not name.isidentifier() or keyword.iskeyword(name):
        raise invalid("name", "a Python identifier (it becomes a column name)", name)
    if name in KEY_COLUMNS:
        raise invalid("name", f"not one of the key columns {sorted(KEY_COLUMNS)}", name)
    return name


def _check_needs(needs: Iterable[str] | str) -> tuple[str, ...]:
    if isinstance(needs, str):
        needs = (needs,)
    out = tuple(needs)
    for n in out:
        if not isinstance(n, str) or not n:
            raise invalid("needs", f"names of inputs: {list(INPUT_NEEDS)} or routing column names", n)
    return out


@overload
def register_metric(
    name: str, fn: None = None, *, needs: Iterable[str] | str = (), overwrite: bool = False
) -> Callable[[MetricFn], MetricFn]: ...
@overload
def register_metric(
    name: str, fn: MetricFn, *, needs: Iterable[str] | str = (), overwrite: bool = False
) -> MetricFn: ...
def register_metric(
    name: str,
    fn: MetricFn | None = None,
    *,
    needs: Iterable[str] | str = (),
    overwrite: bool = False,
) -> MetricFn | Callable[[MetricFn], MetricFn]:
    """Register a per-(layer, expert) metric; usable as a function or as a decorator.

    Parameters
    ----------
    name : str
        Output column name (a Python identifier, not ``layer``/``expert``/``domain``).
    fn : callable, optional
        ``fn(data: LayerData) -> array of shape (data.num_experts,)``. Omit to use as a decorator.
    needs : iterable of str
        Inputs the metric reads: ``"router_probs"``, ``"router_logits"``, ``"weights"`` and/or routing column names
        (e.g. ``"act_norm"``). When one is absent the metric's column is NaN, or, when the metric was
        requested by name in ``metrics=``, :class:`MissingInputError` is raised.
    overwrite : bool
        Replace an existing metric of the same name (default: refuse).

    Returns
    -------
    callable
        ``fn`` itself (or a decorator that registers and returns it).
    """
    _check_name(name)
    needs_t = _check_needs(needs)

    def _register(f: MetricFn) -> MetricFn:
        if not callable(f):
            raise invalid("fn", "a callable taking a LayerData", f)
        if name in _REGISTRY and not overwrite:
            raise invalid("name", "not already registered (pass overwrite=True to replace it)", name)
        _REGISTRY[name] = MetricSpec(name=name, fn=f, needs=needs_t)
        return f

    return _register if fn is None else _register(fn)


def unregister_metric(name: str) -> None:
    """Remove a registered metric (built-ins included); unknown names raise InvalidParameterError."""
    if name not in _REGISTRY:
        raise invalid("name", f"a registered metric, one of {list_metrics()}", name)
    del _REGISTRY[name]


def list_metrics() -> list[str]:
    """Names of the registered metrics, in registration order (built-ins first)."""
    return list(_REGISTRY)


def check_audit_metrics(names: Iterable[str] | None) -> None:
    """Refuse, in one house line, an ``audit.audit_metrics`` entry that no registered metric provides: checked
    before a model loads, not after observe and intervene have run."""
    for name in names or ():
        if name not in _REGISTRY:
            raise invalid("audit.audit_metrics", f"registered metric names, from {list_metrics()}", name)


def get_metric(name: str) -> MetricSpec:
    """The :class:`MetricSpec` registered under ``name``."""
    if name not in _REGISTRY:
        raise invalid("metrics", f"registered metric names, from {list_metrics()}", name)
    return _REGISTRY[name]
