"""`advex reproduce` end to end through a real server at smoke-test scale: every stage runs,
and the report folder holds the table, the figure and the samples with consistent numbers.
Then, with a scripted client (no server, fast): results are written before any figure, Figure 2
covers every evaluated eps, and a rate over 0/0 reads n/a.
(The science itself is asserted at known-answer scale in test_engine_builders.py.)"""
from __future__ import annotations

import dataclasses
import json
import re
from types import SimpleNamespace as NS

import numpy as np
import pytest
from PIL import Image

from advex.client import Client, reproduce
from advex.service.inprocess import InProcessServer

from conftest import require_builtin, require_module


def test_tiny_preset_writes_a_complete_report(tmp_path):
    roots = require_builtin("fashion-mnist")
    lines: list[str] = []
    with InProcessServer(data_dir=str(tmp_path / "d"), data_roots=roots) as srv, Client(srv.target) as c:
        rows = reproduce.run(c, reproduce.PRESETS["tiny"], tmp_path / "report", log=lines.append)
        generated = {d.id: d for d in c.list_datasets() if d.kind == "generated"}
        # each constructed set is stored with its lineage and feeds the model trained on it
        for row in rows[2:]:
            lineage = json.loads(generated[row.dataset_id].lineage_json)
            assert lineage["mode"] == row.training_set.lower()
            assert json.loads(c.get_model(row.model_id).lineage_json)["dataset_id"] == row.dataset_id
    assert [r.training_set for r in rows] == list(reproduce.PAPER)
    report = (tmp_path / "report" / "report.md").read_text()
    for r in rows:
        assert 0 <= r.robust_025 <= r.clean <= 1
        assert f"| {r.training_set} | {r.clean:.1%} |" in report
    data = json.loads((tmp_path / "report" / "results.json").read_text())
    assert [row["clean"] for row in data["rows"]] == [r.clean for r in rows]
    assert data["rows"][0]["sweep"].keys() == {f"{e:g}" for e in reproduce.PRESETS["tiny"].eval_eps}
    fig = Image.open(tmp_path / "report" / "figure2.png")
    samples = Image.open(tmp_path / "report" / "samples.png")
    assert fig.size[0] > fig.size[1] > 400 and np.asarray(fig.convert("L")).std() > 10  # a drawn chart
    assert samples.size[1] > 5 * 28  # five rows of 28-pixel images
    assert np.asarray(samples).std() > 0
    assert any("Reductions" in line for line in lines)


def test_tiny_transfer_experiment_reports_every_architecture(tmp_path):
    roots = require_builtin("fashion-mnist")
    with InProcessServer(data_dir=str(tmp_path / "d"), data_roots=roots) as srv, Client(srv.target) as c:
        summary = reproduce.run_transfer(c, reproduce.TRANSFER_PRESETS["tiny"], tmp_path / "t", log=lambda s: None)
    rows = summary["rows"]
    assert [r["architecture"] for r in rows] == list(reproduce.TRANSFER_PRESETS["tiny"].architectures)
    # a smoke test that measures something: the source learned enough for its attack to succeed
    assert all(r["successful_on_source"] > 0 for r in rows)
    for r in rows:
        if r["successful_on_source"]:
            assert 0 <= r["transfer_rate"] <= 1
        else:
            assert r["transfer_rate"] is None  # 0/0 is not 0%
        assert 0 <= r["d_det_accuracy"] <= 1
        assert r["transferred"] <= r["successful_on_source"]
    assert json.loads((tmp_path / "t" / "transfer.json").read_text())["rows"] == rows
    report = (tmp_path / "t" / "report.md").read_text()
    assert "Pearson r" in report and all(f"| {r['architecture']} |" in report for r in rows)
    assert "nan" not in report.lower().replace("nanoseconds", "")
    fig = Image.open(tmp_path / "t" / "transfer_vs_d_det.png")
    assert fig.size[0] > 600 and fig.size[1] > 400 and np.asarray(fig.convert("L")).std() > 10


# ------------------------------------------------------------------ scripted client, no server

class ScriptedClient:
    """Answers the calls reproduce.run / run_transfer make, with fixed numbers."""

    def __init__(self, *, clean=0.8, robust=None, successes=0, correct_on_target=150):
        self.clean, self.robust = clean, robust or {}
        self.successes, self.correct_on_target = successes, correct_on_target
        self.n = 0

    def _op(self, **fields):
        self.n += 1
        return NS(result=lambda *a, **k: NS(**fields))

    def train(self, *a, **k):
        return self._op(model_id=f"m-{self.n}")

    def robustify(self, *a, **k):
        return self._op(dataset_id=f"ds-{self.n}", mode="D_R", feature_distance_start_mean=1.0,
                        feature_distance_mean=0.1, feature_distance_p95=0.2, mean_l2_from_start=3.0, wall_seconds=1.0)

    def build_nonrobust_dataset(self, mode, *a, **k):
        name = {"d_nr": "D_NR", "d_rand": "D_rand", "d_det": "D_det"}[mode]
        return self._op(dataset_id=f"ds-{self.n}", mode=name, target_hit_rate=0.9, mean_l2=1.0, max_l2=2.0,
                        feature_distance_start_mean=1.0, feature_distance_mean=0.1, feature_distance_p95=0.2,
                        mean_l2_from_start=3.0, wall_seconds=1.0)

    def evaluate(self, model_id, dataset_id, *, attacks=(), **k):
        eps = [e for a in attacks for e in a["eps"]]
        return self._op(clean_accuracy=self.clean,
                        robust=[NS(attack=NS(eps=e), robust_accuracy=self.robust.get(e, 0.5)) for e in eps])

    def transfer_rate(self, sources, targets, dataset_id, **k):
        pairs = [NS(examples=200, correct_on_source=160, correct_on_target=self.correct_on_target,
                    successful_on_source=self.successes, transferred=0, fooled_target=0, white_box_success_rate=0.0,
                    transfer_rate=0.0, unconditional_rate=0.0) for _ in targets]
        return self._op(pairs=pairs, definition="transfer rate = transferred / successful_on_source")

    def download_dataset(self, dataset_id, split="", *, limit=0):
        return np.zeros((limit, 1, 28, 28), np.uint8), np.zeros(limit, np.int64)

    def get_dataset(self, dataset_id):
        return NS(class_names=[str(i) for i in range(10)])


SMALL_EPS = reproduce.PRESETS["small"].eval_eps  # 0.25, 0.5, 1, 2


def _boom(*args, **kwargs):
    raise RuntimeError("the plotting library fell over")


def test_results_and_report_are_written_before_figure2_is_drawn(tmp_path, monkeypatch):
    from advex.client import plots

    monkeypatch.setattr(plots, "figure2", _boom)
    out = tmp_path / "r"
    with pytest.raises(RuntimeError, match="fell over"):
        reproduce.run(ScriptedClient(), reproduce.PRESETS["small"], out, log=lambda s: None)
    data = json.loads((out / "results.json").read_text())
    assert [r["training_set"] for r in data["rows"]] == list(reproduce.PAPER)
    assert data["rows"][0]["sweep"] == {f"{e:g}": 0.5 for e in SMALL_EPS}
    assert "| D (standard) | 80.0% |" in (out / "report.md").read_text()


def test_transfer_json_and_report_are_written_before_the_figure_is_drawn(tmp_path, monkeypatch):
    from advex.client import plots

    monkeypatch.setattr(plots, "scatter", _boom)
    out = tmp_path / "t"
    with pytest.raises(RuntimeError, match="fell over"):
        reproduce.run_transfer(ScriptedClient(successes=40), reproduce.TRANSFER_PRESETS["tiny"], out,
                               log=lambda s: None)
    data = json.loads((out / "transfer.json").read_text())
    assert [r["architecture"] for r in data["rows"]] == list(reproduce.TRANSFER_PRESETS["tiny"].architectures)
    assert "| small_cnn |" in (out / "report.md").read_text()


def test_figure2_of_a_run_covers_every_evaluated_eps(tmp_path, monkeypatch):
    require_module("matplotlib", "pip install 'advex[plot]'")
    from advex.client import plots

    figures, real = [], plots.figure2
    monkeypatch.setattr(plots, "figure2", lambda *a, **k: figures.append(real(*a, **k)) or figures[-1])
    robust = {0.25: 0.7, 0.5: 0.4, 1.0: 0.1, 2.0: 0.0}
    reproduce.run(ScriptedClient(robust=robust), reproduce.PRESETS["small"], tmp_path / "r", log=lambda s: None)
    ax = figures[0].axes[0]
    names = [c.get_label() for c in ax.containers]
    assert len(names) == 1 + len(SMALL_EPS)
    for eps, name in zip(SMALL_EPS, names[1:]):
        assert f"{eps:g}" in name and [b.get_height() for b in ax.containers[names.index(name)]] == \
            pytest.approx([robust[eps]] * len(reproduce.PAPER))
    assert (tmp_path / "r" / "figure2.png").stat().st_size > 10_000


def test_a_transfer_rate_over_zero_successes_reads_na_everywhere(tmp_path):
    require_module("matplotlib", "pip install 'advex[plot]'")
    lines: list[str] = []
    out = tmp_path / "t"
    summary = reproduce.run_transfer(ScriptedClient(successes=0, correct_on_target=0),
                                     reproduce.TRANSFER_PRESETS["tiny"], out, log=lines.append)
    data = json.loads((out / "transfer.json").read_text())
    for row in (*summary["rows"], *data["rows"]):
        assert row["transfer_rate"] is None and row["unconditional_rate"] is None  # null, not 0.0
    assert summary["pearson_r"] is None and data["pearson_r"] is None
    printed = "\n".join(lines)
    report = (out / "report.md").read_text()
    for text in (printed, report):
        assert not re.search(r"(?<![\d.])0\.0%", text) and "nan" not in text
        assert "Pearson r = n/a" in text
        for arch in reproduce.TRANSFER_PRESETS["tiny"].architectures:
            assert re.search(rf"{arch}\b.*\bn/a\b.*\bn/a\b.*0/0", text), arch  # transfer, unconditional
    assert (out / "transfer_vs_d_det.png").stat().st_size > 5_000


def test_robust_accuracy_without_eps_025_reads_na_not_nan(tmp_path):
    require_module("matplotlib", "pip install 'advex[plot]'")
    preset = dataclasses.replace(reproduce.PRESETS["tiny"], eval_eps=(0.5, 1.0))
    lines: list[str] = []
    rows = reproduce.run(ScriptedClient(), preset, tmp_path / "r", log=lines.append)
    assert all(r.robust_025 is None for r in rows)
    data = json.loads((tmp_path / "r" / "results.json").read_text(), parse_constant=_no_nan)  # strict JSON
    assert all(r["robust_025"] is None for r in data["rows"])
    report = (tmp_path / "r" / "report.md").read_text()
    assert "| D (standard) | 80.0% | 95.3% | n/a | 4.5% | 50.0% | 50.0% |" in report
    printed = "\n".join(lines)
    assert re.search(r"D \(standard\)\s+80\.0%\s+95\.3%\s+n/a\s+4\.5%\s+50\.0%\s+50\.0%", printed), printed
    for text in (printed, report):
        assert "nan" not in text


def _no_nan(constant: str):
    raise ValueError(f"{constant} is not JSON")
