"""Cluster-robust inference: CR2 / Bell–McCaffrey against the matrix definitions, reductions to the
independent-data tests, the null rejection rate under strong within-document correlation, the cluster
bootstrap and the mixed model."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps

from moeaudit.errors import InvalidParameterError
from moeaudit.stats import (
    DegenerateInputWarning,
    cluster_bootstrap_ci,
    cluster_robust_mean,
    mixed_effects_mean,
    paired_contrast,
    tost_paired,
    within_token_spearman_frame,
)


def brute_force_cr2(y: np.ndarray, codes: np.ndarray) -> tuple[float, float]:
    """CR2 variance and Bell–McCaffrey df from their matrix definitions (Imbens & Kolesár 2016, Sec. III)."""
    n = y.size
    x = np.ones((n, 1))
    hat = x @ np.linalg.inv(x.T @ x) @ x.T
    resid = y - hat @ y
    variance, columns = 0.0, []
    for g in np.unique(codes):
        idx = codes == g
        w, q = np.linalg.eigh(np.eye(idx.sum()) - hat[np.ix_(idx, idx)])
        adjust = q @ np.diag(w ** -0.5) @ q.T
        score = x[idx].T @ adjust @ resid[idx]
        variance += float(score @ score) / n**2
        columns.append(((np.eye(n) - hat)[:, idx] @ adjust @ x[idx]).ravel() / n)
    g_mat = np.array(columns).T
    lam = np.linalg.eigvalsh(g_mat.T @ g_mat)
    return variance, float(lam.sum() ** 2 / (lam**2).sum())


@pytest.mark.parametrize("sizes", [[1, 3, 7, 2, 10, 4, 1, 5], [2, 2], [30, 1, 1, 1, 1]])
def test_cr2_and_df_equal_the_matrix_definitions(sizes):
    codes = np.repeat(np.arange(len(sizes)), sizes)
    y = np.random.default_rng(len(sizes)).normal(size=codes.size)
    res = cluster_robust_mean(y, codes)
    variance, df = brute_force_cr2(y, codes)
    assert res.se**2 == pytest.approx(variance, rel=1e-10)
    assert res.df == pytest.approx(df, rel=1e-10)
    assert res.p == pytest.approx(2 * sps.t.sf(abs(y.mean() / np.sqrt(variance)), df), rel=1e-9)


def test_equal_clusters_give_the_t_test_of_cluster_means():
    codes = np.repeat(np.arange(12), 5)
    y = np.random.default_rng(3).normal(0.2, 1.0, size=60)
    res = cluster_robust_mean(y, codes)
    ref = sps.ttest_1samp(y.reshape(12, 5).mean(axis=1), 0.0)
    assert res.df == pytest.approx(11, rel=1e-12)
    assert res.t_statistic == pytest.approx(ref.statistic, rel=1e-12)
    assert res.p == pytest.approx(ref.pvalue, rel=1e-10)
    ci = ref.confidence_interval(0.95)
    assert (res.ci_low, res.ci_high) == pytest.approx((ci.low, ci.high), rel=1e-10)


def test_one_observation_per_cluster_is_the_one_sample_t_test():
    y = np.random.default_rng(4).normal(0.1, 1.0, size=80)
    res = cluster_robust_mean(y, np.arange(80), alternative="greater")
    ref = sps.ttest_1samp(y, 0.0, alternative="greater")
    assert res.design_effect == pytest.approx(1.0, rel=1e-12) and res.df == pytest.approx(79, rel=1e-12)
    assert res.p == pytest.approx(ref.pvalue, rel=1e-10)


def test_paired_contrast_with_singleton_clusters_equals_todays_result():
    rng = np.random.default_rng(5)
    high, low = rng.normal(0.1, 1, 150), rng.normal(0, 1, 150)
    for ci in ("analytic", "bca"):
        plain = paired_contrast(high, low, ci=ci, n_boot=500)
        clustered = paired_contrast(high, low, ci=ci, n_boot=500, cluster=[f"doc{i}" for i in range(150)])
        for name in ("d_z", "mean_diff", "sd_diff", "t_statistic", "p_t", "p_wilcoxon", "ci_low", "ci_high"):
            assert getattr(clustered, name) == pytest.approx(getattr(plain, name), rel=1e-10), (ci, name)
        assert plain.n_clusters is None and clustered.n_clusters == 150
        assert clustered.design_effect == pytest.approx(1.0, rel=1e-12)
        assert clustered.confidence_interval(0.8).low == pytest.approx(plain.confidence_interval(0.8).low, rel=1e-10)


def test_null_rejection_rate_with_correlated_documents():
    """40 documents × 50 tokens, ICC 0.3, true effect 0: clustered tests keep α, unclustered ones do not."""
    cells, alpha, n_docs, per_doc, icc = 500, 0.05, 40, 50, 0.3
    rng = np.random.default_rng(2026)
    doc = np.repeat(np.arange(n_docs), per_doc)
    rejected = {"t": 0, "wilcoxon": 0, "plain_t": 0, "plain_wilcoxon": 0}
    with warnings.catch_warnings():
        warnings.simplefilter("error", DegenerateInputWarning)
        for _ in range(cells):
            diff = (np.sqrt(icc) * rng.normal(size=n_docs)[doc]
                    + np.sqrt(1 - icc) * rng.normal(size=n_docs * per_doc))
            zero = np.zeros_like(diff)
            clustered = paired_contrast(diff, zero, cluster=doc, n_boot=100)
            plain = paired_contrast(diff, zero)
            rejected["t"] += clustered.p_t <= alpha
            rejected["wilcoxon"] += clustered.p_wilcoxon <= alpha
            rejected["plain_t"] += plain.p_t <= alpha
            rejected["plain_wilcoxon"] += plain.p_wilcoxon <= alpha
    low, high = sps.binom.interval(0.99, cells, alpha)
    assert low <= rejected["t"] <= high, rejected
    assert low <= rejected["wilcoxon"] <= high, rejected
    # design effect 1 + (50 - 1)·0.3 ≈ 16: the unclustered tests reject far more often than α
    assert rejected["plain_t"] > 5 * high and rejected["plain_wilcoxon"] > 5 * high, rejected


def test_design_effect_recovers_kish_formula():
    rng = np.random.default_rng(7)
    n_docs, per_doc, icc = 400, 10, 0.3
    doc = np.repeat(np.arange(n_docs), per_doc)
    y = np.sqrt(icc) * rng.normal(size=n_docs)[doc] + np.sqrt(1 - icc) * rng.normal(size=doc.size)
    res = cluster_robust_mean(y, doc)
    assert res.design_effect == pytest.approx(1 + (per_doc - 1) * icc, rel=0.15)


def test_cluster_bootstrap_with_singletons_is_scipys_bootstrap():
    y = np.random.default_rng(8).normal(0.3, 1.0, size=60)
    ci = cluster_bootstrap_ci(y, np.arange(60), n_boot=400, seed=3)
    ref = sps.bootstrap((y,), np.mean, n_resamples=400, method="percentile", rng=np.random.default_rng(3))
    assert (ci.low, ci.high) == pytest.approx((ref.confidence_interval.low, ref.confidence_interval.high),
                                              rel=1e-10)


def test_cluster_bootstrap_widens_with_correlation():
    rng = np.random.default_rng(9)
    doc = np.repeat(np.arange(30), 20)
    y = rng.normal(size=30)[doc] + 0.3 * rng.normal(size=600)
    clustered = cluster_bootstrap_ci(y, doc, statistic="d_z", method="bca")
    plain = cluster_bootstrap_ci(y, np.arange(600), statistic="d_z", method="bca")
    assert clustered.high - clustered.low > 3 * (plain.high - plain.low)


def test_tost_with_clusters():
    rng = np.random.default_rng(10)
    d = rng.normal(0, 1, 400)
    plain = tost_paired(d)
    singletons = tost_paired(d, cluster=np.arange(400))
    assert singletons.p == pytest.approx(plain.p, rel=1e-10)
    codes = np.repeat(np.arange(20), 20)
    clustered = tost_paired(d, cluster=codes)
    means = d.reshape(20, 20).mean(axis=1)
    ref = max(sps.ttest_1samp(means, clustered.bound_low, alternative="greater").pvalue,
              sps.ttest_1samp(means, clustered.bound_high, alternative="less").pvalue)
    assert clustered.p == pytest.approx(ref, rel=1e-9)


def test_within_token_spearman_with_clusters():
    rng = np.random.default_rng(11)
    frame = pd.DataFrame([dict(seq=t // 10, pos=t % 10, expert=e, m=rng.normal(), d=rng.normal(), doc=t // 40,
                               token=t) for t in range(200) for e in range(4)])
    plain = within_token_spearman_frame(frame, metric="m", effect="d")
    singletons = within_token_spearman_frame(frame, metric="m", effect="d", cluster="token")
    for name in ("p_t", "ci_low", "ci_high", "p_sign"):
        assert getattr(singletons, name) == pytest.approx(getattr(plain, name), rel=1e-10)
    clustered = within_token_spearman_frame(frame, metric="m", effect="d", cluster="doc")
    means = pd.Series(plain.rhos).groupby(np.arange(200) // 40).mean()  # rhos come in token order here
    ref = sps.ttest_1samp(means, 0.0)
    assert clustered.n_clusters == 5 and clustered.df_t == pytest.approx(4, rel=1e-12)
    assert clustered.p_t == pytest.approx(ref.pvalue, rel=1e-9)
    frame.loc[0, "doc"] = 99
    with pytest.raises(InvalidParameterError, match="constant within each token"):
        within_token_spearman_frame(frame, metric="m", effect="d", cluster="doc")


def test_mixed_model_recovers_planted_components():
    rng = np.random.default_rng(12)
    n_docs, per_doc = 60, 30
    doc = np.repeat(np.arange(n_docs), per_doc)
    y = 0.2 + np.sqrt(0.3) * rng.normal(size=n_docs)[doc] + np.sqrt(0.7) * rng.normal(size=doc.size)
    res = mixed_effects_mean(y, doc)
    # balanced random-intercept model: the REML intercept is the grand mean
    assert res.estimate == pytest.approx(y.mean(), rel=1e-6)
    assert res.ci_low < 0.2 < res.ci_high and 0.15 < res.icc < 0.45 and res.converged
    assert res.se == pytest.approx(cluster_robust_mean(y, doc).se, rel=0.1)
    pair = rng.integers(0, 8, size=doc.size)
    crossed = mixed_effects_mean(y + 0.5 * (pair - 3.5) / 2.3, doc, component=pair)
    assert crossed.n_components == 8 and crossed.var_component > 0.05 and crossed.var_cluster > 0.1


def test_degenerate_and_bad_input():
    with pytest.warns(DegenerateInputWarning, match="1 cluster"):
        res = cluster_robust_mean([1.0, 2.0, 3.0], ["a", "a", "a"])
    assert np.isnan(res.p) and np.isnan(res.se)
    with pytest.warns(DegenerateInputWarning, match="cluster"):
        assert np.isnan(paired_contrast([1.0, 2.0, 4.0], [0.0, 0.0, 0.0], cluster=[1, 1, 1]).p_t)
    with pytest.raises(InvalidParameterError, match="one label per observation"):
        cluster_robust_mean([1.0, 2.0], [1])
    with pytest.raises(InvalidParameterError, match="missing labels"):
        paired_contrast([1.0, 2.0], [0.0, 0.0], cluster=["a", None])
    with pytest.raises(InvalidParameterError, match="`statistic`"):
        cluster_bootstrap_ci([1.0, 2.0], [0, 1], statistic="median")
    with pytest.raises(InvalidParameterError, match="`n_boot`"):
        cluster_bootstrap_ci([1.0, 2.0], [0, 1], n_boot=10)
    with pytest.warns(DegenerateInputWarning):
        assert np.isnan(mixed_effects_mean([1.0, 2.0, 3.0], [0, 0, 0]).estimate)
