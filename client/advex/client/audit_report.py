"""The reports of `advex audit`: a report dict (what the CLI makes of the server's audit result; JSON,
fractions in [0,1]) written as report.json, report.md and report.html, and a target's history as a
plain-text table (`advex audit history TARGET`) and a trend chart.

- report.json: the dict itself, `json.dumps(report, indent=2, sort_keys=True)` and a newline, so that
  `json.loads` of the file gives the dict back.
- report.md: the same content as Markdown pipe tables, the verdict first. It has no pictures and refers
  to no other file (the charts are in the HTML page only).
- report.html: one self-contained page: inline CSS, no script, no external address; the charts are PNGs
  inside it as data: URIs. Without matplotlib (the `plot` extra) the page has no charts and says why.

Every value of the dict may hold any text (it comes from a server): it is escaped for HTML
(html.escape) and Markdown (| ` * _ [ ] \\ and < > &; newlines inside a cell become spaces), and
control characters never reach a terminal. Each file is written atomically (a temporary file in the
same folder, then os.replace).

Charts (matplotlib imported inside the functions only, Figures on an Agg canvas, never pyplot; the
style of advex.client.plots): (a) robust accuracy against eps, one panel per norm, starting from clean
accuracy at eps 0, with 95% whiskers and the thresholds of the min_robust_accuracy (and
min_clean_accuracy, at eps 0) checks marked; (b) the trend over the target's audits, one line per
(norm, eps) with 95% whiskers, failed audits crossed out, when the history has 2 entries or more.
"""
from __future__ import annotations

import base64
import html
import io
import json
import math
import os
import re
import secrets
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Mapping, Optional, Sequence

from advex.client import plots
from advex.client.render import fmt_range, fmt_rate, html_table, numeric_cell, plain as _plain, table

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.figure import Figure

__all__ = ["write_reports", "history_table", "draw_history", "draw_robust", "render_markdown", "render_html"]

_RED = "#c0392b"
_GREEN = "#2e7d32"


# ----------------------------------------------------------------------------- writing

def write_reports(report: dict, out_dir: str | Path) -> dict[str, Path]:
    """Write report.json, report.md and report.html into out_dir (created if needed), each atomically;
    return {"json": path, "md": path, "html": path}. Nothing else is written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "report.json", "md": out / "report.md", "html": out / "report.html"}
    # the JSON first: if drawing or rendering fails, the data is already there
    _write_atomic(paths["json"], json.dumps(report, indent=2, sort_keys=True) + "\n")
    _write_atomic(paths["md"], render_markdown(report))
    _write_atomic(paths["html"], render_html(report))
    return paths


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the umask applies, as for open()
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


# ----------------------------------------------------------------------------- formatting values

def _num(value: object) -> Optional[float]:
    """A finite float, or None (missing, None, text, nan)."""
    if isinstance(value, bool) or value is None:
        return None
    try:
        v = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def _pct(value: object) -> str:
    return fmt_rate(_num(value))


def _ci_pair(ci: object) -> Optional[tuple[float, float]]:
    if isinstance(ci, Mapping):
        ci = (ci.get("lower"), ci.get("upper"))
    if not isinstance(ci, (list, tuple)) or len(ci) != 2:
        return None
    lo, hi = _num(ci[0]), _num(ci[1])
    return None if lo is None or hi is None else (lo, hi)


def _fmt_ci(ci: object) -> str:
    pair = _ci_pair(ci)
    return fmt_range(*pair) if pair else "n/a"


def _rate_ci(value: object, ci: object) -> str:
    """"40.0% (35.7-44.4%)"; "40.0%" without an interval; "n/a" without a value."""
    if _num(value) is None:
        return "n/a"
    pair = _ci_pair(ci)
    return f"{_pct(value)} ({fmt_range(*pair)})" if pair else _pct(value)


def _fmt_eps(eps: object) -> str:
    v = _num(eps)
    return f"{v:g}" if v is not None else _plain(eps)


def _fmt_count(value: object) -> str:
    v = _num(value)
    if v is None:
        return "n/a"
    return f"{int(v):d}" if v == int(v) else f"{v:.1f}"


def _parse_time(value: object) -> Optional[datetime]:
    if not isinstance(value, str) or not value:
        return None
    try:
        t = datetime.fromisoformat(value.strip().replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        return None
    if t.tzinfo is not None:
        t = t.astimezone(timezone.utc).replace(tzinfo=None)
    return t


def _fmt_time(value: object) -> str:
    """"2026-11-19 22:00" (UTC) when it parses; else the text as given (one line)."""
    t = _parse_time(value)
    return t.strftime("%Y-%m-%d %H:%M") if t else _plain(value)


def _verdict(passed: object) -> str:
    return "PASS" if passed is True else "FAIL" if passed is False else "n/a"


def _result(passed: object) -> str:
    """For a table column: "pass", "FAIL" (failures stand out) or "n/a"."""
    return "pass" if passed is True else _verdict(passed)


def _list(value: object) -> list:
    return list(value) if isinstance(value, (list, tuple)) else []


def _dict(value: object) -> dict:
    return value if isinstance(value, dict) else {}


def _key(norm: object, eps: object) -> tuple[str, float]:
    return (_plain(norm), _num(eps) if _num(eps) is not None else math.nan)


def _key_label(key: tuple[str, float]) -> str:
    norm, eps = key
    return f"{norm} {eps:g}".strip() if not math.isnan(eps) else norm


def _sorted_keys(keys: Iterable[tuple[str, float]]) -> list[tuple[str, float]]:
    return sorted(set(keys), key=lambda k: (k[0], math.isnan(k[1]), 0.0 if math.isnan(k[1]) else k[1]))


# ----------------------------------------------------------------------------- history

def _history_keys(history: Sequence[Mapping]) -> list[tuple[str, float]]:
    return _sorted_keys(_key(r.get("norm"), r.get("eps")) for h in history for r in _list(_dict(h).get("robust"))
                        if isinstance(r, Mapping))


def _history_rows(history: Sequence[Mapping]) -> tuple[list[str], list[list[str]]]:
    entries = [_dict(h) for h in history]
    keys = _history_keys(entries)
    headers = ["time (UTC)", "audit", "result", "clean"] + [_key_label(k) for k in keys]
    rows = []
    for h in entries:
        by_key = {_key(r.get("norm"), r.get("eps")): r for r in _list(h.get("robust")) if isinstance(r, Mapping)}
        cells = [_rate_ci(by_key[k].get("accuracy"), by_key[k].get("ci")) if k in by_key else "n/a" for k in keys]
        rows.append([_fmt_time(h.get("time")), _plain(h.get("audit_id")) or "n/a", _result(h.get("passed")),
                     _pct(h.get("clean"))] + cells)
    return headers, rows


def history_table(history: list[dict]) -> str:
    """A target's audits (oldest first) as a plain-text table: time (UTC), audit id, pass/FAIL, clean
    accuracy, and robust accuracy with its 95% interval per (norm, eps), e.g. "40.0% (35.7-44.4%)"."""
    headers, rows = _history_rows(history)
    return table(headers, rows)


# ----------------------------------------------------------------------------- charts

def draw_history(history: Sequence[Mapping], path: str | Path | None = None, *, title: str = "") -> "Figure":
    """The trend of a target's audits (oldest first), also saved as a PNG at `path` when given: robust
    accuracy per (norm, eps) over audit time with 95% whiskers (gid "trend <norm> <eps>" lines through
    the audits that measured it, "whisker" collections), clean accuracy dashed (gid "clean"), the
    points of failed audits crossed out in red (one scatter, gid "failed"). Times that do not all parse
    as ISO-8601 give an axis of audits in order. Returns the Figure (a notebook shows it)."""
    from matplotlib import rc_context

    with rc_context(plots._STYLE):
        fig = _history_figure(history, title)
    return plots.shown(fig, path)


def draw_robust(target: Mapping, path: str | Path | None = None, *, title: str = "") -> "Figure":
    """Robust accuracy against eps of one report target (chart (a)), also saved as a PNG at `path` when
    given. Returns the Figure (a notebook shows it)."""
    from matplotlib import rc_context

    with rc_context(plots._STYLE):
        fig = _robust_figure(target, title)
    return plots.shown(fig, path)


def _percent_axis(ax, values: Sequence[float]) -> None:
    from matplotlib.ticker import MaxNLocator, PercentFormatter

    (lo, hi), step = plots._nice_limits([v for v in values if v is not None] or [0.0, 1.0])
    ax.set_ylim(lo, hi)
    ax.yaxis.set_major_locator(MaxNLocator(nbins=6, steps=list(plots.NICE_STEPS)))
    ax.yaxis.set_major_formatter(PercentFormatter(1.0, decimals=plots._decimals(step)))


def _add_point(x, row: Mapping, xs: list, ys: list, spans: list) -> Optional[float]:
    """Append a row's accuracy at x (and its 95% interval, as a span at x) when it has one; returns
    the accuracy, or None."""
    y = _num(row.get("accuracy"))
    if y is None:
        return None
    xs.append(x)
    ys.append(y)
    pair = _ci_pair(row.get("ci"))
    if pair:
        spans.append((x, pair))
    return y


def _history_figure(history: Sequence[Mapping], title: str):
    from matplotlib import colormaps
    from matplotlib.dates import AutoDateLocator, ConciseDateFormatter

    entries = [_dict(h) for h in history]
    keys = _history_keys(entries)
    times = [_parse_time(h.get("time")) for h in entries]
    use_dates = bool(entries) and all(t is not None for t in times)
    xs: list = times if use_dates else list(range(len(entries)))
    fig, ax = plots._figure(7.6, 4.4)
    colours = colormaps["tab10"]
    seen: list[float] = []
    failed_x, failed_y = [], []
    for k, key in enumerate(keys):
        px, ys, spans = [], [], []  # only audits with a value: the line goes over a gap
        for x, h in zip(xs, entries):
            row = next((r for r in _list(h.get("robust")) if isinstance(r, Mapping)
                        and _key(r.get("norm"), r.get("eps")) == key), None)
            y = _add_point(x, row, px, ys, spans) if row else None
            if y is not None and h.get("passed") is False:
                failed_x.append(x)
                failed_y.append(y)
        seen.extend(ys)
        seen.extend(v for _, p in spans for v in p)
        colour = colours(k % 10)
        ax.plot(px, ys, marker="o", ms=4.5, lw=1.6, color=colour, label=f"robust, {_key_label(key)}",
                gid=f"trend {_key_label(key)}", zorder=3)
        if spans:
            ax.vlines([s[0] for s in spans], [s[1][0] for s in spans], [s[1][1] for s in spans], colors=colour,
                      linewidths=1.0, alpha=0.8, zorder=2.5, gid="whisker")
    clean = [_num(h.get("clean")) for h in entries]
    if any(c is not None for c in clean):
        ax.plot([x for x, c in zip(xs, clean) if c is not None], [c for c in clean if c is not None], ls="--",
                marker="s", ms=3.5, lw=1.2, color="0.45",
                label="clean", gid="clean", zorder=3)
        seen.extend(c for c in clean if c is not None)
        for x, h, c in zip(xs, entries, clean):
            if c is not None and h.get("passed") is False:
                failed_x.append(x)
                failed_y.append(c)
    if failed_x:
        ax.scatter(failed_x, failed_y, marker="x", s=60, linewidths=2.0, color=_RED, zorder=4, label="failed audit",
                   gid="failed")
    if not entries or not seen:
        ax.text(0.5, 0.5, "nothing to plot: no accuracy in the history", transform=ax.transAxes, ha="center",
                va="center", color="0.45", fontsize=10)
    _percent_axis(ax, seen)
    if use_dates:
        locator = AutoDateLocator(minticks=2, maxticks=8)
        ax.xaxis.set_major_locator(locator)
        ax.xaxis.set_major_formatter(ConciseDateFormatter(locator))
        ax.set_xlabel("audit time (UTC)")
    else:
        ax.set_xticks(xs, [_plain(h.get("audit_id") or h.get("time"))[:24] or str(i)
                           for i, h in enumerate(entries)], rotation=20, ha="right")
        ax.set_xlabel("audit")
    ax.margins(x=0.06)
    ax.set_ylabel("accuracy")
    ax.grid(True)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), handlelength=1.6)
    if title:
        fig.suptitle(title, fontweight="bold")
    return fig


def _robust_figure(target: Mapping, title: str):
    robust = [r for r in _list(target.get("robust")) if isinstance(r, Mapping)]
    checks = [c for c in _list(target.get("checks")) if isinstance(c, Mapping)]
    clean = _dict(target.get("clean"))
    norms = sorted({_plain(r.get("norm")) for r in robust}) or [""]
    fig, ax = plots._figure(max(5.6, 4.2 * len(norms) + 1.0), 4.2)
    axes = [ax]
    if len(norms) > 1:
        ax.remove()
        axes = list(fig.subplots(1, len(norms), squeeze=False)[0])
    clean_acc, clean_ci = _num(clean.get("accuracy")), _ci_pair(clean.get("ci"))
    for ax, norm in zip(axes, norms):
        rows = sorted(((_num(r.get("eps")), r) for r in robust if _plain(r.get("norm")) == norm
                       and _num(r.get("eps")) is not None), key=lambda p: p[0])
        xs, ys, spans, seen = [], [], [], []
        if clean_acc is not None:
            xs.append(0.0)
            ys.append(clean_acc)
            if clean_ci:
                spans.append((0.0, clean_ci))
        for eps, r in rows:
            _add_point(eps, r, xs, ys, spans)
        seen.extend(ys)
        seen.extend(v for _, p in spans for v in p)
        if spans:
            ax.vlines([s[0] for s in spans], [s[1][0] for s in spans], [s[1][1] for s in spans], colors=plots._INK,
                      linewidths=1.0, zorder=2.5, gid="whisker", label="95% interval")
        ax.plot(xs, ys, marker="o", ms=5, lw=1.8, color=plots._BLUE, zorder=3, gid=f"robust {norm}".strip(),
                label="accuracy (worst attack)" if rows else "clean accuracy")
        for passed_state, colour, label in ((True, _GREEN, "minimum (met)"), (False, _RED, "minimum (failed)")):
            tx, ty = [], []
            for c in checks:
                limit = _num(c.get("limit"))
                if limit is None or bool(c.get("passed")) != passed_state:
                    continue
                if c.get("kind") == "min_robust_accuracy" and _plain(c.get("norm")) == norm \
                        and _num(c.get("eps")) is not None:
                    tx.append(_num(c.get("eps")))
                elif c.get("kind") == "min_clean_accuracy":
                    tx.append(0.0)
                else:
                    continue
                ty.append(limit)
            if tx:
                ax.plot(tx, ty, ls="none", marker="_", ms=20, mew=2.6, color=colour, zorder=4, gid="threshold",
                        label=label)
                seen.extend(ty)
        if not xs:
            ax.text(0.5, 0.5, "nothing to plot", transform=ax.transAxes, ha="center", va="center", color="0.45")
        _percent_axis(ax, seen)
        top = max(xs) if xs else 1.0
        ax.set_xlim(-0.05 * (top or 1.0), (top or 1.0) * 1.08)
        ax.set_xlabel(f"{norm} radius eps".strip() if norm else "eps")
        ax.set_ylabel("accuracy")
        ax.grid(True)
        ax.set_title(f"{norm}: eps 0 is clean accuracy" if clean_acc is not None else norm, fontsize=9,
                     color="0.35")
    handles, labels = [], []
    for ax in axes:
        for h, l in zip(*ax.get_legend_handles_labels()):
            if l not in labels:
                handles.append(h)
                labels.append(l)
    if handles:
        fig.legend(handles, labels, loc="outside lower center", ncol=len(labels))
    if title:
        fig.suptitle(title, fontweight="bold")
    return fig


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi="figure")
    return buf.getvalue()


def _target_charts(target: Mapping) -> list[tuple[str, bytes]]:
    """(alt text, PNG) of chart (a) when the target has robust rows or clean accuracy, and of chart (b)
    when its history has 2 entries or more."""
    from matplotlib import rc_context

    name = _plain(target.get("name")) or "target"
    charts = []
    with rc_context(plots._STYLE):
        if _has_robust_chart(target):
            charts.append((f"robust accuracy against eps of {name}", _png(_robust_figure(target, ""))))
        if _has_history_chart(target):
            charts.append((f"trend of {name} over its audits", _png(_history_figure(_list(target.get("history")), ""))))
    return charts


def _has_robust_chart(target: Mapping) -> bool:
    return bool(_list(target.get("robust"))) or _num(_dict(target.get("clean")).get("accuracy")) is not None


def _has_history_chart(target: Mapping) -> bool:
    return len(_list(target.get("history"))) >= 2


# ----------------------------------------------------------------------------- the document

# A small document model rendered twice (Markdown, HTML): blocks are
#   ("banner", passed, text) ("h1"|"h2"|"h3", text) ("p", text) ("kv", [(label, value)])
#   ("table", headers, rows, failed_rows) ("list", items) ("charts", target) ("note", text)
# Texts are raw (unescaped) strings; each renderer escapes.

def _document(report: Mapping) -> list[tuple]:
    doc: list[tuple] = []
    targets = [t for t in _list(report.get("targets")) if isinstance(t, Mapping)]
    audit = _plain(report.get("audit")) or "(unnamed)"
    verdict = _verdict(report.get("passed"))
    n_failed = sum(1 for t in targets if t.get("passed") is False)
    summary = (f"{len(targets)} target{'s' if len(targets) != 1 else ''}, "
               f"{n_failed} failed" if targets else "no targets")
    doc.append(("banner", report.get("passed"), f"{verdict}: audit {audit} ({summary})"))
    dataset = _dict(report.get("dataset"))
    ds = _plain(dataset.get("id"))
    if ds:
        extra = []
        if dataset.get("split"):
            extra.append(f"{_plain(dataset.get('split'))} split")
        if _num(dataset.get("limit")):
            extra.append(f"first {_fmt_count(dataset.get('limit'))} examples")
        ds += f" ({', '.join(extra)})" if extra else ""
    meta = [("time", _fmt_time(report.get("time")) + (" UTC" if _parse_time(report.get("time")) else "")),
            ("server", _plain(report.get("server"))), ("operation", _plain(report.get("operation_id"))),
            ("dataset", ds),
            ("suite", _plain(report.get("suite")) or ("explicit attacks" if "suite" in report else ""))]
    doc.append(("kv", [(k, v) for k, v in meta if v]))
    if targets:
        rows, failed = [], []
        for k, t in enumerate(targets):
            checks = [c for c in _list(t.get("checks")) if isinstance(c, Mapping)]
            bad = sum(1 for c in checks if c.get("passed") is False)
            clean = _dict(t.get("clean"))
            rows.append([_plain(t.get("name")) or "n/a", _plain(t.get("kind")), _verdict(t.get("passed")),
                         _rate_ci(clean.get("accuracy"), clean.get("ci")), f"{bad} of {len(checks)}"])
            if t.get("passed") is False:
                failed.append(k)
        doc.append(("table", ["target", "kind", "result", "clean accuracy (95%)", "failed checks"], rows, failed))
    for t in targets:
        doc.extend(_target_blocks(t))
    return doc


def _target_blocks(t: Mapping) -> list[tuple]:
    blocks: list[tuple] = []
    name = _plain(t.get("name")) or "n/a"
    blocks.append(("h2", f"{name}: {_verdict(t.get('passed'))}", t.get("passed")))
    identity = _dict(t.get("identity"))
    endpoint = _dict(identity.get("endpoint"))
    kv = [("kind", _plain(t.get("kind"))), ("model id", _plain(t.get("model_id"))),
          ("sha256", _plain(identity.get("sha256")))]
    if endpoint:
        kv += [("endpoint", _plain(endpoint.get("url"))), ("model name", _plain(endpoint.get("model_name"))),
               ("model version", _plain(endpoint.get("model_version"))),
               ("platform", _plain(endpoint.get("platform")))]
    clean = _dict(t.get("clean"))
    if clean:
        text = _rate_ci(clean.get("accuracy"), clean.get("ci"))
        if _ci_pair(clean.get("ci")):
            text = text.replace(" (", " (95% interval ", 1)
        if _num(clean.get("n")) is not None:
            text += f", {_fmt_count(clean.get('correct'))} of {_fmt_count(clean.get('n'))} correct"
        kv.append(("clean accuracy", text))
    baseline = t.get("baseline")
    if isinstance(baseline, Mapping) and baseline:
        when = _fmt_time(baseline.get("time"))
        kv.append(("baseline", f"audit {_plain(baseline.get('audit_id')) or 'n/a'}" + (f" of {when}" if when else "")))
    elif "baseline" in t:
        kv.append(("baseline", "none (no earlier passing audit)"))
    queries = _dict(t.get("queries"))
    if queries:
        kv.append(("queries", ", ".join(f"{_fmt_count(queries.get(k))} {label}" for k, label in
                                        (("requests", "requests"), ("rows", "rows"), ("retries", "retries"))
                                        if k in queries)))
    blocks.append(("kv", [(k, v) for k, v in kv if v]))

    checks = [c for c in _list(t.get("checks")) if isinstance(c, Mapping)]
    if checks:
        rows, failed = [], []
        for k, c in enumerate(checks):
            rows.append([_verdict(c.get("passed")), _plain(c.get("kind")), _plain(c.get("norm")) or "-",
                         _fmt_eps(c.get("eps")) if _plain(c.get("norm")) else "-",
                         {"ci_lower": "95% lower bound", "point": "point"}.get(c.get("on"), _plain(c.get("on"))),
                         _pct(c.get("measured")), _pct(c.get("limit")),
                         _pct(c.get("baseline")) if c.get("baseline") is not None else "-", _plain(c.get("message"))])
            if c.get("passed") is False:
                failed.append(k)
        blocks.append(("h3", "Checks"))
        blocks.append(("table", ["result", "check", "norm", "eps", "on", "measured", "limit", "baseline", "message"],
                       rows, failed))

    robust = [r for r in _list(t.get("robust")) if isinstance(r, Mapping)]
    if robust:
        blocks.append(("h3", "Robust accuracy (worst attack per norm and eps)"))
        blocks.append(("table", ["norm", "eps", "accuracy", "95% interval", "correct"],
                       [[_plain(r.get("norm")), _fmt_eps(r.get("eps")), _pct(r.get("accuracy")), _fmt_ci(r.get("ci")),
                         f"{_fmt_count(r.get('correct'))} of {_fmt_count(r.get('n'))}"
                         if _num(r.get("n")) is not None else "n/a"] for r in robust], []))

    attacks = [a for a in _list(t.get("attacks")) if isinstance(a, Mapping)]
    if attacks:
        blocks.append(("h3", "Attacks"))
        blocks.append(("table", ["method", "norm", "eps", "accuracy", "95% interval", "mean queries", "suite"],
                       [[_plain(a.get("method")), _plain(a.get("norm")), _fmt_eps(a.get("eps")),
                         _pct(a.get("accuracy")),
                         _fmt_ci(a.get("ci")),
                         f"{_num(a.get('mean_queries')):.1f}" if _num(a.get("mean_queries")) is not None else "-",
                         _plain(a.get("suite")) or "-"] for a in attacks], []))

    skipped = [s for s in _list(t.get("skipped")) if isinstance(s, Mapping)]
    if skipped:
        blocks.append(("h3", "Skipped attacks"))
        blocks.append(("table", ["method", "norm", "eps", "reason"],
                       [[_plain(s.get("method")), _plain(s.get("norm")), _fmt_eps(s.get("eps")),
                         _plain(s.get("reason"))]
                        for s in skipped], []))

    notes = [_plain(n) for n in _list(t.get("notes")) if n is not None and _plain(n).strip()]
    if notes:
        blocks.append(("h3", "Notes"))
        blocks.append(("list", notes))

    history = [h for h in _list(t.get("history")) if isinstance(h, Mapping)]
    if history:
        headers, rows = _history_rows(history)
        blocks.append(("h3", "History (oldest first)"))
        blocks.append(("table", headers, rows, [k for k, h in enumerate(history) if h.get("passed") is False]))
    blocks.append(("charts", t))
    return blocks


# ----------------------------------------------------------------------------- Markdown

_MD_SPECIAL = re.compile(r"([\\`*_\[\]|])")


def _md(text: object) -> str:
    """One line of Markdown text: HTML-escaped (< > &), Markdown's specials backslashed, control
    characters (newlines) as spaces."""
    return _MD_SPECIAL.sub(r"\\\1", html.escape(_plain(text), quote=False))


def _md_table(headers: Sequence[str], rows: Sequence[Sequence[str]], failed: Sequence[int] = ()) -> str:
    def line(cells):
        return "| " + " | ".join(_md(c) or " " for c in cells) + " |"

    numeric = [all(numeric_cell(r[i]) for r in rows if i < len(r)) and rows for i in range(len(headers))]
    out = [line(headers), "|" + "|".join("---:" if n else "---" for n in numeric) + "|"]
    for k, row in enumerate(rows):
        cells = [_md(c) or " " for c in row]
        if k in failed and cells:
            cells[0] = f"**{cells[0]}**"
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def render_markdown(report: Mapping) -> str:
    """The report as Markdown: the verdict first, then tables. No pictures, no link to another file."""
    out: list[str] = []
    for block in _document(report):
        kind = block[0]
        if kind == "banner":
            out.append(f"# {_md(block[2])}")
        elif kind in ("h2", "h3"):
            out.append(f"{'##' if kind == 'h2' else '###'} {_md(block[1])}")
        elif kind == "kv":
            out.append("\n".join(f"- **{_md(k)}**: {_md(v)}" for k, v in block[1]))
        elif kind == "table":
            out.append(_md_table(block[1], block[2], block[3]))
        elif kind == "list":
            out.append("\n".join(f"- {_md(item)}" for item in block[1]))
        elif kind == "charts":
            continue
        out.append("")
    return "\n".join(out).rstrip("\n") + "\n"


# ----------------------------------------------------------------------------- HTML

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;margin:0;color:#222;
background:#f6f7f9;line-height:1.4}
main{max-width:1100px;margin:0 auto;padding:0 20px 40px}
.banner{padding:18px 20px;font-size:1.5em;font-weight:700;color:#fff;margin:0 0 16px}
.banner.pass{background:#2e7d32}.banner.fail{background:#c0392b}.banner.unknown{background:#666}
section.target{background:#fff;border:1px solid #dde1e6;border-radius:6px;padding:4px 18px 14px;margin:18px 0}
section.target.fail{border-left:6px solid #c0392b}section.target.pass{border-left:6px solid #2e7d32}
h2{font-size:1.25em;margin:14px 0 6px}h3{font-size:1.02em;margin:16px 0 6px;color:#333}
.verdict-pass{color:#2e7d32}.verdict-fail{color:#c0392b}
dl.kv{display:grid;grid-template-columns:max-content 1fr;gap:2px 14px;margin:6px 0}
dl.kv dt{color:#555}dl.kv dd{margin:0;overflow-wrap:anywhere}
table{border-collapse:collapse;margin:4px 0 8px;font-size:.92em;background:#fff}
th,td{border:1px solid #d5d9de;padding:3px 8px;text-align:left;vertical-align:top;overflow-wrap:break-word}
th{background:#eef0f3;white-space:nowrap}td.num{text-align:right;white-space:nowrap;font-variant-numeric:tabular-nums}
tr.failed td{background:#fdecea}tr.failed td:first-child{color:#c0392b;font-weight:700}
figure{margin:10px 0}figure img{max-width:100%;height:auto;border:1px solid #eee}
figcaption{font-size:.85em;color:#555}
.note{color:#8a5a00;background:#fff8e1;border:1px solid #f0d98c;padding:6px 10px;border-radius:4px}
"""


def _h(text: object) -> str:
    return html.escape(_plain(text), quote=True)


def render_html(report: Mapping) -> str:
    """The report as one self-contained HTML page (inline CSS, charts as data: PNGs, no script, no
    external address)."""
    missing = plots.missing_plot_extra()
    body: list[str] = []
    in_section = False
    for block in _document(report):
        kind = block[0]
        if kind == "banner":
            cls = {True: "pass", False: "fail"}.get(block[1], "unknown")
            body.append(f'<div class="banner {cls}" id="verdict">{_h(block[2])}</div>\n<main>')
            if missing:
                body.append(f'<p class="note">No charts: {_h(missing)}</p>')
        elif kind == "h2":
            if in_section:
                body.append("</section>")
            cls = {True: "pass", False: "fail"}.get(block[2], "unknown")
            body.append(f'<section class="target {cls}"><h2 class="verdict-{cls}">{_h(block[1])}</h2>')
            in_section = True
        elif kind == "h3":
            body.append(f"<h3>{_h(block[1])}</h3>")
        elif kind == "kv":
            body.append('<dl class="kv">' + "".join(f"<dt>{_h(k)}</dt><dd>{_h(v)}</dd>" for k, v in block[1])
                        + "</dl>")
        elif kind == "table":
            body.append(html_table(block[1], block[2], failed=block[3]))
        elif kind == "list":
            body.append("<ul>" + "".join(f"<li>{_h(item)}</li>" for item in block[1]) + "</ul>")
        elif kind == "charts" and not missing:
            charts = _target_charts(block[1])
            if charts:
                body.append("<h3>Charts</h3>")
            for alt, png in charts:
                data = base64.b64encode(png).decode("ascii")
                body.append(f'<figure><img alt="{_h(alt)}" src="data:image/png;base64,{data}">'
                            f"<figcaption>{_h(alt)}</figcaption></figure>")
    if in_section:
        body.append("</section>")
    body.append("</main>")
    title = _h(f"{_verdict(report.get('passed'))}: audit {_plain(report.get('audit')) or '(unnamed)'}")
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
            f"<title>{title}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n" + "\n".join(body)
            + "\n</body>\n</html>\n")
