"""Redraw the figures of an `advex reproduce` report folder from its numbers, without a server:
figure2.png from results.json, transfer_vs_d_det.png from transfer.json (whichever are there).

    python scripts/redraw_figures.py bench/results/reproduce-small bench/results/reproduce-transfer-small
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from advex.client import reproduce


def redraw(folder: Path) -> list[Path]:
    drawn = []
    if (folder / "results.json").exists():
        data = json.loads((folder / "results.json").read_text())
        preset = reproduce.Preset.from_json(data["preset"])
        rows = [reproduce.Row(**r) for r in data["rows"]]
        reproduce.draw_figure2(preset, rows, folder / "figure2.png")
        drawn.append(folder / "figure2.png")
    if (folder / "transfer.json").exists():
        data = json.loads((folder / "transfer.json").read_text())
        preset = reproduce.TransferPreset(**data["preset"])
        rows = [reproduce.TransferRow(**r) for r in data["rows"]]
        # a transfer.json from before the conditional rate: its figure shows the rate it has
        rate_name = "conditional_rate" if any("conditional_rate" in r for r in data["rows"]) else "transfer_rate"
        # a transfer rate over 0/0 is n/a, whatever an older transfer.json stored for it
        for r in rows:
            if not r.successful_on_source:
                r.transfer_rate = None
        corr = reproduce.pearson_r([getattr(r, rate_name) for r in rows], [r.d_det_accuracy for r in rows])
        reproduce.draw_transfer_figure(preset, rows, corr, folder / "transfer_vs_d_det.png", rate_name)
        drawn.append(folder / "transfer_vs_d_det.png")
    return drawn


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    for folder in argv:
        drawn = redraw(Path(folder))
        print(f"{folder}: " + (", ".join(p.name for p in drawn) or "no results.json or transfer.json"))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
