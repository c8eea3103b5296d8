"""Statistics of the audit: pure functions on arrays and tables, no torch.

Every function wraps scipy or statsmodels, validates its arguments in one step (raising
:class:`moeaudit.errors.InvalidParameterError`), and answers degenerate input with NaN fields and a
:class:`DegenerateInputWarning` (a :class:`RuntimeWarning`) — never with a stand-in value such as p = 1.

- :func:`paired_contrast` — the paper's test: d_z, its CI, paired t and Wilcoxon (arXiv:2606.10703);
  with ``cluster=`` the tests treat documents, not tokens, as independent.
- :func:`cluster_robust_mean`, :func:`cluster_bootstrap_ci`, :func:`mixed_effects_mean` — inference for
  correlated tokens: CR2 / Bell–McCaffrey t, the cluster bootstrap, random-intercept models.
- :func:`adjust`, :func:`dual_verdict`, :func:`verdicts_for_family` — multiple testing and verdicts.
- :func:`within_token_spearman`, :func:`within_token_spearman_frame`, :func:`expert_level_spearman` —
  rank correlations over all active experts of a token, and across experts.
- :func:`min_detectable_dz`, :func:`power_dz`, :func:`tost_paired` — what a null result rules out.
- :func:`cliff`, :func:`progressive_summary` — redundancy under progressive ablation.
"""

from __future__ import annotations

from moeaudit.stats._common import ConfidenceInterval, DegenerateInputWarning
from moeaudit.stats.cluster import (
    ClusterMeanResult,
    MixedMeanResult,
    cluster_bootstrap_ci,
    cluster_robust_mean,
    mixed_effects_mean,
)
from moeaudit.stats.correlation import (
    ExpertLevelSpearmanResult,
    WithinTokenSpearmanResult,
    expert_level_spearman,
    within_token_spearman,
    within_token_spearman_frame,
)
from moeaudit.stats.multitest import VERDICTS, adjust, dual_verdict, verdicts_for_family
from moeaudit.stats.paired import PairedContrastResult, paired_contrast
from moeaudit.stats.power import TostResult, min_detectable_dz, power_dz, tost_paired
from moeaudit.stats.redundancy import cliff, progressive_summary

__all__ = [
    "VERDICTS",
    "ClusterMeanResult",
    "MixedMeanResult",
    "cluster_bootstrap_ci",
    "cluster_robust_mean",
    "mixed_effects_mean",
    "ConfidenceInterval",
    "DegenerateInputWarning",
    "ExpertLevelSpearmanResult",
    "PairedContrastResult",
    "TostResult",
    "WithinTokenSpearmanResult",
    "adjust",
    "cliff",
    "dual_verdict",
    "expert_level_spearman",
    "min_detectable_dz",
    "paired_contrast",
    "power_dz",
    "progressive_summary",
    "tost_paired",
    "verdicts_for_family",
    "within_token_spearman",
    "within_token_spearman_frame",
]
