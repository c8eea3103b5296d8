from __future__ import annotations

import re

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from moeaudit.data import LocalFileSource, load_documents
from moeaudit.errors import CorpusError, InvalidParameterError


def test_txt_blocks_are_documents(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("First para\nline two.\n\n\n  \nSecond para.\r\n\r\nThird.\n", encoding="utf-8")
    docs = load_documents(path)
    assert [d.text for d in docs] == ["First para\nline two.", "Second para.", "Third."]
    assert [d.doc_id for d in docs] == ["notes.txt:0", "notes.txt:1", "notes.txt:2"]
    assert all(d.domain is None for d in docs)


def test_jsonl_round_trip(tmp_path: Path) -> None:
    rows = [{"text": "alpha beta", "domain": "a"}, {"text": "gamma", "id": "g1"}, {"text": "   "}, {"text": "delta"}]
    path = tmp_path / "c.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n", encoding="utf-8")
    docs = load_documents(str(path))
    assert [(d.text, d.domain, d.doc_id) for d in docs] == [
        ("alpha beta", "a", "c.jsonl:1"),
        ("gamma", None, "g1"),
        ("delta", None, "c.jsonl:4"),
    ]
    custom = tmp_path / "d.jsonl"
    custom.write_text(json.dumps({"body": "x y", "topic": "t"}) + "\n", encoding="utf-8")
    doc = load_documents(custom, text_field="body", domain_field="topic")[0]
    assert (doc.text, doc.domain) == ("x y", "t")


def test_parquet_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "c.parquet"
    pq.write_table(pa.table({"text": ["one two", None, "three", ""], "domain": ["x", "y", None, "z"]}), path)
    docs = load_documents(path)
    assert [(d.text, d.domain, d.doc_id) for d in docs] == [("one two", "x", "c.parquet:0"), ("three", None, "c.parquet:2")]


def test_max_docs_samples_deterministically(tmp_path: Path) -> None:
    path = tmp_path / "many.txt"
    path.write_text("\n\n".join(f"doc {i}" for i in range(30)), encoding="utf-8")
    first = load_documents(path, max_docs=7, seed=1)
    assert len(first) == 7 and first == load_documents(path, max_docs=7, seed=1)
    with pytest.raises(InvalidParameterError, match="max_docs"):
        LocalFileSource(path, max_docs=0)


@pytest.mark.parametrize(
    ("name", "content", "match"),
    [
        ("empty.txt", b"", "is empty"),
        ("blank.txt", b"\n \n\t\n", "no non-empty documents"),
        ("data.csv", b"text\nhello\n", "unsupported extension '.csv'"),
        ("latin.txt", "caf\u00e9".encode("latin-1"), "not valid UTF-8"),
        ("nofield.jsonl", b'{"body": "hi"}\n', "no 'text' field"),
        ("notjson.jsonl", b'{"text": "a"}\nnot json\n', "line 2 is not a JSON object (it starts with 'n')"),
        ("broken.jsonl", b'{"text": "a"}\n{"text": \n', "line 2 is not valid JSON"),
        ("latin.jsonl", '{"text": "a"}\n{"text": "caf\u00e9"}\n'.encode("latin-1"), "not valid UTF-8 (bad byte on line 2, column 14)"),
        ("badtype.jsonl", b'{"text": 3}\n', "must be a string"),
        ("broken.parquet", b"PAR1 not really", "not a readable Parquet file"),
    ],
)
def test_bad_files_give_one_line_corpus_errors(tmp_path: Path, name: str, content: bytes, match: str) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(CorpusError, match=re.escape(match)) as info:
        load_documents(path)
    assert "\n" not in str(info.value)


def test_parquet_without_text_column(tmp_path: Path) -> None:
    path = tmp_path / "c.parquet"
    pq.write_table(pa.table({"body": ["a"]}), path)
    with pytest.raises(CorpusError, match="no 'text' column"):
        load_documents(path)


def test_directory_is_refused(tmp_path: Path) -> None:
    with pytest.raises(CorpusError, match="is a directory"):
        load_documents(tmp_path)


def test_a_huge_single_line_is_refused_without_building_it(tmp_path: Path) -> None:
    """A 15 MB single-line array used to be parsed whole (2.8 GB RSS) before its one-line error."""
    import tracemalloc

    path = tmp_path / "huge.jsonl"
    path.write_text("[" + ",".join(["1"] * 7_500_000) + "]\n")
    assert path.stat().st_size > 14_000_000
    tracemalloc.start()
    try:
        with pytest.raises(CorpusError, match=re.escape("huge.jsonl line 1 is not a JSON object (it starts with '[')")):
            load_documents(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 200 * 2**20  # the line itself (~15 MB of text), never its 7.5 million parsed values


def test_jsonl_lines_are_read_one_at_a_time_with_their_numbers(tmp_path: Path) -> None:
    path = tmp_path / "docs.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"text": "first \\u2028 line", "domain": "d"}\r\n\n{"text": "second"}\n')
    docs = load_documents(path)
    assert [d.text for d in docs] == ["first \u2028 line", "second"]  # a JSON-escaped separator stays inside
    assert [d.doc_id for d in docs] == ["docs.jsonl:1", "docs.jsonl:3"] and docs[0].domain == "d"
