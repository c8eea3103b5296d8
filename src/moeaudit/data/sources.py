"""Pick a corpus source by name: the factory over the sources of :mod:`moeaudit.data`.

:mod:`moeaudit.data.documents` holds the :class:`~moeaudit.data.documents.Document` /
:class:`~moeaudit.data.documents.DocumentSource` contract that every source module imports; this module
sits above the sources (built-in mix, local file, Hugging Face dataset) and chooses one of them.
"""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path
from typing import Any

from moeaudit.data.builtin import BuiltinMix
from moeaudit.data.documents import Document, DocumentSource
from moeaudit.data.hub import HubDataset
from moeaudit.data.local import LocalFileSource
from moeaudit.errors import CorpusError, invalid


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
