"""`advex reproduce` end to end through a real server at smoke-test scale: every stage runs,
and the report folder holds the table, the figure and the samples with consistent numbers.
Then, with a scripted client (no server, fast): results are written before any figure, Figure 2
covers every evaluated eps, and a rate over 0/0 reads n/a.
(The science itself is asserted at known-answer scale in test_engine_builders.py.)"""
from __future__ import annotations

import dataclasses
import json
import re
from collections import defaultdict
from types import SimpleNamespace as NS

import numpy as np
import pytest
from PIL import Image

from advex.client import Client, reproduce
from advex.service.inprocess import InProcessServer
from advex.v1 import results_pb2 as results

from conftest import require_builtin, require_module


def test_tiny_preset_writes_a_complete_report(tmp_path):
    roots = require_builtin("fashion-mnist")
    lines: list[str] = []
    with InProcessServer(data_dir=str(tmp_path / "d"), data_roots=roots) as srv, Client(srv.target) as c:
        preset = dataclasses.replace(reproduce.PRESETS["tiny"], test_limit=40)  # PGD-50 on 7 models x 2 eps
        rows = reproduce.run(c, preset, tmp_path / "report", log=lines.append)
        generated = {d.id: d for d in c.list_datasets() if d.kind == "generated"}
        # each constructed set is stored with its lineage and feeds the model trained on it
        assert [r.dataset_id for r in rows[:3]] == ["fashion-mnist"] * 3  # D standard, adversarial, control
        for row in rows[3:]:
            lineage = json.loads(generated[row.dataset_id].lineage_json)
            assert lineage["mode"] == row.training_set.lower()
            assert json.loads(c.get_model(row.model_id).lineage_json)["dataset_id"] == row.dataset_id
    assert [r.training_set for r in rows] == list(reproduce.PAPER)
    report = (tmp_path / "report" / "report.md").read_text()
    for r in rows:
        assert 0 <= r.robust_025 <= r.clean <= 1
        assert f"| {r.training_set} | {r.clean:.1%} (" in report  # then its 95% interval
        assert r.suite == "pgd" and r.clean_ci[0] <= r.clean <= r.clean_ci[1]
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

def _interval(message, lower: float, upper: float):
    message.lower, message.upper = lower, upper


class ScriptedClient:
    """Answers the calls reproduce.run / run_transfer make, with fixed numbers, as the server's own
    result messages (so the report reads them as it reads a server's). Every call is recorded.
    accuracy(model_name, eps, seed) -> the robust accuracy a model reports (eps None: its clean
    accuracy); model_name and seed are those the model was trained with, so a row that reads another
    row's model shows another model's number."""

    def __init__(self, *, clean=0.8, robust=None, successes=0, correct_on_target=150, accuracy=None,
                 successful_target_correct=None, pair_counts=None):
        self.clean, self.robust = clean, robust or {}
        self.successes, self.correct_on_target = successes, correct_on_target
        self.successful_target_correct = successes if successful_target_correct is None else successful_target_correct
        self.accuracy = accuracy
        # per target: (successful_on_source, transferred, successful_target_correct, transferred_target_correct)
        self.pair_counts = pair_counts
        self.n = 0
        self.calls: list[tuple[str, tuple, dict]] = []
        self.model_names: dict[str, str] = {}
        self.model_seeds: dict[str, int] = {}

    def _op(self, result):
        self.n += 1
        return NS(result=lambda *a, **k: result)

    def train(self, arch, dataset_id, **k):
        self.calls.append(("train", (arch, dataset_id), k))
        model_id = f"m-{self.n}"
        self.model_names[model_id] = k["name"]
        self.model_seeds[model_id] = k["seed"]
        return self._op(NS(model_id=model_id))

    def robustify(self, model_id, dataset_id, **k):
        self.calls.append(("robustify", (model_id, dataset_id), k))
        return self._op(NS(dataset_id=f"ds-{self.n}", mode="D_R", feature_distance_start_mean=1.0,
                           feature_distance_mean=0.1, feature_distance_p95=0.2, mean_l2_from_start=3.0,
                           wall_seconds=1.0))

    def build_nonrobust_dataset(self, mode, model_id, dataset_id, **k):
        self.calls.append(("build", (mode, model_id, dataset_id), k))
        name = {"d_nr": "D_NR", "d_rand": "D_rand", "d_det": "D_det"}[mode]
        return self._op(NS(dataset_id=f"ds-{self.n}", mode=name, target_hit_rate=0.9, mean_l2=1.0, max_l2=2.0,
                           feature_distance_start_mean=1.0, feature_distance_mean=0.1, feature_distance_p95=0.2,
                           mean_l2_from_start=3.0, wall_seconds=1.0))

    def _value(self, model_id, eps):
        if self.accuracy is not None:
            return self.accuracy(self.model_names[model_id], eps, self.model_seeds[model_id])
        return self.clean if eps is None else self.robust.get(eps, 0.5)

    def evaluate(self, model_id, dataset_id, *, attacks=(), suite="", **k):
        self.calls.append(("evaluate", (model_id, dataset_id), dict(k, attacks=attacks, suite=suite)))
        ev = results.EvaluateResult(model_id=model_id, num_examples=1000,
                                    clean_accuracy=self._value(model_id, None))
        _interval(ev.clean_accuracy_ci, ev.clean_accuracy - 0.02, ev.clean_accuracy + 0.01)
        for a in attacks:
            for e in a["eps"]:
                value = self._value(model_id, e)
                row = ev.robust.add(robust_accuracy=value, suite=suite)
                row.attack.eps = e
                wc = ev.worst_case.add(norm=results.L2, eps=e, robust_accuracy=value)
                _interval(wc.robust_accuracy_ci, max(0.0, value - 0.03), min(1.0, value + 0.04))
        return self._op(ev)

    def transfer_rate(self, sources, targets, dataset_id, **k):
        self.calls.append(("transfer_rate", (tuple(sources), tuple(targets), dataset_id), k))
        out = results.TransferRateResult(definition="transfer rate = transferred / successful_on_source")
        default = (self.successes, self.successes // 2, self.successful_target_correct,
                   self.successful_target_correct // 4)
        for k, _ in enumerate(targets):
            sos, tr, stc, ttc = self.pair_counts[k] if self.pair_counts else default
            pair = out.pairs.add(examples=200, correct_on_source=160, correct_on_target=self.correct_on_target,
                                 successful_on_source=sos, transferred=tr, successful_target_correct=stc,
                                 transferred_target_correct=ttc)
            if sos:
                _interval(pair.transfer_rate_ci, 0.4, 0.6)
            if stc:
                _interval(pair.conditional_transfer_rate_ci, 0.15, 0.35)
        return self._op(out)

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
    assert "| D (standard) | 80.0% (78.0-81.0) |" in (out / "report.md").read_text()


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
        assert row["conditional_rate"] is None and row["conditional_rate_ci"] is None
    assert summary["pearson_r"] is None and data["pearson_r"] is None
    printed = "\n".join(lines)
    report = (out / "report.md").read_text()
    for text in (printed, report):
        assert not re.search(r"(?<![\d.])0\.0%", text) and "nan" not in text
        assert "Pearson r = n/a" in text
        for arch in reproduce.TRANSFER_PRESETS["tiny"].architectures:
            # conditional rate, its counts, the rate over all successes, the unconditional rate
            assert re.search(rf"{arch}\b.*\bn/a\b.*\b0/0\b.*\bn/a\b.*\bn/a\b", text), arch
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
    cells = "80.0% (78.0-81.0) | 95.3% | n/a | 4.5% | 50.0% (47.0-54.0) | 50.0% (47.0-54.0)"
    assert f"| D (standard) | {cells} |" in report
    assert f"| {reproduce.CONTROL} | 80.0% (78.0-81.0) | — | n/a | — |" in report  # not in the paper
    printed = "\n".join(lines)
    assert re.search(r"D \(standard\)\s+" + r"\s+".join(re.escape(c.strip()) for c in cells.split("|")), printed), \
        printed
    for text in (printed, report):
        assert "nan" not in text


def _no_nan(constant: str):
    raise ValueError(f"{constant} is not JSON")


# ------------------------------------------------------------------ known answers of the pipeline

def _by_name(values: dict):
    """accuracy(model_name, eps) from {model name: (clean, {eps: robust})}."""
    return lambda name, eps, seed: values[name][0] if eps is None else values[name][1][eps]


MODEL_NAMES = {"D (standard)": "D standard", "D (adversarial)": "D adversarial",
               reproduce.CONTROL: "D matched control", "D_R": "standard on D_R", "D_NR": "standard on D_NR",
               "D_rand": "standard on D_rand", "D_det": "standard on D_det"}


def _table(report: str) -> tuple[list[str], dict[str, list[str]]]:
    """The results table of a report.md: its headers and each training set's cells."""
    lines = [line for line in report.splitlines() if line.startswith("| ")]
    headers = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = {}
    for line in lines[1:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0]] = cells
    return headers, rows


def test_each_set_is_built_and_evaluated_through_its_own_model(tmp_path):
    """D_R through the robust model, D_NR / D_rand / D_det through the standard one, each set's
    model trained on that set, the matched control on the same images with the sets' training;
    and each row of the report shows its own model's numbers."""
    p = reproduce.PRESETS["small"]
    values = {name: (0.50 + 0.05 * k, {e: 0.40 - 0.05 * k + 0.001 * e for e in p.eval_eps})
              for k, name in enumerate(MODEL_NAMES.values())}
    client = ScriptedClient(accuracy=_by_name(values))
    rows = reproduce.run(client, p, tmp_path / "r", log=lambda s: None)

    trained = {k["name"]: (args, k) for call, args, k in client.calls if call == "train"}
    model_of = {name: model_id for model_id, name in client.model_names.items()}
    std, rob = model_of["D standard"], model_of["D adversarial"]
    assert trained["D adversarial"][1]["adversarial"] == p.robust_attack
    assert trained["D standard"][1]["adversarial"] is None
    robustify = [args for call, args, k in client.calls if call == "robustify"]
    builds = {args[0]: args[1] for call, args, k in client.calls if call == "build"}
    assert robustify == [(rob, p.dataset)]
    assert builds == {"d_nr": std, "d_rand": std, "d_det": std}
    assert {k["limit"] for call, args, k in client.calls if call in ("robustify", "build")} == {p.build_limit}
    # the matched control: D's first build_limit images, the constructed sets' training, no adversary
    control_args, control = trained["D matched control"]
    assert control_args == (p.arch, p.dataset) and control["limit"] == p.build_limit
    assert control["adversarial"] is None
    assert {k: control[k] for k in p.new_set_train} == p.new_set_train
    for row in rows[3:]:
        args, k = trained[MODEL_NAMES[row.training_set]]
        assert args[1] == row.dataset_id and {key: k[key] for key in p.new_set_train} == p.new_set_train
    # every model evaluated once, with the preset's suite at every eps, on the original test set
    evaluated = [(args, k) for call, args, k in client.calls if call == "evaluate"]
    assert sorted(a[0] for a, _ in evaluated) == sorted(r.model_id for r in rows)
    for (model_id, dataset), k in evaluated:
        assert dataset == p.dataset and k["split"] == "test" and k["suite"] == p.eval_suite
        assert k["attacks"] == [{"norm": "L2", "eps": list(p.eval_eps)}]
    headers, table = _table((tmp_path / "r" / "report.md").read_text())
    for row in rows:
        clean, robust = values[MODEL_NAMES[row.training_set]]
        assert client.model_names[row.model_id] == MODEL_NAMES[row.training_set]
        assert table[row.training_set][1].startswith(f"{clean:.1%} (")
        assert table[row.training_set][headers.index("robust @1")].startswith(f"{robust[1.0]:.1%} (")


def test_every_eps_column_reads_its_own_eps(tmp_path):
    """A report whose column "robust @e" showed another eps's number would be caught: each eps has
    its own value, in the printed table, report.md, results.json and the figure's data."""
    p = reproduce.PRESETS["small"]
    robust = {0.25: 0.71, 0.5: 0.52, 1.0: 0.33, 2.0: 0.14}
    lines: list[str] = []
    reproduce.run(ScriptedClient(robust=robust), p, tmp_path / "r", log=lines.append)
    headers, table = _table((tmp_path / "r" / "report.md").read_text())
    printed = next(line for line in "\n".join(lines).splitlines() if line.startswith("D (standard)"))
    for e, value in robust.items():
        column = headers.index(f"robust @{e:g}")
        for name in reproduce.ROWS:
            assert table[name][column].startswith(f"{value:.1%} ("), (e, name, table[name])
    assert headers.index("paper @0.25") == headers.index("robust @0.25") + 1
    assert table["D (standard)"][headers.index("paper @0.25")] == "4.5%"
    assert [c for c in re.split(r"\s{2,}", printed)][3:] == [table["D (standard)"][i] for i in range(3, len(headers))]
    data = json.loads((tmp_path / "r" / "results.json").read_text())
    for row in data["rows"]:
        assert row["sweep"] == {f"{e:g}": v for e, v in robust.items()} and row["robust_025"] == 0.71
        assert row["sweep_ci"]["0.5"] == pytest.approx([0.49, 0.56])


def test_seeds_give_mean_and_spread(tmp_path):
    """--seeds 3: the pipeline runs with seeds 0, 1, 2 (every training and construction), and the
    report shows the mean, the sample sd and the range; with one seed, the 95% interval."""
    p = reproduce.PRESETS["tiny"]
    values = {0: 0.70, 1: 0.72, 2: 0.74}
    client = ScriptedClient(accuracy=lambda name, eps, seed: values[seed] - (0 if eps is None else 0.3))
    rows = reproduce.run(client, p, tmp_path / "r", log=lambda s: None, seeds=3)
    assert [r.seed for r in rows] == [s for s in range(3) for _ in reproduce.ROWS]
    for call, args, k in client.calls:
        if call in ("train", "robustify", "build"):
            assert k["seed"] in (0, 1, 2)
    assert sorted(k["seed"] for call, args, k in client.calls if call == "robustify") == [0, 1, 2]
    _, table = _table((tmp_path / "r" / "report.md").read_text())
    assert table["D_R"][1] == "72.0% ± 2.0 (70.0-74.0)"
    assert table["D_R"][3] == "42.0% ± 2.0 (40.0-44.0)"
    summary = json.loads((tmp_path / "r" / "results.json").read_text())["summary"]
    assert summary["D_det"]["clean"] == pytest.approx({"mean": 0.72, "sd": 0.02, "min": 0.70, "max": 0.74, "n": 3,
                                                       "ci95": None})
    with pytest.raises(ValueError, match="seeds"):
        reproduce.run(ScriptedClient(), p, tmp_path / "bad", log=lambda s: None, seeds=0)


def test_the_transfer_correlation_uses_the_conditional_rate_with_intervals(tmp_path):
    """Conditional rates 10..40% rise with D_det accuracy while the rate over all successes falls:
    r is +1 only if the conditional rate (the paper's reading) is the one correlated."""
    require_module("matplotlib", "pip install 'advex[plot]'")
    p = reproduce.TRANSFER_PRESETS["small"]
    archs = list(p.architectures)
    d_det_acc = {f"{a} on D_det": 0.2 * (k + 1) for k, a in enumerate(archs)}
    client = ScriptedClient(accuracy=lambda name, eps, seed: d_det_acc.get(name, 0.9),
                            pair_counts=[(100, 40 - 10 * k, 100, 10 + 10 * k) for k in range(len(archs))])
    summary = reproduce.run_transfer(client, p, tmp_path / "t", log=lambda s: None)
    assert [r["conditional_rate"] for r in summary["rows"]] == pytest.approx([0.1, 0.2, 0.3, 0.4])
    assert [r["transfer_rate"] for r in summary["rows"]] == pytest.approx([0.4, 0.3, 0.2, 0.1])
    assert summary["pearson_r"] == pytest.approx(1.0)
    report = (tmp_path / "t" / "report.md").read_text()
    assert f"| {archs[0]} | 90.0% | 20.0% (18.0-21.0%) | 10.0% (15.0-35.0%) | 10/100 | 40.0% (40.0-60.0%) | 0.0% |" in report
    assert "Pearson r = 1.00 over 4 architectures (95% interval" in report


def test_pearson_interval_is_fishers_z():
    assert reproduce.pearson_interval(0.5, 28) == pytest.approx([0.1560, 0.7358], abs=1e-4)  # a textbook case
    lo, hi = reproduce.pearson_interval(-0.3, 4)
    assert lo == pytest.approx(-0.9789, abs=1e-4) and hi == pytest.approx(0.9289, abs=1e-4)  # 4 pairs: wide
    assert reproduce.pearson_interval(0.9, 3) is None and reproduce.pearson_interval(None, 10) is None


def test_every_model_of_a_seed_is_trained_with_that_seed(tmp_path):
    client = ScriptedClient()
    reproduce.run(client, reproduce.PRESETS["tiny"], tmp_path / "r", log=lambda s: None, seeds=3)
    seeds = defaultdict(list)
    for call, args, k in client.calls:
        if call in ("train", "robustify", "build"):
            seeds[k.get("name") or args[0]].append(k["seed"])
    assert len(seeds) == 11  # 7 trainings (3 on D, 4 on the built sets) and 4 constructions
    assert all(v == [0, 1, 2] for v in seeds.values()), dict(seeds)


def test_redraw_reads_an_older_transfer_json_by_the_rate_it_has(tmp_path, monkeypatch):
    """A transfer.json from before the conditional rate (bench/results' with those fields taken
    out): its figure shows the rate over all source successes, not four n/a points."""
    import importlib.util
    from pathlib import Path

    from advex.client import plots

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("redraw_figures", root / "scripts" / "redraw_figures.py")
    redraw = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(redraw)
    data = json.loads((root / "bench" / "results" / "reproduce-transfer-small" / "transfer.json").read_text())
    newer = ("conditional_rate", "successful_target_correct", "transferred_target_correct", "d_det_accuracy_ci",
             "transfer_rate_ci", "unconditional_rate_ci", "conditional_rate_ci")
    data["rows"] = [{k: v for k, v in row.items() if k not in newer} for row in data["rows"]]
    folder = tmp_path / "t"
    folder.mkdir()
    (folder / "transfer.json").write_text(json.dumps(data))
    drawn = []
    monkeypatch.setattr(plots, "scatter", lambda points, path, **k: drawn.append((points, k)))
    redraw.redraw(folder)
    (points, k), = drawn
    assert [p[0] for p in points] == ["small_cnn", "resnet18", "mlp", "linear"]
    assert [p[1] for p in points] == [row["transfer_rate"] for row in data["rows"]]
    assert "all source successes" in k["xlabel"]
    r = reproduce.pearson_r([row["transfer_rate"] for row in data["rows"]], [row["d_det_accuracy"] for row in data["rows"]])
    assert k["note"].startswith(f"Pearson r = {r:.2f} over 4 architectures")
