"""The HTML report: self-contained, every section for every run, figures beside it, and a real browser renders
it without errors or network requests.

The browser test drives Debian's ``chromium`` through playwright with ``executable_path`` (browser downloads by
test tools do not work offline); without either it skips and says which is missing.
"""

from __future__ import annotations

import html
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from moeaudit.report import SECTIONS, write_report
from tests.report.conftest import make_run

pytestmark = pytest.mark.slow  # end-to-end: deselected by -m "not slow"

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
BROWSER_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run", "--disable-default-apps", "--disable-sync",
                 "--disable-extensions", "--mute-audio"]


@pytest.fixture(scope="module")
def report(tmp_path_factory, synthetic_run, synthetic_run_no_pruning) -> Path:
    out = tmp_path_factory.mktemp("html") / "report.html"
    return write_report([synthetic_run, synthetic_run_no_pruning], out)


@pytest.fixture(scope="module")
def page(report) -> str:
    return report.read_text(encoding="utf-8")


def test_self_contained(page):
    assert page.startswith("<!DOCTYPE html>")
    assert re.search(r"https?://", page) is None
    for forbidden in ("<script", "<link", "<iframe", "@import", "url(", "<object", "<embed"):
        assert forbidden not in page.lower(), forbidden
    sources = re.findall(r'\b(?:src|href)="([^"]*)"', page)
    assert sources and all(s.startswith(("data:image/png;base64,", "#")) for s in sources), sources


def test_every_section_for_every_run(page):
    runs = page.split('<section class="run" id="')[1:]
    assert [run.split('"')[0] for run in runs] == ["synthetic-moe", "no-pruning"]
    for body in runs:
        headings = [html.unescape(h) for h in re.findall(r"<h3>(.*?)</h3>", body)]
        assert headings == list(SECTIONS)
        assert "could not be drawn" not in body


def test_absent_inputs_say_so(page, tmp_path):
    assert page.count("Pruning was not run for this run") == 1
    bare = make_run(tmp_path / "bare", pruning=False, effects=False)
    text = write_report(bare, tmp_path / "bare.html").read_text()
    assert text.count("it has no <code>effects.parquet</code>") >= 2
    assert "<code>moeaudit intervene RUN_DIR</code>" in text and "could not be drawn" not in text
    for name in ("tests", "redundancy", "expert_metrics_by_domain", "expert_metrics"):  # observe only
        (bare / f"{name}.parquet").unlink()
    text = write_report(bare, tmp_path / "observed.html").read_text()
    assert "could not be drawn" not in text and text.count("<h3>") == len(SECTIONS)
    assert "<code>moeaudit audit RUN_DIR</code>" in text and "<code>moeaudit metrics RUN_DIR</code>" in text


def test_figures_written_beside_the_report(report, page):
    files = sorted(p.name for p in (report.parent / "figures").iterdir())
    stems = {"routing-load", "domains", "audit-forest", "metric-vs-effect", "routing-weight-control", "progressive",
             "gap-norm", "pruning", "jaccard"}
    for stem in stems:
        assert f"synthetic-moe-{stem}.png" in files and f"synthetic-moe-{stem}.svg" in files, stem
    assert "no-pruning-pruning.png" not in files
    assert page.count("<img ") == len(stems) + len(stems - {"pruning", "jaccard"})


def test_audit_table_colour_codes_verdicts(page):
    assert page.count('class="v-pos"') >= 2 and 'class="v-neg"' in page and 'class="v-untestable"' in page
    assert 'class="v-equiv"' in page and 'class="v-ns"' in page


def test_clustered_cells_show_their_clusters_and_design_effect(page):
    # each clustered cell shows its number of documents and design effect; the hover adds both intervals in nats
    assert page.count('<small class="clusters">24 documents · deff 1.8</small>') == 2 * 3  # 3 layer-0 cells, 2 runs
    assert "cluster bootstrap [+0.0040, +0.0200]" in page and "mixed model +0.0110 [+0.0030, +0.0190]" in page
    assert "distinct experts picked high/low 5/7" in page
    assert "so 3 of 6 cells treat 24 documents, not tokens, as the independent units" in page
    assert "high picks came from 5 distinct experts and its low picks from 7" in page


def test_accepts_a_single_path(synthetic_run, tmp_path):
    out = write_report(synthetic_run, tmp_path / "one" / "r.html")
    assert out == tmp_path / "one" / "r.html" and out.stat().st_size > 10_000


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary on PATH (Debian: apt-get install chromium)")
def test_renders_in_headless_chromium(report, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
    from PIL import Image

    url = report.resolve().as_uri()
    requests, blocked, errors = [], [], []
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=BROWSER_FLAGS)
        try:
            context = browser.new_context(viewport={"width": 1366, "height": 900}, offline=True)
            context.route(re.compile(r"^(?!file:|data:).*"), lambda route: (blocked.append(route.request.url),
                                                                            route.abort()))
            page = context.new_page()
            page.on("request", lambda r: requests.append(r.url))
            page.on("console", lambda m: errors.append(m.text) if m.type in ("error", "warning") else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(url, wait_until="load")
            headings = page.eval_on_selector_all("section.run", "runs => runs.map(r => "
                                                 "Array.from(r.querySelectorAll('h3')).map(h => h.textContent))")
            broken = page.evaluate("Array.from(document.images).filter(i => !i.complete || i.naturalWidth === 0)"
                                   ".length")
            n_images = page.evaluate("document.images.length")
            shot = tmp_path / "report.png"
            page.screenshot(path=str(shot))
        finally:
            browser.close()
    assert errors == []
    assert blocked == [] and [r for r in requests if not r.startswith("data:")] == [url]
    assert headings == [list(SECTIONS), list(SECTIONS)]
    assert n_images > 0 and broken == 0
    pixels = np.asarray(Image.open(shot).convert("L"), dtype=float)
    assert pixels.shape == (900, 1366) and pixels.std() > 20


def test_near_ties_counted_in_the_facts(page):
    assert "3 of 100 routing decisions (3.00%) are within rounding of choosing other experts (layer 0: 3)" in page


def _top(page: str) -> str:
    return page[page.index('<section id="answers">'):page.index('<section id="summary">')]


def test_the_report_answers_first(page):
    top = _top(page)
    assert page.index('<section id="answers">') < page.index('<section id="summary">') < page.index('class="run"')
    runs = top.split('<h3 class="run-answers">')[1:]
    assert len(runs) == 2 and 'href="#synthetic-moe"' in runs[0] and 'href="#no-pruning"' in runs[1]
    assert [body.count('<div class="answer ') for body in runs] == [3, 3]
    assert "Yes, in 2 of 5 tested metric × layer cells (bonferroni-corrected dual test at α = 0.05)" in runs[0]
    assert "The best, reap, reaches held-out perplexity 24 against the random median 26" in runs[0]
    assert ('Not known: pruning was not run for this run (no <code>pruning.parquet</code>); '
            '<code>moeaudit prune RUN_DIR</code> adds it.') in runs[1]
    assert 'class="warn"' not in top  # the two runs share their settings


def test_a_bare_run_answers_not_known(tmp_path):
    bare = make_run(tmp_path / "bare", pruning=False, effects=False)
    for name in ("tests", "redundancy"):
        (bare / f"{name}.parquet").unlink()
    top = _top(write_report(bare, tmp_path / "bare.html").read_text())
    assert top.count('<div class="answer unknown">') == 3 and "could not be drawn" not in top
    assert "<code>moeaudit audit RUN_DIR</code> adds it" in top and "no progressive ablation" in top


def test_runs_with_different_settings_are_flagged(tmp_path):
    runs = [make_run(tmp_path / name, pruning=False, effects=False) for name in ("base", "other", "third")]
    manifest = json.loads((runs[1] / "manifest.json").read_text())
    manifest["config"]["audit"]["alpha"] = 0.01
    manifest["config"]["observe"]["max_len"] = 99
    (runs[1] / "manifest.json").write_text(json.dumps(manifest))
    page = write_report(runs, tmp_path / "report.html").read_text()
    top = html.unescape(re.sub(r"<[^>]+>", "", _top(page)))
    # the three runs share a model, so the page names them by directory
    assert "These runs differ in settings other than the model" in top
    assert "alpha (base: 0.05; other: 0.01; third: 0.05)" in top and "max_len (base: " in top
    assert top.count("(differs in alpha, max_len)") == 1
    assert ('<a href="#other">synthetic-moe</a> <span class="path">other</span> <small class="note">(differs in alpha, '
            'max_len)</small>') in page


def test_run_names_are_escaped(tmp_path):
    run = make_run(tmp_path / "evil", pruning=False, effects=False)
    manifest = json.loads((run / "manifest.json").read_text())
    manifest["model"]["name"] = '<img src=x onerror="alert(1)">'
    (run / "manifest.json").write_text(json.dumps(manifest))
    page = write_report(run, tmp_path / "report.html").read_text()
    assert "<img src=x" not in page and "onerror=\"alert" not in page
    assert page.count("&lt;img src=x onerror=&#34;alert(1)&#34;&gt;") >= 4  # title, nav, heading, summary


def test_a_new_section_is_one_spec(tmp_path, monkeypatch, synthetic_run):
    from moeaudit.report import html as report_html

    spec = report_html.SectionSpec("Interactions", lambda data, ctx: report_html.Absent("Nothing `yet`."),
                                   "sections/scatter.html.j2")
    monkeypatch.setattr(report_html, "SECTION_SPECS", report_html.SECTION_SPECS + (spec,))
    monkeypatch.setitem(report_html.LEDES, "Interactions", "How experts interact.")
    page = write_report(synthetic_run, tmp_path / "report.html").read_text()
    assert '<h3>Interactions</h3><p class="lede">How experts interact.</p>' in page
    assert "Nothing <code>yet</code>." in page and 'href="#synthetic-moe-interactions"' in page


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary on PATH (Debian: apt-get install chromium)")
def test_the_top_in_headless_chromium_at_800_px(report, tmp_path):
    """The answers at the top fit an 800 px window: no horizontal scrolling, every answer box inside it."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
    from PIL import Image

    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=BROWSER_FLAGS)
        try:
            page = browser.new_page(viewport={"width": 800, "height": 1000})
            page.goto(report.resolve().as_uri(), wait_until="load")
            widths = page.evaluate("[document.documentElement.scrollWidth, document.documentElement.clientWidth]")
            top = page.eval_on_selector("#answers", "s => [s.scrollWidth, s.clientWidth, "
                                        "s.getBoundingClientRect().right]")
            boxes = page.eval_on_selector_all("#answers .answer", "els => els.map(e => "
                                              "[e.getBoundingClientRect().left, e.getBoundingClientRect().right, "
                                              "e.querySelector('.verdict').textContent, e.scrollWidth, e.clientWidth])")
            images = page.evaluate("Array.from(document.images).map(i => i.getBoundingClientRect().right)")
            first = page.eval_on_selector("#answers", "s => s.getBoundingClientRect().top")
            shot = tmp_path / "top.png"
            page.locator("#answers").screenshot(path=str(shot))
        finally:
            browser.close()
    assert widths[0] <= widths[1] <= 800
    assert top[0] <= top[1] and top[2] <= 800
    assert len(boxes) == 6 and all(0 <= left and right <= 800 and scroll <= client
                                   for left, right, _, scroll, client in boxes)
    assert [verdict for *_, verdict, _, _ in boxes] == ["Yes", "No", "Yes", "Yes", "No", "Not known"]
    assert first < 1000  # the answers start on the first screen
    assert images and max(images) <= 800
    pixels = np.asarray(Image.open(shot).convert("L"), dtype=float)
    assert pixels.shape[1] <= 800 and pixels.std() > 20
