"""`--executor ray`: the same work units as Ray tasks on a local 2-worker Ray instance give the local
run's tables bit for bit."""

from __future__ import annotations

import json
import sys

import pytest

from tests.cli.conftest import cli  # noqa: F401  (fixture)
from tests.scale.conftest import SMALL_RUN, assert_same_tables

pytestmark = pytest.mark.slow  # end-to-end: deselected by -m "not slow"

ray = pytest.importorskip("ray", reason='the ray executor is tested with the [ray] extra installed')


def test_ray_run_equals_local_run(cli, tmp_path):  # noqa: F811
    local, distributed = tmp_path / "local", tmp_path / "ray"
    code, out, err = cli("run", "--out", str(local), *SMALL_RUN, "--unit-windows", "4")
    assert code == 0, err
    code, out, err = cli("run", "--out", str(distributed), *SMALL_RUN, "--unit-windows", "4",
                         "--executor", "ray", "--workers", "2")
    assert code == 0, err
    assert not ray.is_initialized(), "the executor must stop the Ray instance it started"
    manifest = json.loads((distributed / "manifest.json").read_text())
    for stage in ("observe", "intervene"):
        assert manifest["stages"][stage]["executor"] == "ray"
        assert manifest["stages"][stage]["computed"] == manifest["stages"][stage]["units"] > 1
    assert manifest["model"] == json.loads((local / "manifest.json").read_text())["model"]
    assert_same_tables(local, distributed)

    prune = ("--criteria", "reap,frequency,random", "--seeds", "7", "--ratios", "0.25,0.5", "--all-layers-only",
             "--quiet")  # 18 configurations: two units
    code, _, err = cli("prune", str(local), *prune)
    assert code == 0, err
    code, _, err = cli("prune", str(distributed), *prune, "--executor", "ray", "--workers", "2")
    assert code == 0, err
    manifest = json.loads((distributed / "manifest.json").read_text())
    assert len(manifest["units"]["prune"]["plan"]) > 1
    assert_same_tables(local, distributed, tables=("pruning", "jaccard", "pruning_evals"))


def test_ray_executor_without_ray_names_the_extra(cli, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.setitem(sys.modules, "ray", None)
    code, _, err = cli("observe", str(tmp_path), "--model", "tiny-olmoe", "--max-windows", "2", "--executor", "ray")
    assert code == 2
    assert err.strip().splitlines() == ['error: the ray executor needs Ray: pip install "moeaudit[ray]"']


def test_worker_errors_keep_their_one_line(cli, tmp_path):  # noqa: F811
    import torch
    from transformers import AutoTokenizer

    from moeaudit.models.builtin import tokenizer_path
    from moeaudit.models.testing import tiny_model

    model = tiny_model("olmoe", vocab_size=8192, weight_std=0.05)
    with torch.no_grad():
        model.model.layers[1].mlp.gate.weight.fill_(float("nan"))  # a corrupt checkpoint
    model.save_pretrained(tmp_path / "corrupt")
    AutoTokenizer.from_pretrained(tokenizer_path()).save_pretrained(tmp_path / "corrupt")
    code, _, err = cli("observe", str(tmp_path / "run"), "--model", str(tmp_path / "corrupt"), "--max-windows", "2",
                       "--max-len", "32", "--executor", "ray", "--workers", "1", "--quiet")
    assert code == 2
    lines = err.strip().splitlines()
    assert lines == ["error: layer 1 (OlmoeSparseMoeBlock): the router gives NaN/inf on a random probe input: the "
                     "checkpoint's weights are corrupt (re-download or re-export it)"], err
    assert not ray.is_initialized()


def test_more_workers_than_cpus_share_them(cli, tmp_path):  # noqa: F811
    # Ray's local instance here has 2 CPUs; 3 whole-CPU actors would leave one never started.
    code, out, err = cli("observe", str(tmp_path), "--model", "tiny-olmoe", "--max-windows", "3", "--max-len", "32",
                         "--unit-windows", "1", "--executor", "ray", "--workers", "3", "--quiet")
    assert code == 0, err
    assert json.loads((tmp_path / "manifest.json").read_text())["stages"]["observe"]["units"] == 6


def test_cuda_without_gpus_is_one_line_and_stops_ray(cli, tmp_path):  # noqa: F811
    code, _, err = cli("observe", str(tmp_path), "--model", "tiny-olmoe", "--device", "cuda", "--executor", "ray")
    assert code == 2
    assert err.strip().splitlines() == ["error: --device cuda with --executor ray, but the Ray cluster has no GPU; "
                                        "start workers on GPU nodes or use --device cpu"]
    assert not ray.is_initialized()


def test_a_local_ray_instance_runs_its_workers_at_the_drivers_priority(tmp_path):
    """Ray starts workers at niceness 15; beside three busy processes its model workers then crawled (the
    suite's Ray tests took tens of minutes). A local instance started by moeaudit runs them at niceness 0."""
    import os

    from moeaudit.config import AuditConfig
    from moeaudit.scale.executors import RayExecutor

    executor = RayExecutor(AuditConfig(model="tiny-olmoe", executor="ray"), workers=1)
    try:
        niceness = ray.get(ray.remote(num_cpus=0)(lambda: os.nice(0)).remote())  # the actor holds the CPUs
    finally:
        executor.close()
    assert niceness == os.nice(0) and not ray.is_initialized()
