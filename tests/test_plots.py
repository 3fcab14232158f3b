"""The figures of `advex reproduce` (advex.client.plots, matplotlib) and the rules for showing numbers
(advex.client.render.rate / fmt_rate, advex.client.reproduce.pearson_r). Fast, no server: the plot
functions are called on synthetic numbers and the Figures they return are measured with the Agg
renderer (tick values, text bounding boxes, line data)."""
from __future__ import annotations

import math

import numpy as np
import pytest

from conftest import block_import, require_module

require_module("matplotlib", "pip install 'advex[plot]'")

from advex.client import plots, reproduce  # noqa: E402
from advex.client.render import fmt_rate, rate, table  # noqa: E402

GROUPS = list(reproduce.PAPER)
EPS = (0.25, 0.5, 1.0, 2.0)
# a Fashion-MNIST run where the effect shows at eps >= 0.5 (the matched control, third, made up)
CLEAN = [0.863, 0.824, 0.801, 0.772, 0.797, 0.248, 0.221]
SWEEP = {0.25: [0.692, 0.783, 0.655, 0.67, 0.507, 0.061, 0.023], 0.5: [0.452, 0.736, 0.43, 0.548, 0.204, 0.0, 0.0],
         1.0: [0.067, 0.603, 0.071, 0.257, 0.012, 0.0, 0.0], 2.0: [0.0, 0.174, 0.0, 0.003, 0.0, 0.0, 0.0]}
PAPER_STD = [reproduce.PAPER[g][0] for g in GROUPS]
PAPER_025 = [reproduce.PAPER[g][1] for g in GROUPS]
# bench/results/reproduce-transfer-small/transfer.json: mlp and linear almost on top of each other
TRANSFER = [("small_cnn", 0.8082, 0.22), ("resnet18", 0.4371, 0.214), ("mlp", 0.1644, 0.011),
            ("linear", 0.1631, 0.015)]


# ------------------------------------------------------------------ measuring a Figure

def _nice_step(step: float) -> bool:
    """1, 2, 2.5 or 5 times a power of ten."""
    mantissa = step / 10 ** math.floor(math.log10(step))
    return any(math.isclose(mantissa, m, rel_tol=1e-6) for m in (1, 2, 2.5, 5, 10))


def _visible_ticks(axis) -> tuple[np.ndarray, list]:
    lo, hi = sorted(axis.get_view_interval())
    locs = axis.get_majorticklocs()
    labels = axis.get_ticklabels()
    keep = [k for k, v in enumerate(locs) if lo - 1e-9 <= v <= hi + 1e-9]
    return np.asarray(locs)[keep], [labels[k] for k in keep]


def assert_round_ticks(axis) -> None:
    ticks, labels = _visible_ticks(axis)
    assert len(ticks) >= 3, ticks
    steps = np.diff(ticks)
    step = float(steps[0])
    assert np.allclose(steps, step), ticks
    assert _nice_step(step), f"tick step {step} is not 1, 2, 2.5 or 5 x 10^k: {ticks}"
    assert np.allclose(np.round(ticks / step), ticks / step, atol=1e-6), f"ticks off the step grid: {ticks}"
    for value, label in zip(ticks, labels):  # the label says the value, e.g. 0.2 -> "20%"
        assert float(label.get_text().replace("\u2212", "-").rstrip("%")) == pytest.approx(100 * value, abs=1e-6)


def _texts(fig) -> list:
    """Every visible non-empty text of the figure: tick labels in view, annotations, titles, axis
    labels, legend entries."""
    out = []
    for ax in fig.axes:
        for axis in (ax.xaxis, ax.yaxis):
            out += _visible_ticks(axis)[1]
            out.append(axis.label)
        out += list(ax.texts) + [ax.title, ax._left_title, ax._right_title]
        if ax.get_legend():
            out += list(ax.get_legend().get_texts())
    out += list(fig.texts) + [t for lg in fig.legends for t in lg.get_texts()]
    if fig._suptitle is not None:
        out.append(fig._suptitle)
    unique = {id(t): t for t in out}.values()
    return [t for t in unique if t.get_visible() and t.get_text().strip()]


def _overlap(a, b, tol: float = 0.5) -> bool:
    return a.x0 < b.x1 - tol and b.x0 < a.x1 - tol and a.y0 < b.y1 - tol and b.y0 < a.y1 - tol


def assert_no_overlapping_text(fig) -> None:
    renderer = fig.canvas.get_renderer()
    texts = _texts(fig)
    boxes = [t.get_window_extent(renderer) for t in texts]
    page = fig.bbox
    for i, (t, a) in enumerate(zip(texts, boxes)):
        assert page.x0 - 1 <= a.x0 and a.x1 <= page.x1 + 1 and page.y0 - 1 <= a.y0 and a.y1 <= page.y1 + 1, \
            f"{t.get_text()!r} is cut off the figure"
        for u, b in zip(texts[i + 1:], boxes[i + 1:]):
            assert not _overlap(a, b), f"{t.get_text()!r} overlaps {u.get_text()!r}"


def _figure2(tmp_path, **kw):
    args = dict(title="advex reproduce (small, fashion-mnist): accuracy on the original test set",
                paper_standard=PAPER_STD, paper_robust={0.25: PAPER_025}, paper_label="paper (CIFAR-10, ResNet-50)")
    args.update(kw)
    return plots.figure2(GROUPS, CLEAN, SWEEP, tmp_path / "figure2.png", **args)


def _paper_marks(ax) -> np.ndarray:
    """(x0, x1, y) of every paper mark."""
    marks = [c for c in ax.collections if c.get_label().startswith("paper")]
    assert len(marks) == 1
    return np.array([(s[0][0], s[1][0], s[0][1]) for s in marks[0].get_segments()])


# ------------------------------------------------------------------ Figure 2

def test_figure2_has_bars_at_every_eps_evaluated_not_only_025(tmp_path):
    fig = _figure2(tmp_path)
    assert (tmp_path / "figure2.png").stat().st_size > 10_000
    ax = fig.axes[0]
    names = [c.get_label() for c in ax.containers]
    assert len(names) == 1 + len(EPS) and "standard" in names[0]
    for eps, name in zip(EPS, names[1:]):
        assert f"{eps:g}" in name
    heights = {name: [b.get_height() for b in c] for name, c in zip(names, ax.containers)}
    assert heights[names[0]] == pytest.approx(CLEAN)
    for eps, name in zip(EPS, names[1:]):
        assert heights[name] == pytest.approx(SWEEP[eps])  # bars at eps 0.5, 1, 2 too, where the effect shows
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend[:len(names)] == names and legend[-1].startswith("paper")
    assert [t.get_text() for t in ax.get_xticklabels()] == [g.replace(" (", "\n(") for g in GROUPS]


def test_figure2_whiskers_span_their_intervals_and_lift_the_labels(tmp_path):
    intervals = [(c - 0.02, min(1.0, c + 0.03)) for c in CLEAN]
    ax = _figure2(tmp_path, standard_whiskers=intervals, robust_whiskers={0.5: [None] * len(GROUPS)}).axes[0]
    whiskers = [c for c in ax.collections if c.get_gid() == "whisker"]
    assert len(whiskers) == 1  # the standard bars only: eps 0.5's are all None
    segments = whiskers[0].get_segments()
    bars = ax.containers[0]
    assert len(segments) == len(GROUPS)
    for seg, bar, (lo, hi) in zip(segments, bars, intervals):
        assert seg[0][0] == pytest.approx(bar.get_x() + bar.get_width() / 2)
        assert (seg[0][1], seg[1][1]) == pytest.approx((lo, hi))
    labels = [t for t in ax.texts if t.get_text() == f"{100 * CLEAN[0]:.0f}"]
    assert any(t.xy[1] == pytest.approx(intervals[0][1]) for t in labels)  # above the whisker, not inside it


def test_figure2_marks_the_papers_numbers_on_their_bars(tmp_path):
    ax = _figure2(tmp_path).axes[0]
    marks = _paper_marks(ax)
    assert len(marks) == 2 * (len(GROUPS) - 1)  # standard accuracy and eps 0.25, for all but the matched control
    standard, at_025 = ax.containers[0], ax.containers[1]
    for bars, refs in ((standard, PAPER_STD), (at_025, PAPER_025)):
        for bar, ref in zip(bars, refs):
            if ref is None:
                continue  # nothing in the paper to mark
            centre = bar.get_x() + bar.get_width() / 2
            assert any(x0 < centre < x1 and y == pytest.approx(ref) for x0, x1, y in marks), (centre, ref)
    for bars in ax.containers[2:]:  # the paper reports no number at eps 0.5, 1, 2
        for bar in bars:
            centre = bar.get_x() + bar.get_width() / 2
            assert not any(x0 < centre < x1 for x0, x1, _ in marks)


# values just under the paper's (93% vs 95.3%, 80% vs 82.5%, 47% vs 48%): its marks cross their labels
CLOSE_CLEAN = [0.93] + CLEAN[1:]
CLOSE_SWEEP = {**SWEEP, 0.25: [0.692, 0.80, 0.47] + SWEEP[0.25][3:]}


@pytest.mark.parametrize("clean, sweep", [(CLEAN, SWEEP), (CLOSE_CLEAN, CLOSE_SWEEP)], ids=["small", "close"])
def test_figure2_ticks_are_round_and_no_text_overlaps(tmp_path, clean, sweep):
    fig = plots.figure2(GROUPS, clean, sweep, tmp_path / "figure2.png", title="figure 2", paper_standard=PAPER_STD,
                        paper_robust={0.25: PAPER_025}, paper_label="paper (CIFAR-10, ResNet-50)")
    ax = fig.axes[0]
    assert_round_ticks(ax.yaxis)
    assert_no_overlapping_text(fig)
    # a value label is never crossed by a paper mark
    renderer = fig.canvas.get_renderer()
    marks = [c for c in ax.collections if c.get_label().startswith("paper")][0]
    half = renderer.points_to_pixels(marks.get_linewidth()[0]) / 2
    for x0, x1, y in _paper_marks(ax):
        (px0, py), (px1, _) = ax.transData.transform([(x0, y), (x1, y)])
        for text in ax.texts:
            box = text.get_window_extent(renderer)
            assert not (box.x0 < px1 and px0 < box.x1 and box.y0 - half < py < box.y1 + half), \
                f"the paper's mark at {y:.1%} crosses the label {text.get_text()!r}"
    # every bar label sits inside the axes
    inside = ax.get_window_extent(renderer)
    for text in ax.texts:
        box = text.get_window_extent(renderer)
        assert inside.y0 - 1 <= box.y0 and box.y1 <= inside.y1 + 1, text.get_text()


def test_figure2_shows_unmeasured_values_as_na(tmp_path):
    sweep = {0.25: [None] + SWEEP[0.25][1:], 0.5: SWEEP[0.5]}
    fig = plots.figure2(GROUPS, CLEAN, sweep, tmp_path / "f.png", paper_standard=PAPER_STD)
    labels = [t.get_text() for t in fig.axes[0].texts]
    assert labels.count("n/a") == 1 and "nan" not in labels and len(labels) == 3 * len(GROUPS)
    assert_no_overlapping_text(fig)


# ------------------------------------------------------------------ the transfer scatter

def _scatter(points, tmp_path, name="s.png", note="Pearson r = 0.88 over 4 architectures"):
    return plots.scatter(points, tmp_path / name, xlabel="transfer rate from the source",
                         ylabel="test accuracy after training on D_det", title="transfer (small)", note=note)


def test_scatter_ticks_are_round(tmp_path):
    for points in (TRANSFER, [("a", 0.373, 0.612), ("b", 0.418, 0.655), ("c", 0.391, 0.703)],
                   [("a", 0.0, 0.0), ("b", 1.0, 1.0), ("c", 0.5, 0.2)]):
        ax = _scatter(points, tmp_path).axes[0]
        assert_round_ticks(ax.xaxis)
        assert_round_ticks(ax.yaxis)
        lo, hi = ax.get_xlim()
        assert 0 <= lo and hi <= 1 and min(p[1] for p in points) >= lo and max(p[1] for p in points) <= hi
        lo, hi = ax.get_ylim()
        assert 0 <= lo and hi <= 1 and min(p[2] for p in points) >= lo and max(p[2] for p in points) <= hi


def test_scatter_point_labels_overlap_nothing(tmp_path):
    rng = np.random.default_rng(0)
    crowd = [(f"arch_{i}", float(x), float(y)) for i, (x, y) in
             enumerate(zip(0.4 + 0.05 * rng.random(9), 0.3 + 0.04 * rng.random(9)))]
    for points in (TRANSFER, crowd):
        fig = _scatter(points, tmp_path)
        assert_no_overlapping_text(fig)
        ax = fig.axes[0]
        renderer = fig.canvas.get_renderer()
        labels = {t.get_text(): t.get_window_extent(renderer) for t in ax.texts}
        assert sorted(labels) == sorted(p[0] for p in points)
        inside = ax.get_window_extent(renderer)
        for label, box in labels.items():
            assert inside.x0 <= box.x0 and box.x1 <= inside.x1 and inside.y0 <= box.y0 and box.y1 <= inside.y1, label
            for _, x, y in points:  # no label hides a point
                px, py = ax.transData.transform((x, y))
                assert not box.contains(px, py), (label, x, y)


def test_fit_line_stays_inside_the_axes_and_the_datas_x_range(tmp_path):
    # a steep fit: its line over the data's x-range would leave [0, 1] at both ends
    points = [("a", 0.30, 0.0), ("b", 0.32, 0.02), ("c", 0.34, 0.97), ("d", 0.36, 1.0), ("e", 0.33, 0.5)]
    for pts in (points, TRANSFER):
        ax = _scatter(pts, tmp_path).axes[0]
        fits = [line for line in ax.get_lines() if line.get_gid() == "fit"]
        assert len(fits) == 1
        xs, ys = (np.asarray(v, dtype=float) for v in fits[0].get_data())
        (x_lo, x_hi), (y_lo, y_hi) = ax.get_xlim(), ax.get_ylim()
        data_x = [p[1] for p in pts]
        assert min(data_x) - 1e-9 <= xs.min() and xs.max() <= max(data_x) + 1e-9
        assert x_lo <= xs.min() and xs.max() <= x_hi and y_lo - 1e-9 <= ys.min() and ys.max() <= y_hi + 1e-9
        slope, intercept = np.polyfit(data_x, [p[2] for p in pts], 1)
        assert ys == pytest.approx(slope * xs + intercept)  # still the least-squares line, only cut


def test_scatter_without_a_rate_leaves_the_point_out_and_says_na(tmp_path):
    points = [("small_cnn", None, 0.22), ("mlp", None, 0.011), ("linear", float("nan"), 0.015)]
    fig = _scatter(points, tmp_path, name="na.png",
                   note="Pearson r = n/a (0 of 3 architectures have a transfer rate; it takes 3)")
    assert_no_overlapping_text(fig)  # a long subtitle is wrapped, not cut off
    ax = fig.axes[0]
    assert not [t for t in ax.texts if t.get_text() in ("small_cnn", "mlp", "linear")]
    assert len(ax.collections[0].get_offsets()) == 0
    assert not [line for line in ax.get_lines() if line.get_gid() == "fit"]
    assert "n/a" in ax.get_title() and "small_cnn, mlp, linear" in ax.get_title()
    assert_round_ticks(ax.xaxis)
    assert (tmp_path / "na.png").stat().st_size > 5_000


# ------------------------------------------------------------------ numbers for people

def test_a_rate_over_zero_is_na_not_zero_percent():
    assert rate(0, 0) is None and rate(3, 4) == 0.75 and rate(0, 5) == 0.0
    assert fmt_rate(None) == "n/a" and fmt_rate(float("nan")) == "n/a" and fmt_rate(rate(0, 0)) == "n/a"
    assert fmt_rate(0.0) == "0.0%" and fmt_rate(0.1234) == "12.3%" and fmt_rate(0.876, ".2f") == "0.88"
    text = table(["arch", "rate"], [["a", fmt_rate(None)], ["b", fmt_rate(0.5)]])
    assert text.splitlines()[2].endswith("  n/a") and "nan" not in text


def test_a_correlation_needs_three_known_points_that_vary():
    assert reproduce.pearson_r([0.1, 0.5], [0.2, 0.3]) is None                       # two points
    assert reproduce.pearson_r([0.1, None, 0.5, float("nan")], [0.2, 0.4, 0.3, 0.1]) is None  # two known
    assert reproduce.pearson_r([0.0, 0.0, 0.0], [0.2, 0.4, 0.3]) is None              # x does not vary (0/0 rates)
    assert reproduce.pearson_r([0.1, 0.5, 0.9], [0.3, 0.3, 0.3]) is None
    xs, ys = [x for _, x, _ in TRANSFER], [y for _, _, y in TRANSFER]
    assert reproduce.pearson_r(xs, ys) == pytest.approx(np.corrcoef(xs, ys)[0, 1])
    assert reproduce.pearson_r(xs + [None], ys + [0.5]) == pytest.approx(np.corrcoef(xs, ys)[0, 1])


def test_missing_plot_extra_names_the_install(monkeypatch):
    assert plots.missing_plot_extra() is None
    block_import(monkeypatch, "matplotlib")
    message = plots.missing_plot_extra()
    assert message and "pip install 'advex[plot]'" in message and "matplotlib" in message
    assert "\n" not in message  # one sentence
