"""``moeaudit prune RUN --export DIR --push-to-hub REPO``: export, then upload through ``HfApi`` (mocked; no
network); a hub failure is one line and the export stays on disk."""

from __future__ import annotations

import json

import pytest

from tests.prune.conftest import make_moe, make_run, metrics_table


@pytest.fixture
def run_dir(tmp_path, monkeypatch):
    """A run with expert metrics of the tiny OLMoE, which the CLI's model loading returns."""
    import moeaudit.models.loading as loading

    moe = make_moe("olmoe")
    monkeypatch.setattr(loading, "model_from_config", lambda config: moe)
    return make_run(tmp_path, moe, metrics_table(moe)).path


@pytest.fixture
def calls(monkeypatch):
    """``HfApi`` calls recorded; ``calls.fail`` set to an exception makes ``create_repo`` raise it."""
    import huggingface_hub

    class Api:
        log: list = []
        fail = None

        def __init__(self, token=None):
            pass

        def create_repo(self, repo_id, **kwargs):
            Api.log.append(("create_repo", repo_id, kwargs))
            if Api.fail is not None:
                raise Api.fail

        def upload_folder(self, **kwargs):
            Api.log.append(("upload_folder", kwargs["repo_id"], kwargs))

    monkeypatch.setattr(huggingface_hub, "HfApi", Api)
    return Api


def test_export_then_push(run_dir, tmp_path, cli, calls):
    out = tmp_path / "pruned"
    code, printed, err = cli("prune", str(run_dir), "--export", str(out), "--criterion", "frequency", "--ratio",
                             "0.25", "--push-to-hub", "someone/olmoe-pruned", "--private")
    assert code == 0, err
    assert [(name, repo) for name, repo, _ in calls.log] == [("create_repo", "someone/olmoe-pruned"),
                                                            ("upload_folder", "someone/olmoe-pruned")]
    assert calls.log[0][2]["exist_ok"] is True and calls.log[0][2]["private"] is True
    assert calls.log[1][2]["folder_path"] == str(out)
    assert "uploaded" in printed and "someone/olmoe-pruned" in printed
    config = json.loads((out / "config.json").read_text())
    assert config["num_experts"] == config["num_local_experts"] == 6 and config["torch_dtype"] == config["dtype"]


def test_a_hub_failure_is_one_line_and_keeps_the_export(run_dir, tmp_path, cli, calls):
    from huggingface_hub.errors import LocalTokenNotFoundError

    calls.fail = LocalTokenNotFoundError("Token is required (`token=True`), but no token found.")
    out = tmp_path / "pruned"
    code, printed, err = cli("prune", str(run_dir), "--export", str(out), "--criterion", "frequency", "--ratio",
                             "0.25", "--push-to-hub", "someone/olmoe-pruned")
    assert code == 2
    (line,) = err.strip().splitlines()
    assert line.startswith("error: could not upload") and "hf auth login" in line
    assert f"`hf upload someone/olmoe-pruned {out}`" in line
    assert (out / "model.safetensors").exists() and (out / "moeaudit_pruning.json").exists()
    assert "exported frequency at ratio 0.25" in printed
