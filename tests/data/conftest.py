"""Shared fixtures for the corpus tests: a tiny deterministic whitespace tokenizer (no files needed)."""

from __future__ import annotations

import pytest


class WordTokenizer:
    """Maps each whitespace-separated word to a stable id (a batch encoder, as ``build_windows`` accepts)."""

    def __init__(self) -> None:
        self.vocab: dict[str, int] = {}

    def __call__(self, texts: list[str]) -> list[list[int]]:
        return [[self.vocab.setdefault(word, len(self.vocab)) for word in text.split()] for text in texts]


@pytest.fixture
def word_tokenizer() -> WordTokenizer:
    return WordTokenizer()
