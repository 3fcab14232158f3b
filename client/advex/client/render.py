"""Pictures and tables for people: an image grid PNG (Pillow), plain-text tables, and the one rule
for showing a rate (a zero denominator or nan reads "n/a"). Charts are in advex.client.plots."""
from __future__ import annotations

import html
import math
import re
from pathlib import Path
from typing import Optional, Sequence

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


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_NUMERIC_CELL = re.compile(r"(n/a|-|-?[\d.]+(e-?\d+)?%?( \([\d.]+-[\d.]+%\))?|\d+ of \d+)")


def plain(value: object) -> str:
    """Text for one line: None -> "", control characters (newlines, ESC, ...) -> spaces."""
    if value is None:
        return ""
    return _CONTROL.sub(" ", str(value))


def numeric_cell(text: str) -> bool:
    """A cell to right-align: a number, a rate, a rate with its interval, "n of m", "n/a"."""
    return bool(_NUMERIC_CELL.fullmatch(text))


def html_table(headers: Sequence[str], rows: Sequence[Sequence[object]], *, failed: Sequence[int] = (),
               header: bool = True) -> str:
    """An HTML table, every cell escaped (values may come from a server), numbers right-aligned
    (class "num"), the rows in `failed` marked with class "failed"; header=False leaves out the head."""
    def h(text: object) -> str:
        return html.escape(plain(text), quote=True)

    out = ["<table>"]
    if header:
        out.append("<thead><tr>" + "".join(f"<th>{h(c)}</th>" for c in headers) + "</tr></thead>")
    out.append("<tbody>")
    for k, row in enumerate(rows):
        cls = ' class="failed"' if k in failed else ""
        cells = "".join(f'<td class="num">{h(c)}</td>' if numeric_cell(plain(c)) else f"<td>{h(c)}</td>"
                        for c in row)
        out.append(f"<tr{cls}>{cells}</tr>")
    out.append("</tbody></table>")
    return "\n".join(out)


def rate(numerator: float, denominator: float) -> Optional[float]:
    """numerator / denominator, or None when the denominator is 0 (a rate over nothing is not 0%)."""
    return numerator / denominator if denominator else None


def fmt_rate(value: Optional[float], spec: str = ".1%") -> str:
    """A rate (or a correlation, with spec ".2f") for people: "n/a" when it is None or nan."""
    if value is None or not math.isfinite(float(value)):
        return "n/a"
    return format(float(value), spec)


def fmt_ci(message, field: str, digits: int = 1) -> str:
    """The 95% interval in message.<field> (an advex.v1.Interval) as "80.9-85.4%"; "n/a" when the
    server left it unset (a rate over nothing)."""
    if not message.HasField(field):
        return "n/a"
    ci = getattr(message, field)
    return fmt_range(ci.lower, ci.upper, digits)


def fmt_range(lower: float, upper: float, digits: int = 1, unit: str = "%") -> str:
    """Two rates as a range in %: "80.9-85.4%" (unit "" leaves the sign out)."""
    return f"{100 * lower:.{digits}f}-{100 * upper:.{digits}f}{unit}"


def _fmt(v: object) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e-3 and v else f"{v:.3f}" if v < 10 else f"{v:.1f}"
    return str(v)


def _numeric(s: str) -> bool:
    if s == "n/a":
        return True
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
