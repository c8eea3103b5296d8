"""The audit forest plot and the pruning plot: one row per cell or criterion, labels and units on every axis."""

from __future__ import annotations

import numpy as np
import pandas as pd

from moeaudit.report import _pruning, figures
from tests.report.conftest import _pruning as synthetic_pruning, _tests as synthetic_tests


def _visible(fig):
    return [ax for ax in fig.axes if ax.get_visible()]


def test_audit_forest_has_one_row_per_metric_and_layer():
    paired = synthetic_tests().query("design == 'paired'")  # 3 metrics × 2 layers, one of them untestable
    with figures.style():
        fig = figures.audit_forest(paired)
    axes = _visible(fig)
    assert [ax.get_title(loc="left") for ax in axes] == ["layer 0", "layer 1"]
    rows = [(ax.get_title(loc="left"), tick.label1.get_text()) for ax in axes for tick in ax.yaxis.get_major_ticks()]
    assert rows == [(f"layer {layer}", metric) for layer in (0, 1)
                    for metric in ("frequency", "mean_gate_active", "reap")]
    assert len(rows) == len(paired)
    for ax in axes:  # a CI line per testable cell, its ends the table's CI
        assert ax.get_xlabel() == "d_z (unitless)"
        lines = [line for line in ax.get_lines() if len(line.get_xdata()) == 2 and line.get_ydata()[0] ==
                 line.get_ydata()[1]]
        layer = int(ax.get_title(loc="left").split()[1])
        cells = paired[(paired["layer"] == layer) & np.isfinite(paired["effect"])]
        assert sorted(tuple(np.round(line.get_xdata(), 4)) for line in lines) == \
            sorted(zip(cells["ci_low"].round(4), cells["ci_high"].round(4)))
    assert axes[0].get_ylabel() == "metric"
    assert any(text.get_text() == "untestable" for text in axes[1].texts)  # reap at layer 1
    assert figures.audit_forest(paired.iloc[:0]) is None


def test_pruning_plot_labels_each_criterion_against_the_random_band():
    pruning = synthetic_pruning()
    whole, single = _pruning.whole_model(pruning), _pruning.per_layer(pruning)
    with figures.style():
        fig = figures.pruning_plot(whole, single, "held-out perplexity", 20.0)
    panels, heat = fig.axes[:2], fig.axes[2]
    stats = _pruning.summary(whole)
    for ax, ratio in zip(panels, (0.25, 0.5)):
        assert ax.get_title(loc="left") == f"{ratio:.0%} of routed experts pruned in every layer"
        assert [t.get_text() for t in ax.get_yticklabels()] == ["reap", "frequency"]  # best first
        assert ax.get_xlabel() == "held-out perplexity"
        band = [p for p in ax.patches if p.get_facecolor()[:3] != (1.0, 1.0, 1.0)]
        random = stats[(stats["criterion"] == "random") & (stats["ratio"] == ratio)].iloc[0]
        xs = band[0].get_patch_transform().transform(band[0].get_path().vertices)[:, 0]  # Rectangle or Polygon
        assert (xs.min(), xs.max()) == (random["random_q05"], random["random_q95"])
        colors = {line.get_color() for line in ax.get_lines() if line.get_marker() in ("o", "D")}
        assert colors == {figures.BELOW_BAND, figures.IN_BAND if ratio == 0.25 else figures.ABOVE_BAND}
    assert panels[0].get_ylabel() == "criterion (best first)"
    assert heat.get_xlabel() == "layer pruned alone (50% of its routed experts)" and heat.get_ylabel() == "criterion"
    assert "percentile among" in fig.axes[3].get_ylabel()  # the colour bar
    assert sorted(t.get_text() for t in heat.texts) == ["0", "0", "100", "100"]
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert "random 5–95%" in legend and "below the band (beats random)" in legend


def test_pruning_plot_without_single_layer_rows_or_rows():
    whole = _pruning.whole_model(synthetic_pruning())
    with figures.style():
        fig = figures.pruning_plot(whole, pd.DataFrame(), "held-out NLL (nats per token)")
    assert len(fig.axes) == 2 and all(ax.get_xlabel() == "held-out NLL (nats per token)" for ax in fig.axes)
    assert figures.pruning_plot(whole.iloc[:0], pd.DataFrame(), "x") is None


def test_figures_fit_800_px():
    """The report's column: a figure saved at savefig.dpi is at most ~800 px wide, so it is not scaled down."""
    assert figures.WIDTH * figures.STYLE["savefig.dpi"] <= 800


def test_pruning_plot_with_many_long_criteria_and_three_ratios_lays_out(tmp_path):
    """The full demo's shape (3 ratios, 17 criteria with names like ``oracle_reconstruction``) once left
    matplotlib's constrained layout without room ("axes sizes collapsed to zero") at three panels a row."""
    import warnings

    names = ["oracle_delta_nll", "oracle_reconstruction", "mean_gate_active", "router_row_norm", "routing_entropy",
             "routing_gini", "frequency", "count", "gate_mass", "max_act", "act_std", "ean_sum", "ean_mean", "msan",
             "aimer", "reap", "paper_code_utilisation"]
    rows = [(c, r, 0, 10.0 + i + r) for i, c in enumerate(names) for r in (0.125, 0.25, 0.5)]
    rows += [("random", r, s, 12.0 + s + r) for r in (0.125, 0.25, 0.5) for s in range(10)]
    whole = pd.DataFrame(rows, columns=["criterion", "ratio", "seed", "value"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a layout warning fails the test
        with figures.style():
            fig = figures.pruning_plot(whole, pd.DataFrame(), "held-out perplexity (exp of mean nats per token)")
            figures.save(fig, tmp_path / "pruning")
    assert len(_visible(fig)) == 3
    assert all(ax.get_position().width > 0.2 for ax in _visible(fig))
