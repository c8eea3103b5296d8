"""compute_expert_metrics / compute_expert_metrics_by_domain: the whole table, selections, validation."""

from __future__ import annotations

import math
import statistics

import numpy as np
import pandas as pd
import pytest
from numpy.testing import assert_allclose, assert_array_equal
from pandas.testing import assert_frame_equal

from moeaudit.errors import InvalidParameterError
from moeaudit.metrics import compute_expert_metrics, compute_expert_metrics_by_domain

COLUMNS = [
    "layer", "expert", "frequency", "count", "gate_mass", "mean_gate_active", "ean_sum", "ean_mean", "msan",
    "act_std", "reap", "routing_entropy", "routing_gini", "max_act", "aimer", "router_row_norm",
    "paper_code_utilization", "paper_code_mean_weight_active",
]
MEAN_OVER_ACTIVE = ["mean_gate_active", "ean_mean", "msan", "act_std", "reap", "max_act"]


def test_hand_worked_table(routing):
    table = compute_expert_metrics(routing, {0: 4})
    assert list(table.columns) == COLUMNS
    assert table["count"].dtype == np.int64 and table["frequency"].dtype == np.float64
    want = pd.DataFrame({
        "layer": [0, 0, 0, 0],
        "expert": [0, 1, 2, 3],
        "frequency": [1.0, 2 / 3, 1 / 3, 0.0],
        "count": [3, 2, 1, 0],
        "gate_mass": [2.75, 2.25, 1.0, 0.0],
        "mean_gate_active": [1.1 / 3, 0.45, 0.4, np.nan],
        "ean_sum": [12.0, 6.0, 1.0, 0.0],
        "ean_mean": [4.0, 3.0, 1.0, np.nan],
        "msan": [56 / 3, 10.0, 1.0, np.nan],
        "act_std": [2.0, math.sqrt(2), np.nan, np.nan],
        "reap": [9.5 / 3, 3.0, 1.0, np.nan],
        "max_act": [4.0, 3.0, 0.5, np.nan],
    })
    assert_frame_equal(table[want.columns], want, check_dtype=False)


def test_never_routed_experts_get_the_documented_values(random_case):
    routing, num_experts, probs, weights, _ = random_case(0)
    table = compute_expert_metrics(routing, num_experts, router_probs=probs, weights=weights)
    assert len(table) == sum(num_experts.values())
    assert_array_equal(table.layer, [0] * 6 + [3] * 5)
    assert_array_equal(table.expert, list(range(6)) + list(range(5)))
    last = table[table.expert == table.layer.map(num_experts) - 1]
    assert (last[["frequency", "count", "gate_mass", "ean_sum"]] == 0).all().all()
    assert last[MEAN_OVER_ACTIVE].isna().all().all()
    assert last[["routing_entropy", "routing_gini", "aimer", "router_row_norm"]].notna().all().all()
    assert_allclose(table.groupby("layer").frequency.sum(), [2.0, 3.0])  # = top-k


def _reference(routing, num_experts, router_probs, weights, tokens, reap_gate):
    """Brute-force re-computation with Python loops over rows (the definitions, written out)."""
    out = []
    for layer, n_exp in sorted(num_experts.items()):
        rows = [r for r in routing.itertuples() if r.layer == layer]
        n_tok = len({(r.seq, r.pos) for r in rows})
        for e in range(n_exp):
            mine = [r for r in rows if r.expert == e]
            norms = [r.act_norm for r in mine]
            gate = {"combine": "combine_weight", "renorm": "renorm_gate", "raw": "raw_gate"}[reap_gate]
            column = [router_probs[layer][t][e] for t in range(len(tokens[layer]))]
            total = sum(column)
            entropy = -sum(q / total * math.log(q / total) for q in column if q > 0) / math.log(len(column))
            gini = sum(abs(a - b) for a in column for b in column) / (2 * len(column) * total)
            flat = [float(w) for key in ("gate_up_proj", "down_proj") for w in np.ravel(weights[layer][key][e])]
            aimer = (sum(abs(w) for w in flat) / len(flat)) / math.sqrt(sum(w * w for w in flat) / len(flat))
            nan = float("nan")
            out.append({
                "layer": layer, "expert": e,
                "frequency": len(mine) / n_tok, "count": len(mine),
                "gate_mass": sum(r.combine_weight for r in mine),
                "mean_gate_active": statistics.fmean(r.raw_gate for r in mine) if mine else nan,
                "ean_sum": sum(norms),
                "ean_mean": statistics.fmean(norms) if mine else nan,
                "msan": statistics.fmean(n * n for n in norms) if mine else nan,
                "act_std": statistics.stdev(norms) if len(mine) >= 2 else nan,
                "reap": statistics.fmean(getattr(r, gate) * r.act_norm for r in mine) if mine else nan,
                "routing_entropy": entropy, "routing_gini": gini,
                "max_act": max(r.act_max_abs for r in mine) if mine else nan,
                "aimer": aimer,
                "router_row_norm": math.sqrt(sum(float(w) ** 2 for w in weights[layer]["router"][e])),
                "paper_code_utilization": nan, "paper_code_mean_weight_active": nan,  # no router logits given
            })
    return pd.DataFrame(out)


@pytest.mark.parametrize("seed,reap_gate", [(1, "combine"), (2, "renorm"), (3, "raw")])
def test_equals_a_brute_force_loop(random_case, seed, reap_gate):
    routing, num_experts, probs, weights, tokens = random_case(seed)
    table = compute_expert_metrics(routing, num_experts, router_probs=probs, weights=weights, reap_gate=reap_gate)
    want = _reference(routing, num_experts, probs, weights, tokens, reap_gate)
    assert_frame_equal(table, want[COLUMNS], check_dtype=False, rtol=1e-10)


def _restricted_probs(probs, tokens, keep):
    """router_probs rows of the tokens kept by ``keep((seq, pos))``, still in ascending order."""
    return {layer: p[[i for i, tok in enumerate(tokens[layer]) if keep(tok)]] for layer, p in probs.items()}


def test_seqs_restriction_equals_the_filtered_frame(random_case):
    routing, num_experts, probs, weights, tokens = random_case(4)
    got = compute_expert_metrics(routing, num_experts, router_probs=probs, weights=weights, seqs=[1, 3])
    part = routing[routing.seq.isin([1, 3])]
    want = compute_expert_metrics(part, num_experts, router_probs=_restricted_probs(probs, tokens,
                                  lambda tok: tok[0] in (1, 3)), weights=weights)
    assert_frame_equal(got, want)
    full = compute_expert_metrics(routing, num_experts, router_probs=probs, weights=weights)
    assert not np.allclose(full.frequency, got.frequency)  # the selection changed something


def test_domain_breakdown_equals_the_filtered_frames(random_case):
    routing, num_experts, probs, weights, tokens = random_case(5)
    domain_of = dict(zip(routing.seq, routing.domain, strict=False))
    got = compute_expert_metrics_by_domain(routing, num_experts, router_probs=probs, weights=weights)
    assert list(got.columns) == ["domain", *COLUMNS]
    assert sorted(got.domain.unique()) == ["code", "math", "wiki"]
    for dom, block in got.groupby("domain", sort=False):
        want = compute_expert_metrics(routing[routing.domain == dom], num_experts, weights=weights,
                                      router_probs=_restricted_probs(probs, tokens, lambda t: domain_of[t[0]] == dom))
        assert_frame_equal(block.drop(columns="domain").reset_index(drop=True), want)
    # with seqs as well: only the wiki sequences 0 and 2 -> only the wiki domain
    wiki = compute_expert_metrics_by_domain(routing, num_experts, seqs=[0, 2])
    assert wiki.domain.unique().tolist() == ["wiki"]


def test_domain_breakdown_needs_a_domain_column(routing):
    with pytest.raises(InvalidParameterError, match="`domain` column"):
        compute_expert_metrics_by_domain(routing, {0: 4})


def test_row_order_does_not_matter(random_case):
    routing, num_experts, probs, weights, _ = random_case(6)
    a = compute_expert_metrics(routing, num_experts, router_probs=probs)
    b = compute_expert_metrics(routing.sort_values(["layer", "seq", "pos", "slot"]), num_experts, router_probs=probs)
    assert_frame_equal(a, b)


@pytest.mark.parametrize(
    "mutate,match",
    [
        (lambda r: r.drop(columns="pos"), r"`routing` must be a table with columns"),
        (lambda r: r.assign(layer=r.layer.astype(float)), r"`routing\['layer'\]` must be an integer column"),
        (lambda r: r.assign(expert=r.expert.replace(2, 4)), r"must be in \[0, 3\]"),
        (lambda r: r.assign(seq=-1), r"`routing\['seq'\]` must be non-negative"),
        (lambda r: pd.concat([r, r.iloc[:1]]), "one row per"),
        (lambda r: r.iloc[:0], "non-empty"),
        (lambda r: r.assign(layer=1), "no entry for layer 1"),
    ],
)
def test_bad_routing_is_refused(routing, mutate, match):
    with pytest.raises(InvalidParameterError, match=match):
        compute_expert_metrics(mutate(routing), {0: 4})


def test_bad_arguments_are_refused(routing):
    with pytest.raises(InvalidParameterError, match="`routing` must be a pandas DataFrame"):
        compute_expert_metrics(routing.to_dict(), {0: 4})
    with pytest.raises(InvalidParameterError, match=r"`num_experts\[0\]` must be a positive int"):
        compute_expert_metrics(routing, {0: 0})
    with pytest.raises(InvalidParameterError, match=r"`router_probs\[0\]` must be an array of shape \(3, 4\)"):
        compute_expert_metrics(routing, {0: 4}, router_probs={0: np.ones((4, 4))})
    with pytest.raises(InvalidParameterError, match="`seqs` must be sequence indices that occur"):
        compute_expert_metrics(routing, {0: 4}, seqs=[7])
    with pytest.raises(InvalidParameterError, match="`seqs` must be a non-empty"):
        compute_expert_metrics(routing, {0: 4}, seqs=[])
    with pytest.raises(InvalidParameterError, match="`metrics` must be a list without repeated"):
        compute_expert_metrics(routing, {0: 4}, metrics=["count", "count"])
