from __future__ import annotations

from pathlib import Path

import pytest

from moeaudit.data import BuiltinMix, Document, HubDataset, LocalFileSource, resolve_source, seeded_sample
from moeaudit.errors import CorpusError


def test_resolve_source_dispatch(tmp_path: Path) -> None:
    path = tmp_path / "a.txt"
    path.write_text("hello world\n", encoding="utf-8")
    assert isinstance(resolve_source("builtin"), BuiltinMix)
    assert isinstance(resolve_source(str(path)), LocalFileSource)
    assert isinstance(resolve_source(path), LocalFileSource)
    assert isinstance(resolve_source("wikitext:wikitext-2-raw-v1:test"), HubDataset)
    assert isinstance(resolve_source("hf:some/dataset"), HubDataset)
    source = LocalFileSource(path)
    assert resolve_source(source) is source


def test_missing_file_is_a_corpus_error(tmp_path: Path) -> None:
    with pytest.raises(CorpusError, match="does not exist"):
        resolve_source(str(tmp_path / "nope.jsonl"))


def test_seeded_sample_is_nested_and_deterministic() -> None:
    docs = [Document(text=f"t{i}", domain=None, doc_id=f"d{i}") for i in range(50)]
    small, large = seeded_sample(docs, 5, seed=3), seeded_sample(docs, 20, seed=3)
    assert large[:5] == small
    assert seeded_sample(docs, 5, seed=3) == small
    assert seeded_sample(docs, 5, seed=4) != small


def test_split_key_groups_chunks() -> None:
    assert Document("x", "code", "code:json/decoder.py#3").split_key == "code:json/decoder.py"
    assert Document("x", None, "plain").split_key == "plain"


def test_unknown_source_option_is_refused(tmp_path: Path) -> None:
    from moeaudit.errors import InvalidParameterError

    with pytest.raises(InvalidParameterError, match="`text_field`.*BuiltinMix accepts only"):
        resolve_source("builtin", text_field="body")
    path = tmp_path / "a.txt"
    path.write_text("x y", encoding="utf-8")
    with pytest.raises(InvalidParameterError, match="`max_chars_per_domain`"):
        resolve_source(path, max_chars_per_domain=10)
