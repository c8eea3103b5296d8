"""The audit stage reads its settings from the run's configuration tree and records them in the manifest."""

from __future__ import annotations

import json

import pandas as pd

from moeaudit.audit import AuditSettings, audit
from moeaudit.audit.stage import audit_settings, run_audit
from moeaudit.config import AuditConfig
from moeaudit.rundir import RunDir

from tests.audit.test_audit import synthetic


def test_run_audit_uses_and_records_the_audit_part(tmp_path):
    effects, metrics = synthetic(n_tokens=80)
    effects = effects.assign(kind="zero", scope="token", estimate=False, shared=False, j=1, selection="census")
    config = AuditConfig(seed=7, audit={"audit_n": 40, "designs": ["paired", "expert_level"], "ci": "bca",
                                        "n_permutations": 99, "equivalence_bound": 0.3, "correction": "holm",
                                        "alpha": 0.1, "audit_metrics": ["planted"]})
    run = RunDir(tmp_path / "run", config)
    run.write_frame("effects", effects)
    run.write_frame("expert_metrics", metrics)

    run_audit(run)

    expected = AuditSettings(metrics=["planted"], designs=("paired", "expert_level"), n=40, seed=7,
                             correction="holm", alpha=0.1, ci="bca", equivalence_bound=0.3, n_permutations=99,
                             cluster="auto", mixed="document", dz_ddof=1)
    assert audit_settings(config) == expected
    by_hand = audit(effects, metrics, expected).tests
    written = run.read("tests")
    assert set(written["design"]) == {"paired", "expert_level"} and set(written["metric"]) == {"planted"}
    pd.testing.assert_frame_equal(written, by_hand, check_exact=True)
    recorded = json.loads((run.path / "manifest.json").read_text())["stages"]["audit"]["settings"]
    assert recorded == dict(metrics=["planted"], designs=["paired", "expert_level"], n=40, seed=7,
                            correction="holm", alpha=0.1, ci="bca", equivalence_bound=0.3, n_permutations=99,
                            cluster="auto", mixed="document", dz_ddof=1)
