"""`moeaudit demo --quick` end to end on the built-in model and corpus, and the stage commands."""

from __future__ import annotations

import json
import re
import sys

import numpy as np
import pandas as pd
import pytest

from moeaudit.cli import main
from tests.cli.conftest import restored_logging
from moeaudit.models import builtin
from tests.conftest import HANG_GUARD_S

pytestmark = [
    pytest.mark.slow,  # end-to-end: deselected by -m "not slow"
    pytest.mark.skipif(not (builtin.builtin_path("tiny-olmoe") / "model.safetensors").exists(),
                       reason="built-in model weights not present"),
]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """``moeaudit demo --quick`` on an 80-column terminal, run once: its run directory and what it printed
    (stdout, stderr). ``--out`` is relative, so that the paths it prints are short."""
    import contextlib
    import io

    out = tmp_path_factory.mktemp("demo")
    printed, errors = io.StringIO(), io.StringIO()
    mp = pytest.MonkeyPatch()
    mp.chdir(out)
    mp.setenv("COLUMNS", "80")
    mp.setattr(sys, "argv", ["moeaudit", "demo", "--quick", "--out", "."])
    with restored_logging(), contextlib.redirect_stdout(printed), contextlib.redirect_stderr(errors):
        try:
            main()
        except SystemExit as exit_:
            assert not exit_.code
        finally:
            mp.undo()
    return out / "tiny-olmoe", printed.getvalue(), errors.getvalue()


@pytest.fixture(scope="module")
def demo_dir(demo_run):
    return demo_run[0]


def test_demo_output_fits_80_columns_and_hides_nothing(demo_run):
    run_dir, out, err = demo_run
    lines = (out + err).splitlines()
    assert max(len(line) for line in lines) <= 80, max(lines, key=len)
    assert "…" not in out + err
    tests = pd.read_parquet(run_dir / "tests.parquet")
    paired = tests[(tests.design == "paired") & np.isfinite(tests.effect)]
    words = set(out.replace("│", " ").split())
    for row in paired.itertuples():  # the full cells of the paper's metrics: every p-value whole
        if row.metric in ("frequency", "ean_mean", "act_std", "mean_gate_active"):
            mark = "*" if row.verdict == "significant" else ""
            assert {f"{row.effect:+.3f}", f"{row.p_t:.2g}", f"{row.p_wilcoxon:.2g}{mark}"} <= words, row
    assert "interventions" in words and "tiny-olmoe" in words and "oracle_reconstruction" in words
    flat = " ".join(out.split())
    assert "tiny-olmoe: pairs of active experts removed together (zero, token scope, 12,800 exact removals" in flat
    assert "pruned sets removed together at a token, ratio 0.25" in flat


def test_demo_writes_every_table(demo_dir):
    for table in ("tokens", "routing", "router_probs", "expert_metrics", "effects", "tests", "redundancy",
                  "pruning", "jaccard", "calibration", "interactions", "shapley", "interaction_sets", "shapley_tests"):
        assert (demo_dir / f"{table}.parquet").exists(), table
    manifest = json.loads((demo_dir / "manifest.json").read_text())
    assert set(manifest["stages"]) == {"observe", "metrics", "intervene", "audit", "prune", "calibration",
                                       "interactions"}
    calibration = pd.read_parquet(demo_dir / "calibration.parquet")
    assert set(calibration["unit"]) == {"document"} and calibration["n_units"].min() >= 2
    interactions = manifest["stages"]["interactions"]
    assert interactions["tokens"] == {str(layer): 200 for layer in range(4)} and interactions["engine"] == "fast"
    shapley = pd.read_parquet(demo_dir / "shapley.parquet")
    efficiency = shapley.groupby(["layer", "seq", "pos"]).agg(total=("shapley", "sum"), all=("delta_nll_all", "first"))
    assert (efficiency["total"] - efficiency["all"]).abs().max() < 1e-5
    pruning = pd.read_parquet(demo_dir / "pruning.parquet")
    assert {"reap", "frequency", "random", "oracle_delta_nll"} <= set(pruning.criterion)
    assert pruning[pruning.criterion == "random"].seed.nunique() == 5
    assert manifest["stages"]["intervene"]["engine"] == "fast"
    assert manifest["stages"]["intervene"]["noise_floor"] < 1e-4
    assert manifest["model"]["family"] == "olmoe" and manifest["corpus"]["fingerprint_observed"]


def test_demo_writes_a_self_contained_report(demo_dir):
    html = (demo_dir.parent / "report.html").read_text()
    assert "tiny-olmoe" in html and "http://" not in html and "https://" not in html
    section = html[html.index("<h3>Calibration sensitivity</h3>"):]
    assert "Not available" not in section.split("</section>")[0] and "reap" in section
    assert (demo_dir.parent / "figures").is_dir()


def test_table_and_query_commands(demo_dir, cli):
    code, out, err = cli("table", str(demo_dir), "--what", "audit", "--format", "latex")
    assert code == 0, err
    assert "\\toprule" in out and "\\bottomrule" in out
    code, out, err = cli("query", str(demo_dir),
                             "select count(*) as n from effects where selection = 'census'")
    assert code == 0, err
    census = pd.read_parquet(demo_dir / "effects.parquet").query("selection == 'census'")
    assert re.findall(r"│ +(\d+) │", out) == [str(len(census))]  # one cell, in a table that fits the terminal


def test_census_covers_every_active_expert_of_heldout_tokens(demo_dir):
    tokens = pd.read_parquet(demo_dir / "tokens.parquet")
    routing = pd.read_parquet(demo_dir / "routing.parquet")
    effects = pd.read_parquet(demo_dir / "effects.parquet")
    census = effects[effects.selection == "census"]
    heldout = tokens[(tokens.split == "heldout") & tokens.nll.notna()]  # positions with a next token
    expected = routing.merge(heldout[["seq", "pos"]], on=["seq", "pos"])
    assert len(census) == len(expected)
    merged = census.merge(expected, on=["layer", "seq", "pos", "expert"], suffixes=("", "_obs"))
    assert len(merged) == len(census)
    assert np.allclose(merged.raw_gate, merged.raw_gate_obs, atol=1e-6)
    assert np.allclose(census.nll_clean.to_numpy(), census.merge(tokens, on=["seq", "pos"]).nll.to_numpy(), atol=1e-5)


def test_metrics_on_calibration_effects_on_heldout(demo_dir):
    tokens = pd.read_parquet(demo_dir / "tokens.parquet")
    effects = pd.read_parquet(demo_dir / "effects.parquet")
    split = tokens.drop_duplicates("seq").set_index("seq").split
    assert set(split.loc[effects.seq.unique()]) == {"heldout"}
    manifest = json.loads((demo_dir / "manifest.json").read_text())
    assert manifest["stages"]["metrics"]["split"] == "calibration"


def test_tests_table_has_every_design(demo_dir):
    tests = pd.read_parquet(demo_dir / "tests.parquet")
    assert set(tests.design) == {"paired", "routing_weight", "random_pair", "within_token", "expert_level"}
    paired = tests[tests.design == "paired"]
    assert set(paired.metric) >= {"frequency", "ean_mean", "mean_gate_active", "act_std", "reap"}
    assert (paired.n == 200).all()
    assert paired.verdict.isin(["significant", "not significant", "untestable"]).all()


def test_stage_commands_rerun_on_the_demo_directory(demo_dir, cli):
    code, out, err = cli("audit", str(demo_dir))
    assert code == 0, err
    assert "token_gate" in out and "frequency" in out
    code, out, err = cli("metrics", str(demo_dir))
    assert code == 0 and "top experts by REAP" in out


def test_stage_on_missing_run_is_one_line(tmp_path, cli):
    code, _, err = cli("audit", str(tmp_path / "nope"))
    assert code == 2 and err.strip().startswith("error: ") and len(err.strip().splitlines()) == 1


def test_log_json_emits_one_json_object_per_line(demo_dir, cli):
    import subprocess

    proc = subprocess.run([sys.executable, "-m", "moeaudit", "--log-json", "metrics", str(demo_dir)],
                          capture_output=True, text=True, timeout=HANG_GUARD_S)  # a real process, as a user runs it
    assert proc.returncode == 0, proc.stderr
    records = [json.loads(line) for line in proc.stderr.strip().splitlines()]
    assert records and all({"time", "level", "logger", "message"} <= set(r) for r in records)
    finished = [r for r in records if r["message"].startswith("stage metrics finished")]
    assert finished and finished[0]["logger"] == "moeaudit.rundir" and finished[0]["level"] == "INFO"
    # the counters are fields, not text inside the message
    assert finished[0]["stage"] == "metrics" and finished[0]["counters"]["split"] == "calibration"
    assert "{" not in finished[0]["message"]
    code, out, err = cli("metrics", str(demo_dir))  # without the flag: no INFO records on stderr
    assert code == 0 and "stage metrics finished" not in err
