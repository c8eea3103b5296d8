"""Documents and the one interface every corpus source implements.

A source turns something a user names (``"builtin"``, a local file, a Hugging Face dataset) into a
deterministic list of :class:`Document`. Everything after this point (tokenising, windowing, splitting)
is source-agnostic; see :mod:`moeaudit.data.windows`.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from moeaudit.errors import CorpusError, invalid

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

    ``spec`` is the string that recreates the source through :func:`resolve_source` (stored in the run
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


def _looks_like_file(spec: str) -> bool:
    suffix = Path(spec).suffix.lower()
    return ":" not in spec and 1 < len(suffix) <= 9 and suffix[1:].isalnum()


def resolve_source(source: str | Path | DocumentSource, **options: Any) -> DocumentSource:
    """Turn a user's corpus argument into a :class:`DocumentSource`.

    Parameters
    ----------
    source : str, Path or DocumentSource
        ``"builtin"`` for the built-in mix; a path to a ``.txt``, ``.jsonl`` or ``.parquet`` file; a
        Hugging Face dataset as ``name[:config[:split]]`` (e.g. ``"wikitext:wikitext-2-raw-v1:test"``),
        optionally prefixed with ``"hf:"``; or a ready source object (returned as is).
    **options
        Passed to the source's constructor (``max_docs``, ``seed``, ``text_field``, ...).

    Returns
    -------
    DocumentSource

    Examples
    --------
    >>> resolve_source("builtin", max_chars_per_domain=20_000).spec  # doctest: +SKIP
    'builtin'
    """
    if isinstance(source, DocumentSource) and not isinstance(source, (str, Path)):
        return source
    from moeaudit.data.builtin import BuiltinMix
    from moeaudit.data.hub import HubDataset
    from moeaudit.data.local import LocalFileSource

    spec = str(source)
    path = Path(spec).expanduser()
    if spec == "builtin":
        return _construct(BuiltinMix, options)
    if spec.startswith("hf:"):
        return _construct(HubDataset, options, spec[3:])
    if path.exists() or isinstance(source, Path):
        return _construct(LocalFileSource, options, path)
    if _looks_like_file(spec):
        raise CorpusError(f"corpus file {spec!r} does not exist; check the path (or use 'builtin').")
    return _construct(HubDataset, options, spec)


def _construct(cls: type, options: dict[str, Any], *args: Any) -> DocumentSource:
    accepted = [f.name for f in fields(cls) if f.init][len(args) :]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise invalid(unknown[0], f"not set: {cls.__name__} accepts only {', '.join(accepted)}", options[unknown[0]])
    return cls(*args, **options)


def load_documents(source: str | Path | DocumentSource, **options: Any) -> list[Document]:
    """Documents of ``source`` (see :func:`resolve_source` for what ``source`` may be).

    Examples
    --------
    >>> docs = load_documents("builtin", max_chars_per_domain=20_000)  # doctest: +SKIP
    >>> sorted({d.domain for d in docs})[:3]  # doctest: +SKIP
    ['Arts', 'Biology and health sciences', 'Everyday life']
    """
    return resolve_source(source, **options).documents()
