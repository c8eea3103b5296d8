"""The forward passes of observe: one clean pass per batch of windows, streamed to ``tokens`` and ``routing``.

Writes (columns and types: :mod:`moeaudit.tables`):

* ``tokens.parquet`` — one row per real (non-padding) position: ``seq``, ``pos``, ``token_id``, ``nll``
  (NLL of the next token, null at a window's last position), ``domain``, ``split``;
* ``routing.parquet`` — one row per (layer, seq, pos, slot): ``expert``, ``raw_gate`` (the family's router
  score, :meth:`moeaudit.models.MoELayer.router_probs`: the softmax over all routed experts, or the sigmoid
  score of DeepSeek-V3-style routers), ``combine_weight`` (what the architecture multiplies the expert output by),
  ``renorm_gate`` (raw gate / Σ raw gates of the token's selected experts), ``act_norm`` (L2 norm of the
  ungated expert output), ``act_max_abs`` (max |f_e(x)_i|). ``slot`` 0 is the largest raw gate;
* ``router_probs.parquet`` (optional, chosen layers) — ``layer``, ``seq``, ``pos``, ``probs`` (float16
  list of length E), for routing entropy and Gini.

Memory does not grow with the corpus: each batch becomes one Parquet row group and is dropped.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from moeaudit.data.windows import pad_token_rows
from moeaudit.errors import invalid
from moeaudit.models.moe_model import MoEModel, nll_from_logits
from moeaudit.tables import ROUTING_SCHEMA, TOKENS_SCHEMA, router_probs_schema

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class WindowInput:
    """The minimal window the observe stage needs (``moeaudit.data.Window`` satisfies it too)."""

    seq: int
    token_ids: np.ndarray
    domain: str | None = None
    split: str | None = None


@dataclass
class ObserveStats:
    """Counters recorded in the manifest."""

    windows: int = 0
    tokens: int = 0
    routing_rows: int = 0
    batches: int = 0
    seconds: float = 0.0
    layers: list[int] = field(default_factory=list)
    router_probs_layers: list[int] = field(default_factory=list)
    experts_implementation: str = ""
    mean_nll: float = float("nan")
    batch_size_used: int = 0
    nll_sum: float = 0.0
    nll_count: int = 0

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def as_windows(windows: Iterable[Any]) -> list[Any]:
    """Accept Window-like objects or bare 1-D token arrays (numbered 0, 1, ...)."""
    out = []
    for index, window in enumerate(windows):
        if hasattr(window, "token_ids"):
            out.append(window)
        else:
            out.append(WindowInput(seq=index, token_ids=np.asarray(window, dtype=np.int64)))
    return out


def _batch_tensors(batch: Sequence[Any], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor | None]:
    ids, mask = pad_token_rows([w.token_ids for w in batch], pad_id)
    # Equal lengths need no mask; transformers then takes its plain causal path.
    full = bool(mask.all())
    return torch.from_numpy(ids).to(device), (None if full else torch.from_numpy(mask).to(device))


def _routing_columns(record, layer: int, seqs: np.ndarray, positions: np.ndarray, valid: np.ndarray) -> dict:
    raw_gate = record.raw_gate.float()
    order = torch.argsort(raw_gate, dim=-1, descending=True, stable=True)
    take = lambda t: t.gather(-1, order).cpu().numpy()[valid]  # noqa: E731
    raw = take(raw_gate)
    k = raw.shape[1]
    n = raw.shape[0]
    return {
        "layer": np.full(n * k, layer, dtype=np.int16),
        "seq": np.repeat(seqs[valid], k).astype(np.int32),
        "pos": np.repeat(positions[valid], k).astype(np.int32),
        "slot": np.tile(np.arange(k, dtype=np.int8), n),
        "expert": take(record.topk_idx).reshape(-1).astype(np.int16),
        "raw_gate": raw.reshape(-1).astype(np.float32),
        "combine_weight": take(record.combine_weight.float()).reshape(-1).astype(np.float32),
        "renorm_gate": (raw / raw.sum(axis=1, keepdims=True)).reshape(-1).astype(np.float32),
        "act_norm": take(record.act_norm).reshape(-1).astype(np.float32),
        "act_max_abs": take(record.act_max_abs).reshape(-1).astype(np.float32),
    }


@dataclass
class BatchTables:
    """One forward pass's rows: the tokens table and, per observed layer, routing (and router-probs) tables."""

    tokens: pa.Table
    routing: list[pa.Table]
    router_probs: list[pa.Table]
    nll_sum: float
    nll_count: int
    windows: int


def _check_finite(trace, layers: Sequence[int], logits: torch.Tensor, batch: Sequence[Any],
                  valid_2d: np.ndarray, dtype: torch.dtype) -> None:
    """Raise NonFiniteError naming the first layer (in depth order) and position with NaN/inf activations."""
    b, t = valid_2d.shape
    valid = torch.from_numpy(valid_2d)
    checks = []
    for index in sorted(layers):
        record = trace[index]
        checks.append((f"MoE layer {index} input (router logits)", record.router_logits))
        checks.append((f"MoE layer {index} expert outputs", record.act_norm))
    checks.append(("output logits", logits))
    for where, tensor in checks:
        tensor = tensor.detach()
        # NaN/inf anywhere makes the sum non-finite: a cheap test for the common case (an elementwise
        # isfinite over the logits would cost a fifth of the forward pass on a small model).
        if bool(torch.isfinite(tensor.sum())):
            continue
        # -inf output logits are a legitimate mask of impossible tokens; NaN and +inf are not.
        broken = torch.isnan(tensor) | (torch.isposinf(tensor) if where == "output logits" else torch.isinf(tensor))
        bad = broken.reshape(b, t, -1).any(-1).cpu() & valid
        if bool(bad.any()):
            row, pos = (int(i) for i in torch.nonzero(bad)[0])
            from moeaudit.errors import NonFiniteError

            name = str(dtype).removeprefix("torch.")
            cause = ("the checkpoint's weights may be corrupt" if dtype == torch.float32 else
                     f"{name} may overflow (try --dtype float32) or the checkpoint's weights may be corrupt")
            raise NonFiniteError(f"non-finite activations (NaN/inf) in {where} at window seq {batch[row].seq}, "
                                 f"position {pos} ({int(bad.sum())} positions in this batch); {cause}")


def _observe_batch(moe: MoEModel, batch: Sequence[Any], layers: Sequence[int], probs_layers: Sequence[int],
                   probs_schema: pa.Schema | None, pad_id: int) -> BatchTables:
    ids, mask = _batch_tensors(batch, pad_id, moe.device)
    with torch.no_grad(), moe.capture(layers) as trace:
        logits = moe.model(input_ids=ids, attention_mask=mask).logits
    b, t = ids.shape
    valid_2d = np.zeros((b, t), dtype=bool)
    for row, window in enumerate(batch):
        valid_2d[row, : len(window.token_ids)] = True
    _check_finite(trace, layers, logits, batch, valid_2d, moe.dtype)
    nll = nll_from_logits(logits, ids, mask).cpu().numpy()
    valid = valid_2d.reshape(-1)
    seqs = np.repeat(np.array([w.seq for w in batch], dtype=np.int64), t)
    positions = np.tile(np.arange(t, dtype=np.int64), b)
    finite = np.isfinite(nll[valid_2d])
    tokens = pa.table({
        "seq": seqs[valid].astype(np.int32),
        "pos": positions[valid].astype(np.int32),
        "token_id": ids.cpu().numpy().reshape(-1)[valid].astype(np.int32),
        "nll": pa.array(nll.reshape(-1)[valid], type=pa.float32(), from_pandas=True),
        "domain": np.repeat(np.array([getattr(w, "domain", None) for w in batch], dtype=object), t)[valid],
        "split": np.repeat(np.array([getattr(w, "split", None) for w in batch], dtype=object), t)[valid],
    }, schema=TOKENS_SCHEMA)
    routing, router_probs = [], []
    for index in layers:
        record = trace[index]
        routing.append(pa.table(_routing_columns(record, index, seqs, positions, valid), schema=ROUTING_SCHEMA))
        if index in probs_layers:
            probs = record.router_probs
            if probs is None:
                probs = moe.layer(index).router_probs(record.router_logits)
            probs = probs.float().cpu().numpy()[valid]
            flat = pa.array(probs.astype(np.float16).reshape(-1), type=pa.float16())
            router_probs.append(pa.table({
                "layer": np.full(len(probs), index, dtype=np.int16),
                "seq": seqs[valid].astype(np.int32), "pos": positions[valid].astype(np.int32),
                "probs": pa.FixedSizeListArray.from_arrays(flat, probs.shape[1]),
            }, schema=probs_schema))
    return BatchTables(tokens, routing, router_probs, float(nll[valid_2d][finite].sum()), int(finite.sum()),
                       len(batch))


def observe_batches(
    moe: MoEModel,
    windows: Iterable[Any],
    *,
    layers: Sequence[int] | None = None,
    router_probs_layers: Sequence[int] | str | None = None,
    batch_size: int = 8,
    stats: ObserveStats | None = None,
) -> Iterator[BatchTables]:
    """Yield one :class:`BatchTables` per forward pass over ``windows`` (see :func:`observe`).

    On out-of-memory the batch is halved and retried; ``stats.batch_size_used`` records the smallest
    size that ran. NaN/inf activations raise :class:`~moeaudit.errors.NonFiniteError` with the layer and
    position.
    """
    from moeaudit.scale.memory import with_halving

    if batch_size < 1:
        raise invalid("batch_size", "a positive integer", batch_size)
    windows = as_windows(windows)
    layers = list(moe.moe_layer_indices if layers is None else layers)
    for index in layers:
        moe.layer(index)
    if router_probs_layers == "all":
        probs_layers = list(layers)
    else:
        probs_layers = [i for i in (router_probs_layers or []) if i in layers]
    num_experts = {index: moe.layer(index).num_experts for index in layers}
    if len({num_experts[i] for i in probs_layers}) > 1:
        raise invalid("router_probs_layers", "layers with one expert count", probs_layers)
    probs_schema = router_probs_schema(num_experts[probs_layers[0]]) if probs_layers else None
    pad_id = getattr(moe.config, "pad_token_id", None) or 0
    if stats is not None:
        stats.layers, stats.router_probs_layers = layers, probs_layers
        stats.experts_implementation = moe.experts_implementation
    start = 0
    while start < len(windows):
        tables, batch_size = with_halving(
            lambda size: _observe_batch(moe, windows[start : start + size], layers, probs_layers, probs_schema,
                                        pad_id), batch_size, "batch_size")
        if stats is not None:
            stats.windows += tables.windows
            stats.tokens += tables.tokens.num_rows
            stats.routing_rows += sum(t.num_rows for t in tables.routing)
            stats.batches += 1
            stats.batch_size_used = min(stats.batch_size_used or batch_size, batch_size)
            stats.nll_sum += tables.nll_sum
            stats.nll_count += tables.nll_count
            stats.mean_nll = stats.nll_sum / stats.nll_count if stats.nll_count else float("nan")
        start += tables.windows
        yield tables


def observe(
    moe: MoEModel,
    windows: Iterable[Any],
    *,
    tokens_path: str | Path,
    routing_path: str | Path,
    router_probs_path: str | Path | None = None,
    layers: Sequence[int] | None = None,
    router_probs_layers: Sequence[int] | str | None = None,
    batch_size: int = 8,
    on_batch: Callable[[int, int], None] | None = None,
) -> ObserveStats:
    """Run the clean model over ``windows`` and stream the ``tokens`` / ``routing`` tables to Parquet.

    Parameters
    ----------
    moe : MoEModel
    windows : iterable of Window-like objects (``seq``, ``token_ids``, optional ``domain``, ``split``) or
        of 1-D token-id arrays.
    tokens_path, routing_path : path
        Output files (written directly; the run-directory stage wraps them in atomic renames).
    router_probs_path : path, optional
        Where to write full router probabilities for ``router_probs_layers``.
    layers : sequence of int, optional
        MoE layers to record (default all).
    router_probs_layers : sequence of int or "all", optional
        Layers whose full router-probability rows are kept (float16).
    batch_size : int
        Windows per forward pass (halved and retried on out-of-memory); padding positions are masked
        out of attention and never written.
    on_batch : callable(done_windows, total_windows), optional
        Progress callback.

    Returns
    -------
    ObserveStats
    """
    windows = as_windows(windows)
    stats = ObserveStats()
    started = time.perf_counter()
    if router_probs_layers and router_probs_path is None:
        raise invalid("router_probs_path", "a path when router_probs_layers are chosen", None)
    batches = observe_batches(moe, windows, layers=layers, router_probs_layers=router_probs_layers,
                              batch_size=batch_size, stats=stats)
    tokens_writer = pq.ParquetWriter(tokens_path, TOKENS_SCHEMA)
    routing_writer = pq.ParquetWriter(routing_path, ROUTING_SCHEMA)
    probs_writer = None
    try:
        for tables in batches:
            tokens_writer.write_table(tables.tokens)
            for part in tables.routing:
                routing_writer.write_table(part)
            for part in tables.router_probs:
                if probs_writer is None:
                    probs_writer = pq.ParquetWriter(router_probs_path, part.schema)
                probs_writer.write_table(part)
            if on_batch is not None:
                on_batch(stats.windows, len(windows))
    finally:
        tokens_writer.close()
        routing_writer.close()
        if probs_writer is not None:
            probs_writer.close()
    stats.seconds = time.perf_counter() - started
    logger.info("observed %d windows (%d tokens) in %.1fs", stats.windows, stats.tokens, stats.seconds)
    return stats


def read_router_probs(path: str | Path, layers: Sequence[int] | None = None) -> dict[int, np.ndarray]:
    """``{layer: float32 array [tokens, E]}`` with rows in ascending (seq, pos) order, as metrics expects."""
    table = pq.read_table(path)
    out: dict[int, np.ndarray] = {}
    layer_col = table.column("layer").to_numpy()
    for index in sorted(set(layer_col.tolist()) if layers is None else layers):
        sub = table.filter(pa.compute.equal(table.column("layer"), index))
        seq = sub.column("seq").to_numpy().astype(np.int64)
        pos = sub.column("pos").to_numpy().astype(np.int64)
        probs = sub.column("probs").combine_chunks()
        width = probs.type.list_size
        matrix = probs.flatten().to_numpy(zero_copy_only=False).astype(np.float32).reshape(-1, width)
        out[int(index)] = matrix[np.lexsort((pos, seq))]
    return out
