"""Faults and bad input: out-of-memory recovery, planted NaN/inf activations, unwritable or full output,
corpus edge cases, windows longer than the model's context."""

from __future__ import annotations

import errno
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import moeaudit.intervene.stage as intervene_stage
import moeaudit.observe.forward as observe_module
from moeaudit.config import AuditConfig
from moeaudit.errors import CorpusError, InvalidParameterError, MoeAuditError, NonFiniteError, RunDirectoryError
from moeaudit.intervene.stage import run_intervene
from moeaudit.models import load_model
from moeaudit.observe.stage import run_observe
from moeaudit.rundir import TABLES, RunDir
from moeaudit.scale import is_out_of_memory, with_halving
from tests.scale.conftest import assert_same_tables


@pytest.fixture(scope="module")
def moe():
    return load_model("tiny-olmoe")


def _config(**overrides) -> AuditConfig:
    values = dict(model="tiny-olmoe", max_windows=4, max_len=48, progressive=False)
    return AuditConfig(**dict(values, **overrides))


def _oom(message: str = "CUDA out of memory. Tried to allocate 2.00 GiB") -> Exception:
    return torch.OutOfMemoryError(message)


# ---------------------------------------------------------------------------------------------- memory
def test_with_halving_halves_until_it_fits_and_reports_the_size():
    tried = []

    def run(size):
        tried.append(size)
        if size > 3:
            raise _oom()
        return size * 10

    assert with_halving(run, 16, "batch_size") == (20, 2)
    assert tried == [16, 8, 4, 2]


def test_with_halving_gives_up_at_one_and_passes_other_errors():
    with pytest.raises(MoeAuditError, match="out of memory even with batch_size = 1; .* --max-len"):
        with_halving(lambda size: (_ for _ in ()).throw(_oom()), 4, "batch_size")
    with pytest.raises(ValueError, match="unrelated"):
        with_halving(lambda size: (_ for _ in ()).throw(ValueError("unrelated")), 4, "batch_size")
    assert is_out_of_memory(RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't "
                                         "allocate memory: you tried to allocate 1 bytes"))
    assert not is_out_of_memory(RuntimeError("shape mismatch"))


@pytest.mark.slow
def test_observe_halves_the_batch_on_out_of_memory(tmp_path, moe, monkeypatch, caplog):
    reference = RunDir(tmp_path / "reference", _config(batch_size=2))
    run_observe(reference, moe=moe)
    real = observe_module._observe_batch

    def limited(moe_, batch, *args):
        if len(batch) > 2:
            raise _oom()
        return real(moe_, batch, *args)

    monkeypatch.setattr(observe_module, "_observe_batch", limited)
    info = run_observe(RunDir(tmp_path / "limited", _config(batch_size=8)), moe=moe)
    assert info["batch_size_used"] == 2
    assert "out of memory with batch_size = 8; retrying with 4" in caplog.text
    assert_same_tables(reference.path, tmp_path / "limited", tables=("tokens", "routing", "router_probs"))


@pytest.mark.slow
def test_intervene_halves_rows_per_call_on_out_of_memory(tmp_path, moe, monkeypatch):
    run = RunDir(tmp_path, _config())
    run_observe(run, moe=moe)
    plain = run_intervene(run, moe=moe)
    expected = run.read("effects")
    real = intervene_stage.compute_effects

    seen = []

    def limited(*args, config, **kwargs):
        seen.append((config.rows_per_call, config.max_logit_elements))
        if config.rows_per_call > 32:
            raise _oom()
        return real(*args, config=config, **kwargs)

    monkeypatch.setattr(intervene_stage, "compute_effects", limited)
    again = RunDir(tmp_path / "again", _config())
    run_observe(again, moe=moe)
    info = run_intervene(again, moe=moe)
    assert (plain["rows_per_call_used"], info["rows_per_call_used"]) == (256, 32)
    assert seen[:4] == [(256, 1 << 25), (128, 1 << 24), (64, 1 << 23), (32, 1 << 22)]
    # Rows of one call are computed independently; only float rounding may differ with the batch size.
    got = again.read("effects")
    pd.testing.assert_frame_equal(got.drop(columns=["delta_nll", "kl", "gap_norm", "compensation_cos"]),
                                  expected.drop(columns=["delta_nll", "kl", "gap_norm", "compensation_cos"]))
    np.testing.assert_allclose(got["delta_nll"], expected["delta_nll"], atol=1e-5)


# ---------------------------------------------------------------------------------------------- NaN / inf
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_planted_non_finite_activation_is_reported_with_layer_and_position(tmp_path, moe, value):
    planted = {"layer": 2, "pos": 17}

    def plant(module, args):
        hidden = args[0].clone()
        # The MoE block sees [tokens, hidden] or [batch, seq, hidden]; plant in the first window either way.
        view = hidden.view(-1, hidden.shape[-1]) if hidden.dim() == 2 else hidden[0]
        view[planted["pos"]] = value
        return (hidden, *args[1:])

    handle = moe.layer(planted["layer"]).block.register_forward_pre_hook(plant)
    try:
        with pytest.raises(NonFiniteError) as caught:
            run_observe(RunDir(tmp_path, _config(batch_size=1)), moe=moe)
    finally:
        handle.remove()
    message = str(caught.value)
    assert "MoE layer 2 input (router logits)" in message and "position 17" in message
    assert "\n" not in message and "weights may be corrupt" in message
    assert not (tmp_path / "routing.parquet").exists()


# ---------------------------------------------------------------------------------------------- output
def test_unwritable_output_is_one_line(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(RunDirectoryError, match=r"cannot create .*file/run: Not a directory; choose a writable"):
        RunDir(blocker / "run", _config())


def test_full_disk_leaves_no_partial_table(tmp_path, moe, monkeypatch):
    run = RunDir(tmp_path, _config())
    run_observe(run, moe=moe)
    import pyarrow.parquet as pq

    real = pq.ParquetWriter.write_table

    def full(self, table, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(pq.ParquetWriter, "write_table", full)
    with pytest.raises(RunDirectoryError, match="No space left on device; free disk space"):
        run_intervene(run, moe=moe)
    monkeypatch.setattr(pq.ParquetWriter, "write_table", real)
    assert not (tmp_path / "effects.parquet").exists()
    assert not [p for p in tmp_path.rglob("*") if ".tmp-" in p.name], "a temporary file was left behind"
    assert (tmp_path / "routing.parquet").exists(), "a finished table must survive"


# ---------------------------------------------------------------------------------------------- corpus
def _corpus_run(tmp_path: Path, name: str, content: bytes, **overrides) -> RunDir:
    corpus = tmp_path / name
    corpus.write_bytes(content)
    return RunDir(tmp_path / "run", _config(corpus=str(corpus), max_windows=None, **overrides))


@pytest.mark.parametrize("name,content,match", [
    ("empty.txt", b"", "is empty"),
    ("blank.jsonl", b"\n\n", "no non-empty documents"),
    ("latin1.txt", "caf\xe9 cr\xe8me".encode("latin-1"), "not valid UTF-8 .* re-encode it as UTF-8"),
    ("tokens.txt", b"a\n\nb\n\nc\n\nd", "no document has 2 or more tokens"),
])
def test_corpus_edge_cases_are_one_line_errors(tmp_path, moe, name, content, match):
    with pytest.raises(CorpusError, match=match) as caught:
        run_observe(_corpus_run(tmp_path, name, content), moe=moe)
    assert "\n" not in str(caught.value)


def test_one_token_documents_are_dropped_and_the_rest_observed(tmp_path, moe):
    long_docs = "\n\n".join(f"Document {i} talks about experts, routers and the tokens they see." * 3
                            for i in range(40))
    run = _corpus_run(tmp_path, "mixed.txt", ("x\n\ny\n\n" + long_docs).encode(), max_len=16)
    info = run_observe(run, moe=moe)
    tokens = run.read("tokens")
    assert info["windows"] > 0 and tokens.groupby("seq").size().min() >= 2
    assert run.manifest["corpus"]["counters"]["documents_too_short"] == 2


def test_windows_longer_than_the_context_are_refused(tmp_path, moe):
    text = "\n\n".join("Experts, routers and tokens: " * 120 for _ in range(12))
    run = _corpus_run(tmp_path, "long.txt", text.encode(), max_len=300, truncate=True)
    with pytest.raises(InvalidParameterError, match="at most the model's context length, 256 tokens"):
        run_observe(run, moe=moe)
    assert not any((tmp_path / "run" / f"{t}.parquet").exists() for t in TABLES)


def test_second_process_on_the_same_run_is_refused(tmp_path, moe):
    from moeaudit.scale.units import exclusive

    run = RunDir(tmp_path, _config())
    with exclusive(RunDir(tmp_path), "intervene"):
        with pytest.raises(RunDirectoryError, match=r"is in use by moeaudit pid \d+ \(intervene\); wait for it"):
            run_observe(run, moe=moe)
    run_observe(run, moe=moe)  # released
    assert run.has("routing")


@pytest.mark.parametrize("part", ["router", "experts"])
def test_corrupt_checkpoint_is_named_at_load(tmp_path, part):
    from moeaudit.models.testing import tiny_model

    model = tiny_model("olmoe")
    block = model.model.layers[2].mlp
    with torch.no_grad():
        (block.gate.weight if part == "router" else block.experts.down_proj)[0].fill_(float("inf"))
    model.save_pretrained(tmp_path)
    verb = "gives" if part == "router" else "give"
    with pytest.raises(NonFiniteError, match=rf"^layer 2 \(OlmoeSparseMoeBlock\): the {part} {verb} NaN/inf .* "
                                             "corrupt"):
        load_model(str(tmp_path))


@pytest.mark.parametrize("value,fails", [(float("-inf"), False), (float("nan"), True), (float("inf"), True)])
def test_output_logits_allow_a_minus_inf_mask_only(tmp_path, moe, value, fails):
    def plant(module, args, output):
        output = output.clone()
        output[0, 3, 5] = value
        return output

    handle = moe.model.lm_head.register_forward_hook(plant)
    try:
        run = RunDir(tmp_path, _config(batch_size=1))
        if fails:
            with pytest.raises(NonFiniteError, match=r"in output logits at window seq \d+, position 3 .*weights may be corrupt$"):
                run_observe(run, moe=moe)
        else:
            assert run_observe(run, moe=moe)["windows"] == 8
    finally:
        handle.remove()


def test_low_precision_non_finite_suggests_float32(tmp_path):
    moe16 = load_model("tiny-olmoe", dtype="bfloat16")
    handle = moe16.layer(1).block.register_forward_pre_hook(
        lambda module, args: (args[0].index_fill(-2, torch.tensor([4]), float("inf")), *args[1:]))
    try:
        with pytest.raises(NonFiniteError, match=r"MoE layer 1 input .* position 4 .*bfloat16 may overflow "
                                                 r"\(try --dtype float32\)"):
            run_observe(RunDir(tmp_path, _config(dtype="bfloat16", batch_size=1)), moe=moe16)
    finally:
        handle.remove()
