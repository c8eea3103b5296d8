"""The report's calibration section: drawn from calibration.parquet when the run has one, one sentence naming
`moeaudit calibration` when it does not."""

from __future__ import annotations

import html
import re
import warnings

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from moeaudit.calibration import calibration_sensitivity
from moeaudit.metrics import compute_expert_metrics_by_domain
from moeaudit.report import SECTIONS, write_report
from moeaudit.stats import DegenerateInputWarning
from moeaudit.tables import CALIBRATION_SCHEMA
from tests.calibration.conftest import ASCENDING, DESCENDING, E, planted_routing
from tests.report.conftest import make_run


def _section(page: str) -> str:
    start = page.index("<h3>Calibration sensitivity</h3>")
    end = page.find("</section>", start)
    return page[start:end]


def _calibration_table(path) -> None:
    routing, documents = planted_routing([ASCENDING] * 6 + [DESCENDING] * 5)
    # the majority's documents are "code", the minority's "wiki": the two domains rank the experts oppositely
    routing = routing.assign(domain=routing["seq"].map(lambda s: "code" if s < 6 else "wiki"))
    by_domain = compute_expert_metrics_by_domain(routing, {0: E}, metrics=["count", "reap"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DegenerateInputWarning)
        table = calibration_sensitivity(routing, {0: E}, documents=documents, by_domain=by_domain,
                                        metrics=["count", "reap"], n_resamples=30, points=3, repeats=2)
    pq.write_table(pa.Table.from_pandas(table, schema=CALIBRATION_SCHEMA, preserve_index=False),
                   path / "calibration.parquet")


def test_the_section_is_drawn_from_calibration_parquet(tmp_path):
    run = make_run(tmp_path / "calibrated", pruning=False, effects=False)
    _calibration_table(run)
    page = write_report(run, tmp_path / "report.html").read_text()
    headings = [html.unescape(h) for h in re.findall(r"<h3>(.*?)</h3>", page)]
    assert headings == list(SECTIONS) and "Calibration sensitivity" in SECTIONS
    body = _section(page)
    assert "could not be drawn" not in body and body.count("<img ") == 1
    rows = re.findall(r"<tr><th>(\w+)</th>(.*?)</tr>", body.split("<tbody>")[1])
    assert [name for name, _ in rows] == ["count", "reap"]
    cells = re.findall(r"<td>(.*?)</td>", rows[0][1])
    assert cells[3] == "not reached (0/1 layers)" and cells[5] == "-1.00" and cells[6] == "code | wiki (layer 0)"
    assert "11 calibration documents" in body and "30 bootstrap resamples" in body
    assert (tmp_path / "figures" / "calibrated-calibration.png").exists()
    assert np.isfinite(float(cells[0]))


def test_without_calibration_parquet_the_section_names_the_command(tmp_path):
    run = make_run(tmp_path / "plain", pruning=False, effects=False)
    body = _section(write_report(run, tmp_path / "report.html").read_text())
    assert "it has no <code>calibration.parquet</code>" in body
    assert "<code>moeaudit calibration RUN_DIR</code> adds it" in body and "<img " not in body
