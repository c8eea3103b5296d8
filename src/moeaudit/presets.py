"""Named protocols: settings that reproduce a published audit.

``engmann2026`` reproduces Engmann, Medeiros Adriano & Giese (arXiv 2606.10703), as reconstructed from
the paper and the authors' scripts: WikiText-2 raw test texts longer than 50 characters, the first 100,
each truncated to 512 tokens; 200 token positions per (layer, metric) cell sampled with seed 42 among
positions with a next token; the four metrics (utilisation = ``frequency``, activation norm =
``ean_mean``, mean routing weight when active = ``mean_gate_active``, activation std = ``act_std``) in
moeaudit's single definitions, computed in-sample on the same texts; ``zero`` removal in ``sequence``
scope (the expert zeroed wherever routed in the window, outcome read at the target); Bonferroni over the
model's 20 cells; the dual test, treating the 200 tokens as independent (``audit_cluster = "none"``, as the
paper did; a run's own default clusters them by document). The paper's scripts defined some metrics differently per model
(e.g. OLMoE's "utilisation" was a mean router logit): moeaudit's numbers follow the paper's *intent*.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from moeaudit.errors import invalid

#: Decoder layers the paper audited, by checkpoint (arXiv 2606.10703, its models and layers).
ENGMANN2026_LAYERS: dict[str, list[int]] = {
    "allenai/OLMoE-1B-7B-0924": [0, 4, 7, 11, 15],
    "Qwen/Qwen1.5-MoE-A2.7B": [0, 6, 12, 18, 23],
    "deepseek-ai/DeepSeek-V2-Lite": [1, 7, 13, 20, 26],
}
#: The dtype the paper used per checkpoint (float32 on CPU is always allowed).
ENGMANN2026_DTYPES: dict[str, str] = {
    "allenai/OLMoE-1B-7B-0924": "float32",
    "Qwen/Qwen1.5-MoE-A2.7B": "bfloat16",
    "deepseek-ai/DeepSeek-V2-Lite": "float16",
}
PRESETS: tuple[str, ...] = ("engmann2026",)


def evenly_spaced(moe_layers: list[int], count: int = 5) -> list[int]:
    """``count`` MoE layers evenly spaced from the first to the last (all of them when fewer)."""
    if len(moe_layers) <= count:
        return list(moe_layers)
    picks = np.round(np.linspace(0, len(moe_layers) - 1, count)).astype(int)
    return [moe_layers[i] for i in picks]


def preset_values(name: str, model: str, moe_layers: list[int]) -> dict[str, Any]:
    """AuditConfig fields of preset ``name`` for ``model`` whose MoE layers are ``moe_layers``."""
    if name not in PRESETS:
        raise invalid("preset", "one of " + ", ".join(PRESETS), name)
    key = next((k for k in ENGMANN2026_LAYERS if k.lower() == model.rstrip("/").lower()), None)
    layers = ENGMANN2026_LAYERS[key] if key else evenly_spaced(moe_layers)
    values: dict[str, Any] = dict(
        preset=name,
        model=model,
        corpus="wikitext:wikitext-2-raw-v1:test",
        min_chars=50,
        first_docs=100,
        truncate=True,
        max_len=512,
        observe_splits=["train", "calibration", "heldout"],
        in_sample=True,
        layers=layers,
        audit_n=200,
        intervene_n=200,
        seed=42,
        audit_metrics=["frequency", "ean_mean", "mean_gate_active", "act_std"],
        kind="zero",
        scope="sequence",
        correction="bonferroni",
        alpha=0.05,
        audit_cluster="none",
        progressive=False,
    )
    if key:
        values["dtype"] = ENGMANN2026_DTYPES[key]
    return values
