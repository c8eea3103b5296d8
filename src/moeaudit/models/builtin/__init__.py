"""The three tiny trained MoE models that ship with moeaudit, and their shared tokenizer.

Each model mirrors one architecture of the paper (Engmann et al. 2026, arXiv 2606.10703) at toy scale and
is trained on the built-in corpus by the developer script ``scripts/train_builtin.py`` (in the source
repository, not installed with the package):

==================  ==========================  =====================================================
name                class                       MoE block
==================  ==========================  =====================================================
``tiny-olmoe``      ``OlmoeForCausalLM``        routed experts only, top-k without renormalisation
``tiny-qwen-moe``   ``Qwen2MoeForCausalLM``     routed experts + one sigmoid-gated shared expert
``tiny-deepseek``   ``DeepseekV2ForCausalLM``   dense layer 0, routed experts + two shared experts
==================  ==========================  =====================================================

Each directory holds ``config.json``, ``model.safetensors`` (float16 weights; load them with
``dtype=torch.float32``) and ``MODEL_CARD.md`` (training record, held-out perplexity, routing summary).
This module imports nothing heavy.

Examples
--------
>>> import torch
>>> from transformers import AutoModelForCausalLM, AutoTokenizer
>>> model = AutoModelForCausalLM.from_pretrained(builtin_path("tiny-olmoe"), dtype=torch.float32)
>>> tokenizer = AutoTokenizer.from_pretrained(tokenizer_path())
"""

from __future__ import annotations

from pathlib import Path

from moeaudit.errors import invalid

#: Names of the built-in models, in the order of the paper's three architectures.
BUILTIN_MODELS: tuple[str, ...] = ("tiny-olmoe", "tiny-qwen-moe", "tiny-deepseek")

_HERE = Path(__file__).resolve().parent


def builtin_path(name: str) -> Path:
    """Directory of a built-in model (``config.json``, ``model.safetensors``, ``MODEL_CARD.md``).

    Raises
    ------
    InvalidParameterError
        For a name not in :data:`BUILTIN_MODELS`.
    """
    if name not in BUILTIN_MODELS:
        raise invalid("model", f"one of {', '.join(BUILTIN_MODELS)} (or a local path / hub id)", name, "built-in models")
    return _HERE / name


def tokenizer_path() -> Path:
    """Directory of the byte-level BPE tokenizer shared by all built-in models (``AutoTokenizer`` loads it)."""
    return _HERE / "tokenizer"


def model_card(name: str | Path) -> dict[str, str | float | int]:
    """The machine-readable header of a built-in model's ``MODEL_CARD.md`` (training record and metrics).

    ``name`` is a built-in model name or a directory holding a ``MODEL_CARD.md``. Numbers are returned as
    ``int`` / ``float``, everything else as ``str``; e.g. ``model_card("tiny-olmoe")["heldout_ppl"]``.
    """
    directory = Path(name) if isinstance(name, Path) else builtin_path(name)
    text = (directory / "MODEL_CARD.md").read_text(encoding="utf-8")
    lines = text.split("\n")
    fields: dict[str, str | float | int] = {}
    if lines and lines[0].strip() == "---":
        for line in lines[1:]:
            if line.strip() == "---":
                break
            key, sep, value = line.partition(":")
            if sep and not line.startswith(" "):
                fields[key.strip()] = _parse_scalar(value.strip())
    return fields


def _parse_scalar(value: str) -> str | float | int:
    value = value.strip().strip('"')
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    return value


__all__ = ["BUILTIN_MODELS", "builtin_path", "tokenizer_path", "model_card"]
