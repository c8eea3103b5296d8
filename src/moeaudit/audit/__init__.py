"""Audit: does an observational metric predict the causal effect of removing an expert?

Input is the ``effects`` table (one row per single-expert intervention at a token: ``layer``, ``seq``,
``pos``, ``expert``, ``delta_nll``, ``raw_gate``) restricted to one intervention kind and scope, and the
``expert_metrics`` table (one population value per (layer, expert) and metric). Output is the ``tests``
table: one row per (layer, metric, design).

Designs (``design`` column):

``paired``
    The paper's contrast (arXiv 2606.10703): at each sampled token rank the active set by the metric's
    population value, diff = ΔNLL(highest) − ΔNLL(lowest); d_z = mean/sd (ddof 1), paired t and Wilcoxon.
``routing_weight``
    The same contrast with high/low chosen by the token's own raw gate (the paper's control); one cell
    per layer, ``metric = "token_gate"``.
``random_pair``
    Two distinct active experts drawn at random per token (seeded): the null reference for ``paired``.
``within_token``
    Spearman ρ between the metric and ΔNLL over *all* active experts of each token (k ≥ 3), averaged;
    t-test of the ρs and an exact sign test.
``expert_level``
    Across the experts of a layer: each expert's mean ΔNLL over the tokens where it is active vs its metric
    value; Spearman with a permutation p — the question pruning asks.

Each design's cells form one family over metrics × layers, corrected with ``correction``; the verdict is
the dual test: both of the design's tests pass the corrected α (``tests_used`` names them: t-test and
Wilcoxon for the contrast designs, t-test and sign test for ``within_token``; ``expert_level`` has one
test, its permutation p). ``p_first_adjusted`` / ``p_second_adjusted`` are the two corrected p-values
and ``p_adjusted`` the larger. Paired
cells also carry the minimum detectable d_z at 80 % power (at the corrected α) and a TOST equivalence
test against ``|d_z| < equivalence_bound``, so a null can be stated as "no effect larger than …".

The designs are registered functions of one layer (:mod:`moeaudit.audit.designs`, :func:`get_design`);
the stage on a run directory is :mod:`moeaudit.audit.stage`.
"""

from moeaudit.audit.designs import (
    DESIGNS,
    PAPER_METRICS,
    TOKEN,
    AuditResult,
    AuditSettings,
    Design,
    DesignSpec,
    LayerInputs,
    audit,
    clustering_summary,
    complete_tokens,
    get_design,
    high_low,
    layer_inputs,
    list_designs,
    paper_table,
    register_design,
)

__all__ = [
    "DESIGNS", "PAPER_METRICS", "TOKEN", "AuditResult", "AuditSettings", "Design", "DesignSpec", "LayerInputs",
    "audit", "clustering_summary", "complete_tokens", "get_design", "high_low", "layer_inputs", "list_designs", "paper_table",
    "register_design",
]
