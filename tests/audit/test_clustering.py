"""The audit clusters tokens of one document: when, by what, and what each cell records."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from moeaudit.audit import AuditSettings, audit
from moeaudit.audit.stage import run_audit
from moeaudit.config import AuditConfig
from moeaudit.errors import InvalidParameterError, RunDirectoryError
from moeaudit.rundir import RunDir
from moeaudit.stats import paired_contrast, within_token_spearman_frame

E, K = 8, 4


def correlated(n_docs=12, windows_per_doc=2, tokens_per_window=20, icc=0.5, seed=0):
    """Null effects (no metric predicts them) with a strong document effect on the high/low contrast."""
    rng = np.random.default_rng(seed)
    rows = []
    shift = rng.normal(size=(n_docs, E))  # each document favours some experts
    for d in range(n_docs):
        for w in range(windows_per_doc):
            seq = d * windows_per_doc + w
            for pos in range(tokens_per_window):
                active = rng.choice(E, size=K, replace=False)
                for e in active:
                    rows.append(dict(layer=0, seq=seq, pos=pos, expert=int(e), raw_gate=rng.random(),
                                     delta_nll=np.sqrt(icc) * shift[d, e] + np.sqrt(1 - icc) * rng.normal()))
    metrics = pd.DataFrame(dict(layer=0, expert=np.arange(E), score=rng.permutation(E).astype(float)))
    documents = pd.Series([f"doc{s // windows_per_doc}" for s in range(n_docs * windows_per_doc)],
                          index=range(n_docs * windows_per_doc))
    return pd.DataFrame(rows), metrics, documents


def test_census_cells_cluster_by_document_and_record_it():
    effects, metrics, documents = correlated()
    settings = AuditSettings(n=None, metrics=["score"], n_permutations=99, mixed="document")
    tests = audit(effects, metrics, settings, documents=documents).tests.set_index("design")
    paired = tests.loc["paired"]
    assert paired.cluster == "document" and paired.n_clusters == 12 and paired.design_effect > 2
    assert paired.mean_diff_ci_low < paired.mean_diff < paired.mean_diff_ci_high
    assert paired.mixed_ci_low < paired.mixed_mean_diff < paired.mixed_ci_high
    # the cell's numbers are paired_contrast's with the documents as clusters, pair by pair
    frame = effects.join(metrics.set_index("expert")["score"], on="expert")
    ordered = frame.sort_values(["seq", "pos", "score", "expert"]).groupby(["seq", "pos"])
    hi, lo = ordered.last(), ordered.first()
    ref = paired_contrast(hi["delta_nll"].to_numpy(), lo["delta_nll"].to_numpy(),
                          cluster=hi.index.get_level_values("seq").map(documents).to_numpy())
    assert paired.p_t == pytest.approx(ref.p_t, rel=1e-12) and paired.ci_low == pytest.approx(ref.ci_low, rel=1e-12)
    assert paired.p_t > paired_contrast(hi["delta_nll"].to_numpy(), lo["delta_nll"].to_numpy()).p_t
    within = tests.loc["within_token"]
    ref_w = within_token_spearman_frame(frame.assign(doc=frame["seq"].map(documents)), metric="score", cluster="doc")
    assert within.cluster == "document" and within.p_t == pytest.approx(ref_w.p_t, rel=1e-12)
    assert tests.loc["expert_level"].cluster == "none"
    # mde_dz uses the effective sample size n / design_effect
    unclustered = audit(effects, metrics, AuditSettings(n=None, metrics=["score"], n_permutations=99,
                                                        cluster="none"), documents=documents).tests
    plain = unclustered.set_index("design").loc["paired"]
    assert plain.cluster == "none" and "n_clusters" not in unclustered.columns
    assert paired.mde_dz > plain.mde_dz


def test_auto_leaves_one_token_per_document_unclustered_and_falls_back_to_windows():
    effects, metrics, documents = correlated(n_docs=40, windows_per_doc=1, tokens_per_window=1)
    tests = audit(effects, metrics, AuditSettings(n=None, metrics=["score"], designs=("paired",)),
                  documents=documents).tests
    assert tests.iloc[0].cluster == "none"
    effects, metrics, documents = correlated()
    by_window = audit(effects, metrics, AuditSettings(n=None, metrics=["score"], designs=("paired",))).tests
    assert by_window.iloc[0].cluster == "window" and by_window.iloc[0].n_clusters == 24
    with pytest.raises(InvalidParameterError, match="documents of the windows are unknown"):
        audit(effects, metrics, AuditSettings(n=None, metrics=["score"], cluster="document"))
    with pytest.raises(InvalidParameterError, match="`cluster`"):
        AuditSettings(cluster="token")


def test_run_audit_reads_documents_from_the_windows_table(tmp_path):
    effects, metrics, documents = correlated()
    config = AuditConfig(audit={"audit_n": None, "audit_metrics": ["score"], "designs": ["paired"]})
    run = RunDir(tmp_path / "run", config)
    run.write_frame("effects", effects.assign(kind="zero", scope="token", selection="census", estimate=False,
                                              shared=False, j=1))
    run.write_frame("expert_metrics", metrics)
    info = run_audit(run)
    assert info["cluster_by"] == "window" and run.read("tests").iloc[0].n_clusters == 24
    run.write_frame("windows", pd.DataFrame({"seq": documents.index, "doc_id": documents.to_numpy()}))
    info = run_audit(run)
    assert info["cluster_by"] == "document" and run.read("tests").iloc[0].n_clusters == 12
    (run.path / "windows.parquet").unlink()
    strict = RunDir(tmp_path / "strict", config.model_copy(update={"audit": config.audit.model_copy(
        update={"audit_cluster": "document"})}))
    strict.write_frame("effects", run.read("effects"))
    strict.write_frame("expert_metrics", metrics)
    with pytest.raises(RunDirectoryError, match="audit_cluster = \"window\""):
        run_audit(strict)
    assert not strict.has("tests")


def test_dz_ddof_zero_replays_the_scripts_d_z():
    effects, metrics, documents = correlated()
    ddof1 = audit(effects, metrics, AuditSettings(n=None, metrics=["score"], designs=("paired",), cluster="none"),
                  documents=documents).tests.iloc[0]
    ddof0 = audit(effects, metrics, AuditSettings(n=None, metrics=["score"], designs=("paired",), cluster="none",
                                                  dz_ddof=0), documents=documents).tests.iloc[0]
    n = ddof1.n
    assert ddof0.effect == pytest.approx(ddof1.effect * np.sqrt(n / (n - 1)), rel=1e-12)
    assert ddof0.p_t == ddof1.p_t and ddof0.p_wilcoxon == ddof1.p_wilcoxon
    with pytest.raises(InvalidParameterError, match="`dz_ddof`"):
        AuditSettings(dz_ddof=2)
    with pytest.raises(InvalidParameterError, match="`ddof`"):
        paired_contrast([1.0, 2.0, 3.0], [0.0, 0.0, 0.0], ddof=True)
