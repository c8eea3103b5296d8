"""register_metric / list_metrics / unregister_metric and how compute_expert_metrics runs them."""

from __future__ import annotations

import numpy as np
import pytest
from numpy.testing import assert_allclose

from moeaudit.errors import InvalidParameterError
from moeaudit.metrics import (
    MissingInputError,
    compute_expert_metrics,
    list_metrics,
    register_metric,
    unregister_metric,
)

BUILTIN = [
    "frequency", "count", "gate_mass", "mean_gate_active", "ean_sum", "ean_mean", "msan", "act_std", "reap",
    "routing_entropy", "routing_gini", "max_act", "aimer", "router_row_norm",
]


def test_builtins_are_listed_in_table_order():
    assert list_metrics()[: len(BUILTIN)] == BUILTIN


def test_user_metric_is_added_to_the_table(routing, clean_registry):
    @register_metric("median_norm", needs=("act_norm",))
    def median_norm(data):
        norms = data.column("act_norm")
        return np.array([np.median(norms[data.expert == e]) if (data.expert == e).any() else np.nan
                         for e in range(data.num_experts)])

    assert "median_norm" in list_metrics()
    table = compute_expert_metrics(routing, {0: 4})
    assert list(table.columns[-1:]) == ["median_norm"]
    assert_allclose(table.median_norm, [4.0, 3.0, 1.0, np.nan])  # norms 2,4,6 | 4,2 | 1 | -
    only = compute_expert_metrics(routing, {0: 4}, metrics=["median_norm", "frequency"])
    assert list(only.columns) == ["layer", "expert", "median_norm", "frequency"]


def test_functional_registration_and_overwrite(routing, clean_registry):
    register_metric("ones", lambda d: np.ones(d.num_experts))
    with pytest.raises(InvalidParameterError, match="already registered"):
        register_metric("ones", lambda d: np.zeros(d.num_experts))
    register_metric("ones", lambda d: np.zeros(d.num_experts), overwrite=True)
    assert (compute_expert_metrics(routing, {0: 4}, metrics="ones").ones == 0).all()
    unregister_metric("ones")
    assert "ones" not in list_metrics()


@pytest.mark.parametrize("name", ["layer", "expert", "domain", "1st", "with space", "class"])
def test_bad_names_are_refused(name):
    with pytest.raises(InvalidParameterError, match="`name` must be"):
        register_metric(name, lambda d: np.zeros(d.num_experts))


def test_wrong_output_shape_is_refused(routing, clean_registry):
    register_metric("too_short", lambda d: np.zeros(d.num_experts - 1))
    with pytest.raises(ValueError, match="one value per expert"):
        compute_expert_metrics(routing, {0: 4}, metrics=["too_short"])


def test_missing_input_gives_nan_by_default_and_raises_when_requested(routing):
    table = compute_expert_metrics(routing.drop(columns="act_max_abs"), {0: 4})
    assert table.max_act.isna().all() and table.routing_entropy.isna().all()
    with pytest.raises(MissingInputError, match="`act_max_abs`"):
        compute_expert_metrics(routing.drop(columns="act_max_abs"), {0: 4}, metrics=["max_act"])
    with pytest.raises(MissingInputError, match="`router_probs`"):
        compute_expert_metrics(routing, {0: 4}, metrics=["routing_gini"])
    with pytest.raises(MissingInputError, match="`combine_weight`"):
        compute_expert_metrics(routing.drop(columns="combine_weight"), {0: 4}, metrics=["reap"])


def test_unknown_metric_is_refused(routing):
    with pytest.raises(InvalidParameterError, match="`metrics` must be registered metric names"):
        compute_expert_metrics(routing, {0: 4}, metrics=["nope"])
    with pytest.raises(InvalidParameterError, match="`name` must be a registered metric"):
        unregister_metric("nope")


def test_user_metric_sees_tokens_aligned_with_router_probs(random_case, clean_registry):
    """data.token indexes data.router_probs rows, also after a seqs selection."""

    @register_metric("gate_from_probs", needs=("router_probs",))
    def gate_from_probs(data):
        picked = data.router_probs[data.token, data.expert]  # p_e(x_t) of each routing row
        total = np.bincount(data.expert, weights=picked, minlength=data.num_experts)
        n = np.bincount(data.expert, minlength=data.num_experts)
        with np.errstate(invalid="ignore"):
            return total / n

    routing, num_experts, probs, _, _ = random_case(7)
    for seqs in (None, [1, 3]):
        table = compute_expert_metrics(routing, num_experts, router_probs=probs, seqs=seqs,
                                       metrics=["mean_gate_active", "gate_from_probs"])
        assert_allclose(table.gate_from_probs, table.mean_gate_active, equal_nan=True)
