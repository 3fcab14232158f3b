"""The reports of `advex audit` (advex.client.audit_report): report.json/.md/.html from a report dict,
a target's history as a plain-text table and a trend chart. Fast, no server: a made-up report dict
with hostile strings in it; the HTML page is parsed, and rendered by headless Chromium (Debian's
`chromium`, installed by scripts/test.sh) to see that every embedded chart really loads."""
from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest

from conftest import block_import, require_module

require_module("matplotlib", "pip install 'advex[plot]'")

from advex.client import audit_report  # noqa: E402

HOSTILE = "<script>alert(1)</script> a|b\nnext line `tick`"
FAILED_MESSAGE = "Linf eps 0.03: lower 95% bound 35.7% < minimum 50.0%"


def _report() -> dict:
    """Three targets: an endpoint that fails, with 3 audits of history (2 charts); an uploaded model
    that passes, history of 1 (1 chart); one with nothing measured (no chart)."""
    failing = {
        "name": "prod-classifier", "model_id": "m-1", "kind": "endpoint",
        "identity": {"sha256": "ab12" * 16, "endpoint": {"url": "grpc://10.0.0.5:8081", "model_name": "clf",
                                                        "model_version": "3", "platform": "mlserver"}},
        "passed": False,
        "clean": {"accuracy": 0.83, "correct": 415, "n": 500, "ci": [0.794, 0.862]},
        "robust": [{"norm": "Linf", "eps": 0.01, "accuracy": 0.71, "correct": 355, "n": 500, "ci": [0.669, 0.748]},
                   {"norm": "Linf", "eps": 0.03, "accuracy": 0.40, "correct": 200, "n": 500, "ci": [0.357, 0.444]}],
        "attacks": [{"method": "square", "norm": "Linf", "eps": 0.03, "accuracy": 0.42, "ci": [0.377, 0.464],
                     "mean_queries": 812.3, "suite": "autoattack-fast"}],
        "checks": [
            {"kind": "min_robust_accuracy", "norm": "Linf", "eps": 0.03, "on": "ci_lower", "measured": 0.357,
             "limit": 0.5, "passed": False, "message": FAILED_MESSAGE},
            {"kind": "max_drop", "norm": "Linf", "eps": 0.03, "on": "point", "measured": 0.05, "limit": 0.02,
             "baseline": 0.45, "passed": False, "message": "drop " + HOSTILE},
            {"kind": "min_clean_accuracy", "norm": "", "eps": 0.0, "on": "point", "measured": 0.83, "limit": 0.8,
             "passed": True, "message": "clean 83.0% >= 80.0%"}],
        "baseline": {"audit_id": "au-2", "time": "2026-11-20T22:00:00Z"},
        "queries": {"requests": 123, "rows": 4567, "retries": 2},
        "skipped": [{"method": "apgd-ce", "norm": "Linf", "eps": 0.03, "reason": "needs gradients: " + HOSTILE}],
        "notes": ["note " + HOSTILE],
        "history": [
            {"time": "2026-11-19T22:00:00Z", "audit_id": "au-1", "passed": True, "clean": 0.84,
             "robust": [{"norm": "Linf", "eps": 0.03, "accuracy": 0.46, "ci": [0.416, 0.504]}]},
            {"time": "2026-11-20T22:00:00Z", "audit_id": "au-2", "passed": True, "clean": 0.84,
             "robust": [{"norm": "Linf", "eps": 0.03, "accuracy": 0.45, "ci": [0.406, 0.494]}]},
            {"time": "2026-11-21T22:00:00Z", "audit_id": "au-3", "passed": False, "clean": 0.83,
             "robust": [{"norm": "Linf", "eps": 0.01, "accuracy": 0.71, "ci": [0.669, 0.748]},
                        {"norm": "Linf", "eps": 0.03, "accuracy": 0.40, "ci": [0.357, 0.444]}]}],
    }
    uploaded = {
        "name": HOSTILE, "model_id": "m-2", "kind": "model", "identity": {"sha256": "cd34" * 16}, "passed": True,
        "clean": {"accuracy": 0.9, "correct": 450, "n": 500, "ci": [0.871, 0.923]},
        "robust": [{"norm": "L2", "eps": 0.5, "accuracy": 0.6, "correct": 300, "n": 500, "ci": [0.557, 0.642]}],
        "attacks": [], "checks": [], "baseline": None, "queries": None, "skipped": [], "notes": [],
        "history": [{"time": "2026-11-21T22:00:00Z", "audit_id": "au-4", "passed": True, "clean": 0.9,
                     "robust": [{"norm": "L2", "eps": 0.5, "accuracy": 0.6, "ci": [0.557, 0.642]}]}],
    }
    empty = {"name": "nothing-measured", "kind": "model", "passed": True, "clean": None, "robust": None,
             "history": None}
    return {"audit": "nightly " + HOSTILE, "passed": False, "time": "2026-11-21T22:00:00Z",
            "server": "127.0.0.1:50051", "operation_id": "op-1234abcd",
            "dataset": {"id": "fashion-mnist", "split": "test", "limit": 500}, "suite": "autoattack-fast",
            "targets": [failing, uploaded, empty]}


EXPECTED_CHARTS = 3  # 2 for the failing target (robust, trend), 1 for the uploaded one (no trend: 1 audit)


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    out = tmp_path_factory.mktemp("audit") / "reports" / "nightly"  # created by write_reports
    report = _report()
    return report, audit_report.write_reports(report, out), out


# ------------------------------------------------------------------ JSON, files

def test_writes_the_three_files_and_nothing_else(written):
    report, paths, out = written
    assert paths == {"json": out / "report.json", "md": out / "report.md", "html": out / "report.html"}
    assert sorted(os.listdir(out)) == ["report.html", "report.json", "report.md"]  # no temporary left behind
    raw = paths["json"].read_bytes()
    assert raw == (json.dumps(report, indent=2, sort_keys=True) + "\n").encode("utf-8")
    assert json.loads(raw) == report == _report()  # and the dict was not changed


def test_rewrites_atomically_over_an_old_report(tmp_path):
    report = _report()
    (tmp_path / "report.md").write_text("old")
    before = copy.deepcopy(report)
    report["passed"] = True
    report["targets"] = report["targets"][2:]
    paths = audit_report.write_reports(report, tmp_path)
    assert paths["md"].read_text().startswith("# PASS")
    assert json.loads(paths["json"].read_text()) == report != before
    assert sorted(os.listdir(tmp_path)) == ["report.html", "report.json", "report.md"]


# ------------------------------------------------------------------ Markdown

def _unescaped_pipes(line: str) -> int:
    return len(re.findall(r"(?<!\\)\|", line))


def test_markdown_has_the_verdict_first_and_the_failed_checks(written):
    md = written[1]["md"].read_text()
    first = md.splitlines()[0]
    assert first.startswith("# FAIL: audit nightly"), first
    # the failed check's message, in a row marked failed (its < as an entity)
    row = next(line for line in md.splitlines() if "lower 95% bound 35.7%" in line)
    assert row.startswith("| **FAIL** |") and "35.7% &lt; minimum 50.0%" in row
    assert "| PASS | min\\_clean\\_accuracy |" in md
    assert "83.0% (95% interval 79.4-86.2%), 415 of 500 correct" in md
    assert "| Linf | 0.03 | 40.0% | 35.7-44.4% | 200 of 500 |" in md


def test_hostile_strings_are_escaped_in_markdown(written):
    md = written[1]["md"].read_text()
    assert "<script" not in md and "&lt;script&gt;alert(1)&lt;/script&gt;" in md
    assert "`tick`" not in md and "\\`tick\\`" in md
    assert not any(line.startswith("next line") for line in md.splitlines())  # no newline got through
    lines = md.splitlines()
    # every row of a table has as many cell separators as its header
    for k, line in enumerate(lines):
        if line.startswith("|") and k + 1 < len(lines) and re.fullmatch(r"\|(-+:?\|)+", lines[k + 1]):
            width = _unescaped_pipes(line)
            j = k + 2
            while j < len(lines) and lines[j].startswith("|"):
                assert _unescaped_pipes(lines[j]) == width, lines[j]
                j += 1
    summary = next(line for line in lines if "m-2" not in line and "a\\|b" in line and "model | PASS" in line)
    assert _unescaped_pipes(summary) == 6


# ------------------------------------------------------------------ HTML

class _Refs(HTMLParser):
    URL_ATTRS = {"src", "href", "srcset", "action", "formaction", "poster", "data", "background", "xlink:href",
                 "cite", "longdesc", "manifest", "ping"}

    def __init__(self):
        super().__init__()
        self.refs: list[tuple[str, str, str]] = []
        self.tags: list[str] = []
        self.images = 0

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.images += tag == "img"
        for name, value in attrs:
            if name in self.URL_ATTRS:
                self.refs.append((tag, name, value or ""))


def test_html_refers_to_nothing_outside(written):
    page = written[1]["html"].read_text()
    parser = _Refs()
    parser.feed(page)
    assert parser.images == EXPECTED_CHARTS
    assert parser.refs, "no image found"
    for tag, name, value in parser.refs:
        assert value.startswith("data:") or value.startswith("#"), (tag, name, value[:80])
    assert not {"script", "link", "iframe", "object", "embed", "base"} & set(parser.tags)
    assert "url(" not in page and "@import" not in page
    assert all(v.startswith("data:image/png;base64,") for t, n, v in parser.refs if t == "img")


def test_hostile_strings_are_escaped_in_html(written):
    page = written[1]["html"].read_text()
    assert "<script" not in page.lower()
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert page.startswith("<!DOCTYPE html>")
    # the verdict banner first, the failed check highlighted
    assert re.search(r'<body>\s*<div class="banner fail" id="verdict">FAIL: audit nightly', page)
    row = next(r for r in page.split("<tr") if "lower 95% bound 35.7%" in r)
    assert row.startswith(' class="failed">')


def test_html_without_matplotlib_still_renders(monkeypatch):
    block_import(monkeypatch, "matplotlib")
    page = audit_report.render_html(_report())
    assert "<img" not in page
    assert "No charts" in page and "pip install &#x27;advex[plot]&#x27;" in page
    assert "prod-classifier" in page and "lower 95% bound 35.7% &lt; minimum 50.0%" in page


# Once the page has loaded: per image, whether it is complete, its natural size, and (drawn on a
# canvas) how many of its pixels are transparent (a truncated PNG leaves rows undrawn; the charts are
# opaque, white behind) and how many are not white (something is drawn).
_PROBE = """<script>
window.addEventListener("load", function () {  // synchronous: --dump-dom waits for it
  var found = [];
  for (var img of document.querySelectorAll("img")) {
    var item = {complete: img.complete, width: img.naturalWidth, height: img.naturalHeight};
    try {
      var canvas = document.createElement("canvas");
      canvas.width = img.naturalWidth;
      canvas.height = img.naturalHeight;
      var ctx = canvas.getContext("2d");
      ctx.drawImage(img, 0, 0);
      var px = ctx.getImageData(0, 0, canvas.width, canvas.height).data;
      var transparent = 0, ink = 0;
      for (var i = 0; i < px.length; i += 4) {
        if (px[i + 3] < 255) transparent++;
        else if (px[i] < 250 || px[i + 1] < 250 || px[i + 2] < 250) ink++;
      }
      item.transparent = transparent;
      item.ink = ink;
    } catch (e) {
      item.error = String(e);
    }
    found.push(item);
  }
  pre.textContent = JSON.stringify(found);
});
var pre = document.createElement("pre");  // in the DOM from the start: "waiting" until the load handler ends
pre.id = "probe-result";
pre.textContent = "waiting";
document.addEventListener("DOMContentLoaded", function () { document.body.appendChild(pre); });
</script>"""


def chromium_images(page: Path, tmp_path: Path) -> list[dict]:
    """Render the HTML page `page` in headless Chromium and report every image as the page saw it
    once loaded (see _PROBE); fails the test when Chromium is missing or the page never loads."""
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.fail("chromium is not installed: apt-get install chromium (scripts/test.sh installs it)")
    probe = tmp_path / "probe.html"  # a copy with a script that reports every image once the page loaded
    probe.write_text(page.read_text().replace("</head>", _PROBE + "\n</head>", 1))
    env = {"HOME": str(tmp_path), "PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8"}
    done = subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                           f"--user-data-dir={tmp_path / 'chromium-profile'}", "--virtual-time-budget=10000",
                           "--dump-dom", probe.as_uri()],
                          capture_output=True, text=True, timeout=60, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    match = re.search(r'<pre id="probe-result">(.*?)</pre>', done.stdout, re.S)
    assert match, f"the probe is not in the page chromium rendered:\n{done.stdout[:500]}\n{done.stderr[-1000:]}"
    assert match.group(1) != "waiting", "the page's load handler did not finish (an image never loaded?)"
    return json.loads(match.group(1))


def assert_images_load(images: list[dict]) -> None:
    for img in images:
        assert "error" not in img and img["complete"] and img["width"] > 0 and img["height"] > 0, images
        assert img["transparent"] == 0 and img["ink"] > 0.01 * img["width"] * img["height"], images


def test_chromium_renders_the_page_and_every_chart(written, tmp_path):
    images = chromium_images(written[1]["html"], tmp_path)
    assert len(images) == EXPECTED_CHARTS, images
    assert_images_load(images)


# ------------------------------------------------------------------ history

HISTORY = [
    {"time": "2026-11-19T22:00:00Z", "audit_id": "au-1", "passed": True, "clean": 0.84,
     "robust": [{"norm": "Linf", "eps": 0.03, "accuracy": 0.46, "ci": [0.416, 0.504]}]},
    {"time": "2026-11-20T22:00:00Z", "audit_id": "au-2", "passed": False, "clean": 0.83,
     "robust": [{"norm": "Linf", "eps": 0.03, "accuracy": 0.40, "ci": [0.357, 0.444]},
                {"norm": "L2", "eps": 0.5, "accuracy": 0.6}]},
]


def test_history_table_exact():
    assert audit_report.history_table(HISTORY) == "\n".join([
        "time (UTC)        audit  result  clean  L2 0.5  Linf 0.03",
        "----------------  -----  ------  -----  ------  ------------------",
        "2026-11-19 22:00  au-1   pass    84.0%     n/a  46.0% (41.6-50.4%)",
        "2026-11-20 22:00  au-2   FAIL    83.0%   60.0%  40.0% (35.7-44.4%)",
    ])


def test_history_table_keeps_control_characters_off_the_terminal():
    hostile = [dict(HISTORY[0], audit_id="au-\x1b[31mred\nx", time="yesterday\r")]
    text = audit_report.history_table(hostile)
    assert "\x1b" not in text and "\r" not in text and len(text.splitlines()) == 3
    assert "au- [31mred x" in text and "yesterday" in text


def test_draw_history_lines_points_and_failures(tmp_path):
    fig = audit_report.draw_history(HISTORY, tmp_path / "trend.png", title="prod-classifier")
    ax = fig.axes[0]
    trends = {line.get_gid(): line for line in ax.get_lines() if (line.get_gid() or "").startswith("trend ")}
    assert sorted(trends) == ["trend L2 0.5", "trend Linf 0.03"]
    assert list(trends["trend Linf 0.03"].get_ydata()) == [0.46, 0.40]
    assert list(trends["trend L2 0.5"].get_ydata()) == [0.6]  # measured only in the second audit
    clean = [line for line in ax.get_lines() if line.get_gid() == "clean"]
    assert len(clean) == 1 and list(clean[0].get_ydata()) == [0.84, 0.83]
    failed = [c for c in ax.collections if c.get_gid() == "failed"]
    assert len(failed) == 1 and sorted(failed[0].get_offsets()[:, 1]) == pytest.approx([0.4, 0.6, 0.83])
    whiskers = [c for c in ax.collections if c.get_gid() == "whisker"]
    assert sum(len(c.get_segments()) for c in whiskers) == 2  # L2 0.5 has no interval
    png = (tmp_path / "trend.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")
    assert (width, height) == (round(fig.bbox.width), round(fig.bbox.height))


def test_draw_robust_marks_the_thresholds(tmp_path):
    target = _report()["targets"][0]
    fig = audit_report.draw_robust(target, tmp_path / "robust.png")
    (ax,) = [a for a in fig.axes if a.get_lines()]
    curve = next(line for line in ax.get_lines() if line.get_gid() == "robust Linf")
    assert list(curve.get_xdata()) == [0.0, 0.01, 0.03] and list(curve.get_ydata()) == [0.83, 0.71, 0.40]
    marks = {(tuple(line.get_xdata()), tuple(line.get_ydata()), line.get_color())
             for line in ax.get_lines() if line.get_gid() == "threshold"}
    assert marks == {((0.03,), (0.5,), audit_report._RED), ((0.0,), (0.8,), audit_report._GREEN)}
