"""Pictures and tables for people: an image grid PNG (Pillow) and plain-text tables."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A plain-text table with right-aligned numbers."""
    cells = [[str(h) for h in headers]] + [[_fmt(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = []
    for k, row in enumerate(cells):
        lines.append("  ".join(c.rjust(w) if k and _numeric(c) else c.ljust(w) for c, w in zip(row, widths)).rstrip())
        if k == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _fmt(v: object) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e-3 and v else f"{v:.3f}" if v < 10 else f"{v:.1f}"
    return str(v)


def _numeric(s: str) -> bool:
    try:
        float(s.rstrip("%"))
        return True
    except ValueError:
        return False


def image_grid(rows: Sequence[tuple[str, np.ndarray, Sequence[str]]], path: str | Path, scale: int = 3) -> Path:
    """Write a PNG: one row per (title, images [N,C,H,W] float in [0,1], captions[N]).
    Perturbation rows may hold values in [-1,1]; they are shown around mid-grey."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    n = max(len(r[1]) for r in rows)
    c, h, w = rows[0][1].shape[1:]
    cell_w, cell_h, cap_h, title_w = w * scale + 8, h * scale, 26, 110
    canvas = Image.new("RGB", (title_w + n * cell_w, len(rows) * (cell_h + cap_h + 6) + 4), "white")
    draw = ImageDraw.Draw(canvas)
    for r, (title, images, captions) in enumerate(rows):
        top = 4 + r * (cell_h + cap_h + 6)
        draw.text((4, top + cell_h // 2 - 6), title, fill="black", font=font)
        for i, img in enumerate(images):
            arr = np.clip(img, -1.0, 1.0)
            if arr.min() < 0:
                arr = 0.5 + 0.5 * arr  # signed perturbation around grey
            pixels = (np.clip(arr, 0, 1) * 255).round().astype(np.uint8).transpose(1, 2, 0)
            tile = Image.fromarray(pixels[:, :, 0] if c == 1 else pixels, "L" if c == 1 else "RGB")
            tile = tile.resize((w * scale, h * scale), Image.NEAREST).convert("RGB")
            left = title_w + i * cell_w
            canvas.paste(tile, (left, top))
            for k, line in enumerate(str(captions[i]).split("\n")[:2]):
                draw.text((left, top + cell_h + 2 + 12 * k), line[:18], fill="black", font=font)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path


def bar_chart(groups: Sequence[str], series: Sequence[tuple[str, Sequence[float], str]],
              path: str | Path, title: str = "", reference: Sequence[Sequence[float | None]] = ()) -> Path:
    """Grouped bars in [0,1] (accuracies), in the style of Ilyas et al.'s Figure 2.
    series: (name, one value per group, colour). reference: per series, per group, a value drawn
    as a black tick (e.g. the paper's number), or None."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    width, height, left, bottom, top = 120 + 130 * len(groups), 380, 60, 70, 40
    img = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(img)
    plot_h = height - bottom - top
    d.text((left, 10), title, fill="black", font=font)
    for k in range(0, 11, 2):  # y axis in %
        yy = top + plot_h - plot_h * k / 10
        d.line([(left - 4, yy), (width - 20, yy)], fill=(225, 225, 225))
        d.text((8, yy - 6), f"{k * 10}%", fill="black", font=font)
    bar_w = 100 // max(1, len(series))
    for g, group in enumerate(groups):
        x0 = left + 20 + g * 130
        for s, (name, values, colour) in enumerate(series):
            v = max(0.0, min(1.0, float(values[g])))
            bx = x0 + s * bar_w
            d.rectangle([bx, top + plot_h - plot_h * v, bx + bar_w - 4, top + plot_h], fill=colour)
            d.text((bx, top + plot_h - plot_h * v - 12), f"{100 * v:.0f}", fill="black", font=font)
            if reference and s < len(reference) and reference[s][g] is not None:
                ry = top + plot_h - plot_h * float(reference[s][g])
                d.line([(bx - 2, ry), (bx + bar_w - 2, ry)], fill="black", width=3)
        d.text((x0, top + plot_h + 8), group, fill="black", font=font)
    for s, (name, _, colour) in enumerate(series):  # legend
        lx = left + s * 200
        d.rectangle([lx, height - 28, lx + 12, height - 16], fill=colour)
        d.text((lx + 18, height - 28), name, fill="black", font=font)
    if reference:
        lx = left + len(series) * 200
        d.line([(lx, height - 22), (lx + 12, height - 22)], fill="black", width=3)
        d.text((lx + 18, height - 28), "paper", fill="black", font=font)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


def scatter(points: Sequence[tuple[str, float, float]], path: str | Path, *, xlabel: str, ylabel: str,
            title: str = "", note: str = "") -> Path:
    """Labelled points (label, x, y) with x and y in [0,1], a least-squares line, and a note."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    width, height, left, bottom, top, right = 640, 460, 70, 70, 40, 30
    img = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(img)
    pw, ph = width - left - right, height - top - bottom
    xs = np.array([p[1] for p in points], dtype=float)
    ys = np.array([p[2] for p in points], dtype=float)
    lo_x, hi_x = _span(xs)
    lo_y, hi_y = _span(ys)

    def to_px(x: float, y: float) -> tuple[float, float]:
        return left + pw * (x - lo_x) / (hi_x - lo_x), top + ph - ph * (y - lo_y) / (hi_y - lo_y)

    d.text((left, 10), title, fill="black", font=font)
    for k in range(6):  # grid and tick labels
        gx, gy = lo_x + (hi_x - lo_x) * k / 5, lo_y + (hi_y - lo_y) * k / 5
        px, _ = to_px(gx, lo_y)
        _, py = to_px(lo_x, gy)
        d.line([(px, top), (px, top + ph)], fill=(230, 230, 230))
        d.line([(left, py), (left + pw, py)], fill=(230, 230, 230))
        d.text((px - 12, top + ph + 6), f"{100 * gx:.0f}%", fill="black", font=font)
        d.text((8, py - 6), f"{100 * gy:.0f}%", fill="black", font=font)
    if len(points) >= 2 and xs.std() > 0:
        slope, intercept = np.polyfit(xs, ys, 1)
        d.line([to_px(lo_x, slope * lo_x + intercept), to_px(hi_x, slope * hi_x + intercept)],
               fill=(200, 120, 60), width=2)
    for label, x, y in points:
        px, py = to_px(x, y)
        d.ellipse([px - 5, py - 5, px + 5, py + 5], fill=(70, 110, 180))
        d.text((px + 8, py - 6), label, fill="black", font=font)
    d.text((left + pw // 2 - 80, height - bottom + 26), xlabel, fill="black", font=font)
    d.text((left, height - 22), note, fill="black", font=font)
    side = Image.new("RGB", (ph, 14), "white")
    ImageDraw.Draw(side).text((ph // 2 - 80, 0), ylabel, fill="black", font=font)
    img.paste(side.rotate(90, expand=True), (44, top))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


def _span(v: np.ndarray) -> tuple[float, float]:
    """An axis range in [0,1] around the values, padded (never empty: pad >= 0.05)."""
    lo, hi = float(v.min()), float(v.max())
    pad = max(0.05, 0.1 * (hi - lo))
    return max(0.0, lo - pad), min(1.0, hi + pad)
