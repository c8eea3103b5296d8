"""Which interventions to run: a :class:`Selection` names target positions and what to remove at each.

Target positions
    Every position that has a real next token (the last position of a window and padding are skipped and
    counted), optionally a seeded sample of ``n`` of them per MoE layer, or given positions per layer
    (:meth:`Selection.at`), or an explicit list of interventions.
What is removed at a target (ℓ, t)
    ``active``       every expert of the active set A_ℓ(t), one intervention each (the census);
    ``explicit``     the given (layer, seq, pos, expert) items (an inactive expert is allowed);
    ``contrast``     the experts of A_ℓ(t) with the highest and the lowest value of a per-(layer, expert)
                     metric (the paper's paired contrast), or of the token's own raw gate
                     (``metric="raw_gate"``, the routing-weight control);
    ``progressive``  the top-j experts of A_ℓ(t) by raw gate, cumulatively, j = 1 .. k-1;
    ``shared``       the shared expert(s) of the layer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Literal, Mapping

import numpy as np
import torch

from moeaudit.errors import invalid

SelectionWhat = Literal["active", "explicit", "contrast", "progressive", "shared"]
SELECTION_WHAT: tuple[str, ...] = ("active", "explicit", "contrast", "progressive", "shared")
#: ``metric`` value that ranks a token's active set by its own raw gate (the routing-weight control).
OWN_GATE = "raw_gate"


@dataclass(frozen=True)
class Selection:
    """A selection of interventions; build it with one of the class methods.

    Attributes
    ----------
    what : {"active", "explicit", "contrast", "progressive", "shared"}
    layers : tuple of int or None
        MoE layers (decoder-layer indices); None = every MoE layer.
    n : int or None
        Target positions sampled per MoE layer (None = every position with a next token).
    seed : int
        Seed of the position sample (``numpy.random.default_rng``).
    items : tuple of (layer, seq, pos, expert)
        For ``explicit``; ``seq`` counts from the first window of the batch passed to the engine.
    metric : str or None
        For ``contrast``: a metric column name, or ``"raw_gate"`` for the token's own gate.
    metric_values : mapping (layer, expert) -> float
        For ``contrast`` with a population metric.
    shared_index : int or None
        For ``shared``: None removes all shared experts of the layer, j removes fused shared expert j.
    targets : tuple of (seq, pos)
        Given target positions, the same at every layer (:meth:`at`); ``seq`` counts from the first window
        of the batch.

    Examples
    --------
    >>> Selection.census(layers=[0, 1])
    Selection(what='active', layers=(0, 1), n=None, seed=0, items=(), metric=None, shared_index=None)
    >>> Selection.sample(200, seed=42).n
    200
    """

    what: SelectionWhat = "active"
    layers: tuple[int, ...] | None = None
    n: int | None = None
    seed: int = 0
    items: tuple[tuple[int, int, int, int], ...] = ()
    metric: str | None = None
    metric_values: Mapping[tuple[int, int], float] | None = field(default=None, compare=False, repr=False)
    shared_index: int | None = None
    targets: tuple[tuple[int, int], ...] = field(default=(), repr=False)

    def __post_init__(self) -> None:
        if self.what not in SELECTION_WHAT:
            raise invalid("what", "one of " + ", ".join(SELECTION_WHAT), self.what)
        if self.n is not None and (not isinstance(self.n, (int, np.integer)) or self.n < 1):
            raise invalid("n", "a positive integer or None", self.n)
        if self.what == "contrast":
            if not self.metric:
                raise invalid("metric", f"a metric name (or {OWN_GATE!r}) for a contrast selection", self.metric)
            if self.metric != OWN_GATE and self.metric_values is None:
                raise invalid("metric_table", f"given for metric {self.metric!r}", None)
        if self.what == "explicit" and not self.items:
            raise invalid("items", "a non-empty list of (layer, seq, pos, expert)", list(self.items))

    # ------------------------------------------------------------------ constructors
    @classmethod
    def census(cls, layers: Iterable[int] | None = None) -> "Selection":
        """Every active expert at every position (with a next token) of every chosen MoE layer."""
        return cls("active", _layers(layers))

    @classmethod
    def sample(cls, n: int, *, seed: int = 0, layers: Iterable[int] | None = None) -> "Selection":
        """Every active expert at ``n`` seeded target positions per MoE layer."""
        return cls("active", _layers(layers), n=n, seed=seed)

    @classmethod
    def at(cls, targets: Iterable[tuple[int, int]], *, layers: Iterable[int] | None = None) -> "Selection":
        """Every active expert at the given (seq, pos) target positions of every chosen MoE layer (e.g. a
        replayed sample)."""
        targets = tuple(sorted({tuple(int(v) for v in item) for item in targets}))
        bad = [item for item in targets if len(item) != 2]
        if bad or not targets:
            raise invalid("targets", "a non-empty list of (seq, pos)", bad[0] if bad else [])
        return cls("active", _layers(layers), targets=targets)  # type: ignore[arg-type]

    @classmethod
    def explicit(cls, items: Iterable[tuple[int, int, int, int]]) -> "Selection":
        """Exactly the given (layer, seq, pos, expert) interventions."""
        items = tuple(tuple(int(v) for v in item) for item in items)
        bad = [item for item in items if len(item) != 4]
        if bad:
            raise invalid("items", "tuples (layer, seq, pos, expert)", bad[0])
        return cls("explicit", tuple(sorted({item[0] for item in items})), items=items)  # type: ignore[arg-type]

    @classmethod
    def contrast(cls, metric: str, metric_table: Any = None, *, layers: Iterable[int] | None = None,
                 n: int | None = None, seed: int = 0) -> "Selection":
        """The highest- and lowest-ranked active expert per target by ``metric``.

        Parameters
        ----------
        metric : str
            A column of ``metric_table``, or ``"raw_gate"`` to rank by the token's own gate.
        metric_table : pandas.DataFrame, optional
            One row per (layer, expert) with columns ``layer``, ``expert`` and ``metric``
            (``expert_metrics.parquet``).
        """
        values = None
        if metric != OWN_GATE:
            if metric_table is None:
                raise invalid("metric_table", f"given for metric {metric!r}", None)
            missing = [c for c in ("layer", "expert", metric) if c not in metric_table.columns]
            if missing:
                raise invalid("metric_table", f"a table with columns layer, expert, {metric}",
                              f"columns {list(metric_table.columns)}")
            values = {(int(l), int(e)): float(v) for l, e, v in
                      zip(metric_table["layer"], metric_table["expert"], metric_table[metric])}
        return cls("contrast", _layers(layers), n=n, seed=seed, metric=metric, metric_values=values)

    @classmethod
    def progressive(cls, *, layers: Iterable[int] | None = None, n: int | None = None, seed: int = 0) -> "Selection":
        """Cumulative removal of the top-j active experts by raw gate, j = 1 .. k-1."""
        return cls("progressive", _layers(layers), n=n, seed=seed)

    @classmethod
    def shared(cls, *, layers: Iterable[int] | None = None, index: int | None = None, n: int | None = None,
               seed: int = 0) -> "Selection":
        """The shared expert(s) (all of them, or fused shared expert ``index``) at each target."""
        return cls("shared", _layers(layers), n=n, seed=seed, shared_index=index)

    @property
    def name(self) -> str:
        """The value of the ``selection`` column: census, sample, explicit, contrast, progressive, shared."""
        if self.what == "active":
            return "census" if self.n is None and not self.targets else "sample"
        return self.what


def _layers(layers: Iterable[int] | None) -> tuple[int, ...] | None:
    return None if layers is None else tuple(int(layer) for layer in layers)


# ---------------------------------------------------------------------------- planning
@dataclass
class Plan:
    """Planned interventions of one window at one MoE layer (parallel lists, one entry per intervention)."""

    pos: list[int] = field(default_factory=list)
    expert: list[int] = field(default_factory=list)
    removed: list[tuple[int, ...]] = field(default_factory=list)
    j: list[int] = field(default_factory=list)
    role: list[str | None] = field(default_factory=list)
    gate_rank: list[int] = field(default_factory=list)

    def add(self, pos: int, expert: int, removed: tuple[int, ...], j: int, role: str | None, gate_rank: int) -> None:
        self.pos.append(pos)
        self.expert.append(expert)
        self.removed.append(removed)
        self.j.append(j)
        self.role.append(role)
        self.gate_rank.append(gate_rank)

    def __len__(self) -> int:
        return len(self.pos)


def sample_targets(selection: Selection, layers: list[int], valid: torch.Tensor) -> dict[int, np.ndarray] | None:
    """Seeded (or given) target positions per layer: {layer: int array [n, 2] of (seq, pos)}; None = all valid.

    Given targets (:meth:`Selection.at`) keep the valid ones of each layer.

    Positions are drawn uniformly without replacement among positions with a next token, independently
    per layer (one generator, layers in ascending order); when fewer exist, all are taken.
    """
    if selection.targets:
        rows = np.asarray(selection.targets, dtype=np.int64)
        valid_np = valid.cpu().numpy()
        rows = rows[(rows[:, 0] < valid_np.shape[0]) & (rows[:, 1] < valid_np.shape[1])]
        rows = rows[valid_np[rows[:, 0], rows[:, 1]]]
        return {layer: rows for layer in layers}
    if selection.n is None:
        return None
    candidates = torch.nonzero(valid).cpu().numpy()  # [M, 2] (seq, pos), row-major order
    rng = np.random.default_rng(selection.seed)
    out = {}
    for layer in layers:
        take = min(selection.n, len(candidates))
        chosen = np.sort(rng.choice(len(candidates), size=take, replace=False))
        out[layer] = candidates[chosen]
    return out


def gate_ranks(raw_gate: torch.Tensor) -> torch.Tensor:
    """[N, k] rank of each slot's raw gate within its active set (0 = largest; ties by slot order)."""
    order = torch.argsort(-raw_gate, dim=-1, stable=True)
    return torch.argsort(order, dim=-1, stable=True)


def plan_layer(selection: Selection, layer, record, positions: np.ndarray,
               explicit: list[tuple[int, int]] | None = None) -> Plan:
    """Plan the interventions of one window at one MoE layer.

    Parameters
    ----------
    selection : Selection
    layer : MoELayer
    record : LayerRecord
        The clean capture of the layer for this window.
    positions : int array
        Target positions (already filtered to positions with a next token).
    explicit : list of (pos, expert), optional
        For ``explicit`` selections.
    """
    plan = Plan()
    k = layer.top_k
    topk_idx = record.topk_idx.cpu().numpy()
    ranks = gate_ranks(record.raw_gate).cpu().numpy()
    if selection.what == "explicit":
        for pos, expert in explicit or ():
            active = np.nonzero(topk_idx[pos] == expert)[0]
            plan.add(pos, expert, (expert,), 1, None, int(ranks[pos, active[0]]) if active.size else -1)
        return plan
    if selection.what == "shared":
        index = -1 if selection.shared_index is None else selection.shared_index
        for pos in positions:
            plan.add(int(pos), index, (), 1, None, -1)
        return plan
    for pos in positions:
        pos = int(pos)
        idx, rank = topk_idx[pos], ranks[pos]
        by_gate = idx[np.argsort(rank)]  # experts in descending gate order
        if selection.what == "active":
            for slot in range(k):
                plan.add(pos, int(idx[slot]), (int(idx[slot]),), 1, None, int(rank[slot]))
        elif selection.what == "progressive":
            for j in range(1, k):
                plan.add(pos, int(by_gate[j - 1]), tuple(int(e) for e in by_gate[:j]), j, None, j - 1)
        elif selection.what == "contrast":
            if selection.metric == OWN_GATE:
                values = -np.arange(k, dtype=float)  # descending gate order: rank 0 is the highest
                experts = by_gate
            else:
                experts = by_gate
                values = np.array([selection.metric_values[(layer.layer, int(e))] for e in experts])
            high, low = int(np.argmax(values)), int(np.argmin(values))
            for role, which in (("high", high), ("low", low)):
                expert = int(experts[which])
                plan.add(pos, expert, (expert,), 1, role, which)
    return plan
