"""Bad input is one line before anything is written: devices, config files, lists, damaged manifests."""

from __future__ import annotations

import pytest
import torch

from moeaudit.models.loading import resolve_device
from tests.conftest import one_line_error

NO_MPS = not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())


@pytest.fixture
def no_model(monkeypatch):
    """Fail the test if any model's weights are loaded."""
    import moeaudit.models.loading as loading

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the input was checked")

    monkeypatch.setattr(loading, "model_from_config", refuse)


@pytest.mark.parametrize("device, fragment", [
    ("tpu9", "must be cpu, cuda, cuda:N, mps or auto; got 'tpu9'"),
    pytest.param("mps", "MPS is not available here", marks=pytest.mark.skipif(not NO_MPS, reason="has MPS")),
    pytest.param("cuda:3", "CUDA is not available here",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="has CUDA")),
])
def test_bad_device_is_one_line_and_writes_nothing(tmp_path, cli, device, fragment):
    code, _, err = cli("observe", str(tmp_path / "run"), "--model", "tiny-olmoe", "--device", device)
    one_line_error(code, err, fragment)
    assert not (tmp_path / "run").exists()


@pytest.mark.skipif(torch.cuda.is_available() or not NO_MPS, reason="an accelerator is present")
def test_auto_is_the_cpu_without_an_accelerator():
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")


@pytest.mark.parametrize("what, fragment", [
    ("directory", "is a directory, not a config file"),
    ("latin1", "is not UTF-8 text"),
])
def test_unreadable_config_file_is_one_line(tmp_path, cli, what, fragment):
    config = tmp_path / "cfg"
    if what == "directory":
        config.mkdir()
    else:
        config.write_bytes('model = "tiny-olmoe"\n# caf\xe9\n'.encode("latin-1"))
    code, _, err = cli("observe", str(tmp_path / "run"), "--config", str(config))
    one_line_error(code, err, fragment)
    assert not (tmp_path / "run").exists()


def test_unparsable_lists_are_one_line_before_anything_runs(tmp_path, cli):
    code, _, err = cli("observe", str(tmp_path / "run"), "--layers", ",")
    one_line_error(code, err, "`--layers` must be a comma-separated list of integers", "got ','")
    assert not (tmp_path / "run").exists()
    code, _, err = cli("prune", str(tmp_path / "run"), "--ratios", "a,b")  # checked before the run is read
    one_line_error(code, err, "`--ratios` must be a comma-separated list of numbers", "got 'a,b'")


@pytest.mark.parametrize("content", ["{not json", '{"created": 1}', '{"config": [1, 2]}', "\xff\xfe"])
def test_a_damaged_manifest_is_one_line_and_overwrite_replaces_it(tmp_path, cli, content):
    run = tmp_path / "run"
    run.mkdir()
    (run / "manifest.json").write_bytes(content.encode("latin-1"))
    for command in (["observe", str(run)], ["status", str(run)], ["report", str(run)]):
        code, _, err = cli(*command)
        one_line_error(code, err, "manifest.json", "remove the run directory or pass --overwrite")
    code, out, err = cli("observe", str(run), "--model", "tiny-olmoe", "--overwrite", "--max-windows", "1", "--quiet")
    assert code == 0, err
    assert '"config"' in (run / "manifest.json").read_text()


@pytest.mark.parametrize("command", [["table", "--what", "audit"], ["query", "SELECT count(*) FROM tokens"],
                                     ["report"]])
def test_a_damaged_table_is_named_with_the_stage_that_rebuilds_it(tmp_path, cli, command):
    from tests.report.conftest import make_run

    run = make_run(tmp_path / "run")
    data = (run / "tests.parquet").read_bytes()
    (run / "tests.parquet").write_bytes(data[: len(data) // 2])
    args = [command[0], str(run), *command[1:]]
    code, _, err = cli(*args)
    one_line_error(code, err, "the table tests.parquet", "is damaged", "re-run `moeaudit audit`")


def test_an_unknown_audit_metric_is_one_line_before_anything_runs(tmp_path, cli):
    config = tmp_path / "audit.toml"
    config.write_text('[audit]\naudit_metrics = ["reap", "nope"]\n')
    code, _, err = cli("run", "--out", str(tmp_path / "run"), "--model", "tiny-olmoe", "--config", str(config), "--quiet")
    one_line_error(code, err, "`audit.audit_metrics` must be registered metric names", "got 'nope'")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("flag, value", [("--workers", "3"), ("--address", "auto")])
def test_a_ray_setting_without_the_ray_executor_is_one_line(tmp_path, cli, flag, value):
    """``--workers 3`` without ``--executor ray`` used to be ignored without a word."""
    code, _, err = cli("run", "--out", str(tmp_path / "run"), "--model", "tiny-olmoe", flag, value, "--quiet")
    one_line_error(code, err, f"`{flag}` must be given with --executor ray", "drop the setting")
    assert not (tmp_path / "run").exists()


def test_a_ray_setting_inherited_from_an_old_run_is_dropped_not_refused(tmp_path):
    """A run created while ``--workers`` was silently ignored resumes; only a flag given now is refused."""
    from moeaudit.cli.common import resolve_config
    from moeaudit.config import AuditConfig
    from moeaudit.errors import InvalidParameterError
    from moeaudit.rundir import RunDir

    RunDir(tmp_path / "run", AuditConfig(model="tiny-olmoe", workers=3))
    config = resolve_config(tmp_path / "run", {}, None)  # an existing run: its stored model
    assert config.execution.workers is None and config.execution.executor == "local"
    with pytest.raises(InvalidParameterError, match="`--workers` must be given with --executor ray"):
        resolve_config(tmp_path / "run", {"workers": 3}, None)
    toml = tmp_path / "execution.toml"
    toml.write_text("[execution]\nworkers = 2\n")
    with pytest.raises(InvalidParameterError, match="`--workers` must be given with --executor ray"):
        resolve_config(tmp_path / "other", {}, toml)


def test_export_without_criterion_and_ratio_is_one_line_before_anything_loads(tmp_path, cli, no_model):
    code, out, err = cli("prune", str(tmp_path / "run"), "--export", str(tmp_path / "out"), "--ratio", "0.25")
    assert code == 2 and "`--export` must be given with --criterion and --ratio" in err
    assert not (tmp_path / "out").exists() and not (tmp_path / "run").exists()


def test_group_balanced_without_groups_is_one_line_before_anything_loads(tmp_path, cli, no_model):
    """`moeaudit prune RUN --group-balanced` on a model whose routing has no expert groups: refused from the
    manifest's record of the model, before it loads, and nothing is written."""
    from moeaudit.models.loading import model_record
    from tests.prune.conftest import make_moe, make_run, metrics_table

    moe = make_moe("olmoe")
    run = make_run(tmp_path, moe, metrics_table(moe))
    run.set("model", model_record(moe))
    code, out, err = cli("prune", str(run.path), "--group-balanced", "--ratios", "0.25")
    one_line_error(code, err, "`group_balanced` must be used with group-limited routing (n_group > 1)")
    assert not run.has("pruning")


def test_a_new_run_without_model_is_one_line_and_writes_nothing(tmp_path, cli):
    code, _, err = cli("observe", str(tmp_path / "run"), "--max-windows", "1")
    assert code == 2 and "`--model` is required for a new run directory" in err
    assert not (tmp_path / "run").exists()


def test_an_unknown_setting_suggests_the_closest_name(tmp_path, cli):
    config = tmp_path / "c.toml"
    config.write_text('[audit]\naudit_clustr = "none"\n')
    code, _, err = cli("run", "--out", str(tmp_path / "run"), "--model", "tiny-olmoe", "--config", str(config))
    assert code == 2 and "unknown setting `audit_clustr`; did you mean `audit_cluster`?" in err
    config.write_text('zzz = 1\n')  # nothing close: the allowed names
    code, _, err = cli("run", "--out", str(tmp_path / "run"), "--model", "tiny-olmoe", "--config", str(config))
    assert code == 2 and "unknown setting `zzz`; allowed settings are: model, corpus" in err
    assert not (tmp_path / "run").exists()


def test_push_to_hub_without_export_or_with_a_bad_repo_id_is_one_line_before_anything_loads(tmp_path, cli,
                                                                                            monkeypatch, no_model):
    import huggingface_hub

    def no_hub(*args, **kwargs):
        raise AssertionError("the hub was contacted")

    monkeypatch.setattr(huggingface_hub, "HfApi", no_hub)
    code, out, err = cli("prune", str(tmp_path / "run"), "--push-to-hub", "someone/pruned")
    assert code == 2 and "`--push-to-hub` must be given with --export DIR" in err and "someone/pruned" in err
    assert len(err.strip().splitlines()) == 1
    code, out, err = cli("prune", str(tmp_path / "run"), "--export", str(tmp_path / "out"), "--criterion", "reap",
                         "--ratio", "0.25", "--push-to-hub", "not a//repo")
    assert code == 2 and "`--push-to-hub` must be a hub repository id such as user/name" in err
    code, out, err = cli("prune", str(tmp_path / "run"), "--private")
    assert code == 2 and "`--private` must be given with --push-to-hub" in err
    assert not (tmp_path / "out").exists() and not (tmp_path / "run").exists()


def _write_jsonl(path, field="body", n=60):
    import json

    words = "the cat sat on a mat while dogs ran far away into green hills under a blue sky".split()
    with open(path, "w") as out:
        for i in range(n):
            text = " ".join(words[(i + j) % len(words)] for j in range(60))
            out.write(json.dumps({field: text, "topic": f"t{i % 3}"}) + "\n")
    return path


@pytest.mark.parametrize("command", ["observe", "run"])
@pytest.mark.parametrize("args, fragment", [
    (["--corpus", "nosuch.jsonl"], "corpus file 'nosuch.jsonl' does not exist"),
    (["--corpus", "{jsonl}"], "line 1 has no 'text' field (has ['body', 'topic']); add it or name the field with "
                              "--text-field"),
    (["--text-field", "body"], "`text_field` must be unset for the corpus 'builtin'"),
    (["--max-len", "100000"], "`max_len` must be at most the model's context length, 256 tokens"),
    (["--corpus", "{jsonl}", "--text-field", "body", "--max-windows", "1", "--set", "observe_splits=['train']"],
     "observe_splits ['train'] leave out calibration and heldout"),
])
def test_a_bad_corpus_is_one_line_before_the_model_loads_and_writes_nothing(tmp_path, cli, no_model, command, args,
                                                                            fragment):
    args = [a.replace("{jsonl}", str(_write_jsonl(tmp_path / "c.jsonl"))) for a in args]
    where = [str(tmp_path / "run")] if command == "observe" else ["--out", str(tmp_path / "run")]
    code, _, err = cli(command, *where, "--model", "tiny-olmoe", *args)
    one_line_error(code, err, fragment)
    assert not (tmp_path / "run").exists()


def test_text_and_domain_fields_are_read_from_the_flag_the_set_option_and_toml(tmp_path, cli):
    import pandas as pd

    from moeaudit.rundir import RunDir

    corpus = _write_jsonl(tmp_path / "c.jsonl")
    code, _, err = cli("observe", str(tmp_path / "a"), "--model", "tiny-olmoe", "--corpus", str(corpus),
                       "--text-field", "body", "--set", "domain_field=topic", "--quiet")
    assert code == 0, err
    windows = pd.read_parquet(tmp_path / "a" / "windows.parquet")
    assert set(windows["domain"]) <= {"t0", "t1", "t2"} and len(windows) > 0
    assert RunDir(tmp_path / "a").config.text_field == "body"
    toml = tmp_path / "c.toml"
    toml.write_text(f'model = "tiny-olmoe"\ncorpus = "{corpus}"\n[observe]\ntext_field = "body"\n'
                    'domain_field = "topic"\n')
    code, _, err = cli("observe", str(tmp_path / "b"), "--config", str(toml), "--quiet")
    assert code == 0, err
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "b" / "windows.parquet"), windows)
    # a run made with a field is resumed with it, not re-read with the default field
    code, _, err = cli("observe", str(tmp_path / "a"), "--quiet")
    assert code == 0, err


def test_run_pipeline_checks_the_corpus_before_loading_the_model(tmp_path, no_model):
    from moeaudit import AuditConfig, RunDir, run_pipeline
    from moeaudit.errors import CorpusError

    run = RunDir(tmp_path / "run", AuditConfig(model="tiny-olmoe", corpus=str(tmp_path / "nosuch.jsonl")))
    with pytest.raises(CorpusError, match="does not exist"):
        run_pipeline(run)
