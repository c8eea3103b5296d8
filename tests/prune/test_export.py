"""Export: the physically smaller checkpoint loads with plain transformers and equals masked pruning."""

from __future__ import annotations

import json

import pytest
import torch

from moeaudit.errors import InvalidParameterError, RunDirectoryError
from moeaudit.models.generic import TOP_K_FIELDS
from moeaudit.models.moe_model import nll_from_logits
from moeaudit.models.testing import FAMILIES
from moeaudit.prune import export_pruned, pruning_ablations
from moeaudit.prune.export import EXPERT_COUNT_FIELDS, LEGACY_EXPERT_COUNT_KEYS

from tests.prune.conftest import make_moe, windows

#: Families whose pruned checkpoint cannot be described by their config (refused, tested below).
NOT_EXPORTABLE = ("ernie4_5_vl_moe", "deepseek_v4", "jetmoe")
EXPORTABLE = [family for family in FAMILIES if family not in NOT_EXPORTABLE]
#: Kept experts per family (8 experts, top-2); group-limited DeepSeek keeps one expert of each group of 2.
KEPT = {family: [0, 2, 3, 5, 6, 7] for family in FAMILIES}
KEPT["deepseek_v2_grouped"] = [0, 3, 4, 7]
KEPT["longcat_flash"] = [0, 2, 3, 5, 6, 7, 8, 10]  # 6 of 8 real experts, 2 of 4 identity experts


@pytest.mark.parametrize("family", EXPORTABLE)
def test_export_equals_masked_pruning(family, tmp_path):
    from transformers import AutoModelForCausalLM

    moe = make_moe(family)
    ids = windows(3, 14, seed=2)
    kept = {layer.layer: KEPT[family] for layer in moe.layers}
    result = export_pruned(moe, kept, tmp_path / "pruned")
    with torch.no_grad():
        with moe.intervene(pruning_ablations(moe, kept)):
            masked = nll_from_logits(moe.model(input_ids=ids).logits, ids)
        # Plain transformers: AutoModelForCausalLM, or the model's own class where transformers 5.23 does not
        # map it (Mistral 4's text model, Qwen3-VL-MoE).
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING
        cls = AutoModelForCausalLM if type(moe.model.config) in MODEL_FOR_CAUSAL_LM_MAPPING else type(moe.model)
        loaded = cls.from_pretrained(tmp_path / "pruned").eval()
        exported = nll_from_logits(loaded(input_ids=ids).logits, ids)
    assert torch.allclose(masked[:, :-1], exported[:, :-1], atol=1e-5, rtol=0)
    n_kept = len(KEPT[family])
    assert result.num_experts == n_kept and result.original_num_experts == moe.layers[0].num_experts
    assert result.parameters < result.original_parameters
    assert sum(p.numel() for p in loaded.parameters()) == result.parameters
    text_config = loaded.config.get_text_config()  # the config itself but for vision-language models
    counts_in = moe.adapter.expert_count_config(text_config)  # the text config; DBRX: its ffn_config
    counts = {"n_routed_experts": 6, "zero_expert_num": 2} if family == "longcat_flash" else {}
    for name in result.config_fields:
        assert getattr(counts_in, name) == counts.get(name, n_kept)
    top_k_field = next(f for f in (*TOP_K_FIELDS, "moe_top_k") if getattr(counts_in, f, None) is not None)
    assert getattr(counts_in, top_k_field) == moe.layers[0].top_k
    record = json.loads((tmp_path / "pruned" / "moeaudit_pruning.json").read_text())
    assert record["kept"][str(moe.layers[0].layer)] == KEPT[family]
    assert loaded.config.architectures == [type(moe.model).__name__]  # the class that loads it, as save_pretrained
    _assert_legacy_keys(tmp_path / "pruned" / "config.json", text_config, counts.get("n_routed_experts", n_kept),
                        counts_key="ffn_config" if family == "dbrx" else None)
    # the exported experts are the kept ones, in order (LongCat-Flash's identity experts have no down_proj)
    layer = moe.layers[0]
    exported_layer = {found.layer: found for found in moe.adapter.find_layers(loaded)}[layer.layer]
    weighted = [e for e in KEPT[family] if e < layer.experts.down_proj.shape[0]]
    assert torch.equal(exported_layer.experts.down_proj, layer.experts.down_proj[weighted])
    assert exported_layer.num_experts == n_kept


def _text_json(data: dict) -> dict:
    """The text config's part of a config.json (itself but for vision-language models)."""
    return data.get("text_config", data)


def _assert_legacy_keys(path, text_config, n_kept, counts_key=None):
    """config.json has the transformers 4.x spellings (expert count, RoPE, torch_dtype) with the pruned values;
    the expert count in the sub-config ``counts_key`` where the family keeps it there (DBRX: ``ffn_config``),
    and nowhere else."""
    data = json.loads(path.read_text())
    text = _text_json(data)
    legacy = LEGACY_EXPERT_COUNT_KEYS.get(text_config.model_type)
    if legacy is not None:
        assert text[legacy] == n_kept, legacy
    counts_part = text
    if counts_key is not None:
        assert not any(name in text for name in EXPERT_COUNT_FIELDS)
        counts_part = text[counts_key]
    assert any(name in counts_part for name in EXPERT_COUNT_FIELDS)
    assert all(counts_part[name] == n_kept for name in EXPERT_COUNT_FIELDS if name in counts_part)
    rope = getattr(text_config, "rope_parameters", None)
    if isinstance(rope, dict) and "rope_theta" in rope:  # flat; nested per layer type has no 4.x spelling
        assert text["rope_theta"] == rope["rope_theta"]
        assert text.get("partial_rotary_factor") == rope.get("partial_rotary_factor")
        assert "rope_scaling" in text
    for part in (data, *(v for v in data.values() if isinstance(v, dict) and "dtype" in v)):
        assert part["torch_dtype"] == part["dtype"]


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral", "glm4_moe", "qwen3_vl_moe", "mistral4", "qwen3_omni_moe"])
def test_export_writes_the_keys_transformers_4_reads(family, tmp_path):
    """The issue's examples (Qwen3-MoE's num_experts, Mixtral's rope_theta) and partial rotary, M-RoPE and YaRN:
    a config.json stripped of every 5.x-only spelling (what a 4.x reader sees) gives the exported config."""
    moe = make_moe(family)
    export_pruned(moe, {l.layer: [0, 2, 3, 5, 6, 7] for l in moe.layers}, tmp_path / "p")
    data = json.loads((tmp_path / "p" / "config.json").read_text())
    text = _text_json(data)
    if family == "qwen3_moe":  # transformers 5.x writes num_local_experts; 4.x read num_experts (default 128)
        assert text["num_experts"] == text["num_local_experts"] == 6
        assert text["rope_theta"] == 10000.0 and text["rope_scaling"] is None
    if family == "mixtral":  # 5.x keeps rope_theta in rope_parameters; 4.x read it at the top level
        assert text["num_local_experts"] == 6 and text["rope_theta"] == 1e6 and text["rope_scaling"] is None
    if family == "glm4_moe":
        assert text["partial_rotary_factor"] == 0.5 and text["n_routed_experts"] == 6
    if family == "qwen3_vl_moe":  # 4.x Qwen3-VL read mrope_section from rope_scaling
        assert text["num_experts"] == 6 and text["rope_scaling"]["mrope_section"] == [1, 1, 2]
    if family == "qwen3_omni_moe":  # the thinker alone; 4.x read the interleaved mrope_section from rope_scaling
        assert data["model_type"] == "qwen3_omni_moe_thinker" and text["num_experts"] == 6
        assert text["rope_scaling"]["mrope_section"] == [2, 1, 1] and text["rope_scaling"]["interleaved"] is True
    if family == "mistral4":
        assert text["rope_scaling"]["rope_type"] == "yarn" and text["rope_scaling"]["factor"] == 128.0
    assert data["torch_dtype"] == data["dtype"] == "float32"
    exported = type(moe.model.config).from_pretrained(tmp_path / "p")
    legacy_only = json.loads(json.dumps(data))
    for part in (legacy_only, _text_json(legacy_only)):
        part.pop("dtype", None)
        part.pop("rope_parameters", None)
    if family == "qwen3_moe":
        legacy_only.pop("num_local_experts")
    old_style = type(moe.model.config).from_dict(legacy_only)
    assert old_style.get_text_config().rope_parameters == exported.get_text_config().rope_parameters
    assert old_style.to_dict() == exported.to_dict()
    assert str(old_style.dtype) == "torch.float32"


@pytest.mark.parametrize("family", NOT_EXPORTABLE)
def test_export_refuses_a_family_its_config_cannot_describe_pruned(family, tmp_path):
    """ERNIE-4.5-VL's text and vision experts share one expert count, DeepSeek-V4's hash-routed layers keep every
    expert beside the pruned ones: refused in one line naming what to do, before anything is written."""
    moe = make_moe(family)
    with pytest.raises(InvalidParameterError) as err:
        export_pruned(moe, {l.layer: KEPT[family] for l in moe.layers}, tmp_path / "x")
    message = str(err.value)
    assert "cannot be exported pruned" in message and "moeaudit prune" in message and "\n" not in message
    assert not (tmp_path / "x").exists()


def test_export_refuses_non_uniform_and_bad_kept(tmp_path):
    moe = make_moe("olmoe")
    first, second = (layer.layer for layer in moe.layers[:2])
    with pytest.raises(InvalidParameterError) as err:
        export_pruned(moe, {first: [0, 1, 2, 3], second: [0, 1, 2, 3, 4]}, tmp_path / "a")
    assert "same number of experts in every MoE layer" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(InvalidParameterError, match="same number of experts in every MoE layer"):
        export_pruned(moe, {first: [0, 1, 2, 3]}, tmp_path / "b")  # other layers keep all 8
    with pytest.raises(InvalidParameterError, match="at least top_k = 2"):
        export_pruned(moe, {l.layer: [1] for l in moe.layers}, tmp_path / "c")
    with pytest.raises(InvalidParameterError, match="distinct"):
        export_pruned(moe, {l.layer: [1, 1, 2] for l in moe.layers}, tmp_path / "d")
    assert not any((tmp_path / n).exists() for n in "abcd")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    with pytest.raises(RunDirectoryError, match="not an empty directory"):
        export_pruned(moe, {l.layer: [0, 1, 2, 3] for l in moe.layers}, tmp_path / "full")


#: Group-limited families (hand-written and generic), with a kept set whose groups are unequal.
UNBALANCED = {"deepseek_v2_grouped": ([0, 1, 2, 4, 6, 7], "[2, 1, 1, 2]"),
              **{family: ([0, 1, 4, 5, 6, 7], "[2, 4]")
                 for family in ("deepseek_v3", "mistral4", "kimi_linear", "bailing_hybrid")}}


@pytest.mark.parametrize("family", sorted(UNBALANCED))
def test_export_refuses_unbalanced_groups(family, tmp_path):
    """Group-limited routing regroups consecutive experts after slicing, so unequal groups would route otherwise
    than the masked pruning: refused in one line for every grouped rule, the generic adapter's inferred ones
    (Kimi-Linear, Bailing-hybrid) included, before anything is written."""
    moe = make_moe(family)
    kept, counts = UNBALANCED[family]
    with pytest.raises(InvalidParameterError) as err:
        export_pruned(moe, {l.layer: kept for l in moe.layers}, tmp_path / "g")
    message = str(err.value)
    assert "expert groups" in message and counts in message and "\n" not in message
    assert not (tmp_path / "g").exists()


def test_unbalanced_groups_would_export_another_routing(tmp_path, monkeypatch):
    """Why the refusal above exists: exported without it, Mistral 4's sliced router groups experts 0, 1, 4 and
    5, 6, 7 where the masked model grouped 0-3 and 4-7, and the exported model computes something else."""
    from moeaudit.prune import export as export_module
    from transformers import Mistral4ForCausalLM

    moe = make_moe("mistral4")
    kept = {l.layer: UNBALANCED["mistral4"][0] for l in moe.layers}
    monkeypatch.setattr(export_module, "_check_groups", lambda moe, kept: None)
    export_pruned(moe, kept, tmp_path / "g")
    ids = windows(3, 14, seed=2)
    with torch.no_grad():
        with moe.intervene(pruning_ablations(moe, kept)):
            masked = nll_from_logits(moe.model(input_ids=ids).logits, ids)
        exported = nll_from_logits(Mistral4ForCausalLM.from_pretrained(tmp_path / "g").eval()(input_ids=ids).logits,
                                   ids)
    assert (masked[:, :-1] - exported[:, :-1]).abs().max() > 1e-3


def test_export_saves_tokenizer(tmp_path):
    class Tokenizer:
        def save_pretrained(self, path):
            (path / "tokenizer.json").write_text("{}")

    moe = make_moe("qwen3_moe")
    moe.tokenizer = Tokenizer()
    export_pruned(moe, {l.layer: [0, 1, 2, 3] for l in moe.layers}, tmp_path / "t")
    assert (tmp_path / "t" / "tokenizer.json").exists()


def test_export_keeps_tied_embeddings_tied(tmp_path):
    from transformers import AutoModelForCausalLM

    moe = make_moe("olmoe", tie_word_embeddings=True)
    result = export_pruned(moe, {l.layer: [0, 1, 2, 3] for l in moe.layers}, tmp_path / "tied")
    expert = moe.layers[0].experts
    removed = sum(p.numel() // 2 for p in expert.parameters()) * len(moe.layers)
    router = moe.layers[0].router.weight.numel() // 2 * len(moe.layers)
    assert result.original_parameters - result.parameters == removed + router
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "tied")
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight


def test_export_writes_shards_one_at_a_time(tmp_path, monkeypatch):
    """``max_shard_bytes``: several safetensors shards and an index, written one shard at a time (never the
    whole pruned state dict in memory), loading to the same model as a one-file export."""
    import safetensors.torch
    from transformers import AutoModelForCausalLM

    moe = make_moe("olmoe")
    kept = {layer.layer: [0, 2, 5, 7] for layer in moe.layers}
    export_pruned(moe, kept, tmp_path / "one")
    written = []
    real = safetensors.torch.save_file

    def recording(tensors, path, metadata=None):
        written.append(sum(t.numel() * t.element_size() for t in tensors.values()))
        return real(tensors, path, metadata=metadata)

    monkeypatch.setattr(safetensors.torch, "save_file", recording)
    budget = 64 * 1024
    export_pruned(moe, kept, tmp_path / "sharded", max_shard_bytes=budget)
    files = sorted(p.name for p in (tmp_path / "sharded").glob("*.safetensors"))
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    assert len(files) == len(written) > 2 and set(index["weight_map"].values()) == set(files)
    largest = max(p.numel() * p.element_size() for p in moe.model.parameters())
    assert max(written) <= max(budget, largest) and sum(written) == index["metadata"]["total_size"]
    ids = windows(2, 12, seed=4)
    with torch.no_grad():
        one = AutoModelForCausalLM.from_pretrained(tmp_path / "one").eval()(input_ids=ids).logits
        sharded = AutoModelForCausalLM.from_pretrained(tmp_path / "sharded").eval()(input_ids=ids).logits
    assert torch.equal(one, sharded)


def test_export_writes_a_model_card_a_full_record_and_usual_file_modes(tmp_path):
    import os

    from moeaudit import __version__

    moe = make_moe("qwen3_moe")
    kept = {l.layer: [0, 2, 3, 5, 6, 7] for l in moe.layers}
    old = os.umask(0o022)
    try:
        export_pruned(moe, kept, tmp_path / "p", provenance={"criterion": "reap", "ratio": 0.25, "guard": 0,
                                                              "run": "runs/x", "run_fingerprint": "abc123"})
    finally:
        os.umask(old)
    record = json.loads((tmp_path / "p" / "moeaudit_pruning.json").read_text())
    assert record["dropped"] == {str(l.layer): [1, 4] for l in moe.layers}
    assert record["criterion"] == "reap" and record["ratio"] == 0.25 and record["run_fingerprint"] == "abc123"
    assert record["moeaudit_version"] == __version__
    card = (tmp_path / "p" / "README.md").read_text()
    assert "pruned to 6 of 8 routed experts" in card and "by `reap` at ratio 0.25" in card and "`abc123`" in card
    assert f"| {moe.layers[0].layer} | 1, 4 |" in card
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "p").iterdir()}
    assert any(name.endswith(".safetensors") for name in modes)
    assert set(modes.values()) == {0o644}, modes  # safetensors alone writes its shards 0600
