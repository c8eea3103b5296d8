"""``push_to_hub``: the exported folder goes to the hub through ``HfApi`` (mocked: no network), and a hub
failure is one line naming the fix that leaves the export on disk."""

from __future__ import annotations

import types

import pytest

from moeaudit.errors import HubUploadError, InvalidParameterError, RunDirectoryError
from moeaudit.prune import export_pruned, push_to_hub

from tests.prune.conftest import make_moe


class FakeApi:
    """Records ``HfApi`` calls; ``fail`` (an exception) is raised by ``fail_at`` ("create_repo"/"upload_folder")."""

    instances: list["FakeApi"] = []
    fail: BaseException | None = None
    fail_at = "create_repo"

    def __init__(self, token=None):
        self.token = token
        self.calls: list[tuple[str, tuple, dict]] = []
        type(self).instances.append(self)

    def create_repo(self, *args, **kwargs):
        self.calls.append(("create_repo", args, kwargs))
        if self.fail is not None and self.fail_at == "create_repo":
            raise self.fail
        return f"https://huggingface.co/{args[0] if args else kwargs['repo_id']}"

    def upload_folder(self, *args, **kwargs):
        self.calls.append(("upload_folder", args, kwargs))
        if self.fail is not None and self.fail_at == "upload_folder":
            raise self.fail
        return types.SimpleNamespace(commit_url="https://huggingface.co/x/commit/1")


@pytest.fixture
def hub(monkeypatch):
    """``huggingface_hub.HfApi`` replaced by :class:`FakeApi` (fresh class state per test)."""
    import huggingface_hub

    fake = type("Api", (FakeApi,), {"instances": [], "fail": None, "fail_at": "create_repo"})
    monkeypatch.setattr(huggingface_hub, "HfApi", fake)
    return fake


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    moe = make_moe("olmoe")
    out = tmp_path_factory.mktemp("push") / "pruned"
    export_pruned(moe, {l.layer: [0, 2, 5, 7] for l in moe.layers}, out)
    return out


def test_push_creates_the_repo_then_uploads_the_export_folder(hub, exported):
    info = push_to_hub(exported, "someone/olmoe-pruned", private=True, token="hf_x")
    (api,) = hub.instances
    assert api.token == "hf_x"
    (create, c_args, c_kwargs), (upload, _, u_kwargs) = api.calls
    assert create == "create_repo" and upload == "upload_folder"
    assert c_args == ("someone/olmoe-pruned",)
    assert c_kwargs == {"private": True, "repo_type": "model", "exist_ok": True}
    assert u_kwargs["repo_id"] == "someone/olmoe-pruned" and u_kwargs["repo_type"] == "model"
    assert u_kwargs["folder_path"] == str(exported)
    assert "olmoe pruned to 4 of 8 experts" in u_kwargs["commit_message"]
    assert info.commit_url.endswith("/commit/1")
    push_to_hub(exported, "someone/olmoe-pruned", commit_message="v2")
    assert hub.instances[-1].calls[0][2]["private"] is False
    assert hub.instances[-1].calls[1][2]["commit_message"] == "v2"


def _http_error(status):
    from huggingface_hub.errors import HfHubHTTPError

    return HfHubHTTPError(f"{status} Client Error for url: https://huggingface.co/api/repos/create",
                          response=types.SimpleNamespace(status_code=status, headers={}, request=None))


@pytest.mark.parametrize("make_error, where, fix", [
    (lambda: __import__("huggingface_hub.errors").errors.LocalTokenNotFoundError("Token is required"),
     "create_repo", "log in with `hf auth login` or set HF_TOKEN"),
    (lambda: _http_error(401), "create_repo", "log in with `hf auth login`"),
    (lambda: _http_error(403), "create_repo", "use a token with write access"),
    (lambda: ConnectionError("Failed to resolve 'huggingface.co'\nmore"), "upload_folder",
     "check the network connection"),
    (lambda: __import__("huggingface_hub.errors").errors.OfflineModeIsEnabled("offline"), "create_repo",
     "unset HF_HUB_OFFLINE"),
    (lambda: _http_error(500), "upload_folder", "check the repository id"),
])
def test_a_hub_failure_is_one_line_naming_the_fix_and_keeps_the_export(hub, exported, make_error, where, fix):
    before = sorted(p.name for p in exported.iterdir())
    hub.fail, hub.fail_at = make_error(), where
    with pytest.raises(HubUploadError) as err:
        push_to_hub(exported, "someone/olmoe-pruned")
    message = str(err.value)
    assert "\n" not in message and fix in message, message
    assert f"could not upload {exported} to the hub as someone/olmoe-pruned" in message
    assert f"`hf upload someone/olmoe-pruned {exported}`" in message
    assert sorted(p.name for p in exported.iterdir()) == before
    assert (exported / "model.safetensors").stat().st_size > 0


def test_push_refuses_a_bad_repo_id_or_a_folder_that_is_no_export_without_asking_the_hub(hub, exported, tmp_path):
    with pytest.raises(InvalidParameterError, match="`repo_id` must be a hub repository id such as user/name"):
        push_to_hub(exported, "not a repo//id")
    (tmp_path / "empty").mkdir()
    with pytest.raises(RunDirectoryError, match="is not an exported checkpoint"):
        push_to_hub(tmp_path / "empty", "someone/x")
    assert hub.instances == []
