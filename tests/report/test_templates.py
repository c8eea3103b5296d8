"""The Jinja2 templates of the report: autoescaped, every value of a run (its name first) shown as text."""

from __future__ import annotations

from moeaudit.report import html
from moeaudit.report.answers import QUESTIONS, Answer

EVIL = '<script>alert("x")</script>&amp;'


def _view(name: str) -> dict:
    return {"name": name, "slug": "run", "path": f"/runs/{name}", "headline": f"{name}: no audit yet.",
            "answers": [Answer(QUESTIONS[0], "yes", f"Yes: {name} in `tests.parquet`."),
                        Answer(QUESTIONS[1], "no", "No."), Answer(QUESTIONS[2], "unknown", "Not known.")],
            "summary": [name] + ["–"] * (len(html.SUMMARY_HEADER) - 1), "label": name, "differs": [name],
            "sections": [{"heading": "Pruning", "id": "run-pruning", "lede": name, "template": "sections/scatter.html.j2",
                          "body": None, "absent": f"No `{name}`.", "error": None},
                         {"heading": "Gap", "id": "run-gap", "lede": "l", "template": "sections/scatter.html.j2",
                          "body": None, "absent": None, "error": name}]}


def test_the_page_escapes_run_names_everywhere():
    page = html.render_page(f"report {EVIL}", [_view(EVIL), _view("plain")], {"alpha": {EVIL: EVIL, "plain": 0.05}})
    assert "<script" not in page and "alert(\"x\")" not in page
    escaped = "&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt;&amp;amp;"
    # title, nav, answers heading and text, summary row, run heading and path, lede, absent and error sentences,
    # the settings warning (name and value)
    assert page.count(escaped) >= 12
    assert f"<title>report {escaped}</title>" in page
    assert f"Yes: {escaped} in <code>tests.parquet</code>." in page  # backticks become code after escaping
    assert f"No <code>{escaped}</code>." in page
    assert f"This section could not be drawn: {escaped}" in page


def test_answers_come_first_with_a_verdict_each():
    page = html.render_page("t", [_view("one")], {})
    top = page[page.index('<section id="answers">'):page.index('<section id="summary">')]
    assert page.index('<section id="answers">') < page.index('<section class="run"')
    assert [top.count(f'class="answer {v}"') for v in ("yes", "no", "unknown")] == [1, 1, 1]
    assert all(question in top for question in QUESTIONS)
    assert 'class="warn"' not in top  # one run: nothing to compare


def test_codes_filter_escapes_before_marking_code():
    assert str(html._codes("a <b> `x<y>` c")) == "a &lt;b&gt; <code>x&lt;y&gt;</code> c"
