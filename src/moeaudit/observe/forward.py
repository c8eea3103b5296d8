"""The forward passes of observe: one clean pass per batch of equal-length windows, streamed to ``tokens`` and
``routing``.

Writes (columns and types: :mod:`moeaudit.tables`):

* ``tokens.parquet`` — one row per position: ``seq``, ``pos``, ``token_id``, ``nll``
  (NLL of the next token, null at a window's last position), ``domain``, ``split``;
* ``routing.parquet`` — one row per (seq, layer, pos, slot), in that order: ``expert``, ``raw_gate`` (the
  family's router score, :meth:`moeaudit.models.MoELayer.router_probs`: the softmax over all routed experts,
  or the sigmoid score of DeepSeek-V3-style routers), ``combine_weight`` (what the architecture multiplies the expert output by),
  ``renorm_gate`` (raw gate / Σ raw gates of the token's selected experts), ``act_norm`` (L2 norm of the
  ungated expert output), ``act_max_abs`` (max |f_e(x)_i|). ``slot`` 0 is the largest raw gate;
* ``router_probs.parquet`` (optional, chosen layers) — ``layer``, ``seq``, ``pos``, ``probs`` (float16
  list of length E), for routing entropy and Gini;
* ``router_logits.parquet`` (optional, chosen layers) — ``layer``, ``seq``, ``pos``, ``logits`` (float32
  list of length E): the router's raw logits, for the ``paper_code_*`` metrics.

Memory does not grow with the corpus: each block of :data:`BLOCK_BATCHES` batches is written and dropped.
The rows do not depend on the batch size or the work units: windows are batched only with windows of their
own length (:func:`same_length_batches`) and written window by window.
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

from moeaudit.errors import invalid
from moeaudit.models.moe_model import MoEModel, nll_from_logits
from moeaudit.tables import ROUTING_SCHEMA, TOKENS_SCHEMA, router_logits_schema, router_probs_schema

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
    router_logits_layers: list[int] = field(default_factory=list)
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


def _routing_columns(record, layer: int, seqs: np.ndarray, positions: np.ndarray) -> dict:
    raw_gate = record.raw_gate.float()
    order = torch.argsort(raw_gate, dim=-1, descending=True, stable=True)
    take = lambda t: t.gather(-1, order).cpu().numpy()  # noqa: E731
    raw = take(raw_gate)
    n, k = raw.shape
    return {
        "layer": np.full(n * k, layer, dtype=np.int16),
        "seq": np.repeat(seqs, k).astype(np.int32),
        "pos": np.repeat(positions, k).astype(np.int32),
        "slot": np.tile(np.arange(k, dtype=np.int8), n),
        "expert": take(record.topk_idx).reshape(-1).astype(np.int16),
        "raw_gate": raw.reshape(-1).astype(np.float32),
        "combine_weight": take(record.combine_weight.float()).reshape(-1).astype(np.float32),
        "renorm_gate": (raw / raw.sum(axis=1, keepdims=True)).reshape(-1).astype(np.float32),
        "act_norm": take(record.act_norm).reshape(-1).astype(np.float32),
        "act_max_abs": take(record.act_max_abs).reshape(-1).astype(np.float32),
    }


def _layer_tables(moe: MoEModel, record, index: int, seqs: np.ndarray, positions: np.ndarray,
                  probs_schema: pa.Schema | None, logits_schema: pa.Schema | None):
    """One layer's rows of a record (one row per token of ``seqs``/``positions``): the routing table, and the
    router-probability and router-logit tables when their schema is given (else None)."""
    routing = pa.table(_routing_columns(record, index, seqs, positions), schema=ROUTING_SCHEMA)
    keys = {"layer": np.full(len(seqs), index, dtype=np.int16), "seq": seqs.astype(np.int32),
            "pos": positions.astype(np.int32)}
    probs_table = logits_table = None
    if probs_schema is not None:
        probs = record.router_probs
        if probs is None:
            probs = moe.layer(index).router_probs(record.router_logits)
        probs = probs.float().cpu().numpy().reshape(len(seqs), -1)
        flat = pa.array(probs.astype(np.float16).reshape(-1), type=pa.float16())
        probs_table = pa.table({**keys, "probs": pa.FixedSizeListArray.from_arrays(flat, probs.shape[1])},
                               schema=probs_schema)
    if logits_schema is not None:
        logits = record.router_logits.float().cpu().numpy().reshape(len(seqs), -1)
        flat = pa.array(logits.reshape(-1), type=pa.float32())
        logits_table = pa.table({**keys, "logits": pa.FixedSizeListArray.from_arrays(flat, logits.shape[1])},
                                schema=logits_schema)
    return routing, probs_table, logits_table


@dataclass
class BatchTables:
    """Observed windows' rows, window by window in input order: the tokens table and, per window and then per
    observed layer, routing (and router-probs) tables."""

    tokens: pa.Table
    routing: list[pa.Table]
    router_probs: list[pa.Table]
    nll_sum: float
    nll_count: int
    windows: int
    router_logits: list[pa.Table] = field(default_factory=list)


@dataclass
class _WindowTables:
    """One window's rows, cut from its batch's tables."""

    tokens: pa.Table
    routing: list[pa.Table]
    router_probs: list[pa.Table]
    nll_sum: float
    nll_count: int
    router_logits: list[pa.Table] = field(default_factory=list)


def _check_finite(trace, layers: Sequence[int], logits: torch.Tensor, batch: Sequence[Any],
                  dtype: torch.dtype) -> None:
    """Raise NonFiniteError naming the first layer (in depth order) and position with NaN/inf activations."""
    b, t = logits.shape[:2]
    checks = []
    for index in sorted(layers):
        record = trace[index].rows
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
        bad = broken.reshape(b, t, -1).any(-1).cpu()
        if bool(bad.any()):
            row, pos = (int(i) for i in torch.nonzero(bad)[0])
            from moeaudit.errors import NonFiniteError

            name = str(dtype).removeprefix("torch.")
            cause = ("the checkpoint's weights may be corrupt" if dtype == torch.float32 else
                     f"{name} may overflow (try --dtype float32) or the checkpoint's weights may be corrupt")
            raise NonFiniteError(f"non-finite activations (NaN/inf) in {where} at window seq {batch[row].seq}, "
                                 f"position {pos} ({int(bad.sum())} positions in this batch); {cause}")


def _observe_batch(moe: MoEModel, batch: Sequence[Any], layers: Sequence[int], probs_layers: Sequence[int],
                   probs_schema: pa.Schema | None, logits_layers: Sequence[int] = (),
                   logits_schema: pa.Schema | None = None) -> list[_WindowTables]:
    """One forward pass over windows of one length (no padding), cut into each window's tables."""
    lengths = {len(w.token_ids) for w in batch}
    if len(lengths) != 1:
        raise ValueError(f"a batch holds windows of one length, got lengths {sorted(lengths)}")
    ids = torch.from_numpy(np.stack([np.asarray(w.token_ids, dtype=np.int64) for w in batch])).to(moe.device)
    with torch.no_grad(), moe.capture(layers) as trace:
        logits = moe.model(input_ids=ids).logits
    b, t = ids.shape
    _check_finite(trace, layers, logits, batch, moe.dtype)
    nll = nll_from_logits(logits, ids, None).cpu().numpy()
    seqs = np.repeat(np.array([w.seq for w in batch], dtype=np.int64), t)
    positions = np.tile(np.arange(t, dtype=np.int64), b)
    tokens = pa.table({
        "seq": seqs.astype(np.int32),
        "pos": positions.astype(np.int32),
        "token_id": ids.cpu().numpy().reshape(-1).astype(np.int32),
        "nll": pa.array(nll.reshape(-1), type=pa.float32(), from_pandas=True),
        "domain": np.repeat(np.array([getattr(w, "domain", None) for w in batch], dtype=object), t),
        "split": np.repeat(np.array([getattr(w, "split", None) for w in batch], dtype=object), t),
    }, schema=TOKENS_SCHEMA)
    routing, router_probs, router_logits = [], [], []
    for index in layers:
        record = trace[index].rows
        routing_table, probs_table, logits_table = _layer_tables(
            moe, record, index, seqs, positions, probs_schema if index in probs_layers else None,
            logits_schema if index in logits_layers else None)
        routing.append(routing_table)
        if probs_table is not None:
            router_probs.append(probs_table)
        if logits_table is not None:
            router_logits.append(logits_table)
    out = []
    for row in range(b):
        window_nll = nll[row][np.isfinite(nll[row])].astype(np.float64)
        rows = [part.num_rows // b for part in routing]  # t positions x k slots per window
        out.append(_WindowTables(
            tokens.slice(row * t, t),
            [part.slice(row * n, n) for part, n in zip(routing, rows)],
            [part.slice(row * t, t) for part in router_probs],
            float(window_nll.sum()), int(window_nll.size),
            [part.slice(row * t, t) for part in router_logits]))
    return out


def same_length_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices of ``lengths`` cut into batches of at most ``batch_size`` windows of one length each.

    Windows are never padded: a padded batch computes a window's numbers along another path (an attention
    mask, other matrix shapes) than the window alone, which changed them by up to ~1e-5 with the batch size.
    A window of a length no other window in its block shares runs alone.
    """
    by_length: dict[int, list[int]] = {}
    for index, length in enumerate(lengths):
        by_length.setdefault(int(length), []).append(index)
    return [group[i : i + batch_size] for group in by_length.values() for i in range(0, len(group), batch_size)]


#: Windows per yielded block, in batches: windows are grouped by length within a block, so memory holds at
#: most this many batches' tables.
BLOCK_BATCHES = 8


def observe_batches(
    moe: MoEModel,
    windows: Iterable[Any],
    *,
    layers: Sequence[int] | None = None,
    router_probs_layers: Sequence[int] | str | None = None,
    batch_size: int = 8,
    stats: ObserveStats | None = None,
    router_logits_layers: Sequence[int] | str | None = None,
) -> Iterator[BatchTables]:
    """Yield the tables of ``windows`` in blocks of consecutive windows (see :func:`observe`).

    Each block's rows come window by window in input order (routing: window, then layer, position, slot),
    and each window is computed in a batch of windows of its own length only, never padded, so the tables
    are the same, bit for bit, for every ``batch_size`` and however the windows are cut into work units
    (on the CPU; a GPU's BLAS may choose kernels by matrix shape). On out-of-memory the batch is halved and
    retried; ``stats.batch_size_used`` records the smallest size that ran. NaN/inf activations raise
    :class:`~moeaudit.errors.NonFiniteError` with the layer and position.
    """
    from moeaudit.scale.memory import with_halving
    from moeaudit.scale.units import window_done

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
    logits_layers = list(layers) if router_logits_layers == "all" else [
        i for i in (router_logits_layers or []) if i in layers]
    if len({num_experts[i] for i in logits_layers}) > 1:
        raise invalid("router_logits_layers", "layers with one expert count", logits_layers)
    logits_schema = router_logits_schema(num_experts[logits_layers[0]]) if logits_layers else None
    if stats is not None:
        stats.layers, stats.router_probs_layers = layers, probs_layers
        stats.router_logits_layers = logits_layers
        stats.experts_implementation = moe.experts_implementation
    block = batch_size * BLOCK_BATCHES
    for start in range(0, len(windows), block):
        part = windows[start : start + block]
        pieces: dict[int, _WindowTables] = {}
        queue = same_length_batches([len(w.token_ids) for w in part], batch_size)
        while queue:
            group = queue.pop(0)
            done, batch_size = with_halving(
                lambda size: _observe_batch(moe, [part[i] for i in group[:size]], layers, probs_layers,
                                            probs_schema, logits_layers, logits_schema), batch_size, "batch_size")
            pieces.update(zip(group, done))
            window_done(len(done))
            if len(done) < len(group):
                queue.insert(0, group[len(done):])
            if stats is not None:
                stats.batches += 1
                stats.batch_size_used = min(stats.batch_size_used or batch_size, batch_size)
        ordered = [pieces[i] for i in range(len(part))]
        tables = BatchTables(
            pa.concat_tables([p.tokens for p in ordered]),
            [table for p in ordered for table in p.routing],
            [table for p in ordered for table in p.router_probs],
            sum(p.nll_sum for p in ordered), sum(p.nll_count for p in ordered), len(ordered),
            [table for p in ordered for table in p.router_logits])
        if stats is not None:
            stats.windows += tables.windows
            stats.tokens += tables.tokens.num_rows
            stats.routing_rows += sum(t.num_rows for t in tables.routing)
            stats.nll_sum += tables.nll_sum
            stats.nll_count += tables.nll_count
            stats.mean_nll = stats.nll_sum / stats.nll_count if stats.nll_count else float("nan")
        yield tables


PADDING_TABLES = ("padding_routing", "padding_router_probs", "padding_router_logits")


def observe_padding(
    moe: MoEModel,
    windows: Sequence[Any],
    *,
    pad_to: int,
    layers: Sequence[int],
    router_probs_layers: Sequence[int] = (),
    router_logits_layers: Sequence[int] = (),
    batch_size: int = 8,
) -> dict[str, pa.Table]:
    """Routing (and router probabilities / logits) at the *padding* positions of ``windows`` right-padded to
    ``pad_to`` tokens, as the released scripts of arXiv 2606.10703 computed them.

    The scripts tokenised their texts padded to the longest one (right padding with the tokenizer's pad
    token, the model's ``pad_token_id``), ran the padded batch with its attention mask, and pooled every
    position — padding included — into their four metrics (about 62 % of the released OLMoE rows are
    padding). moeaudit's own tables never hold a padding position; this pass adds exactly those rows: one
    row per (layer, window, padding position, slot) in :data:`~moeaudit.tables.ROUTING_SCHEMA`, ``pos``
    counting on past the window's last token. The real positions of the padded pass are not kept (they are
    the observe tables' rows, computed without padding).

    Parameters
    ----------
    moe : MoEModel
    windows : sequence of WindowInput-like
        ``seq`` and ``token_ids`` of each window, each at most ``pad_to`` tokens.
    pad_to : int
        The padded length (the scripts: the longest text).
    layers, router_probs_layers, router_logits_layers : sequence of int
        MoE layers whose routing / router probabilities / router logits are kept (the observe stage's).
    batch_size : int
        Windows per forward pass (padding rows of one window do not depend on the others').

    Returns
    -------
    dict of str to pyarrow.Table
        ``padding_routing``, ``padding_router_probs``, ``padding_router_logits`` (empty tables when none).
    """
    import dataclasses as _dc

    pad_id = getattr(moe.model.config, "pad_token_id", None)
    if pad_id is None:
        raise invalid("paper_code_padding", "used with a model whose config names a pad_token_id", True, moe.name)
    num_experts = {index: moe.layer(index).num_experts for index in layers}
    probs_schema = router_probs_schema(num_experts[router_probs_layers[0]]) if router_probs_layers else None
    logits_schema = router_logits_schema(num_experts[router_logits_layers[0]]) if router_logits_layers else None
    parts: dict[str, list[pa.Table]] = {name: [] for name in PADDING_TABLES}
    padded = [w for w in windows if len(w.token_ids) < pad_to]
    for start in range(0, len(padded), batch_size):
        batch = padded[start:start + batch_size]
        b = len(batch)
        ids = torch.full((b, pad_to), int(pad_id), dtype=torch.int64)
        mask = torch.zeros((b, pad_to), dtype=torch.int64)
        for row, w in enumerate(batch):
            n = len(w.token_ids)
            ids[row, :n] = torch.as_tensor(np.asarray(w.token_ids, dtype=np.int64))
            mask[row, :n] = 1
        with torch.no_grad(), moe.capture(layers) as trace:
            moe.model(input_ids=ids.to(moe.device), attention_mask=mask.to(moe.device))
        pads = (mask.reshape(-1) == 0).numpy()
        keep = torch.from_numpy(pads).to(moe.device)
        seqs = np.repeat(np.array([w.seq for w in batch], dtype=np.int64), pad_to)[pads]
        positions = np.tile(np.arange(pad_to, dtype=np.int64), b)[pads]
        for index in layers:
            record = trace[index].rows
            sliced = _dc.replace(record, **{f.name: getattr(record, f.name)[keep] for f in _dc.fields(record)
                                            if isinstance(getattr(record, f.name), torch.Tensor)
                                            and getattr(record, f.name).shape[:1] == keep.shape})
            tables = _layer_tables(moe, sliced, index, seqs, positions,
                                   probs_schema if index in router_probs_layers else None,
                                   logits_schema if index in router_logits_layers else None)
            for name, table in zip(PADDING_TABLES, tables):
                if table is not None:
                    parts[name].append(table)
    empty = {"padding_routing": ROUTING_SCHEMA,
             "padding_router_probs": probs_schema or router_probs_schema(1),
             "padding_router_logits": logits_schema or router_logits_schema(1)}
    return {name: pa.concat_tables(parts[name]) if parts[name] else empty[name].empty_table()
            for name in PADDING_TABLES}


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
        At most this many windows of one length per forward pass (halved and retried on out-of-memory);
        execution only: the tables are the same for every value.
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
    return _read_token_matrix(path, "probs", layers)


def read_router_logits(path: str | Path, layers: Sequence[int] | None = None) -> dict[int, np.ndarray]:
    """``{layer: float32 array [tokens, E]}`` of ``router_logits.parquet``, rows in ascending (seq, pos) order."""
    return _read_token_matrix(path, "logits", layers)


def _read_token_matrix(path: str | Path, column: str, layers: Sequence[int] | None) -> dict[int, np.ndarray]:
    table = pq.read_table(path)
    out: dict[int, np.ndarray] = {}
    layer_col = table.column("layer").to_numpy()
    for index in sorted(set(layer_col.tolist()) if layers is None else layers):
        sub = table.filter(pa.compute.equal(table.column("layer"), index))
        seq = sub.column("seq").to_numpy().astype(np.int64)
        pos = sub.column("pos").to_numpy().astype(np.int64)
        probs = sub.column(column).combine_chunks()
        width = probs.type.list_size
        matrix = probs.flatten().to_numpy(zero_copy_only=False).astype(np.float32).reshape(-1, width)
        out[int(index)] = matrix[np.lexsort((pos, seq))]
    return out
