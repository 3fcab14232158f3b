"""`advex reproduce` end to end through a real server at smoke-test scale: every stage runs,
and the report folder holds the table, the figure and the samples with consistent numbers.
(The science itself is asserted at known-answer scale in test_engine_builders.py.)"""
from __future__ import annotations

import json

import numpy as np
from PIL import Image

from advex.client import Client, reproduce
from advex.service.inprocess import InProcessServer

from conftest import require_builtin


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
    fig = Image.open(tmp_path / "report" / "figure2.png")
    samples = Image.open(tmp_path / "report" / "samples.png")
    assert fig.size[0] > 600 and samples.size[1] > 5 * 28  # five rows of 28-pixel images
    assert np.asarray(samples).std() > 0
    assert any("Reductions" in line for line in lines)


def test_tiny_transfer_experiment_reports_every_architecture(tmp_path):
    roots = require_builtin("fashion-mnist")
    with InProcessServer(data_dir=str(tmp_path / "d"), data_roots=roots) as srv, Client(srv.target) as c:
        summary = reproduce.run_transfer(c, reproduce.TRANSFER_PRESETS["tiny"], tmp_path / "t", log=lambda s: None)
    rows = summary["rows"]
    assert [r["architecture"] for r in rows] == list(reproduce.TRANSFER_PRESETS["tiny"].architectures)
    for r in rows:
        assert 0 <= r["transfer_rate"] <= 1 and 0 <= r["d_det_accuracy"] <= 1
        assert r["transferred"] <= r["successful_on_source"]
    report = (tmp_path / "t" / "report.md").read_text()
    assert "Pearson r" in report and all(f"| {r['architecture']} |" in report for r in rows)
    assert Image.open(tmp_path / "t" / "transfer_vs_d_det.png").size == (640, 460)
