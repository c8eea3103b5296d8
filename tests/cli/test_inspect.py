"""`moeaudit inspect`: save_pretrained round trips for every family, and each user error is one line."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import torch

from moeaudit.models import wrap_model
from moeaudit.models.testing import FAMILIES, tiny_config, tiny_model
from tests.conftest import HANG_GUARD_S, one_line_error


@pytest.mark.parametrize("family", FAMILIES)
def test_inspect_round_trip(family, tmp_path, cli):
    model = tiny_model(family, seed=1)
    model.save_pretrained(tmp_path)
    expected = wrap_model(model)
    code, out, err = cli("inspect", str(tmp_path), "--json")
    assert code == 0, err
    d = json.loads(out)
    assert d["family"] == expected.family
    assert [row["layer"] for row in d["moe_layers"]] == expected.moe_layer_indices
    for row, layer in zip(d["moe_layers"], expected.layers):
        assert (row["num_experts"], row["top_k"], row["num_shared"], row["routing_rule"]) == (
            layer.num_experts, layer.top_k, layer.num_shared, layer.routing_rule)
    assert d["parameters"]["total"] == sum(p.numel() for p in model.parameters())
    assert d["dtype"] == "float32"
    code, out, _ = cli("inspect", str(tmp_path))
    assert code == 0 and "MoE layers" in out and expected.layers[0].routing_rule in out


def test_inspect_known_layouts(tmp_path, cli):
    tiny_model("deepseek_v2_grouped").save_pretrained(tmp_path / "ds")
    tiny_model("qwen2_moe").save_pretrained(tmp_path / "qw")
    _, out, _ = cli("inspect", str(tmp_path / "ds"), "--json")
    d = json.loads(out)
    assert d["dense_layers"] == [0] and d["moe_layers"][0]["layer"] == 1
    assert d["moe_layers"][0]["num_shared"] == 2 and not d["moe_layers"][0]["shared_gated"]
    assert d["moe_layers"][0]["routing_rule"] == "softmax_group_limited_scaled"
    _, out, _ = cli("inspect", str(tmp_path / "qw"), "--json")
    d = json.loads(out)
    assert d["dense_layers"] == [1] and d["moe_layers"][0]["shared_gated"]


def save_config_only(path, config):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)


def test_dense_model_refused(tmp_path, cli):
    from transformers import LlamaConfig

    save_config_only(tmp_path, LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                           num_attention_heads=2, num_key_value_heads=2))
    code, _, err = cli("inspect", str(tmp_path))
    one_line_error(code, err, "no MoE layers found in", "(LlamaForCausalLM)", "supported families: olmoe")


def test_qwen2_moe_without_experts_is_dense(tmp_path, cli):
    tiny_model("qwen2_moe", mlp_only_layers=[0, 1, 2]).save_pretrained(tmp_path)
    code, _, err = cli("inspect", str(tmp_path))
    one_line_error(code, err, "no MoE layers found in")


def test_unsupported_moe_family_refused(tmp_path, cli):
    from transformers import DogeConfig  # Doge's product-key routing reads later tokens (not adapted)

    save_config_only(tmp_path, DogeConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                          num_attention_heads=2, num_key_value_heads=2, is_moe=True, num_experts=16,
                                          num_experts_per_tok=2))
    code, _, err = cli("inspect", str(tmp_path))
    one_line_error(code, err, "'doge' MoE model", "does not adapt yet", "(product-key expert selection",
                   "supported families", "inspect --supported")


def test_supported_lists_every_family_with_its_status(cli):
    from transformers import CONFIG_MAPPING

    from moeaudit.models.registry import ADAPTERS, GENERIC_FAMILIES, UNSUPPORTED_MOE

    code, out, _ = cli("inspect", "--supported", "--json")
    assert code == 0
    rows = {row["model_type"]: row for row in json.loads(out)}
    adapted = {mt for cls in ADAPTERS for mt in cls.model_types if mt in CONFIG_MAPPING}
    adapted |= {mt for mt in GENERIC_FAMILIES if mt in CONFIG_MAPPING}
    assert rows["hy_v3"]["note"].startswith("generic adapter: ")
    assert {mt for mt, row in rows.items() if row["status"] == "adapted"} == adapted
    assert {"deepseek_v3", "glm4_moe", "minimax_m2", "ernie4_5_moe", "qwen3_next"} <= adapted
    assert rows["kimi_k2"]["status"] == "alias" and "deepseek_v3" in rows["kimi_k2"]["note"]
    assert rows["doge"] == dict(model_type="doge", status="refused", note=UNSUPPORTED_MOE["doge"])
    assert rows["phimoe"]["status"] == rows["llama4"]["status"] == "adapted"
    assert not adapted & set(UNSUPPORTED_MOE)  # a family is adapted or refused, never both
    code, out, _ = cli("inspect", "--supported")
    assert code == 0 and "deepseek_v3" in out and "product-key" in out
    code, _, err = cli("inspect")
    one_line_error(code, err, "MODEL is missing", "--supported")


def test_remote_code_only_refused(tmp_path, cli):
    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": "deepseek", "architectures": ["DeepseekForCausalLM"],
        "auto_map": {"AutoConfig": "configuration_deepseek.DeepseekConfig",
                     "AutoModelForCausalLM": "modeling_deepseek.DeepseekForCausalLM"}}))
    code, _, err = cli("inspect", str(tmp_path))
    one_line_error(code, err, "needs trust_remote_code", "never runs")


def test_missing_path_refused(tmp_path, cli):
    code, _, err = cli("inspect", str(tmp_path / "nope"))
    one_line_error(code, err, "no such directory", "nope")
    (tmp_path / "empty").mkdir()
    code, _, err = cli("inspect", str(tmp_path / "empty"))
    one_line_error(code, err, "no config.json in")


def test_layer_out_of_range(tmp_path, cli):
    tiny_model("deepseek_v2").save_pretrained(tmp_path)
    code, _, err = cli("inspect", str(tmp_path), "--layers", "0")
    one_line_error(code, err, "`layer` must be an MoE layer index, one of [1, 2]", "got 0")
    code, _, err = cli("inspect", str(tmp_path), "--layers", "x")
    one_line_error(code, err, "`--layers` must be a comma-separated list")


def test_bad_dtype_refused(tmp_path, cli):
    tiny_model("olmoe").save_pretrained(tmp_path)
    code, _, err = cli("inspect", str(tmp_path), "--dtype", "fp8")
    one_line_error(code, err, "`dtype` must be one of float32, bfloat16, float16")


@pytest.mark.slow
def test_hub_without_network_is_one_line(tmp_path):
    """A real process: the hub id cannot be reached (offline mode), one line on stderr, exit 2."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"), TRANSFORMERS_VERBOSITY="error")
    proc = subprocess.run([sys.executable, "-m", "moeaudit", "inspect", "allenai/OLMoE-1B-7B-0924"],
                          capture_output=True, text=True, env=env, timeout=HANG_GUARD_S)
    one_line_error(proc.returncode, proc.stderr, "could not reach the model hub for allenai/OLMoE-1B-7B-0924",
                   "pass a local directory")


@pytest.mark.slow
def test_version_and_help():
    proc = subprocess.run([sys.executable, "-m", "moeaudit", "--version"], capture_output=True, text=True,
                          timeout=HANG_GUARD_S)
    assert proc.returncode == 0 and proc.stdout.strip() == "moeaudit 0.1.0"


def test_contract_violation_is_refused():
    """A router that returns probabilities instead of logits must be caught at load, not produce numbers."""
    from moeaudit.errors import ContractError

    model = tiny_model("olmoe")
    router = model.model.layers[0].mlp.gate
    original = type(router).forward

    def probs_first(self, hidden):
        logits, weights, idx = original(self, hidden)
        return torch.softmax(logits, dim=-1), weights, idx

    router.forward = probs_first.__get__(router)
    with pytest.raises(ContractError, match="not its raw logits"):
        wrap_model(model)
    assert tiny_config("olmoe").num_experts == 8


@pytest.mark.parametrize("family", ["olmoe", "qwen2_moe"])  # without and with a gated shared expert
def test_a_block_that_transforms_its_output_is_refused(family):
    """Planted: the MoE block's output scaled by 0.5 after the experts (as an output scale or a latent
    projection would) — the hooks would edit a routed part that does not enter the residual as is."""
    from moeaudit.errors import ContractError

    model = tiny_model(family)
    model.model.layers[0].mlp.register_forward_hook(lambda module, args, output: output * 0.5)
    with pytest.raises(ContractError, match="not its experts' weighted sum plus its shared experts"):
        wrap_model(model)


def test_query_command_refuses_writes_in_one_line(tmp_path, cli):
    from tests.report.conftest import make_run

    run = make_run(tmp_path / "run")
    before = (run / "tests.parquet").read_bytes()
    code, _, err = cli("query", str(run), f"COPY (SELECT 1 AS a) TO '{run / 'tests.parquet'}' (USE_TMP_FILE false)")
    one_line_error(code, err, "read-only statements", "got COPY", "--allow-external")
    assert (run / "tests.parquet").read_bytes() == before
    code, out, err = cli("query", str(run), "SELECT count(*) AS n FROM tests")
    assert code == 0 and re.findall(r"│ +(\d+) │", out) not in ([], ["0"]), err
