"""Local corpus files: ``.txt``, ``.jsonl`` and ``.parquet``.

* ``.txt``: one document per block of text separated by one or more blank lines (a paragraph-per-document
  file; a file without blank lines is one document). Domain ``None``; ``doc_id`` = ``"<file>:<block>"``.
* ``.jsonl``: one JSON object per line with a string field ``text_field`` (default ``"text"``) and an
  optional ``domain_field`` (default ``"domain"``) and ``id_field`` (default ``"id"``); blank lines are
  allowed. ``doc_id`` = the id field if present, else ``"<file>:<line>"``.
* ``.parquet``: a string column ``text_field`` and optionally ``domain_field`` / ``id_field`` columns.

Rows whose text is empty or only whitespace are skipped (and counted in the log); everything else that
is wrong with a file (missing, empty, not UTF-8, unknown extension, missing text field, not JSON) is a
:class:`~moeaudit.errors.CorpusError` whose one line says what to fix.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from moeaudit.data.documents import LOCAL_SUFFIXES, Document, check_nonempty, seeded_sample
from moeaudit.errors import CorpusError, invalid

logger = logging.getLogger(__name__)

_BLANK_LINES = re.compile(r"\n[ \t]*\n+")


@dataclass(frozen=True)
class LocalFileSource:
    """Documents from one local file (see the module docstring for the formats).

    Parameters
    ----------
    path : str or Path
        A ``.txt``, ``.jsonl`` or ``.parquet`` file.
    max_docs : int or None, default None
        Keep a seeded sample of at most this many documents (``None``: all, in file order).
    seed : int, default 0
        Seed of that sample.
    text_field, domain_field, id_field : str
        Field / column names for ``.jsonl`` and ``.parquet``.

    Examples
    --------
    >>> LocalFileSource("notes.txt").documents()[0].doc_id  # doctest: +SKIP
    'notes.txt:0'
    """

    path: Path
    max_docs: int | None = None
    seed: int = 0
    text_field: str = "text"
    domain_field: str = "domain"
    id_field: str = "id"

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path).expanduser())
        if self.max_docs is not None and (not isinstance(self.max_docs, int) or self.max_docs < 1):
            raise invalid("max_docs", "a positive integer or None", self.max_docs, str(self.path))

    @property
    def spec(self) -> str:
        return str(self.path)

    def describe(self) -> dict[str, Any]:
        return {"source": "file", "path": str(self.path.resolve()), "max_docs": self.max_docs, "seed": self.seed}

    def documents(self) -> list[Document]:
        path = self.path
        if path.is_dir():
            raise CorpusError(f"corpus {str(path)!r} is a directory; pass one .txt, .jsonl or .parquet file.")
        if not path.is_file():
            raise CorpusError(f"corpus file {str(path)!r} does not exist; check the path (or use 'builtin').")
        suffix = path.suffix.lower()
        if suffix not in LOCAL_SUFFIXES:
            raise CorpusError(
                f"corpus file {path.name!r} has an unsupported extension {suffix or '(none)'!r}; "
                f"use one of {', '.join(LOCAL_SUFFIXES)}."
            )
        if path.stat().st_size == 0:
            raise CorpusError(f"corpus file {str(path)!r} is empty; pass a file with some text in it.")
        reader = {".txt": self._read_txt, ".jsonl": self._read_jsonl, ".parquet": self._read_parquet}[suffix]
        docs = check_nonempty(reader(path), str(path))
        if self.max_docs is not None:
            docs = seeded_sample(docs, self.max_docs, self.seed)
        return docs

    # -- readers ---------------------------------------------------------------------------------
    def _decode(self, path: Path) -> str:
        data = path.read_bytes()
        try:
            return data.decode("utf-8-sig")
        except UnicodeDecodeError as err:
            raise CorpusError(
                f"corpus file {path.name!r} is not valid UTF-8 (bad byte at offset {err.start}); "
                "re-encode it as UTF-8 (e.g. iconv -t UTF-8)."
            ) from None

    def _read_txt(self, path: Path) -> list[Document]:
        text = self._decode(path).replace("\r\n", "\n").replace("\r", "\n")
        blocks = [b.strip() for b in _BLANK_LINES.split(text)]
        return [Document(text=b, domain=None, doc_id=f"{path.name}:{i}") for i, b in enumerate(blocks) if b]

    def _jsonl_lines(self, path: Path) -> Iterator[tuple[int, str]]:
        """``(line number, line)`` read one at a time (a file is never held whole in memory)."""
        with path.open("rb") as handle:
            for line_no, raw in enumerate(handle, start=1):
                try:
                    line = raw.decode("utf-8-sig" if line_no == 1 else "utf-8")
                except UnicodeDecodeError as err:
                    raise CorpusError(
                        f"corpus file {path.name!r} is not valid UTF-8 (bad byte on line {line_no}, column "
                        f"{err.start + 1}); re-encode it as UTF-8 (e.g. iconv -t UTF-8)."
                    ) from None
                yield line_no, line

    def _read_jsonl(self, path: Path) -> list[Document]:
        docs = []
        skipped = 0
        for line_no, line in self._jsonl_lines(path):
            stripped = line.lstrip()
            if not stripped:
                continue
            if not stripped.startswith("{"):  # refused before parsing: a huge array would be built in full first
                raise CorpusError(
                    f"{path.name} line {line_no} is not a JSON object (it starts with {stripped[:1]!r}); write one "
                    "JSON object per line."
                )
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise CorpusError(
                    f"{path.name} line {line_no} is not valid JSON ({err.msg}); write one JSON object per line."
                ) from None
            if not isinstance(row, dict) or self.text_field not in row:
                fields = sorted(row) if isinstance(row, dict) else type(row).__name__
                raise CorpusError(
                    f"{path.name} line {line_no} has no {self.text_field!r} field (has {fields}); "
                    "add it or name the field with --text-field."
                )
            text = row[self.text_field]
            if not isinstance(text, str):
                raise CorpusError(
                    f"{path.name} line {line_no}: field {self.text_field!r} must be a string; "
                    f"got {type(text).__name__}."
                )
            if not text.strip():
                skipped += 1
                continue
            domain = row.get(self.domain_field)
            doc_id = row.get(self.id_field)
            docs.append(
                Document(
                    text=text,
                    domain=None if domain is None else str(domain),
                    doc_id=str(doc_id) if doc_id is not None else f"{path.name}:{line_no}",
                )
            )
        if skipped:
            logger.info("%s: skipped %d rows with empty text", path.name, skipped)
        return docs

    def _read_parquet(self, path: Path) -> list[Document]:
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except Exception as err:  # noqa: BLE001 - pyarrow raises several types for corrupt files
            raise CorpusError(f"{path.name} is not a readable Parquet file ({type(err).__name__}); check the file.") from None
        names = table.column_names
        if self.text_field not in names:
            raise CorpusError(f"{path.name} has no {self.text_field!r} column (has {names}); add it or name the "
                              "column with --text-field.")
        texts = table.column(self.text_field).to_pylist()
        if any(t is not None and not isinstance(t, str) for t in texts):
            raise CorpusError(f"{path.name}: column {self.text_field!r} must hold strings; convert it to text.")
        domains = table.column(self.domain_field).to_pylist() if self.domain_field in names else [None] * len(texts)
        ids = table.column(self.id_field).to_pylist() if self.id_field in names else [None] * len(texts)
        docs = []
        for row, (text, domain, doc_id) in enumerate(zip(texts, domains, ids, strict=True)):
            if text is None or not text.strip():
                continue
            docs.append(
                Document(
                    text=text,
                    domain=None if domain is None else str(domain),
                    doc_id=str(doc_id) if doc_id is not None else f"{path.name}:{row}",
                )
            )
        return docs
