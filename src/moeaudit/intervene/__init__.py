"""Intervene: the exact causal effect of removing experts, for every token if you like.

The public entry point is :func:`compute_effects` (windows + a :class:`Selection` -> an ``effects``
table and counters). Two engines produce identical numbers (to float32 rounding):

* ``reference`` — one full forward per intervention through the adapter's ablation hooks;
* ``fast`` — recomputes only what an intervention can change (position t from layer ℓ+1 upward against
  the clean key/value cache for ``token`` scope; positions from the first use onward for ``sequence``
  scope), many interventions batched per call.

A gradient (attribution-patching) estimate of the token-scope ``zero`` effect is available with
``InterveneConfig(estimate=True)``; its rows carry ``estimate=True`` and are never mixed into exact ones.

Examples
--------
>>> from moeaudit.intervene import InterveneConfig, Selection, compute_effects  # doctest: +SKIP
>>> result = compute_effects(moe, input_ids, Selection.census(),
...                          config=InterveneConfig(kinds=("zero", "reroute")))  # doctest: +SKIP
>>> result.effects.head(), result.stats.noise_floor  # doctest: +SKIP
"""

from moeaudit.intervene.engine import (
    EFFECT_COLUMNS,
    ENGINES,
    SCOPES,
    EffectsResult,
    InterveneConfig,
    InterveneStats,
    compute_effects,
    estimate_correlation,
    expert_mean_outputs,
    fast_unsupported_reason,
    single_expert_rows,
)
from moeaudit.intervene.selection import OWN_GATE, SELECTION_WHAT, Selection

__all__ = [
    "EFFECT_COLUMNS", "ENGINES", "OWN_GATE", "SCOPES", "SELECTION_WHAT", "EffectsResult", "InterveneConfig",
    "InterveneStats", "Selection", "compute_effects", "estimate_correlation", "expert_mean_outputs",
    "fast_unsupported_reason", "single_expert_rows",
]
