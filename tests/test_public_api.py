"""The package's public surface: sub-packages as attributes, result objects that render in Jupyter."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pandas as pd
import torch


def test_subpackages_are_attributes_of_the_package():
    code = ("import moeaudit; print(moeaudit.intervene.compute_effects.__name__, moeaudit.audit.audit.__name__, "
            "moeaudit.prune.__name__, moeaudit.report.write_report.__name__, "
            "moeaudit.interactions.measure_interactions.__name__, moeaudit.wrap_model.__name__, "
            "'intervene' in dir(moeaudit))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["compute_effects", "audit", "moeaudit.prune", "write_report", "measure_interactions", "wrap_model",
                   "True"]


def test_result_objects_render_as_html_tables():
    from moeaudit.audit import AuditSettings, audit
    from moeaudit.interactions import measure_interactions
    from moeaudit.intervene import compute_effects
    from moeaudit.models import wrap_model
    from moeaudit.models.testing import tiny_model

    moe = wrap_model(tiny_model("olmoe", seed=1, num_experts_per_tok=2, num_experts=4))
    ids = torch.randint(3, 96, (2, 12), generator=torch.Generator().manual_seed(0))
    effects = compute_effects(moe, ids)
    html = effects._repr_html_()
    assert html.startswith("<div>") and "<table" in html and f"{effects.stats.interventions:,} exact" in html
    for layer in moe.moe_layer_indices:
        assert f"<td>{layer}</td>" in html
    games = measure_interactions(moe, ids, n=4)
    html = games._repr_html_()
    assert "<table" in html and "mean_interaction" in html and "top_gate_share" in html
    layers = moe.moe_layer_indices
    metrics = pd.DataFrame({"layer": np.repeat(layers, 4), "expert": np.tile(range(4), len(layers)),
                            "a<b>": np.arange(4.0 * len(layers))})
    result = audit(effects.effects, metrics, AuditSettings(designs=("paired",), n=None))
    html = result._repr_html_()
    assert "a&lt;b&gt;" in html and "a<b>" not in html  # names are escaped
    assert f"{result.counters['significant']} of {result.counters['cells']} cells significant" in html
