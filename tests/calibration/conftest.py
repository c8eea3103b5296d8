"""Synthetic routing tables with planted calibration behaviour, and one small real run of the built-in model.

Planted tables are top-1 at one layer of 8 experts: a document routes expert e on ``profile[e]`` of its
tokens, so the metric values of any sample follow from the documents drawn by hand.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from moeaudit.models import builtin

E = 8
ASCENDING = np.arange(1, E + 1)  # expert e on e + 1 tokens: 36 tokens per document
DESCENDING = ASCENDING[::-1].copy()
HAS_BUILTIN = (builtin.builtin_path("tiny-olmoe") / "model.safetensors").exists()


def planted_routing(profiles: list[np.ndarray], *, windows_per_doc: int = 1, layer: int = 0
                    ) -> tuple[pd.DataFrame, dict[int, str]]:
    """Top-1 routing rows: document d routes expert e on ``profiles[d][e]`` tokens (gate and activation norm
    depend on the expert only), its tokens cut into ``windows_per_doc`` windows; and seq -> document."""
    rows, documents, seq = [], {}, 0
    for d, profile in enumerate(profiles):
        experts = np.repeat(np.arange(E), profile)
        for part in np.array_split(experts, windows_per_doc):
            documents[seq] = f"doc{d}"
            for pos, expert in enumerate(part):
                gate = 0.3 + 0.05 * expert
                rows.append(dict(layer=layer, seq=seq, pos=pos, slot=0, expert=int(expert), raw_gate=gate,
                                 combine_weight=gate, renorm_gate=1.0, act_norm=1.0 + expert,
                                 act_max_abs=0.5 + expert))
            seq += 1
    frame = pd.DataFrame(rows).astype({"layer": "int64", "seq": "int64", "pos": "int64", "expert": "int64"})
    return frame, documents


def random_routing(n_docs: int, *, seed: int = 0, layers: tuple[int, ...] = (0, 2), num_experts: int = 6,
                   top_k: int = 2, max_windows: int = 3, max_len: int = 9
                   ) -> tuple[pd.DataFrame, dict[int, np.ndarray], dict[int, str], dict[int, int]]:
    """A random multi-layer routing table (top-k, no ``renorm_gate`` column: it is derived), documents of 1 to
    ``max_windows`` windows of unequal length, interleaved domains, and router probabilities aligned as
    compute_expert_metrics expects. Returns routing, router_probs, seq -> document, num_experts."""
    rng = np.random.default_rng(seed)
    rows, probs, documents, seq = [], {layer: [] for layer in layers}, {}, 0
    for d in range(n_docs):
        for _ in range(int(rng.integers(1, max_windows + 1))):
            documents[seq] = f"d{d}"
            for pos in range(int(rng.integers(2, max_len + 1))):
                for layer in layers:
                    p = rng.dirichlet(np.ones(num_experts) * 0.7)
                    probs[layer].append((seq, pos, p))
                    chosen = np.argsort(-p, kind="stable")[:top_k]
                    for slot, expert in enumerate(chosen):
                        rows.append(dict(layer=layer, seq=seq, pos=pos, slot=slot, expert=int(expert),
                                         raw_gate=float(p[expert]), combine_weight=float(p[expert] / p[chosen].sum()),
                                         act_norm=float(rng.gamma(2.0, 1.0 + expert)),
                                         act_max_abs=float(rng.gamma(1.0, 1.0)),
                                         domain="code" if d % 2 else "prose"))
            seq += 1
    routing = pd.DataFrame(rows).astype({"layer": "int64", "seq": "int64", "pos": "int64", "expert": "int64"})
    matrices = {layer: np.stack([p for s, q, p in sorted(entries, key=lambda x: (x[0], x[1]))]).astype(np.float32)
                for layer, entries in probs.items()}
    return routing, matrices, documents, {layer: num_experts for layer in layers}


def small_run(path, *, truncate: bool = True, max_windows: int = 16):
    """observe + metrics of the built-in tiny-olmoe on the built-in corpus (about 6 s on 2 cores):
    ``truncate`` gives one window per document (16 calibration documents over 8 domains)."""
    from moeaudit.config import AuditConfig
    from moeaudit.metrics.stage import run_metrics
    from moeaudit.models.loading import model_from_config
    from moeaudit.observe.stage import run_observe
    from moeaudit.rundir import RunDir

    config = AuditConfig(model="tiny-olmoe", max_len=24, max_windows=max_windows, batch_size=16, seed=0,
                         truncate=truncate, resamples=40, curve_repeats=3)
    run = RunDir(path, config, overwrite=True)
    moe = model_from_config(config)
    run_observe(run, moe=moe)
    run_metrics(run, moe=moe)
    return run


@pytest.fixture(scope="session")
def observed_run(tmp_path_factory):
    """A small real run (observe + metrics done), shared read-only by the stage and CLI tests; tests that
    write copy it first (:func:`copy_run`)."""
    if not HAS_BUILTIN:
        pytest.skip("built-in model weights not present")
    return small_run(tmp_path_factory.mktemp("calibration") / "run").path


def copy_run(source, target):
    import shutil

    shutil.copytree(source, target)
    return target
