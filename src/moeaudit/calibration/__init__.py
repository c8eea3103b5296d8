"""Calibration sensitivity: how much each metric's expert ranking depends on which, and how many, calibration
tokens were used (issue 16).

Pure functions of the observe stage's tables (:mod:`moeaudit.calibration.sensitivity`) and the stage that
writes a run's ``calibration`` table (:func:`run_calibration`, ``moeaudit calibration RUN_DIR``).

=========================  ===========================================================================
function                   what it measures, per (metric, layer)
=========================  ===========================================================================
ranking_stability          Kendall τ of bootstrap resamples of calibration documents to the full ranking;
                           share of prune/keep decisions at a ratio that flip
learning_curve             τ of nested subsets of growing size to the full ranking
tokens_to_tau              the calibration size from which the learning curve's τ reaches a target
domain_agreement           τ between the rankings computed on each calibration domain alone
calibration_sensitivity    all of the above: the ``calibration`` table
kendall_tau_b              Kendall's tau-b of one vector against many (vectorised)
=========================  ===========================================================================
"""

from __future__ import annotations

from moeaudit.calibration.sensitivity import (
    CURVE_MAX_SHARE,
    UNITS,
    calibration_metrics,
    calibration_sensitivity,
    curve_sizes,
    domain_agreement,
    kendall_tau_b,
    learning_curve,
    ranking_stability,
    tokens_to_tau,
)
from moeaudit.calibration.stage import calibration_summary, calibration_windows, run_calibration

__all__ = [
    "CURVE_MAX_SHARE",
    "UNITS",
    "calibration_metrics",
    "calibration_sensitivity",
    "calibration_summary",
    "calibration_windows",
    "curve_sizes",
    "domain_agreement",
    "kendall_tau_b",
    "learning_curve",
    "ranking_stability",
    "run_calibration",
    "tokens_to_tau",
]
