"""Downstream evaluation: lm-eval on an exported pruned checkpoint, offline, with a task defined here.

The accuracy lm-eval reports is recomputed by brute force (one plain ``transformers`` forward per choice,
tokenised the way lm-eval's HFLM does), the checkpoint path is shown to matter (pruned ≠ unpruned), and
nothing reaches the network: offline mode is on and every socket connect is refused and recorded.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch

from moeaudit.errors import CorpusError, InvalidParameterError, ModelLoadError, MoeAuditError
from moeaudit.models import builtin
from moeaudit.prune import evaluate_downstream, export_pruned
from moeaudit.prune.downstream import DOWNSTREAM_COLUMNS

from tests.cli.conftest import cli  # noqa: F401  (the shared in-process CLI fixture)
from tests.conftest import HANG_GUARD_S, one_line_error

pytestmark = [
    pytest.mark.slow,  # end-to-end: deselected by -m "not slow"
    pytest.mark.skipif(not (builtin.builtin_path("tiny-olmoe") / "model.safetensors").exists(),
                       reason="built-in model weights not present"),
]

TASK = "tiny_mc"
KEEP = 24  # of the 32 routed experts per MoE layer

#: Eight multiple-choice documents; targets are fixed by hand, not by what the tiny model prefers.
DOCS = [
    {"question": "The sun rises in the", "choices": ["east", "west", "north"], "label": 0},
    {"question": "Water freezes at zero degrees", "choices": ["Celsius", "Fahrenheit", "Kelvin", "Rankine"],
     "label": 0},
    {"question": "A cat is a kind of", "choices": ["animal", "vegetable", "mineral"], "label": 0},
    {"question": "Two plus two equals", "choices": ["three", "four", "five"], "label": 1},
    {"question": "The opposite of hot is", "choices": ["warm", "cold", "bright", "loud"], "label": 1},
    {"question": "People read books in the", "choices": ["library", "ocean", "sky"], "label": 0},
    {"question": "The colour of grass is", "choices": ["blue", "red", "green"], "label": 2},
    {"question": "Bread is made from", "choices": ["stone", "wood", "flour", "glass"], "label": 2},
]

TASK_YAML = """\
task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: choices
doc_to_target: label
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


def _offline(mp: pytest.MonkeyPatch, hub_offline: bool = True) -> list:
    """Every name lookup and connect refused (and recorded); with ``hub_offline``, Hub offline mode on too
    (the environment, and the constants that huggingface_hub and datasets read at import).

    Returns the list that collects attempted addresses; a test asserts it stays empty.
    """
    if hub_offline:
        import datasets.config
        import huggingface_hub.constants

        for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
            mp.setenv(name, "1")
        mp.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        mp.setattr(datasets.config, "HF_HUB_OFFLINE", True)
        mp.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    attempts: list = []

    def refuse(*args, **kwargs):
        attempts.append(args[:2])
        raise OSError("test: network access refused")

    # DNS first: without network a lookup fails before any connect, so a connect guard alone sees nothing.
    mp.setattr(socket, "getaddrinfo", refuse)
    mp.setattr(socket.socket, "connect", refuse)
    mp.setattr(socket.socket, "connect_ex", refuse)
    return attempts


@pytest.fixture
def offline(monkeypatch):
    attempts = _offline(monkeypatch)
    yield
    assert attempts == [], f"network access attempted: {attempts}"


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """The built-in tiny OLMoE exported twice: with 24 of 32 experts per layer, and with all 32."""
    import moeaudit

    root = tmp_path_factory.mktemp("downstream")
    moe = moeaudit.load_model("tiny-olmoe")
    assert moe.tokenizer is not None  # export_pruned saves it, and HFLM needs it
    rng = np.random.default_rng(7)
    kept = {layer.layer: sorted(rng.choice(layer.num_experts, KEEP, replace=False).tolist()) for layer in moe.layers}
    export_pruned(moe, kept, root / "pruned")
    export_pruned(moe, {layer.layer: list(range(layer.num_experts)) for layer in moe.layers}, root / "full")
    return root / "pruned", root / "full"


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    """A directory with one local multiple-choice task YAML whose documents live in a JSONL file."""
    root = tmp_path_factory.mktemp("tasks")
    data = root / "docs.jsonl"
    data.write_text("".join(json.dumps(doc) + "\n" for doc in DOCS))
    tasks = root / "yaml"
    tasks.mkdir()
    (tasks / f"{TASK}.yaml").write_text(TASK_YAML.format(task=TASK, data=data))
    return tasks


@pytest.fixture(scope="module")
def pruned_result(checkpoints, task_dir):
    with pytest.MonkeyPatch.context() as mp:
        attempts = _offline(mp)
        result = evaluate_downstream(checkpoints[0], [TASK], include_path=task_dir)
    assert attempts == [], f"network access attempted: {attempts}"
    return result


def lm_eval_loglikelihoods(result) -> np.ndarray:
    """Per-document, per-choice log-likelihoods from lm-eval's logged samples (doc order, NaN-padded)."""
    samples = sorted(result.raw["samples"][TASK], key=lambda s: s["doc_id"])
    out = np.full((len(samples), 4), np.nan)
    for row, sample in enumerate(samples):
        for col, (loglikelihood, _is_greedy) in enumerate(sample["filtered_resps"]):
            out[row, col] = loglikelihood
    return out


def brute_force_loglikelihoods(checkpoint) -> np.ndarray:
    """Summed log-probability of each choice given its context, with a plain transformers forward.

    Tokenised as lm-eval's HFLM does for a causal model: the context is ``doc_to_text``, the continuation
    is the target delimiter " " plus the choice; ``context + continuation`` is encoded whole and split
    where the encoding of the context alone ends; the tokens after that are scored.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    out = np.full((len(DOCS), 4), np.nan)
    for row, doc in enumerate(DOCS):
        context = f"Question: {doc['question']}\nAnswer:"
        context_ids = tokenizer(context)["input_ids"]
        for col, choice in enumerate(doc["choices"]):
            whole = tokenizer(context + " " + choice)["input_ids"]
            continuation = whole[len(context_ids):]
            assert continuation
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([whole[:-1]])).logits[0]
            log_probs = torch.log_softmax(logits.float(), dim=-1)[len(context_ids) - 1:]
            out[row, col] = float(log_probs.gather(1, torch.tensor(continuation)[:, None]).sum())
    return out


def test_accuracy_equals_brute_force(pruned_result, checkpoints):
    table = pruned_result.table
    assert list(table.columns) == list(DOWNSTREAM_COLUMNS)
    row = table[(table.task == TASK) & (table.metric == "acc")]
    assert len(row) == 1 and row.iloc[0]["filter"] == "none" and row.iloc[0]["n"] == len(DOCS)
    brute = brute_force_loglikelihoods(checkpoints[0])
    np.testing.assert_allclose(lm_eval_loglikelihoods(pruned_result), brute, atol=1e-4, rtol=0)
    predicted = np.nanargmax(brute, axis=1)
    accuracy = float(np.mean(predicted == np.array([doc["label"] for doc in DOCS])))
    assert row.iloc[0]["value"] == accuracy
    expected_stderr = np.std(predicted == np.array([d["label"] for d in DOCS]), ddof=1) / np.sqrt(len(DOCS))
    assert row.iloc[0]["stderr"] == pytest.approx(expected_stderr)
    assert pruned_result.checkpoint == checkpoints[0].resolve() and pruned_result.tasks == (TASK,)


def test_pruned_checkpoint_is_what_gets_evaluated(pruned_result, checkpoints, task_dir, offline):
    full = evaluate_downstream(checkpoints[1], [TASK], include_path=task_dir, limit=4)
    pruned = lm_eval_loglikelihoods(pruned_result)[:4]
    unpruned = lm_eval_loglikelihoods(full)
    assert unpruned.shape == (4, 4) and full.table.loc[0, "n"] == 4
    finite = ~np.isnan(pruned)
    assert np.abs(pruned[finite] - unpruned[finite]).max() > 1e-3  # dropping 8 experts changes every score
    np.testing.assert_allclose(unpruned, brute_force_loglikelihoods(checkpoints[1])[:4], atol=1e-4, rtol=0)


def test_relative_checkpoint_path_never_reaches_the_hub(checkpoints, task_dir, monkeypatch):
    # lm-eval looks the model up on the Hub (HfApi().model_info(repo_id=pretrained)) for its result
    # metadata; a relative path such as "pruned" is a valid repo id and was looked up. Hub offline mode is
    # left off here so that only the path handling keeps the lookup from happening.
    attempts = _offline(monkeypatch, hub_offline=False)
    monkeypatch.chdir(checkpoints[0].parent)
    result = evaluate_downstream(checkpoints[0].name, [TASK], include_path=task_dir, limit=1)
    assert attempts == [] and result.table.loc[0, "n"] == 1


def test_cli_evaluate_writes_the_table(checkpoints, task_dir, tmp_path, cli, offline):  # noqa: F811
    out = tmp_path / "results.json"
    code, stdout, err = cli("evaluate", str(checkpoints[0]), "--tasks", TASK, "--include-path", str(task_dir),
                            "--limit", "3", "--out", str(out))
    assert code == 0, err
    assert TASK in stdout and "acc" in stdout and str(out) in stdout
    records = json.loads(out.read_text())
    assert [(r["task"], r["metric"], r["n"]) for r in records] == [(TASK, "acc", 3)]
    assert 0.0 <= records[0]["value"] <= 1.0
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary file left behind


def test_write_table_parquet(pruned_result, tmp_path):
    from moeaudit.cli.evaluate import write_table

    write_table(pruned_result.table, tmp_path / "r.parquet")
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "r.parquet"), pruned_result.table)


def test_cli_missing_checkpoint_is_one_line(tmp_path, cli):  # noqa: F811
    code, _, err = cli("evaluate", str(tmp_path / "nope"), "--tasks", TASK)
    one_line_error(code, err, "does not exist", "export")


def test_cli_unknown_task_is_one_line(checkpoints, task_dir, cli, offline):  # noqa: F811
    code, _, err = cli("evaluate", str(checkpoints[0]), "--tasks", "tiny_mcq", "--include-path", str(task_dir))
    one_line_error(code, err, "'tiny_mcq'", "did you mean tiny_mc", "--include-path")


def test_cli_bad_out_suffix_is_one_line(checkpoints, tmp_path, cli):  # noqa: F811
    code, _, err = cli("evaluate", str(checkpoints[0]), "--tasks", TASK, "--out", str(tmp_path / "r.csv"))
    one_line_error(code, err, "--out", ".json or .parquet")


@pytest.mark.parametrize("kwargs, fragment", [
    (dict(tasks=[]), "`tasks`"),
    (dict(tasks=[TASK, TASK]), "distinct"),
    (dict(limit=0), "`limit`"),
    (dict(batch_size=0), "`batch_size`"),
    (dict(dtype="float64"), "`dtype` must be one of float32, bfloat16, float16"),
    (dict(num_fewshot=-1), "`num_fewshot`"),
    (dict(device="gpu"), "`device`"),
    (dict(include_path="/nonexistent/tasks"), "`include_path` must be a directory"),
])
def test_bad_values_are_refused(checkpoints, task_dir, kwargs, fragment):
    arguments = dict(tasks=[TASK], include_path=task_dir) | kwargs
    with pytest.raises(InvalidParameterError) as err:
        evaluate_downstream(checkpoints[0], **arguments)
    assert fragment in str(err.value) and "\n" not in str(err.value)


def test_checkpoint_without_tokenizer_is_refused(checkpoints, tmp_path, task_dir):
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "config.json").write_text((checkpoints[0] / "config.json").read_text())
    with pytest.raises(ModelLoadError, match="no tokenizer files"):
        evaluate_downstream(bare, [TASK], include_path=task_dir)
    with pytest.raises(ModelLoadError, match="no config.json"):
        evaluate_downstream(tmp_path, [TASK], include_path=task_dir)


def test_missing_task_data_is_one_line(checkpoints, tmp_path, offline):
    tasks = tmp_path / "yaml"
    tasks.mkdir()
    (tasks / "gone.yaml").write_text(TASK_YAML.format(task="gone", data=tmp_path / "missing.jsonl"))
    with pytest.raises(CorpusError) as err:
        evaluate_downstream(checkpoints[0], ["gone"], include_path=tasks)
    message = str(err.value)
    assert "missing.jsonl" in message and "data_files" in message and "\n" not in message


def test_missing_extra_names_the_install(checkpoints, task_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval.models.huggingface", None)  # as if accelerate were missing
    with pytest.raises(MoeAuditError) as err:
        evaluate_downstream(checkpoints[0], [TASK], include_path=task_dir)
    message = str(err.value)
    assert 'pip install "moeaudit[eval]"' in message and "\n" not in message


def test_package_import_does_not_load_lm_eval():
    code = "import sys, moeaudit.prune, moeaudit.cli; assert 'lm_eval' not in sys.modules, 'lm_eval imported'"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=HANG_GUARD_S)


# --- lm-eval's own files, model arguments, chat template, and the comparison with a baseline (issue 18) ---

PPL_TASK = "tiny_ppl"

#: A rolling log-likelihood task on the same documents: continuous metrics (perplexities), so a pruned model
#: and its unpruned source differ measurably where accuracy on a few documents may tie.
PPL_YAML = """\
task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{question}}}}"
metric_list:
  - metric: word_perplexity
    aggregation: weighted_perplexity
    higher_is_better: false
  - metric: byte_perplexity
    aggregation: weighted_perplexity
    higher_is_better: false
  - metric: bits_per_byte
    aggregation: bits_per_byte
    higher_is_better: false
"""

CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


@pytest.fixture(scope="module")
def ppl_task_dir(task_dir):
    """``task_dir``'s multiple-choice task and a perplexity task over the same documents."""
    tasks = task_dir.parent / "yaml_ppl"
    tasks.mkdir(exist_ok=True)
    (tasks / f"{TASK}.yaml").write_text((task_dir / f"{TASK}.yaml").read_text())
    (tasks / f"{PPL_TASK}.yaml").write_text(PPL_YAML.format(task=PPL_TASK, data=task_dir.parent / "docs.jsonl"))
    return tasks


@pytest.fixture(scope="module")
def chat_checkpoint(checkpoints, tmp_path_factory):
    """The pruned checkpoint with a chat template in its tokenizer_config.json."""
    import shutil

    root = tmp_path_factory.mktemp("chat") / "pruned-chat"
    shutil.copytree(checkpoints[0], root)
    config = json.loads((root / "tokenizer_config.json").read_text())
    config["chat_template"] = CHAT_TEMPLATE
    (root / "tokenizer_config.json").write_text(json.dumps(config))
    return root


def test_output_path_writes_lm_eval_results_json(checkpoints, task_dir, tmp_path, offline):
    from lm_eval.utils import get_results_filenames, sanitize_model_name

    result = evaluate_downstream(checkpoints[0], [TASK], include_path=task_dir, limit=3,
                                 output_path=tmp_path / "results")
    written = result.results_file
    # where `lm-eval run --output_path DIR` files it: DIR/<sanitized model name>/results_<date>.json
    assert written.parent == tmp_path / "results" / sanitize_model_name(str(checkpoints[0].resolve()))
    assert get_results_filenames([str(written)]) == [str(written)] and result.sample_files == ()
    saved = json.loads(written.read_text())
    for key in ("results", "configs", "versions", "n-shot", "config", "n-samples", "higher_is_better",
                "task_hashes", "model_name", "total_evaluation_time_seconds"):
        assert key in saved, key
    assert "samples" not in saved and saved["task_hashes"] == {}  # samples only with log_samples
    assert saved["results"][TASK]["acc,none"] == result.table.loc[0, "value"]
    assert saved["n-samples"][TASK]["effective"] == 3 and saved["config"]["limit"] == 3
    assert saved["config"]["model_args"]["pretrained"] == str(checkpoints[0].resolve())
    assert saved["configs"][TASK]["task"] == TASK
    assert "samples" in result.raw  # what evaluate_downstream returns keeps them


def test_output_path_json_name(checkpoints, task_dir, tmp_path, offline):
    result = evaluate_downstream(checkpoints[0], [TASK], include_path=task_dir, limit=1,
                                 output_path=tmp_path / "run.json", log_samples=True)
    assert result.results_file.parent == tmp_path and result.results_file.name.startswith("run_")
    assert [p.parent for p in result.sample_files] == [tmp_path]
    assert json.loads(result.results_file.read_text())["results"][TASK]["acc,none"] in (0.0, 1.0)


def test_cli_log_samples_writes_samples(checkpoints, task_dir, tmp_path, cli, offline):  # noqa: F811
    from lm_eval.utils import get_sample_results_filenames

    code, stdout, err = cli("evaluate", str(checkpoints[0]), "--tasks", TASK, "--include-path", str(task_dir),
                            "--limit", "2", "--output-path", str(tmp_path / "out"), "--log-samples")
    assert code == 0, err
    results = sorted((tmp_path / "out").rglob("results_*.json"))
    samples = sorted((tmp_path / "out").rglob(f"samples_{TASK}_*.jsonl"))
    assert len(results) == 1 and len(samples) == 1
    assert get_sample_results_filenames([str(samples[0])]) == [str(samples[0])]
    lines = [json.loads(line) for line in samples[0].read_text().splitlines()]
    assert sorted(line["doc_id"] for line in lines) == [0, 1]
    assert all(len(line["filtered_resps"]) == len(DOCS[line["doc_id"]]["choices"]) for line in lines)
    assert lines[0]["doc"]["question"] == DOCS[lines[0]["doc_id"]]["question"]
    saved = json.loads(results[0].read_text())
    assert set(saved["task_hashes"]) == {TASK}  # lm-eval hashes the logged samples into the results file
    assert "".join(stdout.split()).find("".join(str(samples[0]).split())) >= 0  # the note names the file


def test_cli_log_samples_needs_output_path(checkpoints, cli):  # noqa: F811
    code, _, err = cli("evaluate", str(checkpoints[0]), "--tasks", TASK, "--log-samples")
    one_line_error(code, err, "--log-samples", "--output-path")


def test_log_samples_needs_output_path(checkpoints, task_dir):
    with pytest.raises(InvalidParameterError, match="output_path"):
        evaluate_downstream(checkpoints[0], [TASK], include_path=task_dir, log_samples=True)


def _recording_hflm(monkeypatch) -> list:
    """Replace lm-eval's HFLM with a subclass that records each created model and its arguments."""
    import lm_eval.models.huggingface as huggingface

    created: list = []

    class RecordingHFLM(huggingface.HFLM):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            created.append((self, kwargs))

    monkeypatch.setattr(huggingface, "HFLM", RecordingHFLM)
    return created


def test_cli_model_args_reach_lm_eval_model(checkpoints, task_dir, tmp_path, cli, monkeypatch,  # noqa: F811
                                            offline):
    created = _recording_hflm(monkeypatch)
    code, _, err = cli("evaluate", str(checkpoints[0]), "--tasks", TASK, "--include-path", str(task_dir),
                       "--limit", "1", "--model-args", "max_length=48,logits_cache=False,revision=main",
                       "--output-path", str(tmp_path / "out"))
    assert code == 0, err
    assert len(created) == 1
    model, kwargs = created[0]
    assert model.max_length == 48 and model.logits_cache is False  # cast as lm-eval casts --model_args
    assert kwargs["pretrained"] == str(checkpoints[0].resolve()) and kwargs["dtype"] == "float32"
    assert model.model.dtype == torch.float32
    saved = json.loads(next((tmp_path / "out").rglob("results_*.json")).read_text())
    assert saved["config"]["model_args"]["max_length"] == 48


def test_model_args_dict_sets_the_model(checkpoints, task_dir, monkeypatch, offline):
    created = _recording_hflm(monkeypatch)
    evaluate_downstream(checkpoints[0], [TASK], include_path=task_dir, limit=1,
                        model_args={"max_length": 40, "trust_remote_code": False})
    assert created[0][0].max_length == 40


@pytest.fixture
def no_hflm(monkeypatch):
    """Fail the test if lm-eval builds a model (every refusal below comes before one loads)."""
    import lm_eval.models.huggingface as huggingface

    def never(**kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(huggingface, "HFLM", never)


@pytest.mark.parametrize("model_args, fragment", [
    ("pretrained=gpt2", "pretrained"),
    ("dtype=float16", "--dtype"),
    ("device=cuda", "--device"),
    ("batch_size=8", "--batch-size"),
    ("tokenizer=gpt2", "tokenizer"),
    ("trust_remote_code=True", "trust_remote_code"),
    ("max_length", "key=value"),
    ("max_length=1,max_length=2", "each key once"),
])
def test_cli_bad_model_args_refused_before_loading(checkpoints, task_dir, cli, no_hflm,  # noqa: F811
                                                   model_args, fragment):
    code, _, err = cli("evaluate", str(checkpoints[0]), "--tasks", TASK, "--include-path", str(task_dir),
                       "--model-args", model_args)
    one_line_error(code, err, "`model_args`", fragment)


def test_cli_chat_template_reaches_simple_evaluate(chat_checkpoint, task_dir, tmp_path, monkeypatch, offline,
                                                   cli):  # noqa: F811
    import lm_eval.evaluator as evaluator

    calls: list = []
    real = evaluator.simple_evaluate

    def recording(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(evaluator, "simple_evaluate", recording)
    code, _, err = cli("evaluate", str(chat_checkpoint), "--tasks", TASK, "--include-path", str(task_dir),
                       "--limit", "2", "--apply-chat-template", "--output-path", str(tmp_path / "out"),
                       "--log-samples")
    assert code == 0, err
    assert [c["apply_chat_template"] for c in calls] == [True]
    samples = next((tmp_path / "out").rglob(f"samples_{TASK}_*.jsonl")).read_text().splitlines()
    contexts = [json.loads(line)["arguments"]["gen_args_0"]["arg_0"] for line in samples]
    assert all(c.startswith("<|user|>Question: ") and c.endswith("<|assistant|>") for c in contexts), contexts
    saved = json.loads(next((tmp_path / "out").rglob("results_*.json")).read_text())
    assert saved["chat_template"] == CHAT_TEMPLATE  # lm-eval records the template it applied

    calls.clear()
    code, _, err = cli("evaluate", str(chat_checkpoint), "--tasks", TASK, "--include-path", str(task_dir),
                       "--limit", "1")
    assert code == 0, err
    assert [c["apply_chat_template"] for c in calls] == [False]


def test_cli_chat_template_without_one_is_refused(checkpoints, task_dir, cli):  # noqa: F811
    code, _, err = cli("evaluate", str(checkpoints[0]), "--tasks", TASK, "--include-path", str(task_dir),
                       "--apply-chat-template")
    one_line_error(code, err, "`apply_chat_template`", "chat template")


def test_cli_baseline_comparison_table(checkpoints, ppl_task_dir, tmp_path, cli, offline):  # noqa: F811
    # The baseline is the built-in model the pruned checkpoint was exported from (its unpruned source).
    out = tmp_path / "comparison.json"
    code, stdout, err = cli("evaluate", str(checkpoints[0]), "--tasks", f"{TASK},{PPL_TASK}", "--include-path",
                            str(ppl_task_dir), "--limit", "4", "--baseline", "tiny-olmoe", "--out", str(out),
                            "--output-path", str(tmp_path / "lm_eval"))
    assert code == 0, err
    assert "baseline" in stdout and "difference" in stdout
    table = pd.DataFrame(json.loads(out.read_text()))
    from moeaudit.tables import DOWNSTREAM_COMPARISON_COLUMNS

    assert list(table.columns) == list(DOWNSTREAM_COMPARISON_COLUMNS)
    assert set(zip(table.task, table.metric)) == {(TASK, "acc"), (PPL_TASK, "word_perplexity"),
                                                  (PPL_TASK, "byte_perplexity"), (PPL_TASK, "bits_per_byte")}
    # (--out JSON keeps 10 significant digits)
    np.testing.assert_allclose(table.difference, table.pruned - table.baseline, rtol=1e-8, atol=1e-9)
    # each column is that model's own evaluation: the baseline equals the all-experts export, pruned the pruned
    keys = ["task", "metric", "filter"]
    for column, checkpoint in (("baseline", checkpoints[1]), ("pruned", checkpoints[0])):
        alone = evaluate_downstream(checkpoint, [TASK, PPL_TASK], include_path=ppl_task_dir, limit=4).table
        merged = table.merge(alone, on=keys)
        assert len(merged) == 4
        np.testing.assert_allclose(merged[column], merged["value"], rtol=1e-5)
        np.testing.assert_allclose(merged[f"{column}_stderr"].fillna(-1), merged["stderr"].fillna(-1), rtol=1e-5)
    ppl = table[table.metric == "bits_per_byte"].iloc[0]
    assert abs(ppl.difference) > 1e-4  # dropping 8 of 32 experts per layer changes the perplexity
    assert (table.n == 4).all()
    # both models' lm-eval results files, each under its own model name
    assert len(list((tmp_path / "lm_eval").rglob("results_*.json"))) == 2


def test_comparison_table_difference_is_pruned_minus_baseline():
    from moeaudit.prune.downstream import comparison_table

    base = pd.DataFrame(dict(task=["a", "a"], metric=["acc", "f1"], filter=["none", "none"], value=[0.5, 0.2],
                             stderr=[0.1, np.nan], n=pd.array([10, 10], dtype="Int64")))
    pruned = pd.DataFrame(dict(task=["a", "b"], metric=["acc", "acc"], filter=["none", "none"], value=[0.3, 0.9],
                               stderr=[0.2, 0.05], n=pd.array([10, 4], dtype="Int64")))
    table = comparison_table(base, pruned)
    row = table[table.metric.eq("acc") & table.task.eq("a")].iloc[0]
    assert row.difference == pytest.approx(-0.2) and row.baseline_stderr == 0.1 and row.pruned_stderr == 0.2
    only_base = table[table.metric.eq("f1")].iloc[0]
    assert np.isnan(only_base.pruned) and np.isnan(only_base.difference) and only_base.n == 10
    only_pruned = table[table.task.eq("b")].iloc[0]
    assert np.isnan(only_pruned.baseline) and only_pruned.pruned == 0.9 and only_pruned.n == 4


@pytest.mark.parametrize("baseline, fragments", [
    ("no-such-model", ("baseline directory", "does not exist", "built-in")),
    (None, ("`baseline`", "different")),  # the checkpoint itself
])
def test_cli_bad_baseline_refused_before_loading(checkpoints, task_dir, cli, no_hflm,  # noqa: F811
                                                 baseline, fragments):
    code, _, err = cli("evaluate", str(checkpoints[0]), "--tasks", TASK, "--include-path", str(task_dir),
                       "--baseline", baseline or str(checkpoints[0]))
    one_line_error(code, err, *fragments)


def test_output_path_that_is_a_file_is_refused(checkpoints, task_dir, tmp_path):
    (tmp_path / "taken").write_text("")
    with pytest.raises(InvalidParameterError, match="output_path"):
        evaluate_downstream(checkpoints[0], [TASK], include_path=task_dir, output_path=tmp_path / "taken")
