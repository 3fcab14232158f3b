"""Charts for people, drawn with matplotlib (the `plot` extra): Figure 2 of Ilyas et al. (grouped
accuracy bars at every evaluated eps, with the paper's numbers marked), a labelled scatter with a
least-squares line (§3.3's transfer plot), and a robustness curve from minimal distances.

matplotlib is imported inside the functions only, so `import advex.client.plots` costs nothing and
works without it; `missing_plot_extra()` says what to install. Figures are made with
`matplotlib.figure.Figure` on an Agg canvas, never with pyplot: nothing global changes (no backend
switch, no open figure kept by pyplot, rc settings only inside a context). Each function saves a PNG
and returns the Figure, so a notebook can show it and a test can measure it.
"""
from __future__ import annotations

import math
import textwrap
from pathlib import Path
from typing import TYPE_CHECKING, Mapping, Optional, Sequence

from advex.client.render import fmt_rate

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np
    from matplotlib.figure import Figure

PLOT_EXTRA = "advex[plot]"

#: Tick steps allowed on a percentage axis (fractions of 1): 1%, 2%, 2.5%, 5%, 10%, 20%, 25%, 50%.
NICE_STEPS = (1, 2, 2.5, 5, 10)

_STYLE = {
    "font.size": 9.5,
    "axes.titlesize": 11,
    "axes.labelsize": 10,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.edgecolor": "0.35",
    "axes.axisbelow": True,
    "grid.color": "0.88",
    "grid.linewidth": 0.8,
    "xtick.color": "0.25",
    "ytick.color": "0.25",
    "legend.frameon": False,
    "savefig.facecolor": "white",
}
_DPI = 150
_MARK_WIDTH = 2.6  # points, the paper's marks on Figure 2
_BLUE = "#3b6fb6"
_ORANGE = "#dd8a2e"
_INK = "0.15"


def missing_plot_extra() -> Optional[str]:
    """None when matplotlib and Pillow import; else one sentence saying what to install."""
    missing = []
    for name, module in (("matplotlib", "matplotlib.figure"), ("Pillow", "PIL.Image")):
        try:
            __import__(module)
        except ImportError:
            missing.append(name)
    if not missing:
        return None
    what = " and ".join(missing)
    return (f"The figures need matplotlib and Pillow, and {what} {'is' if len(missing) == 1 else 'are'} "
            f"not installed: pip install '{PLOT_EXTRA}'")


# ----------------------------------------------------------------------------- Figure 2

def figure2(groups: Sequence[str], standard: Sequence[Optional[float]],
            robust: Mapping[float, Sequence[Optional[float]]], path: str | Path, *, title: str = "",
            paper_standard: Sequence[Optional[float]] = (),
            paper_robust: Mapping[float, Sequence[Optional[float]]] | None = None,
            paper_label: str = "paper", standard_whiskers: Sequence[Optional[tuple[float, float]]] = (),
            robust_whiskers: Mapping[float, Sequence[Optional[tuple[float, float]]]] | None = None) -> "Figure":
    """Grouped bars in [0,1] in the style of Ilyas et al.'s Figure 2: per training set (group), its
    standard accuracy and its robust accuracy at every eps of `robust` (eps -> one value per group).
    A value None (not measured) shows as "n/a". The paper's numbers (`paper_standard`, and
    `paper_robust` at the eps it reports) are black marks across the matching bars. Whiskers
    (`standard_whiskers`, `robust_whiskers`: (lower, upper) per group, or None) span an interval
    around a bar, e.g. its 95% interval; the bar's value label sits above its whisker."""
    from matplotlib import colormaps, rc_context
    from matplotlib.ticker import MultipleLocator, PercentFormatter

    eps_list = sorted(robust)
    series: list[tuple[str, Sequence[Optional[float]], object, Sequence[Optional[float]], Sequence]] = [
        ("standard accuracy", standard, _BLUE, paper_standard, standard_whiskers)]
    shades = colormaps["Oranges"]
    for k, eps in enumerate(eps_list):
        shade = shades(0.35 + 0.5 * k / (len(eps_list) - 1)) if len(eps_list) > 1 else _ORANGE
        series.append((f"robust, L2 \u03b5 = {eps:g}", robust[eps], shade, (paper_robust or {}).get(eps, ()),
                       (robust_whiskers or {}).get(eps, ())))
    n_groups, n_series = len(groups), len(series)
    width = min(20.0, max(8.0, 1.4 + n_groups * (n_series + 1) * 0.3))
    with rc_context(_STYLE):
        fig, ax = _figure(width, 5.2)
        bar_w = 0.84 / n_series
        marks: list[tuple[float, float, float]] = []  # (x0, x1, y) of every paper mark
        labels_by_bar = []
        for s, (name, values, colour, refs, whiskers) in enumerate(series):
            xs = [g - 0.42 + bar_w * (s + 0.5) for g in range(n_groups)]
            heights = [_clip01(v) for v in values]
            bars = ax.bar(xs, heights, bar_w * 0.92, color=colour, label=name, zorder=2)
            # the value in % without the sign (the axis says %), or n/a
            texts = ax.bar_label(bars, labels=[fmt_rate(v, ".0%").rstrip("%") for v in values], padding=2,
                                 fontsize=7.5, color=_INK)
            spans = [(g, w) for g, w in enumerate(whiskers) if g < n_groups and w is not None and values[g] is not None]
            if spans:
                ax.vlines([xs[g] for g, _ in spans], [_clip01(w[0]) for _, w in spans],
                          [_clip01(w[1]) for _, w in spans], colors=_INK, linewidths=0.9, zorder=2.5, gid="whisker")
                for g, w in spans:
                    texts[g].xy = (xs[g], max(heights[g], _clip01(w[1])))
            for g, text in enumerate(texts):
                ref = refs[g] if g < len(refs) else None
                labels_by_bar.append((text, xs[g], heights[g], ref))
                if ref is not None:
                    marks.append((xs[g] - bar_w * 0.55, xs[g] + bar_w * 0.55, float(ref)))
        if marks:
            ax.hlines([m[2] for m in marks], [m[0] for m in marks], [m[1] for m in marks], colors="black",
                      linewidths=_MARK_WIDTH, zorder=3, label=paper_label, gid="paper")
        ax.set_xticks(range(n_groups), [g.replace(" (", "\n(") for g in groups])
        ax.tick_params(axis="x", length=0, pad=6)
        ax.set_xlim(-0.6, n_groups - 0.4)
        ax.set_ylim(0, 1.09)  # room for a label over a bar at 100%
        ax.yaxis.set_major_locator(MultipleLocator(0.2))
        ax.yaxis.set_major_formatter(PercentFormatter(1.0, decimals=0))
        ax.set_ylabel("accuracy on the original test set")
        ax.grid(axis="y")
        ax.spines["left"].set_bounds(0, 1)
        handles, names = ax.get_legend_handles_labels()
        order = sorted(range(len(names)), key=lambda k: names[k] == paper_label)  # the paper's marks last
        for ncol in (len(order), math.ceil(len(order) / 2), math.ceil(len(order) / 3)):  # one row if it fits
            legend = ax.legend([handles[k] for k in order], [names[k] for k in order], loc="lower center",
                               bbox_to_anchor=(0.5, 1.01), ncol=ncol, handlelength=1.4, columnspacing=1.4)
            if legend.get_window_extent(fig.canvas.get_renderer()).width <= 0.95 * fig.bbox.width:
                break
        if title:
            fig.suptitle(title, fontweight="bold")
        _lift_labels_over_marks(fig, ax, labels_by_bar)
        _save(fig, path)
    return fig


def _lift_labels_over_marks(fig, ax, labels_by_bar) -> None:
    """A value label that a paper mark crosses moves above the mark (same bar, same x)."""
    renderer = fig.canvas.get_renderer()
    fig.draw_without_rendering()  # settle the constrained layout first
    margin = renderer.points_to_pixels(_MARK_WIDTH) / 2 + 5  # half the mark's thickness and a gap
    for text, x, height, ref in labels_by_bar:
        if ref is None or ref < height:
            continue
        box = text.get_window_extent(renderer)
        y_ref = ax.transData.transform((x, ref))[1]
        if box.y0 - margin <= y_ref <= box.y1 + margin:
            text.xy = (x, ref)
            text.xyann = (0, 4)


# ----------------------------------------------------------------------------- scatter

def scatter(points: Sequence[tuple[str, Optional[float], Optional[float]]], path: str | Path, *, xlabel: str,
            ylabel: str, title: str = "", note: str = "", fit: bool = True) -> "Figure":
    """Labelled points (label, x, y), x and y in [0,1] shown as percentages on round ticks, with a
    least-squares line over the data's x-range (when at least 3 points with distinct x). A point with
    x or y None (e.g. a rate over 0/0) is not drawn and is named "n/a" under the title, beside `note`."""
    import numpy as np
    from matplotlib import rc_context
    from matplotlib.ticker import MaxNLocator, PercentFormatter

    valid = [(label, float(x), float(y)) for label, x, y in points if _finite(x) and _finite(y)]
    skipped = [label for label, x, y in points if not (_finite(x) and _finite(y))]
    xs = np.array([p[1] for p in valid], dtype=float)
    ys = np.array([p[2] for p in valid], dtype=float)
    with rc_context(_STYLE):
        fig, ax = _figure(7.2, 5.4)
        line = None
        if fit and len(valid) >= 3 and xs.std() > 0:
            slope, intercept = np.polyfit(xs, ys, 1)
            line = (slope, intercept)
        ends = [slope * x + intercept for x in (xs.min(), xs.max())] if line else []
        (x_lo, x_hi), x_step = _nice_limits(xs)
        (y_lo, y_hi), y_step = _nice_limits(np.concatenate([ys, np.clip(ends, 0, 1)]))  # the line's ends too
        ax.set_xlim(x_lo, x_hi)
        ax.set_ylim(y_lo, y_hi)
        for axis, step in ((ax.xaxis, x_step), (ax.yaxis, y_step)):
            axis.set_major_locator(MaxNLocator(nbins=6, steps=list(NICE_STEPS)))
            axis.set_major_formatter(PercentFormatter(1.0, decimals=_decimals(step)))
        ax.grid(True)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        lines = [note] if note else []
        if line:
            seg = _clip_segment(slope, intercept, (xs.min(), xs.max()), (y_lo, y_hi))
            if seg is not None:
                ax.plot(*seg, color=_ORANGE, lw=1.8, zorder=2, gid="fit", solid_capstyle="butt",
                        label="least-squares fit")
                lines.append("line: least-squares fit")
        if skipped:
            lines.append("not plotted (n/a): " + ", ".join(skipped))
        ax.scatter(xs, ys, s=42, color=_BLUE, edgecolor="white", linewidth=0.8, zorder=3)
        if not valid:
            ax.text(0.5, 0.5, "nothing to plot: every point has a value n/a", transform=ax.transAxes, ha="center",
                    va="center", color="0.45", fontsize=10)
        if title:
            fig.suptitle(title, fontweight="bold")
        if lines:
            ax.set_title("\n".join(textwrap.fill(line, 100) for line in lines), fontsize=9, color="0.35")
        _place_point_labels(fig, ax, valid)
        _save(fig, path)
    return fig


def robustness_curve(curve, path: str | Path, *, clean_accuracy: Optional[float] = None, title: str = "") -> "Figure":
    """Robust accuracy at every eps from one minimal-distance run (an advex.v1.DistanceCurve of
    Evaluate's result): a step line with its 95% band, clean accuracy at eps 0."""
    from matplotlib import rc_context
    from matplotlib.ticker import PercentFormatter

    norm = "L2" if curve.norm == 2 else "Linf"
    points = list(curve.points)
    start = clean_accuracy if clean_accuracy is not None else (points[0].robust_accuracy if points else 0.0)
    eps = [0.0] + [p.eps for p in points]
    acc = [start] + [p.robust_accuracy for p in points]
    lower = [start] + [p.robust_accuracy_ci.lower for p in points]
    upper = [start] + [p.robust_accuracy_ci.upper for p in points]
    with rc_context(_STYLE):
        fig, ax = _figure(6.4, 4.2)
        ax.fill_between(eps, lower, upper, step="post", color=_BLUE, alpha=0.18, lw=0, label="95% interval")
        ax.step(eps, acc, where="post", color=_BLUE, lw=1.8, label=f"robust accuracy ({curve.method})", gid="curve")
        ax.set_ylim(0, 1)
        ax.set_xlim(0, max(eps) * 1.02 if max(eps) > 0 else 1.0)
        ax.yaxis.set_major_formatter(PercentFormatter(1.0, decimals=0))
        ax.grid(True)
        ax.set_xlabel(f"{norm} radius eps")
        ax.set_ylabel("accuracy")
        ax.legend(loc="upper right")
        ax.set_title(f"median minimal {norm} distance {curve.median_distance:.3g}", fontsize=9, color="0.35")
        if title:
            fig.suptitle(title, fontweight="bold")
        _save(fig, path)
    return fig


# ----------------------------------------------------------------------------- notebook figures

def shown(fig: "Figure", path: str | Path | None = None) -> "Figure":
    """Save the Figure as a PNG at `path` when one is given, and let IPython display it: a Figure made
    without pyplot has no display of its own, so it gets a `_repr_png_` (its PNG, as saved)."""
    import io

    def _repr_png_() -> bytes:
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi="figure")
        return buf.getvalue()

    fig._repr_png_ = _repr_png_  # type: ignore[attr-defined]
    if path is not None:
        _save(fig, path)
    return fig


def heatmap(values: Sequence[Sequence[Optional[float]]], rows: Sequence[str], columns: Sequence[str],
            path: str | Path | None = None, *, title: str = "", xlabel: str = "", ylabel: str = "",
            label: str = "") -> "Figure":
    """A matrix of rates (fractions in [0,1]; None is not measured, a grey cell reading "n/a") as a
    heat map on a fixed 0-100% scale, each cell's value written in it (texts with gid "cell R C")."""
    import numpy as np
    from matplotlib import colormaps, rc_context
    from matplotlib.ticker import PercentFormatter

    grid = np.array([[np.nan if v is None or not _finite(v) else float(v) for v in row] for row in values],
                    dtype=float).reshape(len(rows), len(columns))
    cmap = colormaps["viridis"].with_extremes(bad="0.85")
    with rc_context(_STYLE):
        fig, ax = _figure(max(4.2, 1.1 * len(columns) + 2.6), max(3.0, 0.7 * len(rows) + 1.8))
        image = ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, vmin=0.0, vmax=1.0, aspect="auto")
        ax.set_xticks(range(len(columns)), [str(c) for c in columns], rotation=30 if len(columns) > 3 else 0,
                      ha="right" if len(columns) > 3 else "center")
        ax.set_yticks(range(len(rows)), [str(r) for r in rows])
        ax.spines[:].set_visible(False)
        ax.tick_params(length=0)
        for r in range(grid.shape[0]):
            for c in range(grid.shape[1]):
                v = grid[r, c]
                ink = "0.3" if not np.isfinite(v) else ("white" if v < 0.55 else "black")
                ax.text(c, r, fmt_rate(None if not np.isfinite(v) else v), ha="center", va="center", color=ink,
                        fontsize=9, gid=f"cell {r} {c}")
        bar = fig.colorbar(image, ax=ax, shrink=0.9)
        bar.ax.yaxis.set_major_formatter(PercentFormatter(1.0, decimals=0))
        if label:
            bar.set_label(label)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        if title:
            fig.suptitle(title, fontweight="bold")
    return shown(fig, path)


def image_rows(rows: Sequence[tuple[str, "np.ndarray", Sequence[str]]], path: str | Path | None = None, *,
               title: str = "", signed: Sequence[str] = ()) -> "Figure":
    """Images in rows, one row per (name, images [N,C,H,W] in [0,1], captions[N]). The rows named in
    `signed` (perturbations) are shown around mid-grey, scaled so that the row's largest |value| is
    black or white (sizes stay comparable across the row). Each image is an AxesImage with gid
    "<name> <i>"."""
    import numpy as np
    from matplotlib import rc_context

    n = max((len(r[1]) for r in rows), default=0)
    with rc_context(_STYLE):
        fig, _ = _figure(max(3.0, 1.15 * n + 1.0), 1.35 * max(1, len(rows)) + (0.4 if title else 0.1))
        fig.clear()
        grid = fig.subplots(max(1, len(rows)), max(1, n), squeeze=False)
        for r, (name, images, captions) in enumerate(rows):
            images = np.asarray(images, dtype=np.float32)
            if name in signed:
                images = 0.5 + 0.5 * images / (float(np.abs(images).max()) or 1.0)
            for i in range(grid.shape[1]):
                ax = grid[r, i]
                ax.set_xticks([])
                ax.set_yticks([])
                ax.spines[:].set_visible(False)
                if i >= len(images):
                    continue
                pixels = np.clip(images[i], 0.0, 1.0)
                ax.imshow(pixels[0] if pixels.shape[0] == 1 else pixels.transpose(1, 2, 0), vmin=0.0, vmax=1.0,
                          cmap="gray", interpolation="nearest", gid=f"{name} {i}")
                ax.set_xlabel(str(captions[i]) if i < len(captions) else "", fontsize=7.5)
            grid[r, 0].set_ylabel(name, fontsize=9, rotation=0, ha="right", va="center")
        if title:
            fig.suptitle(title, fontweight="bold")
    return shown(fig, path)


def curves(x: Sequence[float], series: Mapping[str, Sequence[Optional[float]]], path: str | Path | None = None,
           *, xlabel: str, title: str = "", percent: Sequence[str] = ()) -> "Figure":
    """Lines over x, one Axes per series name (gid "<name>" on its line); the series named in
    `percent` are rates on a percentage axis."""
    from matplotlib import rc_context
    from matplotlib.ticker import MaxNLocator, PercentFormatter

    names = list(series)
    with rc_context(_STYLE):
        fig, _ = _figure(max(4.4, 3.6 * len(names)), 3.4)
        fig.clear()
        axes = fig.subplots(1, max(1, len(names)), squeeze=False)[0]
        for ax, name in zip(axes, names):
            pairs = [(a, b) for a, b in zip(x, series[name]) if _finite(b)]
            ax.plot([a for a, _ in pairs], [b for _, b in pairs], marker="o", ms=4, lw=1.8, color=_BLUE, gid=name)
            ax.set_title(name, fontsize=10)
            ax.set_xlabel(xlabel)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.grid(True)
            if name in percent:
                ax.yaxis.set_major_formatter(PercentFormatter(1.0, decimals=0))
        if title:
            fig.suptitle(title, fontweight="bold")
    return shown(fig, path)


def _place_point_labels(fig, ax, valid: Sequence[tuple[str, float, float]]) -> None:
    """Each point's label at the first nearby offset where it overlaps no other label, no marker, no
    tick label and stays inside the axes (greedy, in the points' order); else where it overlaps least."""
    renderer = fig.canvas.get_renderer()
    fig.draw_without_rendering()
    axes_box = ax.get_window_extent(renderer)
    px = fig.dpi / 72.0
    markers = [ax.transData.transform((x, y)) for _, x, y in valid]
    r = 5.5 * px
    obstacles = [_box(mx - r, my - r, mx + r, my + r) for mx, my in markers]
    obstacles += [t.get_window_extent(renderer) for t in ax.get_xticklabels() + ax.get_yticklabels()
                  if t.get_visible() and t.get_text()]
    fit = [line for line in ax.get_lines() if line.get_gid() == "fit"]
    candidates = [(dx * k, dy * k, ha, va) for k in (1, 2, 3, 4.5)
                  for dx, dy, ha, va in ((7, 3, "left", "bottom"), (7, -3, "left", "top"), (-7, 3, "right", "bottom"),
                                         (-7, -3, "right", "top"), (0, 7, "center", "bottom"),
                                         (0, -7, "center", "top"), (9, 0, "left", "center"),
                                         (-9, 0, "right", "center"))]
    for label, x, y in valid:
        best, best_cost = None, math.inf
        for dx, dy, ha, va in candidates:
            text = ax.annotate(label, (x, y), xytext=(dx, dy), textcoords="offset points", ha=ha, va=va,
                               fontsize=9, color=_INK, zorder=4,
                               bbox=dict(boxstyle="square,pad=0.1", fc="white", ec="none", alpha=0.85))
            box = text.get_window_extent(renderer)
            cost = sum(_overlap(box, o) for o in obstacles) * 10
            outside = box.width * box.height - _overlap(box, axes_box)
            cost += outside * 10
            cost += 0.5 * sum(_crosses(box, line, renderer) for line in fit) * box.width * box.height
            cost += math.hypot(dx, dy) * 0.01  # prefer near
            if cost < best_cost:
                if best is not None:
                    best[0].remove()
                best, best_cost = (text, box), cost
            else:
                text.remove()
            if cost < 1:
                break
        obstacles.append(best[1])


def _crosses(box, line, renderer) -> bool:
    """Whether a straight 2-point line passes through the box (display coordinates)."""
    import numpy as np

    pts = line.get_transform().transform(np.column_stack(line.get_data()))
    (x0, y0), (x1, y1) = pts[0], pts[-1]
    box = box.expanded(1.0, 1.0).padded(line.get_linewidth() * renderer.points_to_pixels(1.0))
    for t in np.linspace(0, 1, 200):
        if box.contains(x0 + t * (x1 - x0), y0 + t * (y1 - y0)):
            return True
    return False


# ----------------------------------------------------------------------------- helpers

def _figure(width: float, height: float):
    """A Figure on its own Agg canvas (no pyplot), with a constrained layout, and its one Axes."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=_DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot()


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi="figure")  # the PNG's pixels are the Figure's: what is measured is what is saved
    return path


def _nice_limits(values, lo_bound: float = 0.0, hi_bound: float = 1.0) -> tuple[tuple[float, float], float]:
    """Axis limits on round ticks around the values, padded, inside [lo_bound, hi_bound]; and the step."""
    import numpy as np
    from matplotlib.ticker import MaxNLocator

    values = np.asarray(values, dtype=float)
    if values.size == 0:
        return (lo_bound, hi_bound), 0.2
    lo, hi = float(values.min()), float(values.max())
    pad = max(0.02, 0.08 * (hi - lo))
    lo, hi = max(lo_bound, lo - pad), min(hi_bound, hi + pad)
    ticks = MaxNLocator(nbins=6, steps=list(NICE_STEPS)).tick_values(lo, hi)
    step = float(ticks[1] - ticks[0])
    lo = max(lo_bound, step * math.floor(lo / step + 1e-9))
    hi = min(hi_bound, step * math.ceil(hi / step - 1e-9))
    return (lo, hi), step


def _decimals(step: float) -> int:
    """Decimals a percentage label needs to show ticks `step` apart (0.2 -> 0, 0.025 -> 1)."""
    for d in range(4):
        if abs(round(step * 100, d) - step * 100) < 1e-9:
            return d
    return 3


def _clip_segment(slope: float, intercept: float, x_range: tuple[float, float],
                  y_range: tuple[float, float]) -> Optional[tuple[list[float], list[float]]]:
    """The part of y = slope * x + intercept with x in x_range and y in y_range, or None."""
    x0, x1 = float(x_range[0]), float(x_range[1])
    if slope != 0:
        bounds = sorted(((y_range[0] - intercept) / slope, (y_range[1] - intercept) / slope))
        x0, x1 = max(x0, bounds[0]), min(x1, bounds[1])
    elif not y_range[0] <= intercept <= y_range[1]:
        return None
    if x1 <= x0:
        return None
    ys = [min(max(slope * x + intercept, y_range[0]), y_range[1]) for x in (x0, x1)]
    return [x0, x1], ys


def _box(x0, y0, x1, y1):
    from matplotlib.transforms import Bbox

    return Bbox([[x0, y0], [x1, y1]])


def _overlap(a, b) -> float:
    w = min(a.x1, b.x1) - max(a.x0, b.x0)
    h = min(a.y1, b.y1) - max(a.y0, b.y0)
    return w * h if w > 0 and h > 0 else 0.0


def _finite(v) -> bool:
    return v is not None and math.isfinite(float(v))


def _clip01(v: Optional[float]) -> float:
    return min(1.0, max(0.0, float(v))) if _finite(v) else 0.0


