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

``engmann2026-code`` is the same protocol with the metrics as the authors' released scripts computed them
(github.com/callmeloui/observational_metrics), so that the published tables can be set beside the corrected
ones. For OLMoE-1B-7B-0924 (and any checkpoint the paper did not audit) it tests
``paper_code_utilization`` (mean router logit), ``ean_mean``, ``paper_code_mean_weight_active`` (mean logit
over a batch-global top-k mask) and ``act_std`` (the script's activation norm and std agree with moeaudit's);
for DeepSeek-V2-Lite, whose script counted routed tokens and averaged top-k weights, it tests the same four
columns as ``engmann2026``. Beside the metrics it replays:

* the padding: the scripts padded every text to the longest one and pooled the padding positions into all
  four metrics (about 62 % of the released OLMoE rows). ``paper_code_padding`` records the routing (and
  router logits, ``router_logits_layers = "all"``) of the windows right-padded the same way, and the metrics
  stage pools it into every metric;
* the position sets: one per metric, drawn in turn from numpy's global stream seeded with 42 over the padded
  global numbering, the same sets at every layer (``position_sets = "paper_code"``: the intervene stage
  intervenes at their union, the paired design tests metric i on set i). They equal the scripts' only when
  the windows are the scripts' token rows (one per text, in corpus order, as ``first_docs`` + ``truncate``
  give);
* the ddof-0 d_z (``dz_ddof = 0``).

It does not replay the routing-weight control script, nor Qwen1.5-MoE-A2.7B, whose script followed another
protocol (its own generator, positions drawn per text, activation norms on 30 texts, a std over output
values); this preset refuses it.
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
PRESETS: tuple[str, ...] = ("engmann2026", "engmann2026-code")
#: The metrics ``engmann2026-code`` tests, per checkpoint; the OLMoE script's for every other checkpoint.
PAPER_CODE_METRICS: dict[str, list[str]] = {
    "allenai/OLMoE-1B-7B-0924": ["paper_code_utilization", "ean_mean", "paper_code_mean_weight_active", "act_std"],
    "deepseek-ai/DeepSeek-V2-Lite": ["frequency", "ean_mean", "mean_gate_active", "act_std"],
}
#: Checkpoints whose released script ``engmann2026-code`` does not replay, with the reason.
PAPER_CODE_REFUSED: dict[str, str] = {
    "Qwen/Qwen1.5-MoE-A2.7B": "its script followed another protocol (positions drawn per text with its own "
                              "generator, activation norms on 30 texts, a std over output values)",
}


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
    if name == "engmann2026-code":
        if key in PAPER_CODE_REFUSED:
            raise invalid("preset", f"engmann2026 for {key} ({PAPER_CODE_REFUSED[key]})", name)
        olmoe = PAPER_CODE_METRICS["allenai/OLMoE-1B-7B-0924"]
        values["audit_metrics"] = list(PAPER_CODE_METRICS.get(key or "", olmoe))
        values["router_logits_layers"] = "all"
        values["dz_ddof"] = 0
        values["position_sets"] = "paper_code"
        values["paper_code_padding"] = True
    return values
