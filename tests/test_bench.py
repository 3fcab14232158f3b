"""bench/gpu.sh's script runs end to end (at toy sizes, on the CPU) and writes every section: a GPU
session is too short to find a broken benchmark. No timing is asserted: figures live in bench/results."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from conftest import require_builtin

ROOT = Path(__file__).resolve().parent.parent


def test_the_gpu_benchmark_runs_small_and_reports_every_figure(tmp_path):
    roots = require_builtin("cifar10")
    tag = str(tmp_path / "gpu_small")  # an absolute tag: the files land in tmp_path, not bench/results
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu.py"), "--small", "--tag", tag,
                           *(a for r in roots for a in ("--data-root", r))],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(Path(tag + ".json").read_text())
    benches = [r["bench"] for r in result["rows"]]
    assert benches.count("pgd") == 2 and {"autoattack-fast", "d_r", "train_epoch"} <= set(benches)
    for r in result["rows"]:
        if r["bench"] == "pgd":
            assert r["advex_img_s"] > 0 and r["torchattacks_img_s"] > 0 and r["gflop_per_step"] > 0
            assert 0.0 <= r["verdict_agreement"] <= 1.0 and r["advex_mfu"] is None  # no GPU peak on the CPU
    assert result["meta"]["device"] == "cpu" and result["meta"]["small"] is True
    report = Path(tag + ".md").read_text()
    assert "## PGD, every step" in report and "## AutoAttack" in report and "D_R, small_cnn" in report
