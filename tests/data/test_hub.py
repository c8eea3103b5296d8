from __future__ import annotations

import sys
import types

import pytest

from moeaudit.data import HubDataset, load_documents
from moeaudit.errors import CorpusError


def test_spec_parsing() -> None:
    ds = HubDataset("wikitext:wikitext-2-raw-v1:test")
    assert (ds.dataset, ds.config, ds.split) == ("wikitext", "wikitext-2-raw-v1", "test")
    assert (HubDataset("imdb").config, HubDataset("imdb").split) == (None, "test")


def test_missing_datasets_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` raise ImportError
    with pytest.raises(CorpusError, match=r"needs the optional package `datasets`.*local") as info:
        load_documents("wikitext:wikitext-2-raw-v1:test")
    assert "\n" not in str(info.value)


def _fake_datasets(load_dataset) -> types.ModuleType:
    module = types.ModuleType("datasets")
    module.load_dataset = load_dataset
    return module


def test_unreachable_hub(monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'wikitext' on the Hub (LocalEntryNotFoundError)\nmore detail")

    monkeypatch.setitem(sys.modules, "datasets", _fake_datasets(offline))
    with pytest.raises(CorpusError, match=r"could not load .*hub is unreachable.*local") as info:
        load_documents("wikitext:wikitext-2-raw-v1:test")
    assert "\n" not in str(info.value)


class _Table(dict):
    @property
    def column_names(self) -> list[str]:
        return list(self)


def test_rows_become_documents(monkeypatch: pytest.MonkeyPatch) -> None:
    seen = {}

    def load(name, config, split):
        seen.update(name=name, config=config, split=split)
        return _Table(text=["", " = Title = ", "Some paragraph .", "  "])

    monkeypatch.setitem(sys.modules, "datasets", _fake_datasets(load))
    docs = load_documents("wikitext:wikitext-2-raw-v1:validation")
    assert seen == {"name": "wikitext", "config": "wikitext-2-raw-v1", "split": "validation"}
    assert [(d.text, d.doc_id) for d in docs] == [(" = Title = ", "wikitext:1"), ("Some paragraph .", "wikitext:2")]
    with pytest.raises(CorpusError, match="no 'body' column"):
        load_documents("wikitext:wikitext-2-raw-v1:validation", text_field="body")


def test_an_unreachable_hub_reads_the_cache_without_retries_or_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    """The hub is asked once (moeaudit.hub.probe); unreachable, the dataset is read from the cache in
    offline mode (no back-off retries), and a dataset not cached is one line naming the way out."""
    import huggingface_hub.constants

    import moeaudit.hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    seen = []

    def cached(name, config, split):
        seen.append(huggingface_hub.constants.HF_HUB_OFFLINE)
        return _Table(text=["cached text"])

    monkeypatch.setattr(moeaudit.hub, "probe", lambda repo, kind="model": "unreachable")
    monkeypatch.setitem(sys.modules, "datasets", _fake_datasets(cached))
    assert [d.text for d in load_documents("wikitext:wikitext-2-raw-v1:test")] == ["cached text"]
    assert seen == [True] and huggingface_hub.constants.HF_HUB_OFFLINE is False  # offline only while loading

    def not_cached(*args, **kwargs):
        raise ConnectionError("Couldn't find a cached copy")

    monkeypatch.setitem(sys.modules, "datasets", _fake_datasets(not_cached))
    with pytest.raises(CorpusError, match=r"^could not reach the Hugging Face hub for dataset 'wikitext:wikitext-2-raw"
                       r"-v1:test', and it is not in the local cache; pass a local") as info:
        load_documents("wikitext:wikitext-2-raw-v1:test")
    assert "\n" not in str(info.value)
    monkeypatch.setattr(moeaudit.hub, "probe", lambda repo, kind="model": "missing")
    with pytest.raises(CorpusError, match=r"^no dataset 'wikitext' on the Hugging Face hub; check the name"):
        load_documents("wikitext:wikitext-2-raw-v1:test")
