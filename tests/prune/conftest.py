"""Shared helpers: tiny random models (one thread, so the folder runs in seconds on 2 cores) and run dirs."""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np
import pandas as pd
import torch

from moeaudit.config import AuditConfig
from moeaudit.models import wrap_model
from moeaudit.models.testing import tiny_model
from moeaudit.rundir import RunDir

torch.set_num_threads(1)

VOCAB = 96


def make_moe(family: str = "olmoe", seed: int = 3, **overrides):
    return wrap_model(tiny_model(family, seed=seed, **overrides), name=family)


def windows(n: int, seq_len: int = 12, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, VOCAB, (n, seq_len), generator=torch.Generator().manual_seed(seed))


def tokens_table(n_cal: int = 4, n_held: int = 6, seq_len: int = 12, seed: int = 0) -> pd.DataFrame:
    """A tokens table with calibration and held-out windows, two domains, one short (padded) window."""
    ids = windows(n_cal + n_held, seq_len, seed)
    rows = []
    for seq in range(n_cal + n_held):
        length = seq_len - 3 if seq == n_cal + 1 else seq_len
        for pos in range(length):
            rows.append(dict(seq=seq, pos=pos, token_id=int(ids[seq, pos]), nll=np.nan,
                             domain="code" if seq % 2 else "prose",
                             split="calibration" if seq < n_cal else "heldout"))
    return pd.DataFrame(rows)


def metrics_table(moe, columns: dict[str, np.ndarray] | None = None, seed: int = 0) -> pd.DataFrame:
    """An expert_metrics table: random `frequency`, `max_act`, `aimer` columns plus ``columns``
    ({name: array [n_layers, E]})."""
    rng = np.random.default_rng(seed)
    frames = []
    for i, layer in enumerate(moe.layers):
        e = layer.num_experts
        frame = pd.DataFrame({"layer": layer.layer, "expert": np.arange(e), "frequency": rng.random(e),
                              "max_act": rng.random(e), "aimer": rng.random(e)})
        for name, values in (columns or {}).items():
            frame[name] = np.asarray(values[i], dtype=float)
        frames.append(frame)
    return pd.concat(frames, ignore_index=True)


def make_run(tmp_path, moe, metrics: pd.DataFrame, *, effects: pd.DataFrame | None = None,
             tokens: pd.DataFrame | None = None, name: str = "run") -> RunDir:
    run = RunDir(tmp_path / name, AuditConfig(model="tiny-olmoe", batch_size=4, seed=0))
    run.write_frame("tokens", tokens if tokens is not None else tokens_table())
    run.write_frame("expert_metrics", metrics)
    if effects is not None:
        run.write_frame("effects", effects)
    return run
