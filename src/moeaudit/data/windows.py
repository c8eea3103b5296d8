"""Tokenise documents, cut them into windows, split by document, fingerprint.

This is the only place where text becomes token ids. The result, :class:`WindowedCorpus`, is what the
observe / intervene / prune stages iterate over; its :meth:`~WindowedCorpus.fingerprint` goes into the
run manifest so that two runs can tell whether they saw the same tokens.
"""

from __future__ import annotations

import hashlib
import logging
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from moeaudit.data.documents import Document, seeded_rank
from moeaudit.errors import CorpusError, invalid
from moeaudit.options import SPLITS, Split

logger = logging.getLogger(__name__)

#: Default train / calibration / held-out fractions (of documents, not tokens).
DEFAULT_FRACTIONS: tuple[float, float, float] = (0.8, 0.1, 0.1)
#: A window needs at least two tokens: one to condition on and one to predict.
MIN_WINDOW_TOKENS = 2

Encoder = Callable[[list[str]], list[list[int]]]


@dataclass(frozen=True, eq=False)
class Window:
    """A run of at most ``max_len`` consecutive tokens from one document.

    Attributes
    ----------
    seq : int
        Index of the window in its :class:`WindowedCorpus` (the ``seq`` column of the run tables).
    doc_id, domain : str, str or None
        The document it comes from.
    split : {"train", "calibration", "heldout"}
        The split of that document.
    start : int
        Offset of the first token within the document's token sequence.
    token_ids : numpy.ndarray of int32, shape (n_tokens,)
        The token ids, ``MIN_WINDOW_TOKENS <= n_tokens <= max_len``.
    """

    seq: int
    doc_id: str
    domain: str | None
    split: Split
    start: int
    token_ids: np.ndarray

    def __len__(self) -> int:
        return int(self.token_ids.shape[0])


def assign_split(split_key: str, *, seed: int = 0, fractions: Sequence[float] = DEFAULT_FRACTIONS) -> Split:
    """The split of a document, decided by a seeded hash of its split key alone.

    Because the decision depends only on ``(seed, split_key)``, a document is in the same split whatever
    else is in the corpus: held-out documents of a large corpus stay held-out in any subset of it.
    """
    u = seeded_rank(f"split:{split_key}", seed) / 2**64
    edge = 0.0
    for name, frac in zip(SPLITS, fractions, strict=True):
        edge += frac
        if u < edge:
            return name
    return SPLITS[-1]


def split_documents(
    documents: Sequence[Document], *, seed: int = 0, fractions: Sequence[float] = DEFAULT_FRACTIONS
) -> dict[Split, list[Document]]:
    """Partition documents into train / calibration / held-out by :func:`assign_split` (order kept)."""
    fractions = _check_fractions(fractions)
    out: dict[Split, list[Document]] = {name: [] for name in SPLITS}
    for doc in documents:
        out[assign_split(doc.split_key, seed=seed, fractions=fractions)].append(doc)
    return out


def cut_windows(n_tokens: int, max_len: int) -> list[tuple[int, int]]:
    """``(start, stop)`` of ``ceil(n / max_len)`` near-equal windows covering ``n_tokens`` tokens.

    Equal cuts (sizes differ by at most one) avoid a short tail window: a 260-token document with
    ``max_len=256`` gives two windows of 130 tokens, not 256 + 4.
    """
    if n_tokens <= 0:
        return []
    k = -(-n_tokens // max_len)
    bounds = [round(i * n_tokens / k) for i in range(k + 1)]
    return [(bounds[i], bounds[i + 1]) for i in range(k)]


def as_encoder(tokenizer: Any) -> Encoder:
    """A batch encoder ``list[str] -> list[list[int]]`` (no special tokens added) for ``tokenizer``.

    Accepts a ``tokenizers.Tokenizer``, a transformers tokenizer, a directory or ``tokenizer.json``
    path, or a callable that already has the batch signature.
    """
    if isinstance(tokenizer, (str, Path)):
        from tokenizers import Tokenizer

        path = Path(tokenizer)
        return as_encoder(Tokenizer.from_file(str(path / "tokenizer.json" if path.is_dir() else path)))
    if hasattr(tokenizer, "batch_encode_plus") or hasattr(tokenizer, "convert_tokens_to_ids"):  # transformers

        def encode_hf(texts: list[str]) -> list[list[int]]:
            return list(tokenizer(texts, add_special_tokens=False)["input_ids"])

        return encode_hf
    if hasattr(tokenizer, "encode_batch"):  # tokenizers.Tokenizer

        def encode_fast(texts: list[str]) -> list[list[int]]:
            return [enc.ids for enc in tokenizer.encode_batch(texts, add_special_tokens=False)]

        return encode_fast
    if callable(tokenizer):
        return tokenizer
    raise invalid("tokenizer", "a tokenizers.Tokenizer, a transformers tokenizer, a path, or a callable", type(tokenizer))


@dataclass(frozen=True)
class WindowedCorpus:
    """Token windows of a corpus, split by document.

    Build one with :func:`build_windows`. ``seq`` numbers windows across all splits in document order,
    so a window keeps its ``seq`` whichever split is selected.

    Attributes
    ----------
    windows : tuple of Window
    max_len, seed, fractions
        The arguments it was built with.
    counters : dict
        What was kept and dropped: ``documents``, ``documents_too_short`` (fewer than two tokens),
        ``windows``, ``tokens``, and ``windows_<split>`` / ``tokens_<split>`` / ``documents_<split>``.

    Examples
    --------
    >>> corpus = build_windows(load_documents("builtin"), "path/to/tokenizer", max_len=128)  # doctest: +SKIP
    >>> corpus.select("heldout")[0].token_ids[:5]  # doctest: +SKIP
    """

    windows: tuple[Window, ...]
    max_len: int
    seed: int
    fractions: tuple[float, float, float]
    counters: dict[str, int] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.windows)

    def select(self, split: Split | None = None, *, domains: Sequence[str] | None = None) -> list[Window]:
        """Windows of one split (all when ``None``), optionally only those of some domains."""
        if split is not None and split not in SPLITS:
            raise invalid("split", f"one of {list(SPLITS)}", split)
        return [
            w
            for w in self.windows
            if (split is None or w.split == split) and (domains is None or w.domain in domains)
        ]

    def domains(self) -> list[str | None]:
        """Domains present, in sorted order (``None`` last)."""
        present = {w.domain for w in self.windows}
        return sorted((d for d in present if d is not None)) + ([None] if None in present else [])

    def fingerprint(self, split: Split | None = None) -> str:
        """sha256 over the split names and token ids of the selected windows (hex digest).

        Each window contributes its split name, its length and its token ids as little-endian int32, so
        the digest changes when a token, a window boundary or a document's split changes.
        """
        digest = hashlib.sha256()
        digest.update(f"moeaudit-windows-v1 max_len={self.max_len}\n".encode())
        for w in self.select(split):
            digest.update(f"{w.split}:{len(w)}:".encode())
            digest.update(np.ascontiguousarray(w.token_ids, dtype="<i4").tobytes())
        return digest.hexdigest()

    def token_matrix(self, split: Split | None = None, *, pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """``(token_ids, lengths)`` of the selected windows, right-padded with ``pad_id``.

        Returns
        -------
        token_ids : numpy.ndarray of int64, shape (n_windows, max_len_in_selection)
        lengths : numpy.ndarray of int64, shape (n_windows,)
        """
        ids, mask = pad_token_rows([w.token_ids for w in self.select(split)], pad_id)
        return ids, mask.sum(axis=1)

    def to_frame(self, split: Split | None = None):  # -> pandas.DataFrame
        """One row per window: ``seq, doc_id, domain, split, start, n_tokens, token_ids`` (list)."""
        import pandas as pd

        chosen = self.select(split)
        return pd.DataFrame(
            {
                "seq": [w.seq for w in chosen],
                "doc_id": [w.doc_id for w in chosen],
                "domain": [w.domain for w in chosen],
                "split": [w.split for w in chosen],
                "start": [w.start for w in chosen],
                "n_tokens": [len(w) for w in chosen],
                "token_ids": [w.token_ids.tolist() for w in chosen],
            }
        )

    def manifest(self) -> dict[str, Any]:
        """What a run manifest records about the corpus windows."""
        return {
            "max_len": self.max_len,
            "seed": self.seed,
            "fractions": list(self.fractions),
            "counters": dict(self.counters),
            "fingerprint": self.fingerprint(),
            "fingerprints": {name: self.fingerprint(name) for name in SPLITS},
        }


def build_windows(
    documents: Sequence[Document],
    tokenizer: Any,
    *,
    max_len: int,
    seed: int = 0,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    splits: Sequence[Split] | None = None,
    truncate: bool = False,
) -> WindowedCorpus:
    """Tokenise documents and cut each into windows of at most ``max_len`` tokens.

    Parameters
    ----------
    documents : sequence of Document
        From :func:`~moeaudit.data.load_documents`; their order fixes the ``seq`` order.
    tokenizer
        Anything :func:`as_encoder` accepts. No special tokens are added.
    max_len : int
        Longest window, in tokens (>= 2).
    seed : int, default 0
        Split seed (:func:`assign_split`). The built-in models were trained with seed 0: evaluate them on
        the held-out split of seed 0 only.
    fractions : (float, float, float), default (0.8, 0.1, 0.1)
        Train / calibration / held-out shares of documents.
    splits : sequence of split names, optional
        Tokenise only documents of these splits (faster when only the held-out split is needed).
    truncate : bool, default False
        One window per document: its first ``max_len`` tokens (the paper's protocol, arXiv 2606.10703,
        Sec. 3.1), the rest of the document dropped.

    Returns
    -------
    WindowedCorpus

    Notes
    -----
    The split is by document, so no document contributes windows to two splits. Documents shorter than
    two tokens give no window and are counted in ``counters["documents_too_short"]``. A document of
    ``n`` tokens gives ``ceil(n / max_len)`` windows of near-equal length (:func:`cut_windows`), or with
    ``truncate`` one window of ``min(n, max_len)`` tokens.
    """
    if not isinstance(max_len, int) or isinstance(max_len, bool) or max_len < MIN_WINDOW_TOKENS:
        raise invalid("max_len", f"an integer >= {MIN_WINDOW_TOKENS}", max_len)
    fractions = _check_fractions(fractions)
    if splits is not None:
        for name in splits:
            if name not in SPLITS:
                raise invalid("splits", f"a subset of {list(SPLITS)}", name)
    encode = as_encoder(tokenizer)
    assigned = [(doc, assign_split(doc.split_key, seed=seed, fractions=fractions)) for doc in documents]
    if splits is not None:
        assigned = [(doc, s) for doc, s in assigned if s in splits]
    ids_per_doc = encode([doc.text for doc, _ in assigned]) if assigned else []
    counts: Counter[str] = Counter(documents=len(assigned))
    windows: list[Window] = []
    for (doc, split), ids in zip(assigned, ids_per_doc, strict=True):
        if len(ids) < MIN_WINDOW_TOKENS:
            counts["documents_too_short"] += 1
            continue
        counts[f"documents_{split}"] += 1
        array = np.asarray(ids, dtype=np.int32)
        cuts = [(0, min(len(array), max_len))] if truncate else cut_windows(len(array), max_len)
        for start, stop in cuts:
            windows.append(Window(len(windows), doc.doc_id, doc.domain, split, start, array[start:stop]))
            counts[f"windows_{split}"] += 1
            counts[f"tokens_{split}"] += stop - start
    if not windows:
        raise CorpusError(
            f"no document has {MIN_WINDOW_TOKENS} or more tokens ({len(assigned)} documents); "
            "pass longer documents."
        )
    counts["windows"] = len(windows)
    counts["tokens"] = sum(len(w) for w in windows)
    if counts["documents_too_short"]:
        logger.info("dropped %d documents with fewer than %d tokens", counts["documents_too_short"], MIN_WINDOW_TOKENS)
    return WindowedCorpus(tuple(windows), max_len, seed, fractions, dict(counts))


def _check_fractions(fractions: Sequence[float]) -> tuple[float, float, float]:
    values = tuple(float(f) for f in fractions)
    if len(values) != 3 or any(f < 0 for f in values) or abs(sum(values) - 1.0) > 1e-9:
        raise invalid("fractions", "three non-negative numbers (train, calibration, heldout) summing to 1", fractions)
    return values  # type: ignore[return-value]


def pad_token_rows(rows: Sequence[Any], pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Right-pad token-id rows of unequal length into one matrix: the one padding rule of moeaudit.

    Parameters
    ----------
    rows : sequence of 1-D integer array-likes
        Token ids of each window, in the order the matrix rows should have.
    pad_id : int
        Id written after a row's last token (the model's pad token; masked out, never attended to).

    Returns
    -------
    token_ids : numpy.ndarray of int64, shape (len(rows), longest row)
    attention_mask : numpy.ndarray of int64, same shape
        1 at a real token, 0 at padding.
    """
    lengths = [len(row) for row in rows]
    width = max(lengths, default=0)
    ids = np.full((len(rows), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(rows), width), dtype=np.int64)
    for i, (row, n) in enumerate(zip(rows, lengths)):
        ids[i, :n] = np.asarray(row, dtype=np.int64)
        mask[i, :n] = 1
    return ids, mask


def windows_fingerprint(windows: Sequence[Any]) -> str:
    """A 16-hex-digit digest of windows (their ``seq`` and token ids, in order): what a run directory's
    corpus check compares (:meth:`moeaudit.rundir.RunDir.check_corpus`), so a resumed run refuses other
    windows."""
    import hashlib

    digest = hashlib.sha256()
    for window in windows:
        digest.update(np.int64(window.seq).tobytes())
        digest.update(np.asarray(window.token_ids, dtype=np.int64).tobytes())
    return digest.hexdigest()[:16]
