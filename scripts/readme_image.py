"""Redraw examples/images/evaluate.png, the README's picture of a result in a notebook: an
Evaluate result's table (its _repr_html_, styled as JupyterLab shows a cell's output) and its
plot(), rendered by headless Chromium. It trains and evaluates a small CNN on Fashion-MNIST on an
in-process server (about a minute on 2 CPU cores).

    .venv/bin/python scripts/readme_image.py [--out examples/images/evaluate.png]
"""
from __future__ import annotations

import argparse
import base64
import io
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from advex.client import Client
from advex.service.inprocess import InProcessServer

ROOT = Path(__file__).resolve().parent.parent
_PAGE = """<!DOCTYPE html><html><head><meta charset="utf-8"><style>
body{{font-family:system-ui,-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;margin:0;background:#fff}}
.cell{{margin:14px 18px;border-left:3px solid #1976d2;padding:4px 12px}}
.prompt{{font-family:monospace;color:#303f9f;font-size:13px;margin-bottom:6px}}
table{{border-collapse:collapse;font-size:13px}}th,td{{border:none;padding:4px 10px;text-align:right}}
thead{{border-bottom:1px solid #000}}tbody tr:nth-child(odd){{background:#f5f5f5}}
img{{max-width:760px}}
</style></head><body>
<div class="cell"><div class="prompt">[4]: ev</div>{table}</div>
<div class="cell"><div class="prompt">[5]: ev.plot()</div><img src="data:image/png;base64,{png}"></div>
</body></html>"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "examples" / "images" / "evaluate.png"))
    parser.add_argument("--data-root", default=os.environ.get("ADVEX_DATA_ROOT", ""))
    args = parser.parse_args()
    chromium = shutil.which("chromium")
    if chromium is None:
        raise SystemExit("chromium is not installed (apt-get install chromium)")
    with tempfile.TemporaryDirectory() as tmp, \
            InProcessServer(data_dir=tmp, data_roots=[r for r in args.data_root.split(":") if r]
                                                   + ["/usr/share/datasets"]) as srv, \
            Client(srv.target) as c:
        model_id = c.train("small_cnn", "fashion-mnist", limit=5000, epochs=2, lr=0.05, schedule="cosine",
                           arch_args={"width": 16}, seed=0).result(progress=False).model_id
        ev = c.evaluate(model_id, "fashion-mnist", split="test", limit=500,
                        attacks=[{"norm": "L2", "eps": [0.25, 0.5, 1.0], "steps": 10, "seed": 0},
                                 {"norm": "Linf", "eps": [0.01, 0.03], "steps": 10, "seed": 0}]).result(progress=False)
        buf = io.BytesIO()
        ev.plot().savefig(buf, format="png", dpi=110)
        page = Path(tmp) / "page.html"
        page.write_text(_PAGE.format(table=ev._repr_html_(), png=base64.b64encode(buf.getvalue()).decode()))
        out = Path(args.out).resolve()
        out.parent.mkdir(parents=True, exist_ok=True)
        env = {"HOME": tmp, "PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8"}
        subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--hide-scrollbars",
                        f"--user-data-dir={tmp}/profile", "--window-size=820,640", f"--screenshot={out}",
                        page.as_uri()], check=True, capture_output=True, timeout=120, env=env, cwd=tmp)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
