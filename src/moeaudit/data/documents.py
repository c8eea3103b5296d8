"""Documents and the one interface every corpus source implements.

A source turns something a user names (``"builtin"``, a local file, a Hugging Face dataset) into a
deterministic list of :class:`Document`; :mod:`moeaudit.data.sources` picks the source for a name.
Everything after this point (tokenising, windowing, splitting) is source-agnostic; see
:mod:`moeaudit.data.windows`.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from moeaudit.errors import CorpusError

logger = logging.getLogger(__name__)

#: File suffixes understood by :class:`moeaudit.data.local.LocalFileSource`.
LOCAL_SUFFIXES: tuple[str, ...] = (".txt", ".jsonl", ".parquet")


@dataclass(frozen=True)
class Document:
    """One document of a corpus.

    Attributes
    ----------
    text : str
        The document text (UTF-8, non-empty).
    domain : str or None
        Label used to break results down by domain (a Wikipedia topic, ``"code"``, ``"docs"``, a
        ``domain`` field of a JSONL row); ``None`` when the source has none.
    doc_id : str
        Identifier, unique within the source and stable across runs. The part before the first ``"#"``
        is the *split key*: documents sharing it (chunks of one source file) always land in the same
        train / calibration / held-out split.
    """

    text: str
    domain: str | None
    doc_id: str

    @property
    def split_key(self) -> str:
        """The part of :attr:`doc_id` that decides the split (chunks of one file share it)."""
        return self.doc_id.partition("#")[0]


@runtime_checkable
class DocumentSource(Protocol):
    """What every corpus source provides.

    ``spec`` is the string that recreates the source through
    :func:`~moeaudit.data.sources.resolve_source` (stored in the run
    manifest); :meth:`documents` returns the same list every time it is called with the same arguments.
    """

    @property
    def spec(self) -> str: ...

    def documents(self) -> list[Document]: ...

    def describe(self) -> dict[str, Any]: ...


def seeded_rank(key: str, seed: int) -> int:
    """A deterministic pseudo-random rank for ``key`` (first 8 bytes of sha256(seed, key)).

    Sorting by this rank is a seeded shuffle with one useful property over ``random.sample``: the
    first ``n`` items for a larger ``n`` contain those for a smaller one, and adding items to the pool
    does not reorder the others.
    """
    digest = hashlib.sha256(f"{seed}\x00{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big")


def seeded_sample(documents: Sequence[Document], max_docs: int | None, seed: int) -> list[Document]:
    """The first ``max_docs`` documents in seeded order (all of them, reordered, when ``None``)."""
    ordered = sorted(documents, key=lambda d: (seeded_rank(d.doc_id, seed), d.doc_id))
    return ordered if max_docs is None else ordered[:max_docs]


def check_nonempty(documents: Iterable[Document], spec: str) -> list[Document]:
    """Return ``documents`` as a list; refuse an empty corpus with one line."""
    docs = list(documents)
    if not docs:
        raise CorpusError(f"corpus {spec!r} has no non-empty documents; pass a file with some text in it.")
    return docs
