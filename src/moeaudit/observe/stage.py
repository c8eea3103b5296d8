"""The observe stage on a run directory: build the corpus windows from the config, observe them in resumable work units."""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np

from moeaudit.config import AuditConfig
from moeaudit.data.windows import windows_fingerprint
from moeaudit.models.loading import tokenizer_for
from moeaudit.models.moe_model import MoEModel
from moeaudit.rundir import RunDir


def build_corpus(config: AuditConfig, tokenizer):
    """Documents -> windows split by document, as the config says (deterministic)."""
    from moeaudit.data import build_windows, load_documents, seeded_sample

    documents = load_documents(config.corpus, **corpus_options(config))
    if config.min_chars is not None:
        documents = [d for d in documents if len(d.text) > config.min_chars]
    if config.first_docs is not None:
        documents = documents[: config.first_docs]
    if config.max_docs is not None:
        documents = seeded_sample(documents, config.max_docs, config.split_seed)
    return build_windows(documents, tokenizer, max_len=config.max_len, seed=config.split_seed, truncate=config.truncate)


def corpus_options(config: AuditConfig) -> dict[str, str]:
    """The source options the config sets (``text_field``, ``domain_field``), refused for a source without fields."""
    from moeaudit.data import resolve_source
    from moeaudit.errors import invalid

    options = {name: getattr(config, name) for name in ("text_field", "domain_field") if getattr(config, name)}
    if options:
        source = resolve_source(config.corpus)
        accepted = getattr(source, "__dataclass_fields__", {})
        is_text = getattr(getattr(source, "path", None), "suffix", "").lower() == ".txt"
        for name, value in options.items():
            if name not in accepted or is_text:
                raise invalid(name, f"unset for the corpus {config.corpus!r} (it has no fields; {name} names a "
                              ".jsonl field or a .parquet / hub dataset column)", value)
    return options


def prepare_corpus(config: AuditConfig, moe: MoEModel | None = None):
    """The corpus windows of ``config``, built and checked before any weights load or anything is written.

    Reads the documents, tokenizes them with the checkpoint's tokenizer (no weights needed) and applies
    every check of the windows: the corpus gives windows in the observed splits, none is longer than the
    model's context (read from its config), and metrics and effects get separate windows
    (:func:`check_held_out_support`). A bad corpus, field or ``max_len`` is thus one line before the model
    loads, and no run directory is made for it.
    """
    corpus = build_corpus(config, tokenizer_for(config.model, moe))
    context = moe.describe().get("max_position_embeddings") if moe is not None else model_context(config.model)
    check_windows(observed_windows(corpus, config), corpus, config, context)
    return corpus


def model_context(model: str) -> int | None:
    """The context length in a checkpoint's config (its language model's), read without the weights."""
    from moeaudit.models.loading import load_config, resolve_source

    hf_config = load_config(*resolve_source(model), model)
    return getattr(hf_config.get_text_config(), "max_position_embeddings", None)


def check_windows(windows: Sequence[Any], corpus, config: AuditConfig, context: int | None) -> None:
    """Refuse observed windows that are none, longer than ``context`` tokens, or without held-out support."""
    from moeaudit.errors import CorpusError

    if not windows:
        raise CorpusError(f"the corpus {config.corpus!r} gave no windows in splits {config.observe_splits}; "
                          "use a larger corpus or other splits")
    check_context(windows, {"max_position_embeddings": context}, config)
    check_held_out_support(windows, corpus, config)


def observed_windows(corpus, config: AuditConfig) -> list[Any]:
    chosen = []
    for split in config.observe_splits:
        windows = [w for w in corpus.select(split) if w.start == 0] if config.truncate else corpus.select(split)
        # (a corpus built with truncate holds first windows only; one built without it, passed in by a
        # caller, is reduced to each document's first window)
        chosen.extend(windows[: config.max_windows] if config.max_windows else windows)
    return sorted(chosen, key=lambda w: w.seq)


OBSERVE_TABLES = ("tokens", "routing", "router_probs", "router_logits", "padding_routing", "padding_router_probs",
                  "padding_router_logits")


def observe_unit(moe: MoEModel, payload: dict[str, Any]):
    """Compute one observe work unit: its windows' tokens / routing / router_probs / router_logits tables and
    counters."""
    import pyarrow as pa

    from moeaudit.observe.forward import ObserveStats, observe_batches, observe_padding
    from moeaudit.tables import ROUTING_SCHEMA, TOKENS_SCHEMA, router_logits_schema, router_probs_schema
    from moeaudit.scale import UnitResult

    stats = ObserveStats()
    parts: dict[str, list] = {name: [] for name in OBSERVE_TABLES}
    for tables in observe_batches(moe, payload["windows"], layers=payload["layers"],
                                  router_probs_layers=payload["router_probs_layers"],
                                  router_logits_layers=payload.get("router_logits_layers"),
                                  batch_size=payload["batch_size"], stats=stats):
        parts["tokens"].append(tables.tokens)
        parts["routing"].extend(tables.routing)
        parts["router_probs"].extend(tables.router_probs)
        parts["router_logits"].extend(tables.router_logits)
    probs_experts = moe.layer(stats.router_probs_layers[0]).num_experts if stats.router_probs_layers else 1
    logits_experts = moe.layer(stats.router_logits_layers[0]).num_experts if stats.router_logits_layers else 1
    schemas = {"tokens": TOKENS_SCHEMA, "routing": ROUTING_SCHEMA, "router_probs": router_probs_schema(probs_experts),
               "router_logits": router_logits_schema(logits_experts)}
    schemas.update(padding_routing=schemas["routing"], padding_router_probs=schemas["router_probs"],
                   padding_router_logits=schemas["router_logits"])
    if payload.get("pad_to"):  # the released scripts' padding rows (paper_code_padding)
        padding = observe_padding(moe, payload["windows"], pad_to=payload["pad_to"], layers=stats.layers,
                                  router_probs_layers=stats.router_probs_layers,
                                  router_logits_layers=stats.router_logits_layers, batch_size=payload["batch_size"])
        parts.update({name: [table] for name, table in padding.items()})
    out = {name: pa.concat_tables(parts[name]) if parts[name] else schemas[name].empty_table()
           for name in OBSERVE_TABLES}
    counters = {k: v for k, v in stats.to_dict().items() if k not in ("seconds", "mean_nll")}
    counters["padding_routing_rows"] = out["padding_routing"].num_rows
    return UnitResult(out, counters)


def observe_work_units(windows: Sequence[Any], config: AuditConfig) -> list[Any]:
    """The observe stage's units: ``unit_windows`` consecutive windows (in ``seq`` order) each."""
    from moeaudit.observe.forward import WindowInput
    from moeaudit.scale import WorkUnit
    from moeaudit.scale.units import chunks, unit_id

    units = []
    pad_to = max(len(w.token_ids) for w in windows) if config.paper_code_padding and windows else None
    for start, stop in chunks(len(windows), config.unit_windows):
        part = [WindowInput(w.seq, np.asarray(w.token_ids, dtype=np.int64), getattr(w, "domain", None),
                            getattr(w, "split", None)) for w in windows[start:stop]]
        payload = {"windows": part, "layers": config.layers, "router_probs_layers": config.router_probs_layers,
                   "router_logits_layers": config.router_logits_layers, "batch_size": config.batch_size,
                   "pad_to": pad_to}
        units.append(WorkUnit(unit_id("observe", start, stop), payload, windows=stop - start))
    return units


def run_observe(run: RunDir, *, moe: MoEModel | None = None, corpus=None,
                on_batch: Callable[[int, int], None] | None = None, executor=None) -> dict[str, Any]:
    """Write tokens / routing / router_probs / router_logits tables into ``run`` and record counters in its manifest.

    The work is cut into units of ``config.unit_windows`` windows; a re-run skips the units (or the whole
    stage) already done. ``executor`` (default: from the config) runs the units.
    """
    import time

    from moeaudit.scale import make_executor, run_units

    config = run.config
    started = time.perf_counter()
    if corpus is None:  # a bad corpus is refused before the model loads
        corpus = prepare_corpus(config, moe or getattr(executor, "moe", None))
    own_executor = executor is None
    executor = executor or make_executor(config, moe)
    try:
        model = executor.describe_model()
        run.check_model(model)
        windows = observed_windows(corpus, config)
        check_windows(windows, corpus, config, model.get("max_position_embeddings"))
        run.check_corpus(windows_fingerprint(windows), corpus.manifest() if hasattr(corpus, "manifest") else {})
        write_windows_table(run, windows)
        store, progress = run_units(run, "observe", observe_work_units(windows, config), OBSERVE_TABLES,
                                    observe_unit, executor, on_unit=on_batch)
    finally:
        if own_executor:
            executor.close()
    parts = store.stats()
    nll_sum, nll_count = sum(p["nll_sum"] for p in parts), sum(p["nll_count"] for p in parts)
    info = {key: int(sum(p[key] for p in parts)) for key in ("windows", "tokens", "routing_rows", "batches")}
    if config.paper_code_padding:
        info["padding_routing_rows"] = int(sum(p.get("padding_routing_rows", 0) for p in parts))
    info.update(layers=parts[0]["layers"], router_probs_layers=parts[0]["router_probs_layers"],
                router_logits_layers=parts[0].get("router_logits_layers", []),
                experts_implementation=parts[0]["experts_implementation"],
                batch_size_used=min(p["batch_size_used"] for p in parts),
                mean_nll=nll_sum / nll_count if nll_count else float("nan"),
                seconds=time.perf_counter() - started, executor=executor.name, **progress)
    run.record_stage("observe", info)
    return info


def write_windows_table(run: RunDir, windows: Sequence[Any]) -> None:
    """Write ``windows.parquet``: each observed window's document, domain, split, offset and length."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from moeaudit.tables import WINDOWS_SCHEMA

    table = pa.table({
        "seq": [w.seq for w in windows],
        "doc_id": [str(getattr(w, "doc_id", w.seq)) for w in windows],
        "domain": [getattr(w, "domain", None) for w in windows],
        "split": [getattr(w, "split", None) for w in windows],
        "start": [int(getattr(w, "start", 0)) for w in windows],
        "n_tokens": [len(w.token_ids) for w in windows],
    }, schema=WINDOWS_SCHEMA)
    with run.writing("windows") as tmp:
        pq.write_table(table, tmp)


def check_context(windows: Sequence[Any], model: dict[str, Any], config: AuditConfig) -> None:
    """Refuse windows longer than the model's context (positions past it are untrained or out of range)."""
    from moeaudit.errors import invalid

    limit = model.get("max_position_embeddings")
    longest = max(len(w.token_ids) for w in windows)
    if limit and longest > limit:
        raise invalid("max_len", f"at most the model's context length, {limit} tokens", config.max_len,
                      config.model)


def check_held_out_support(windows: Sequence[Any], corpus, config: AuditConfig) -> None:
    """Refuse, before any table is written, a run whose metrics and effects would silently share windows.

    Metrics are computed on the ``calibration`` windows and effects measured on the ``heldout`` ones
    (:mod:`moeaudit.metrics.stage`, :mod:`moeaudit.intervene.stage`); a split without windows (a small
    corpus whose documents all landed in other splits, or ``observe_splits`` without it) made both
    stages fall back to every observed window without a word. ``in_sample = true`` asks for exactly that
    (the paper's protocol) and is recorded as such.
    """
    if config.in_sample:
        return
    from collections import Counter

    from moeaudit.errors import CorpusError

    observed = Counter(getattr(w, "split", None) for w in windows)
    missing = [split for split in ("calibration", "heldout") if not observed.get(split)]
    if not missing:
        return
    if any(split not in config.observe_splits for split in missing):
        reason = f"observe_splits {config.observe_splits} leave out {' and '.join(missing)}"
    else:
        documents = Counter(getattr(w, "split", None) for w in getattr(corpus, "windows", windows) if w.start == 0)
        shares = ", ".join(f"{split} {documents.get(split, 0)}" for split in ("train", "calibration", "heldout"))
        reason = f"the corpus gave no {' and no '.join(missing)} windows (documents by split: {shares})"
    raise CorpusError(f"{reason}, so metrics and effects would be measured on the same windows; use a larger corpus "
                      "(or observe_splits with calibration and heldout), or set in_sample = true in the config file's "
                      "[observe] table to measure in sample on purpose")
