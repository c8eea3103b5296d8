"""The observe stage on a run directory: build the corpus windows from the config, run :func:`observe`."""

from __future__ import annotations

from typing import Any, Callable

from moeaudit.config import AuditConfig
from moeaudit.models.moe_model import MoEModel
from moeaudit.observe import observe
from moeaudit.rundir import RunDir


def model_from_config(config: AuditConfig) -> MoEModel:
    from moeaudit.models import load_model

    return load_model(config.model, dtype=config.dtype, device=config.device,
                      experts_implementation=config.experts_implementation, layers=config.layers)


def tokenizer_for(moe: MoEModel, config: AuditConfig):
    """The model's tokenizer; the built-in models share the packaged one."""
    if moe.tokenizer is not None:
        return moe.tokenizer
    from moeaudit.errors import ModelLoadError
    from moeaudit.models import builtin

    if config.model in builtin.BUILTIN_MODELS:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(builtin.tokenizer_path())
    raise ModelLoadError(f"{config.model} has no tokenizer files; save its tokenizer into the checkpoint "
                         "directory (tokenizer.save_pretrained(DIR))")


def build_corpus(config: AuditConfig, tokenizer):
    """Documents -> windows split by document, as the config says (deterministic)."""
    from moeaudit.data import build_windows, load_documents, seeded_sample

    documents = load_documents(config.corpus)
    if config.min_chars is not None:
        documents = [d for d in documents if len(d.text) > config.min_chars]
    if config.first_docs is not None:
        documents = documents[: config.first_docs]
    if config.max_docs is not None:
        documents = seeded_sample(documents, config.max_docs, config.split_seed)
    return build_windows(documents, tokenizer, max_len=config.max_len, seed=config.split_seed)


def observed_windows(corpus, config: AuditConfig) -> list[Any]:
    chosen = []
    for split in config.observe_splits:
        windows = [w for w in corpus.select(split) if w.start == 0] if config.truncate else corpus.select(split)
        chosen.extend(windows[: config.max_windows] if config.max_windows else windows)
    return sorted(chosen, key=lambda w: w.seq)


def run_observe(run: RunDir, *, moe: MoEModel | None = None, corpus=None,
                on_batch: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Write tokens / routing / router_probs tables into ``run`` and record counters in its manifest."""
    config = run.config
    moe = moe or model_from_config(config)
    corpus = corpus or build_corpus(config, tokenizer_for(moe, config))
    windows = observed_windows(corpus, config)
    if not windows:
        from moeaudit.errors import CorpusError

        raise CorpusError(f"the corpus {config.corpus!r} gave no windows in splits {config.observe_splits}; "
                          "use a larger corpus or other splits")
    with run.writing("tokens") as tokens_tmp, run.writing("routing") as routing_tmp, \
            run.writing("router_probs") as probs_tmp:
        stats = observe(moe, windows, tokens_path=tokens_tmp, routing_path=routing_tmp,
                        router_probs_path=probs_tmp, layers=config.layers,
                        router_probs_layers=config.router_probs_layers, batch_size=config.batch_size,
                        on_batch=on_batch)
        if not stats.router_probs_layers:
            import pyarrow as pa
            import pyarrow.parquet as pq

            from moeaudit.observe import router_probs_schema

            pq.write_table(pa.table({n: [] for n in router_probs_schema(1).names},
                                    schema=router_probs_schema(1)), probs_tmp)
    corpus_info = corpus.manifest() if hasattr(corpus, "manifest") else {}
    run.set("corpus", dict(corpus_info, fingerprint_observed=_windows_fingerprint(windows)))
    run.set("model", {"name": moe.name, "family": moe.family, "fingerprint": model_fingerprint(moe),
                      "moe_layers": moe.moe_layer_indices,
                      "num_experts": {str(l.layer): l.num_experts for l in moe.layers},
                      "top_k": {str(l.layer): l.top_k for l in moe.layers}})
    info = stats.to_dict()
    run.record_stage("observe", info)
    return info


def _windows_fingerprint(windows) -> str:
    import hashlib

    import numpy as np

    digest = hashlib.sha256()
    for window in windows:
        digest.update(np.int64(window.seq).tobytes())
        digest.update(np.asarray(window.token_ids, dtype=np.int64).tobytes())
    return digest.hexdigest()[:16]


def model_fingerprint(moe: MoEModel) -> str:
    """Hash of the config and of every parameter's name, shape and a strided sample of its values."""
    import hashlib

    import torch

    digest = hashlib.sha256(moe.config.to_json_string(use_diff=False).encode())
    with torch.no_grad():
        for name, param in moe.model.named_parameters():
            flat = param.detach().reshape(-1)
            sample = flat[:: max(1, flat.numel() // 1024)].float().cpu().numpy()
            digest.update(name.encode())
            digest.update(str(tuple(param.shape)).encode())
            digest.update(sample.tobytes())
    return digest.hexdigest()[:16]
