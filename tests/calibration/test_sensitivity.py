"""Calibration sensitivity on planted routing tables: exact resampling, τ and flips, the learning curve,
domain agreement, degenerate input and validation."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps

import moeaudit.metrics as M
from moeaudit.calibration import (
    calibration_sensitivity,
    curve_sizes,
    domain_agreement,
    kendall_tau_b,
    learning_curve,
    ranking_stability,
    tokens_to_tau,
)
from moeaudit.calibration.sensitivity import _bootstrap_counts, _pruned, _setup
from moeaudit.errors import InvalidParameterError
from moeaudit.metrics import compute_expert_metrics
from moeaudit.prune.criteria import prune_order
from moeaudit.stats import DegenerateInputWarning
from moeaudit.tables import CALIBRATION_SCHEMA
from tests.calibration.conftest import ASCENDING, DESCENDING, E, planted_routing, random_routing

COUNTING = ["frequency", "count"]


# ------------------------------------------------------------------------------------------ exact resampling
@pytest.fixture
def gate_median():
    """A user metric (the median raw gate over active tokens), registered for one test."""
    @M.register_metric("gate_median_test", needs=("raw_gate",))
    def _median(data):
        gate = data.column("raw_gate")
        return np.array([np.median(gate[data.expert == e]) if (data.expert == e).any() else np.nan
                         for e in range(data.num_experts)])
    yield "gate_median_test"
    M.unregister_metric("gate_median_test")


def test_drawing_every_document_once_reproduces_the_calibration_metrics_bit_for_bit(gate_median):
    routing, probs, documents, num_experts = random_routing(9, seed=1)
    seqs = np.array(sorted(documents))[::2]  # a calibration subset whose documents are partly cut
    reference = compute_expert_metrics(routing, num_experts, router_probs=probs, seqs=seqs)
    setup = _setup(routing, num_experts, probs, {s: documents[s] for s in seqs}, seqs, None, "combine", None)
    # the user metric too; not the weight-only ones, nor those whose input (router logits) was not given
    needs_logits = {m for m in M.list_metrics() if "router_logits" in M.get_metric(m).needs}
    assert set(setup.metrics) == set(M.list_metrics()) - {"aimer", "router_row_norm"} - needs_logits
    identity = setup.values(np.ones(setup.pool.n_units, dtype=np.int64))
    for mi, metric in enumerate(setup.metrics):
        for li, layer in enumerate(setup.layers):
            expected = reference.loc[reference["layer"] == layer, metric].to_numpy(dtype=np.float64)
            assert np.array_equal(identity[li, mi, :len(expected)], expected, equal_nan=True), (metric, layer)


def test_a_document_drawn_twice_counts_twice():
    routing, probs, documents, num_experts = random_routing(5, seed=2)
    setup = _setup(routing, num_experts, probs, documents, None, None, "combine", None)
    first = setup.pool.units[0]
    seqs = [s for s, d in documents.items() if d == first]
    one = routing[routing["seq"].isin(seqs)]
    twice = pd.concat([one, one.assign(seq=one["seq"] + 1000)], ignore_index=True)
    doubled_probs = {}
    for layer, matrix in probs.items():
        at = routing[routing["layer"] == layer].drop_duplicates(["seq", "pos"]).sort_values(["seq", "pos"])
        rows = matrix[at["seq"].isin(seqs).to_numpy()]
        doubled_probs[layer] = np.concatenate([rows, rows])
    expected = compute_expert_metrics(twice, num_experts, router_probs=doubled_probs, metrics=list(setup.metrics))
    counts = np.zeros(setup.pool.n_units, dtype=np.int64)
    counts[0] = 2
    drawn = setup.values(counts)
    for mi, metric in enumerate(setup.metrics):
        for li, layer in enumerate(setup.layers):
            want = expected.loc[expected["layer"] == layer, metric].to_numpy(dtype=np.float64)
            np.testing.assert_allclose(drawn[li, mi, :len(want)], want, rtol=1e-12, err_msg=metric)
    single = compute_expert_metrics(one, num_experts, metrics=["count"])
    count = setup.metrics.index("count")
    assert np.array_equal(drawn[0, count, :6], 2 * single.loc[single["layer"] == setup.layers[0], "count"])


# ------------------------------------------------------------------------------------------ τ and flips
def test_kendall_tau_b_is_scipys_tau_b():
    rng = np.random.default_rng(0)
    reference = rng.integers(0, 5, 12).astype(float)
    reference[[2, 7]] = -np.inf
    values = rng.integers(0, 4, (40, 12)).astype(float)
    values[3, :4] = -np.inf
    ours = kendall_tau_b(reference, values)
    theirs = [sps.kendalltau(np.where(np.isinf(reference), -1, reference), np.where(np.isinf(v), -1, v)).statistic
              for v in values]
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-12)
    assert kendall_tau_b([1, 2, 3, 4], [[1, 2, 4, 3]]).round(3).tolist() == [0.667]


def test_kendall_tau_b_of_a_constant_vector_is_nan_with_a_warning():
    with pytest.warns(DegenerateInputWarning, match="constant vector"):
        tau = kendall_tau_b([1, 2, 3], [[5, 5, 5], [3, 2, 1]])
    assert math.isnan(tau[0]) and tau[1] == -1.0


def test_flip_decisions_are_the_prune_stages():
    rng = np.random.default_rng(3)
    scores = rng.integers(0, 4, (30, 10)).astype(float)
    scores[scores == 0] = -np.inf  # unscored experts
    chosen = _pruned(scores, 3)
    for row, mask in zip(scores, chosen):
        assert set(np.flatnonzero(mask)) == set(prune_order(row, "low")[:3].tolist())


def test_documents_with_the_same_profile_give_tau_one_and_no_flips():
    routing, documents = planted_routing([ASCENDING] * 6, windows_per_doc=2)
    table = ranking_stability(routing, {0: E}, documents=documents, metrics=COUNTING + ["reap", "ean_mean"],
                              n_resamples=50, seed=4)
    assert (table["tau_mean"] == 1.0).all() and (table["tau_p05"] == 1.0).all()
    assert (table["flip_share"] == 0.0).all() and (table["n_resamples"] == 50).all()
    assert (table["n_units"] == 6).all() and (table["n_tokens"] == 6 * 36).all() and (table["n_pruned"] == 2).all()


def test_two_populations_with_opposite_rankings_give_low_tau_and_many_flips():
    # 6 documents rank the experts one way, 5 the other: the full split follows the majority, and a resample
    # reverses the ranking exactly when it draws more of the minority's documents
    routing, documents = planted_routing([ASCENDING] * 6 + [DESCENDING] * 5)
    table = ranking_stability(routing, {0: E}, documents=documents, metrics=COUNTING, n_resamples=200, seed=7)
    counts = _bootstrap_counts(11, 200, 7)
    majority = counts[:, :6].sum(axis=1) > counts[:, 6:].sum(axis=1)
    for row in table.itertuples():
        assert row.tau_mean == pytest.approx(np.where(majority, 1.0, -1.0).mean(), abs=1e-12)
        assert row.tau_p05 == -1.0
        # reversed: the two experts pruned become the two kept most, 4 of 8 decisions flip
        assert row.flip_share == pytest.approx(0.5 * (~majority).mean(), abs=1e-12)
        assert row.flip_share_p95 == 0.5
    assert table["tau_mean"].max() < 0.5


def test_windows_as_units_split_a_document():
    routing, documents = planted_routing([ASCENDING] * 3, windows_per_doc=4)
    assert ranking_stability(routing, {0: E}, metrics="count", n_resamples=5)["n_units"].tolist() == [12]
    assert ranking_stability(routing, {0: E}, documents=documents, metrics="count",
                             n_resamples=5)["n_units"].tolist() == [3]


def test_resamples_are_seeded():
    routing, probs, documents, num_experts = random_routing(8, seed=5)
    a = ranking_stability(routing, num_experts, router_probs=probs, documents=documents, n_resamples=20, seed=1)
    b = ranking_stability(routing, num_experts, router_probs=probs, documents=documents, n_resamples=20, seed=1)
    c = ranking_stability(routing, num_experts, router_probs=probs, documents=documents, n_resamples=20, seed=2)
    pd.testing.assert_frame_equal(a, b)
    assert not a["tau_mean"].equals(c["tau_mean"])


# ------------------------------------------------------------------------------------------ learning curve
def test_curve_sizes_are_geometric_up_to_half_the_split():
    assert curve_sizes(40, 6) == [1, 2, 3, 6, 11, 20]  # round(20 ** (i / 5))
    assert curve_sizes(3, 6) == [1] and curve_sizes(1, 6) == []


def test_identical_documents_reach_the_target_with_one_document():
    routing, documents = planted_routing([ASCENDING] * 10, windows_per_doc=3)
    curve = learning_curve(routing, {0: E}, documents=documents, metrics=COUNTING, points=4, repeats=3)
    assert (curve["tau"] == 1.0).all() and curve["units"].unique().tolist() == [1, 2, 3, 5]
    reach = tokens_to_tau(curve, 0.9)
    assert reach["units_to_target"].tolist() == [1.0, 1.0] and reach["tokens_to_target"].tolist() == [36.0, 36.0]


def test_the_curve_rises_with_calibration_size_on_noisy_documents():
    rng = np.random.default_rng(11)
    share = ASCENDING / ASCENDING.sum()
    profiles = [rng.multinomial(30, share) for _ in range(60)]
    routing, documents = planted_routing(profiles)
    curve = learning_curve(routing, {0: E}, documents=documents, metrics="frequency", points=6, repeats=20, seed=3)
    tau = curve.sort_values("units")["tau"].to_numpy()
    assert tau[-1] > tau[0] + 0.2 and np.all(np.diff(tau) > -0.05)
    reach = tokens_to_tau(curve, float(tau[-1]))
    assert reach["units_to_target"].iloc[0] <= curve["units"].max()


def test_a_target_never_reached_is_nan_with_a_warning():
    curve = pd.DataFrame({"metric": ["reap"] * 2, "layer": [0, 0], "units": [1, 2], "tokens": [10.0, 20.0],
                          "tau": [0.3, 0.6]})
    with pytest.warns(DegenerateInputWarning, match="never reaches 0.9"):
        reach = tokens_to_tau(curve)
    assert math.isnan(reach["tokens_to_target"].iloc[0]) and math.isnan(reach["units_to_target"].iloc[0])


# ------------------------------------------------------------------------------------------ domains
def _by_domain(orders: dict[str, np.ndarray]) -> pd.DataFrame:
    return pd.concat([pd.DataFrame({"domain": d, "layer": 0, "expert": np.arange(E), "reap": order.astype(float),
                                    "aimer": np.ones(E)}) for d, order in orders.items()], ignore_index=True)


def test_domain_agreement_over_pairs():
    table = domain_agreement(_by_domain({"a": ASCENDING, "b": ASCENDING, "c": DESCENDING}))
    row = table.iloc[0]
    assert table["metric"].tolist() == ["reap"]  # aimer is weight-only
    assert row.n_domains == 3 and row.domain_tau_min == -1.0 and row.domain_tau_mean == pytest.approx(-1 / 3)
    assert row.domain_pair_min == "a | c"


def test_one_domain_gives_nan_with_a_warning():
    with pytest.warns(DegenerateInputWarning, match="fewer than 2 domains"):
        table = domain_agreement(_by_domain({"a": ASCENDING}))
    assert math.isnan(table["domain_tau_mean"].iloc[0]) and table["n_domains"].iloc[0] == 1


# ------------------------------------------------------------------------------------------ the table
def test_calibration_sensitivity_gives_the_table_schema():
    routing, probs, documents, num_experts = random_routing(12, seed=6)
    by_domain = M.compute_expert_metrics_by_domain(routing, num_experts, router_probs=probs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DegenerateInputWarning)
        table = calibration_sensitivity(routing, num_experts, router_probs=probs, documents=documents,
                                        by_domain=by_domain, n_resamples=10, points=3, repeats=2, seed=5)
    assert list(table.columns) == CALIBRATION_SCHEMA.names
    import pyarrow as pa

    pa.Table.from_pandas(table, schema=CALIBRATION_SCHEMA, preserve_index=False)  # the types fit
    assert len(table) == 2 * 12 and set(table["unit"]) == {"document"} and (table["n_domains"] == 2).all()
    assert all(len(u) == len(t) == len(v) == 3 for u, t, v in
               zip(table["curve_units"], table["curve_tokens"], table["curve_tau"]))
    assert table["domain_pair_min"].dropna().eq("code | prose").all()


def test_one_document_is_degenerate_nan_with_warnings():
    routing, documents = planted_routing([ASCENDING], windows_per_doc=4)
    with pytest.warns(DegenerateInputWarning) as record:
        table = calibration_sensitivity(routing, {0: E}, documents=documents, metrics=COUNTING, n_resamples=10)
    messages = " ".join(str(w.message) for w in record)
    assert "need at least 2 to resample" in messages and "curve is empty" in messages
    assert table[["tau_mean", "tau_p05", "flip_share", "tokens_to_target"]].isna().all().all()
    assert (table["n_resamples"] == 0).all() and table["curve_tau"].map(len).eq(0).all()


def test_a_constant_full_ranking_is_nan_with_a_warning():
    routing, documents = planted_routing([ASCENDING] * 4)
    routing["act_norm"] = 2.0  # every expert's activation norm is the same
    with pytest.warns(DegenerateInputWarning, match="ranking is constant for ean_mean@0"):
        table = ranking_stability(routing, {0: E}, documents=documents, metrics=["ean_mean", "count"],
                                  n_resamples=10)
    assert math.isnan(table.set_index("metric").loc["ean_mean", "tau_mean"])
    assert table.set_index("metric").loc["count", "tau_mean"] == 1.0


@pytest.mark.parametrize("kwargs, fragment", [
    (dict(n_resamples=1), "`n_resamples` must be an integer >= 2; got 1."),
    (dict(ratio=1.5), "`ratio` must be in (0, 1); got 1.5."),
    (dict(seed=-1), "`seed` must be an integer >= 0; got -1."),
    (dict(seed=None), "`seed` must be a non-negative integer"),
    (dict(metrics=["aimer"]), "`metrics` must be metrics that read calibration tokens"),
    (dict(metrics=["no_such_metric"]), "`metrics` must be registered metric names"),
    (dict(documents={0: "a"}), "`documents` must be a document key for every selected seq"),
    (dict(documents=["a"]), "`documents` must be a mapping or Series"),
    (dict(reap_gate="sum"), "`reap_gate` must be one of"),
    (dict(seqs=[99]), "`seqs` must be sequence indices that occur in `routing`"),
])
def test_bad_input_is_one_house_line(kwargs, fragment):
    routing, _ = planted_routing([ASCENDING] * 3)
    with pytest.raises(InvalidParameterError) as info:
        ranking_stability(routing, {0: E}, **kwargs)
    assert fragment in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("call, fragment", [
    (lambda r: learning_curve(r, {0: E}, points=0), "`points` must be an integer >= 1; got 0."),
    (lambda r: learning_curve(r, {0: E}, repeats=0), "`repeats` must be an integer >= 1; got 0."),
    (lambda r: calibration_sensitivity(r, {0: E}, tau_target=0), "`tau_target` must be a τ in (0, 1]; got 0."),
    (lambda r: calibration_sensitivity(r, {0: E}, by_domain=pd.DataFrame({"layer": [0]})),
     "`by_domain` must be a table with columns domain, layer, expert"),
    (lambda r: ranking_stability(r.drop(columns="expert"), {0: E}), "`routing` must be a table with columns"),
    (lambda r: ranking_stability(r, {1: E}), "`num_experts` must be a mapping with an entry for every layer"),
    (lambda r: tokens_to_tau(pd.DataFrame({"metric": []}), 0.9), "`curve` must be a learning_curve table"),
    (lambda r: tokens_to_tau(pd.DataFrame({c: [] for c in ("metric", "layer", "units", "tokens", "tau")}), 1.5),
     "`target` must be a τ in (0, 1]; got 1.5."),
    (lambda r: kendall_tau_b([1, 2, 3], [[1, 2]]), "`values` must be an array of shape (B, 3)"),
    (lambda r: kendall_tau_b([1, np.nan, 3], [1, 2, 3]), "finite scores or -inf"),
    (lambda r: domain_agreement(_by_domain({"a": ASCENDING}), metrics=["nope"]),
     "`metrics` must be metric columns of `by_domain`"),
])
def test_every_public_function_validates_first(call, fragment):
    routing, _ = planted_routing([ASCENDING] * 3)
    with pytest.raises(InvalidParameterError) as info:
        call(routing)
    assert fragment in str(info.value) and "\n" not in str(info.value)
