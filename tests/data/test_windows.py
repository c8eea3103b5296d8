from __future__ import annotations

import numpy as np
import pytest

from moeaudit.data import Document, assign_split, build_windows, cut_windows, split_documents
from moeaudit.errors import CorpusError, InvalidParameterError


def _docs(n: int = 60) -> list[Document]:
    return [
        Document(text=" ".join(f"w{(i * 7 + j) % 50}" for j in range(3 + (i * 13) % 40)), domain=f"d{i % 3}", doc_id=f"doc{i}")
        for i in range(n)
    ]


def test_cut_windows_is_even_and_complete() -> None:
    assert cut_windows(0, 8) == []
    assert cut_windows(8, 8) == [(0, 8)]
    assert cut_windows(9, 8) == [(0, 4), (4, 9)]
    for n in range(1, 200):
        cuts = cut_windows(n, 16)
        sizes = [b - a for a, b in cuts]
        assert cuts[0][0] == 0 and cuts[-1][1] == n and max(sizes) <= 16 and max(sizes) - min(sizes) <= 1


def test_windows_are_bounded_and_cover_documents(word_tokenizer) -> None:
    corpus = build_windows(_docs(), word_tokenizer, max_len=8, seed=0)
    assert all(2 <= len(w) <= 8 for w in corpus.windows)
    assert [w.seq for w in corpus.windows] == list(range(len(corpus)))
    assert corpus.counters["tokens"] == sum(len(d.text.split()) for d in _docs())
    frame = corpus.to_frame("train")
    assert set(frame.columns) >= {"seq", "doc_id", "domain", "split", "token_ids"}
    assert (frame["n_tokens"] <= 8).all()
    ids, lengths = corpus.token_matrix("heldout", pad_id=-1)
    assert ids.shape[0] == len(corpus.select("heldout")) and (lengths <= 8).all()


def test_split_is_by_document_and_deterministic(word_tokenizer) -> None:
    docs = _docs(300)
    corpus = build_windows(docs, word_tokenizer, max_len=8, seed=0)
    split_of: dict[str, set[str]] = {}
    for w in corpus.windows:
        split_of.setdefault(w.doc_id, set()).add(w.split)
    assert all(len(s) == 1 for s in split_of.values())
    assert {w.split for w in corpus.windows} == {"train", "calibration", "heldout"}
    again = build_windows(docs, word_tokenizer, max_len=8, seed=0)
    assert [(w.doc_id, w.split) for w in again.windows] == [(w.doc_id, w.split) for w in corpus.windows]
    other = build_windows(docs, word_tokenizer, max_len=8, seed=1)
    assert [w.split for w in other.windows] != [w.split for w in corpus.windows]
    # a document's split does not depend on the rest of the corpus
    subset = split_documents(docs[::3], seed=0)
    for name, chosen in subset.items():
        assert all(assign_split(d.split_key, seed=0) == name for d in chosen)
    # chunks that share a split key share a split
    chunks = [Document("a b c", "code", f"code:x.py#{k}") for k in range(20)]
    assert len({assign_split(c.split_key, seed=5) for c in chunks}) == 1


def test_fingerprint_is_stable_and_sensitive(word_tokenizer) -> None:
    docs = _docs()
    corpus = build_windows(docs, word_tokenizer, max_len=8, seed=0)
    same = build_windows(docs, word_tokenizer, max_len=8, seed=0)
    assert corpus.fingerprint() == same.fingerprint()
    assert len(corpus.fingerprint()) == 64
    assert corpus.fingerprint("train") != corpus.fingerprint("heldout")
    changed = list(docs)
    changed[0] = Document(docs[0].text + " w999", docs[0].domain, docs[0].doc_id)
    assert build_windows(changed, word_tokenizer, max_len=8, seed=0).fingerprint() != corpus.fingerprint()
    # one token id changed in place
    window = corpus.windows[0]
    object.__setattr__(window, "token_ids", window.token_ids.copy())
    before = corpus.fingerprint()
    window.token_ids[0] += 1
    assert corpus.fingerprint() != before
    manifest = corpus.manifest()
    assert manifest["fingerprints"]["train"] == corpus.fingerprint("train")


def test_short_documents_are_dropped_and_counted(word_tokenizer) -> None:
    docs = [Document("one", None, "a"), Document("two words", None, "b"), Document("x y z", None, "c")]
    corpus = build_windows(docs, word_tokenizer, max_len=4, fractions=(1.0, 0.0, 0.0))
    assert corpus.counters["documents_too_short"] == 1
    assert {w.doc_id for w in corpus.windows} == {"b", "c"}
    with pytest.raises(CorpusError, match="2 or more tokens"):
        build_windows([Document("one", None, "a")], word_tokenizer, max_len=4)


def test_parameter_validation(word_tokenizer) -> None:
    with pytest.raises(InvalidParameterError, match="max_len"):
        build_windows(_docs(), word_tokenizer, max_len=1)
    with pytest.raises(InvalidParameterError, match="fractions"):
        build_windows(_docs(), word_tokenizer, max_len=8, fractions=(0.5, 0.5, 0.5))
    with pytest.raises(InvalidParameterError, match="split"):
        build_windows(_docs(), word_tokenizer, max_len=8).select("test")


def test_real_tokenizer_and_splits_filter() -> None:
    tokenizers = pytest.importorskip("tokenizers")
    from moeaudit.models.builtin import tokenizer_path

    tok = tokenizers.Tokenizer.from_file(str(tokenizer_path() / "tokenizer.json"))
    docs = _docs(100)
    full = build_windows(docs, tok, max_len=16)
    only = build_windows(docs, tokenizer_path(), max_len=16, splits=["heldout"])
    assert {w.split for w in only.windows} == {"heldout"}
    assert only.fingerprint("heldout") == full.fingerprint("heldout")
    assert np.array_equal(only.windows[0].token_ids, full.select("heldout")[0].token_ids)


def test_pad_token_rows_matches_a_brute_force_padding():
    from moeaudit.data import pad_token_rows

    rng = np.random.default_rng(0)
    rows = [rng.integers(0, 100, size=n).tolist() for n in (3, 7, 1, 7, 5)]
    ids, mask = pad_token_rows(rows, pad_id=99)
    for i, row in enumerate(rows):
        assert ids[i].tolist() == row + [99] * (7 - len(row))
        assert mask[i].tolist() == [1] * len(row) + [0] * (7 - len(row))
    assert ids.dtype == mask.dtype == np.int64
    empty_ids, empty_mask = pad_token_rows([], pad_id=0)
    assert empty_ids.shape == empty_mask.shape == (0, 0)


def test_windows_fingerprint_sees_every_token_and_the_order():
    import hashlib

    from moeaudit.data import Window, windows_fingerprint

    def window(seq, ids):
        return Window(seq=seq, doc_id=f"d{seq}", domain=None, split="heldout", start=0, token_ids=ids)

    windows = [window(0, [1, 2, 3]), window(1, [4, 5])]
    by_hand = hashlib.sha256(np.int64(0).tobytes() + np.array([1, 2, 3], dtype=np.int64).tobytes()
                             + np.int64(1).tobytes() + np.array([4, 5], dtype=np.int64).tobytes()).hexdigest()[:16]
    assert windows_fingerprint(windows) == by_hand
    assert windows_fingerprint([window(0, [1, 2, 3]), window(1, [4, 6])]) != by_hand
    assert windows_fingerprint(windows[::-1]) != by_hand
    assert windows_fingerprint([window(0, [1, 2, 3]), window(2, [4, 5])]) != by_hand


def test_truncate_keeps_each_documents_first_max_len_tokens(word_tokenizer) -> None:
    """The paper's protocol: one window per document, its first 512 tokens. The first of the near-equal
    windows (what truncation gave before) is shorter: a 700-token document gave 350 tokens, not 512."""
    docs = [Document(text=" ".join(f"w{i}_{j}" for j in range(n)), domain=None, doc_id=f"d{i}")
            for i, n in enumerate([7, 20, 8, 13])]
    corpus = build_windows(docs, word_tokenizer, max_len=8, seed=0, truncate=True)
    assert [len(w.token_ids) for w in corpus.windows] == [7, 8, 8, 8]
    full = build_windows(docs, word_tokenizer, max_len=8, seed=0)
    firsts = {w.doc_id: w.token_ids for w in full.windows if w.start == 0}
    for window in corpus.windows:
        document = docs[int(window.doc_id[1:])].text
        assert window.start == 0 and np.array_equal(window.token_ids, word_tokenizer([document])[0][:8])
    assert len(firsts["d1"]) == 7 and len(firsts["d3"]) == 6  # the near-equal cuts: 20 -> 7+7+6, 13 -> 6+7
