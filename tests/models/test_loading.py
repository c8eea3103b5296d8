"""Loading checkpoints: aliases, fingerprints, missing or damaged weights, refused layouts."""

from __future__ import annotations

import json

import pytest
import torch

from moeaudit.models import load_model
from moeaudit.models.loading import NATIVE_ALIASES
from moeaudit.models.testing import tiny_model
from tests.conftest import HANG_GUARD_S


def test_kimi_k2_checkpoint_loads_as_native_deepseek_v3(tmp_path):
    """Kimi-K2's config.json says model_type "kimi_k2" with remote code, architecture DeepseekV3ForCausalLM."""
    native = tiny_model("deepseek_v3", seed=3)
    native.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config.update(model_type="kimi_k2", auto_map={"AutoConfig": "configuration_deepseek.DeepseekV3Config",
                                                  "AutoModelForCausalLM": "modeling_deepseek.DeepseekV3ForCausalLM"})
    (tmp_path / "config.json").write_text(json.dumps(config))

    moe = load_model(str(tmp_path), experts_implementation="batched_mm")

    assert NATIVE_ALIASES["kimi_k2"] == "deepseek_v3"
    assert moe.adapter.family == "deepseek_v3" and type(moe.model).__name__ == "DeepseekV3ForCausalLM"
    ids = torch.randint(3, 96, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(moe.model(ids).logits, native(ids).logits)


def test_fingerprint_sees_the_routers_correction_bias():
    """The bias is a buffer, not a parameter, and it changes which experts are selected."""
    from moeaudit.models import wrap_model
    from moeaudit.models.loading import model_fingerprint

    moe = wrap_model(tiny_model("deepseek_v3", seed=3), name="deepseek_v3")
    before = model_fingerprint(moe)
    with torch.no_grad():
        moe.layers[0].router.e_score_correction_bias[3] += 1.0
    assert model_fingerprint(moe) != before


def test_describe_shows_each_rules_parameters_from_the_config():
    from moeaudit.models import wrap_model

    config = dict(routed_scaling_factor=2.5, n_group=2, topk_group=1, norm_topk_prob=True)
    moe = wrap_model(tiny_model("deepseek_v3", seed=3, **config), name="deepseek_v3")
    params = moe.describe()["moe_layers"][0]["routing_parameters"]
    assert params == dict(score="sigmoid", correction_bias="router", n_group=2, topk_group=1,
                          group_score="sum of its 2 best", dropped_groups_filled_with="-inf", renormalise=True,
                          renormalise_denominator="sum + 1e-20", routed_scaling_factor=2.5)
    ernie = wrap_model(tiny_model("ernie4_5_moe", seed=3), name="ernie4_5_moe")
    assert ernie.describe()["moe_layers"][0]["routing_parameters"] == dict(
        score="softmax", correction_bias="statics", renormalise=True, renormalise_denominator="max(sum, norm_min)")
    olmoe = wrap_model(tiny_model("olmoe", seed=3, norm_topk_prob=True), name="olmoe")
    assert olmoe.describe()["moe_layers"][0]["routing_parameters"] == {"renormalise": True}


def test_checkpoint_missing_a_tensor_is_refused_not_left_random(tmp_path):
    """A parameter without a tensor would keep its random initialisation: refused in one line, naming it."""
    import pytest
    from safetensors.torch import load_file, save_file

    from moeaudit.errors import ModelLoadError

    tiny_model("olmoe", seed=3).save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    dropped = "model.layers.1.self_attn.o_proj.weight"
    assert dropped in weights
    del weights[dropped]
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match=r"no weights for 1 parameter.*layers\.1\.self_attn\.o_proj"):
        load_model(str(tmp_path))


def test_latent_experts_whose_up_projection_has_a_bias_are_refused_in_one_line():
    """Nemotron 3's latent experts project back with ``fc2_latent_proj``; with a bias (``mlp_bias``) it is added
    once to the routed sum, not once per expert, so the sum is no weighted sum of expert terms: refused."""
    import pytest

    from moeaudit.errors import UnsupportedModelError
    from moeaudit.models import wrap_model

    assert wrap_model(tiny_model("nemotron_h_latent", seed=3)).layers[0].experts.inner is not None  # adapted
    with pytest.raises(UnsupportedModelError, match=r"projects its experts' latent output back with a bias") as err:
        wrap_model(tiny_model("nemotron_h_latent", seed=3, mlp_bias=True))
    assert "\n" not in str(err.value)


def test_a_config_without_a_causal_lm_class_is_refused_in_one_line(tmp_path):
    """Step-3.5-Flash's ``step3p5`` is a text config whose only model is a base model (no language-model head in
    transformers 5.23): refused in one line from the config alone, not with transformers' list of classes; so
    is any family the generic adapter would try that has no causal-LM class."""
    from transformers import Step3p7TextConfig

    from moeaudit.errors import UnsupportedModelError
    from moeaudit.models import load_model
    from moeaudit.models.loading import causal_lm_class

    config = Step3p7TextConfig(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                               intermediate_size=48, moe_intermediate_size=16)
    config.save_pretrained(tmp_path / "step")
    with pytest.raises(UnsupportedModelError) as err:
        load_model(str(tmp_path / "step"))
    message = str(err.value)
    assert "'step3p5'" in message and "no causal-LM class" in message and "\n" not in message
    with pytest.raises(UnsupportedModelError) as err:  # the generic path: no class to build
        causal_lm_class(config)
    assert "no causal-LM class for model_type 'step3p5'" in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("damage", ["truncated", "random", "empty", "pickle"])
def test_damaged_or_unsafe_weights_are_one_line(tmp_path, damage):
    """Truncated, random or empty safetensors, and a pickle that would run code: one line, nothing run."""
    import os
    import pickle

    from moeaudit.errors import ModelLoadError

    tiny_model("olmoe", seed=1).save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    data = weights.read_bytes()
    marker = tmp_path / "pwned"
    if damage == "truncated":
        weights.write_bytes(data[: len(data) // 2])
    elif damage == "random":
        weights.write_bytes(os.urandom(len(data)))
    elif damage == "empty":
        weights.write_bytes(b"")
    else:
        weights.unlink()

        class Evil:
            def __reduce__(self):
                return (os.system, (f"touch {marker}",))

        (tmp_path / "pytorch_model.bin").write_bytes(pickle.dumps(Evil(), protocol=2))
    fragment = "could run code" if damage == "pickle" else "are damaged"
    with pytest.raises(ModelLoadError, match=fragment) as caught:
        load_model(str(tmp_path))
    assert "\n" not in str(caught.value) and not marker.exists()


@pytest.mark.parametrize("damage", ["truncated_json", "wordlevel_without_unk"])
def test_a_damaged_tokenizer_is_one_line_not_no_tokenizer(tmp_path, damage):
    """A tokenizer file that is there but unusable is named as damaged (it used to read as "no tokenizer")."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast

    from moeaudit.errors import ModelLoadError
    from moeaudit.models.builtin import tokenizer_path

    tiny_model("olmoe", seed=1).save_pretrained(tmp_path)
    if damage == "truncated_json":
        PreTrainedTokenizerFast.from_pretrained(str(tokenizer_path())).save_pretrained(tmp_path)
        text = (tmp_path / "tokenizer.json").read_text()
        (tmp_path / "tokenizer.json").write_text(text[: len(text) // 3])
        fragment = "tokenizer files of .* are damaged"
    else:
        raw = Tokenizer(WordLevel({"a": 0}, unk_token="[UNK]"))  # [UNK] is not in the vocabulary
        raw.pre_tokenizer = Whitespace()
        PreTrainedTokenizerFast(tokenizer_object=raw).save_pretrained(tmp_path)
        fragment = "cannot encode text"
    with pytest.raises(ModelLoadError, match=fragment) as caught:
        load_model(str(tmp_path))
    assert "\n" not in str(caught.value)


def _hub_env(tmp_path):
    """A process whose hub refuses connections at once (nothing listens on port 9) and whose cache is empty."""
    import os

    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    return dict(env, HF_ENDPOINT="http://127.0.0.1:9", HF_HOME=str(tmp_path / "hf"), TRANSFORMERS_VERBOSITY="error")


def test_an_unreachable_hub_is_one_line_without_retries(tmp_path):
    """transformers retried the connection ten times (eleven printed lines, ~50 s) before the clean line."""
    import subprocess
    import sys

    from tests.conftest import one_line_error

    proc = subprocess.run([sys.executable, "-m", "moeaudit", "inspect", "some-org/some-moe"], capture_output=True,
                          text=True, env=_hub_env(tmp_path), timeout=HANG_GUARD_S)
    one_line_error(proc.returncode, proc.stderr, "could not reach the model hub for some-org/some-moe",
                   "hf download some-org/some-moe --local-dir DIR")
    assert "Retry" not in proc.stderr


def test_an_unreachable_hub_falls_back_to_the_cached_snapshot(tmp_path):
    """A model downloaded before loads from the Hugging Face cache when the hub cannot be reached."""
    import subprocess
    import sys

    revision = "0" * 40
    repo = tmp_path / "hf" / "hub" / "models--some-org--cached-moe"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(revision)
    tiny_model("olmoe", seed=1).save_pretrained(repo / "snapshots" / revision)
    proc = subprocess.run([sys.executable, "-m", "moeaudit", "inspect", "some-org/cached-moe"], capture_output=True,
                          text=True, env=_hub_env(tmp_path), timeout=HANG_GUARD_S)
    assert proc.returncode == 0, proc.stderr
    assert "olmoe" in proc.stdout.lower() and "Retry" not in proc.stderr


# ---------------------------------------------------------------------------- transformers-style arguments
def test_dtype_auto_is_the_checkpoints_own_and_aliases_are_names(tmp_path):
    tiny_model("olmoe", seed=2).to(torch.bfloat16).save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "bfloat16"
    assert load_model(str(tmp_path), dtype="auto").dtype == torch.bfloat16
    assert load_model(str(tmp_path), dtype="fp16").dtype == torch.float16
    assert load_model(str(tmp_path)).dtype == torch.float32  # the default stays the exact float32 reference
    from moeaudit.config import AuditConfig
    from moeaudit.models.loading import model_from_config, model_record

    moe = model_from_config(AuditConfig(model=str(tmp_path), dtype="auto"))
    assert moe.dtype == torch.bfloat16 and model_record(moe)["dtype"] == "torch.bfloat16"
    assert AuditConfig(dtype="bf16").dtype == "bfloat16"


def test_from_pretrained_arguments_pass_through_and_remote_code_is_refused(tmp_path):
    from moeaudit.errors import InvalidParameterError

    tiny_model("olmoe", seed=2).save_pretrained(tmp_path)
    moe = load_model(str(tmp_path), device_map="cpu", low_cpu_mem_usage=True, local_files_only=True,
                     attn_implementation="eager")
    assert moe.model.config._attn_implementation == "eager" and moe.device.type == "cpu"
    with pytest.raises(InvalidParameterError, match="trust_remote_code"):
        load_model(str(tmp_path), trust_remote_code=True)
    with pytest.raises(InvalidParameterError, match="`config`"):
        load_model(str(tmp_path), config=None)
    with pytest.raises(InvalidParameterError, match="dtype"):
        load_model(str(tmp_path), dtype="int8")


def test_revision_picks_the_snapshot(tmp_path):
    """``revision=`` reaches the hub cache: two snapshots of one repository, loaded by tag."""
    import subprocess
    import sys

    repo = tmp_path / "hf" / "hub" / "models--some-org--tagged-moe"
    (repo / "refs").mkdir(parents=True)
    for tag, (commit, seed) in {"main": ("1" * 40, 1), "v2": ("2" * 40, 2)}.items():
        (repo / "refs" / tag).write_text(commit)
        tiny_model("olmoe", seed=seed).save_pretrained(repo / "snapshots" / commit)
    code = ("import moeaudit; from moeaudit.models.loading import model_fingerprint as f; "
            "print(f(moeaudit.load_model('some-org/tagged-moe')), f(moeaudit.load_model('some-org/tagged-moe', "
            "revision='v2')))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_hub_env(tmp_path),
                          timeout=HANG_GUARD_S)
    assert proc.returncode == 0, proc.stderr
    main, v2 = proc.stdout.split()
    from moeaudit.models.loading import model_fingerprint

    snapshot = {tag: model_fingerprint(load_model(str(repo / "snapshots" / commit)))
                for tag, commit in (("main", "1" * 40), ("v2", "2" * 40))}
    assert main != v2 and (main, v2) == (snapshot["main"], snapshot["v2"])


def test_doge_is_refused_because_its_routing_reads_later_tokens():
    """The reason moeaudit gives for refusing Doge, measured on the installed transformers: changing only the
    last token of a window changes the logits of earlier positions (its product-key router views the flat
    batch's logits as two halves). Should transformers make it causal, this fails: time to adapt Doge."""
    import pytest
    import torch
    from transformers import DogeConfig, DogeForCausalLM

    from moeaudit.errors import UnsupportedModelError
    from moeaudit.models import wrap_model

    config = DogeConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, is_moe=True, num_experts=16,
                        num_experts_per_tok=2, keep_window_size=2048, pad_token_id=0)
    torch.manual_seed(0)
    model = DogeForCausalLM(config).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0, 0.2)
        ids = torch.randint(3, 96, (1, 12), generator=torch.Generator().manual_seed(0))
        other = ids.clone()
        other[0, -1] = (ids[0, -1] + 1 - 3) % 93 + 3
        moved = (model(ids).logits[0, :-1] - model(other).logits[0, :-1]).abs().max()
    assert moved > 1e-5  # a causal model leaves them bit for bit as they were
    with pytest.raises(UnsupportedModelError, match="reads other tokens and other sequences") as err:
        wrap_model(model)
    assert "\n" not in str(err.value)
