"""A small deterministic synthetic run directory: every table the report reads, numbers written out by hand
or by closed formulas (no random draws), so golden files do not move when a stage's numerics change."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from moeaudit.config import AuditConfig

LAYERS = (0, 1)
EXPERTS = 8
TOP_K = 2
DOMAINS = ("code", "wiki")
NAN = float("nan")


def _manifest() -> dict:
    return {
        "format_version": 1,
        "created": "2026-01-01T00:00:00+00:00",
        "config": AuditConfig(model="tiny-olmoe", corpus="builtin").model_dump(mode="json"),
        "config_fingerprint": "0123456789abcdef",
        "versions": {"moeaudit": "0.1.0", "python": "3.11", "torch": "2.x", "transformers": "5.x"},
        "stages": {
            "observe": {"windows": 2, "tokens": 10, "mean_nll": 4.5, "seconds": 0.5,
                        "finished": "2026-01-01T00:00:01+00:00"},
            "metrics": {"split": "calibration", "finished": "2026-01-01T00:00:02+00:00"},
            "intervene": {"interventions": 40, "noise_floor": 3e-06, "engine": "fast", "fallback_reason": None,
                          "split": "heldout", "kind": "zero", "scope": "token", "selections": ["census"],
                          "interventions_per_second": 1000.0, "seconds": 0.04,
                          "near_ties": {"0": 3, "1": 0}, "near_tie_positions": 50,
                          "finished": "2026-01-01T00:00:03+00:00"},
            "audit": {"cells": 14, "significant": 3, "n": 200, "correction": "bonferroni", "alpha": 0.05,
                      "finished": "2026-01-01T00:00:04+00:00"},
        },
        "corpus": {"fingerprint": "f" * 64, "fingerprint_observed": "abcdef0123456789",
                   "counters": {"tokens_calibration": 100, "tokens_heldout": 90}},
        "model": {"name": "synthetic-moe", "family": "olmoe", "fingerprint": "feedfacecafebeef",
                  "moe_layers": list(LAYERS), "num_experts": {str(l): EXPERTS for l in LAYERS},
                  "top_k": {str(l): TOP_K for l in LAYERS}},
    }


def _expert_metrics(domain: str | None = None) -> pd.DataFrame:
    rows = []
    shift = {None: 0.0, "code": 0.05, "wiki": -0.05}[domain]
    for layer in LAYERS:
        for expert in range(EXPERTS):
            # layer 1 has a dead expert (3) and a dominant one (0)
            frequency = ([0.25, 0.3, 0.2, 0.25, 0.25, 0.3, 0.2, 0.25] if layer == 0 else
                         [0.55, 0.25, 0.2, 0.0, 0.3, 0.25, 0.2, 0.25])[expert]
            frequency = max(0.0, frequency + (shift if expert % 2 == 0 else -shift)) if frequency else 0.0
            count = int(round(frequency * 20))
            rows.append({"layer": layer, "expert": expert, "frequency": frequency, "count": count,
                         "mean_gate_active": 0.30 + 0.05 * expert, "ean_mean": 2.0 + expert + layer,
                         "act_std": 0.5 + 0.1 * expert, "reap": (0.30 + 0.05 * expert) * (2.0 + expert),
                         "routing_entropy": 0.9 - 0.05 * expert, "router_row_norm": 1.0 + 0.01 * expert})
    frame = pd.DataFrame(rows)
    return frame if domain is None else frame.assign(domain=domain)[["domain", *frame.columns]]


def _tests() -> pd.DataFrame:
    cells = [
        # layer, metric, design, n, effect, ci_low, ci_high, p_t, p_wilcoxon, p_adjusted, verdict, equivalent
        (0, "frequency", "paired", 200, 0.2512, 0.1106, 0.3918, 0.00042, 0.0011, 0.0066, "significant", False),
        (1, "frequency", "paired", 200, -0.0312, -0.1698, 0.1074, 0.66, 0.71, 1.0, "not significant", True),
        (0, "mean_gate_active", "paired", 200, -0.3101, -0.4518, -0.1684, 1.6e-05, 4.2e-05, 0.00025,
         "significant", False),
        (1, "mean_gate_active", "paired", 198, 0.1203, -0.0193, 0.2599, 0.091, 0.12, 1.0, "not significant", False),
        (0, "reap", "paired", 200, 0.0871, -0.0515, 0.2257, 0.22, 0.31, 1.0, "not significant", False),
        (1, "reap", "paired", 0, NAN, NAN, NAN, NAN, NAN, NAN, "untestable", False),
        (0, "token_gate", "routing_weight", 200, 0.2314, 0.0905, 0.3723, 0.0013, 0.0021, 0.0042, "significant",
         False),
        (1, "token_gate", "routing_weight", 200, 0.0505, -0.0881, 0.1891, 0.47, 0.52, 1.0, "not significant",
         True),
        (0, "random", "random_pair", 200, -0.0210, -0.1596, 0.1176, 0.77, 0.81, 1.0, "not significant", True),
        (1, "random", "random_pair", 200, 0.0402, -0.0984, 0.1788, 0.57, 0.60, 1.0, "not significant", True),
        (0, "frequency", "expert_level", 4, 0.8, NAN, NAN, 0.33, 0.33, 1.0, "not significant", None),
        (1, "frequency", "expert_level", 4, 0.4, NAN, NAN, 0.75, 0.75, 1.0, "not significant", None),
        (0, "frequency", "within_token", 150, 0.05, -0.03, 0.13, 0.21, 0.10, 1.0, "not significant", None),
        (1, "frequency", "within_token", 150, 0.02, -0.06, 0.10, 0.61, 0.55, 1.0, "not significant", None),
    ]
    columns = ["layer", "metric", "design", "n", "effect", "ci_low", "ci_high", "p_t", "p_wilcoxon", "p_adjusted",
               "verdict", "equivalent"]
    frame = pd.DataFrame(cells, columns=columns)
    frame["mde_dz"] = np.where(frame["design"].isin(["paired", "routing_weight", "random_pair"]), 0.297, NAN)
    frame["p_tost"] = np.where(frame["equivalent"] == True, 0.01, 0.4)  # noqa: E712
    # the paired cells of layer 0 clustered by document (as a census's would be), the others not
    clustered = (frame["design"] == "paired") & (frame["layer"] == 0)
    frame["cluster"] = np.where(clustered, "document", "none")
    frame["n_clusters"] = np.where(clustered, 24, NAN)
    frame["design_effect"] = np.where(clustered, 1.8, NAN)
    frame["df_t"] = np.where(clustered, 20.3, NAN)
    frame["mean_diff"] = np.where(clustered, 0.012, NAN)
    frame["mean_diff_ci_low"] = np.where(clustered, 0.004, NAN)
    frame["mean_diff_ci_high"] = np.where(clustered, 0.020, NAN)
    frame["mixed_mean_diff"] = np.where(clustered, 0.011, NAN)
    frame["mixed_ci_low"] = np.where(clustered, 0.003, NAN)
    frame["mixed_ci_high"] = np.where(clustered, 0.019, NAN)
    frame["n_distinct_high"] = np.where(frame["design"] == "paired", 5, NAN)
    frame["n_distinct_low"] = np.where(frame["design"] == "paired", 7, NAN)
    return frame


def _effects() -> pd.DataFrame:
    rows = []
    for layer in LAYERS:
        for seq in range(2):
            for pos in range(5):
                active = [(seq + pos) % EXPERTS, (seq + pos + 1) % (EXPERTS - layer)]
                if active[1] == active[0]:
                    active[1] = (active[0] + 1) % (EXPERTS - 1)
                for rank, expert in enumerate(active):
                    delta = 0.01 * (expert + 1) * (2 - layer) + 0.002 * pos - 0.004 * rank
                    rows.append({"layer": layer, "seq": seq, "pos": pos, "expert": expert, "kind": "zero",
                                 "scope": "token", "delta_nll": delta, "kl": abs(delta) * 1.1,
                                 "top1_flip": delta > 0.05, "raw_gate": 0.6 - 0.2 * rank, "gate_rank": rank,
                                 "gap_norm": 1.0 + 0.5 * expert - 0.3 * layer, "compensation_cos": 0.2 + 0.1 * layer,
                                 "estimate": False, "j": 1, "shared": False, "selection": "census"})
                rows.append({"layer": layer, "seq": seq, "pos": pos, "expert": active[0], "kind": "zero",
                             "scope": "token", "delta_nll": 0.5, "kl": 0.5, "top1_flip": True, "raw_gate": 0.6,
                             "gate_rank": 0, "gap_norm": NAN, "compensation_cos": NAN, "estimate": False, "j": 2,
                             "shared": False, "selection": "progressive"})
    return pd.DataFrame(rows)


def _redundancy() -> pd.DataFrame:
    return pd.DataFrame({"layer": [0, 1], "j": [1, 1], "n": [10, 10], "mean": [0.15, 0.03],
                         "median": [0.08, 0.01], "p95": [0.6, 0.2], "cliff": [1.0, NAN]})


def _pruning() -> pd.DataFrame:
    """The prune stage's layout: ``all_layers`` rows (one per layer, the whole model's held-out values repeated)
    and ``single_layer`` rows; deterministic criteria have a null seed; random is drawn with 5 seeds."""
    rows = []
    base = 20.0
    for ratio in (0.25, 0.5):
        keep = int(EXPERTS * (1 - ratio))
        for criterion, seeds in (("frequency", [None]), ("reap", [None]), ("random", [0, 1, 2, 3, 4])):
            for seed in seeds:
                if criterion == "random":
                    ppl = base * (1 + ratio) + 0.5 * seed
                    kept_by_layer = {l: sorted((seed + l + i) % EXPERTS for i in range(keep)) for l in LAYERS}
                else:
                    ppl = base * (1 + ratio * (0.8 if criterion == "reap" else 1.3))
                    order = list(range(EXPERTS)) if criterion == "reap" else [0, 1, 3, 2, 6, 4, 7, 5]
                    kept_by_layer = {l: sorted(order[:keep]) for l in LAYERS}
                for mode in ("all_layers", "single_layer"):
                    for layer, kept in kept_by_layer.items():
                        value = ppl if mode == "all_layers" else base + (ppl - base) / 2 + layer
                        rows.append({"criterion": criterion, "ratio": ratio, "seed": seed, "mode": mode,
                                     "layer": layer, "kept": kept, "num_experts": EXPERTS,
                                     "heldout_nll": float(np.log(value)), "heldout_ppl": value,
                                     "unpruned_nll": float(np.log(base)), "unpruned_ppl": base})
    frame = pd.DataFrame(rows)
    frame["seed"] = frame["seed"].astype("Int64")
    return frame


def make_run(path: Path, *, pruning: bool = True, effects: bool = True) -> Path:
    """Write the synthetic run directory at ``path`` and return it."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "manifest.json").write_text(json.dumps(_manifest(), indent=2))
    tables = {
        "tokens": pd.DataFrame({"seq": np.repeat([0, 1], 5), "pos": np.tile(range(5), 2), "token_id": range(10),
                                "nll": np.linspace(3.0, 6.0, 10), "domain": ["code"] * 5 + ["wiki"] * 5,
                                "split": ["heldout"] * 10}),
        "expert_metrics": _expert_metrics(),
        "expert_metrics_by_domain": pd.concat([_expert_metrics(d) for d in DOMAINS], ignore_index=True),
        "tests": _tests(),
        "redundancy": _redundancy(),
    }
    if effects:
        tables["effects"] = _effects()
    if pruning:
        tables["pruning"] = _pruning()
    for name, frame in tables.items():
        frame.to_parquet(path / f"{name}.parquet", index=False)
    return path


@pytest.fixture(scope="session")
def synthetic_run(tmp_path_factory) -> Path:
    return make_run(tmp_path_factory.mktemp("report") / "synthetic-moe")


@pytest.fixture(scope="session")
def synthetic_run_no_pruning(tmp_path_factory) -> Path:
    return make_run(tmp_path_factory.mktemp("report") / "no-pruning", pruning=False)
