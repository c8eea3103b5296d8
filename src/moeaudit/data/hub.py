"""Hugging Face ``datasets`` as a corpus source (optional dependency: ``pip install 'moeaudit[datasets]'``).

The spec is ``name[:config[:split]]``, e.g. ``wikitext:wikitext-2-raw-v1:test``; the split defaults to
``"test"``. Each non-empty row of ``text_field`` is one document (for wikitext that is one paragraph or
heading). Without ``datasets`` installed, or when the hub cannot be reached and the dataset is not in
the local cache, the error says so in one line and suggests a local file instead.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
from dataclasses import dataclass, field
from typing import Any

from moeaudit.data.documents import Document, check_nonempty, seeded_sample
from moeaudit.errors import CorpusError, first_line, invalid

logger = logging.getLogger(__name__)

_LOCAL_HINT = "pass a local .txt/.jsonl/.parquet file instead (or 'builtin')"


@dataclass(frozen=True)
class HubDataset:
    """Documents from a Hugging Face dataset.

    Parameters
    ----------
    name : str
        ``name[:config[:split]]``, e.g. ``"wikitext:wikitext-2-raw-v1:test"``.
    max_docs : int or None, default None
        Keep a seeded sample of at most this many rows.
    seed : int, default 0
        Seed of that sample.
    text_field, domain_field : str
        Column names; the domain column is optional.
    """

    name: str
    max_docs: int | None = None
    seed: int = 0
    text_field: str = "text"
    domain_field: str = "domain"
    dataset: str = field(init=False)
    config: str | None = field(init=False)
    split: str = field(init=False)

    def __post_init__(self) -> None:
        parts = self.name.split(":")
        if len(parts) > 3 or not parts[0]:
            raise invalid("corpus", "'builtin', a local file, or a dataset as name[:config[:split]]", self.name)
        object.__setattr__(self, "dataset", parts[0])
        object.__setattr__(self, "config", parts[1] if len(parts) > 1 and parts[1] else None)
        object.__setattr__(self, "split", parts[2] if len(parts) > 2 and parts[2] else "test")
        if self.max_docs is not None and (not isinstance(self.max_docs, int) or self.max_docs < 1):
            raise invalid("max_docs", "a positive integer or None", self.max_docs, self.name)

    @property
    def spec(self) -> str:
        return f"hf:{self.dataset}:{self.config or ''}:{self.split}"

    def describe(self) -> dict[str, Any]:
        return {
            "source": "huggingface",
            "dataset": self.dataset,
            "config": self.config,
            "split": self.split,
            "max_docs": self.max_docs,
            "seed": self.seed,
        }

    def documents(self) -> list[Document]:
        try:
            datasets = importlib.import_module("datasets")
        except ImportError:
            raise CorpusError(
                f"corpus {self.name!r} looks like a Hugging Face dataset, which needs the optional package "
                f"`datasets` (pip install 'moeaudit[datasets]'); or {_LOCAL_HINT}."
            ) from None
        from moeaudit.hub import offline, probe

        answer = probe(self.dataset, "dataset")
        if answer == "missing":
            raise CorpusError(f"no dataset {self.dataset!r} on the Hugging Face hub; check the name, or {_LOCAL_HINT}.")
        try:
            # An unreachable hub: the cached copy, if any, without datasets' retries.
            with offline() if answer == "unreachable" else contextlib.nullcontext():
                table = datasets.load_dataset(self.dataset, self.config, split=self.split)
        except Exception as err:  # noqa: BLE001 - datasets/hub raise many types for "not reachable"
            if answer == "unreachable":
                raise CorpusError(f"could not reach the Hugging Face hub for dataset {self.name!r}, and it is not "
                                  f"in the local cache; {_LOCAL_HINT}.") from None
            reason = first_line(err)[:160]
            raise CorpusError(
                f"could not load Hugging Face dataset {self.name!r} ({reason}); "
                f"if the hub is unreachable, {_LOCAL_HINT}."
            ) from None
        columns = list(getattr(table, "column_names", []) or [])
        if self.text_field not in columns:
            raise CorpusError(
                f"dataset {self.name!r} has no {self.text_field!r} column (has {columns}); "
                "name the column with --text-field."
            )
        texts = table[self.text_field]
        domains = table[self.domain_field] if self.domain_field in columns else [None] * len(texts)
        docs = [
            Document(text=text, domain=None if domain is None else str(domain), doc_id=f"{self.dataset}:{row}")
            for row, (text, domain) in enumerate(zip(texts, domains, strict=True))
            if isinstance(text, str) and text.strip()
        ]
        docs = check_nonempty(docs, self.name)
        return docs if self.max_docs is None else seeded_sample(docs, self.max_docs, self.seed)
