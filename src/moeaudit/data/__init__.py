"""Corpora: documents from a source, tokenised into windows, split by document, fingerprinted.

>>> from moeaudit.data import load_documents, build_windows
>>> docs = load_documents("builtin", max_chars_per_domain=20_000)          # doctest: +SKIP
>>> corpus = build_windows(docs, tokenizer, max_len=128, seed=0)           # doctest: +SKIP
>>> corpus.select("calibration"), corpus.fingerprint()                     # doctest: +SKIP

Sources: ``"builtin"`` (:class:`BuiltinMix`), a local ``.txt`` / ``.jsonl`` / ``.parquet`` file
(:class:`LocalFileSource`), or a Hugging Face dataset ``name[:config[:split]]`` (:class:`HubDataset`).
"""

from __future__ import annotations

from moeaudit.data.builtin import BuiltinMix, wiki_package_version
from moeaudit.data.documents import Document, DocumentSource, seeded_sample
from moeaudit.data.hub import HubDataset
from moeaudit.data.local import LocalFileSource
from moeaudit.data.sources import load_documents, resolve_source
from moeaudit.data.windows import (
    DEFAULT_FRACTIONS,
    SPLITS,
    Split,
    Window,
    WindowedCorpus,
    as_encoder,
    assign_split,
    build_windows,
    cut_windows,
    pad_token_rows,
    split_documents,
    windows_fingerprint,
)

__all__ = [
    "Document",
    "DocumentSource",
    "BuiltinMix",
    "LocalFileSource",
    "HubDataset",
    "load_documents",
    "resolve_source",
    "seeded_sample",
    "wiki_package_version",
    "Window",
    "WindowedCorpus",
    "Split",
    "SPLITS",
    "DEFAULT_FRACTIONS",
    "assign_split",
    "split_documents",
    "cut_windows",
    "as_encoder",
    "build_windows",
    "pad_token_rows",
    "windows_fingerprint",
]
