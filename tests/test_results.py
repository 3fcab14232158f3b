"""Results in a notebook (advex.client.results): each result reads like its message, and its table
(_repr_html_), DataFrame (to_pandas) and figure (plot) hold the message's numbers. The messages are
built by hand with known values, so every cell and every plotted point has a known answer."""
from __future__ import annotations

import sys
import types

import numpy as np
import pytest

from advex.client import results as rich
from advex.client.sdk import in_notebook, to_dict, wants_progress
from advex.v1 import results_pb2 as results
from advex.v1.wire import to_tensor

PNG = b"\x89PNG\r\n\x1a\n"


def _ci(lo: float, hi: float) -> results.Interval:
    return results.Interval(lower=lo, upper=hi)


def _spec(norm: int, eps: float, method: str = "pgd", steps: int = 10) -> results.AttackSpec:
    return results.AttackSpec(method=method, norm=norm, eps=eps, steps=steps)


def evaluation() -> results.EvaluateResult:
    ev = results.EvaluateResult(model_id="m-1", dataset_id="fashion-mnist", split="test", num_examples=200,
                                clean_accuracy=0.8, clean_correct=160, clean_accuracy_ci=_ci(0.74, 0.85),
                                wall_seconds=3.5, device="cpu", notes=["<script>alert(1)</script>"])
    for norm, eps, acc, ci in ((results.L2, 0.25, 0.6, (0.53, 0.67)), (results.L2, 0.5, 0.4, (0.33, 0.47)),
                               (results.LINF, 0.03, 0.5, (0.43, 0.57))):
        ev.robust.add(attack=_spec(norm, eps), robust_accuracy=acc, robust_correct=round(acc * 200), total=200,
                      success_rate=1 - acc / 0.8, robust_accuracy_ci=_ci(*ci), wall_seconds=1.0)
        ev.worst_case.add(norm=norm, eps=eps, robust_accuracy=acc, robust_correct=round(acc * 200),
                          robust_accuracy_ci=_ci(*ci))
    return ev


# ----------------------------------------------------------------------------- reading like the message

def test_a_result_reads_like_its_message_and_equals_it():
    proto = evaluation()
    ev = rich.wrap(proto)
    assert isinstance(ev, rich.Evaluation) and ev.proto is proto
    assert ev.clean_accuracy == 0.8 and ev.robust[1].attack.eps == 0.5 and ev.HasField("clean_accuracy_ci")
    assert ev == proto and ev == rich.wrap(evaluation()) and ev != results.EvaluateResult()
    assert "clean_accuracy" in dir(ev) and "to_pandas" in dir(ev)
    assert to_dict(ev) == to_dict(proto) and to_dict(ev)["num_examples"] == 200
    assert rich.wrap(results.AttackSpec()) == results.AttackSpec()  # no result class: the message itself
    with pytest.raises(AttributeError):
        ev.no_such_field
    assert "m-1 on fashion-mnist/test (200 examples): clean 80.0%" in repr(ev)


# ----------------------------------------------------------------------------- Evaluate

def test_evaluation_to_pandas_has_a_row_per_attack_and_eps_with_numbers():
    df = rich.wrap(evaluation()).to_pandas()
    assert list(df.columns) == ["attack", "suite", "norm", "eps", "steps", "robust_accuracy", "ci_lower", "ci_upper",
                                "robust_correct", "total", "success_rate", "mean_queries", "wall_seconds"]
    assert df["norm"].tolist() == ["L2", "L2", "Linf"] and df["eps"].tolist() == [0.25, 0.5, 0.03]
    assert df["robust_accuracy"].tolist() == [0.6, 0.4, 0.5] and df["ci_lower"].tolist() == [0.53, 0.33, 0.43]
    assert df["robust_correct"].tolist() == [120, 80, 100] and df["robust_correct"].dtype.kind == "i"
    worst = rich.wrap(evaluation()).to_pandas("worst_case")
    assert list(worst.columns) == ["norm", "eps", "robust_accuracy", "ci_lower", "ci_upper", "robust_correct",
                                   "total"]
    assert worst["ci_upper"].tolist() == [0.67, 0.47, 0.57] and set(worst["total"]) == {200}
    with pytest.raises(ValueError, match="worst_case"):
        rich.wrap(evaluation()).to_pandas("per_class")


def test_evaluation_html_shows_rates_with_intervals_and_escapes_server_text():
    page = rich.wrap(evaluation())._repr_html_()
    assert "clean accuracy 80.0% (74.0-85.0%) (160 of 200)" in page
    assert '<td class="num">60.0% (53.0-67.0%)</td>' in page and "120 of 200" in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page and "<script>" not in page
    assert "worst case over the attacks" not in page  # one attack per radius: the rows are the worst case


def test_evaluation_plot_draws_clean_then_worst_case_per_norm_with_intervals(tmp_path):
    fig = rich.wrap(evaluation()).plot(tmp_path / "ev.png")
    assert (tmp_path / "ev.png").read_bytes()[:8] == PNG and fig._repr_png_()[:8] == PNG
    assert len(fig.axes) == 2
    lines = {line.get_gid(): line for ax in fig.axes for line in ax.get_lines()}
    assert lines["robust L2"].get_xdata().tolist() == [0.0, 0.25, 0.5]
    assert lines["robust L2"].get_ydata().tolist() == [0.8, 0.6, 0.4]
    assert lines["robust Linf"].get_ydata().tolist() == [0.8, 0.5]
    whiskers = [c for c in fig.axes[0].collections if c.get_gid() == "whisker"][0]
    spans = sorted((round(s[0][1], 4), round(s[1][1], 4)) for s in whiskers.get_segments())
    assert spans == [(0.33, 0.47), (0.53, 0.67), (0.74, 0.85)]


# ----------------------------------------------------------------------------- TransferRate

def transfer() -> results.TransferRateResult:
    t = results.TransferRateResult(definition="transferred / successful on the source", dataset_id="d",
                                   attack=_spec(results.L2, 0.5))
    for s, tg, rate in (("a", "b", 0.25), ("a", "c", 0.5), ("b", "c", None)):
        pair = t.pairs.add(source_model_id=s, target_model_id=tg, examples=100)
        if rate is not None:  # ("b", "c") succeeded on nothing: its rate is not measured
            pair.transfer_rate = rate
            pair.transfer_rate_ci.CopyFrom(_ci(rate - 0.1, rate + 0.1))
    return t


def test_transfer_table_plot_and_frame_hold_each_pair_and_say_na_for_a_rate_over_nothing():
    tr = rich.wrap(transfer())
    df = tr.to_pandas()
    assert len(df) == 3 and df["transfer_rate"].tolist() == [0.25, 0.5, 0.0]
    assert df["transfer_rate_ci_lower"].tolist()[:2] == [0.15, 0.4] and np.isnan(df["transfer_rate_ci_lower"][2])
    page = tr._repr_html_()
    assert "25.0% (15.0-35.0%)" in page and "source \\ target" in page
    fig = tr.plot()
    texts = {t.get_gid(): t.get_text() for t in fig.axes[0].texts}
    # rows a, b; columns b, c
    assert texts == {"cell 0 0": "25.0%", "cell 0 1": "50.0%", "cell 1 0": "n/a", "cell 1 1": "n/a"}
    image = fig.axes[0].images[0].get_array()
    assert image[0, 1] == 0.5 and bool(image.mask[1, 1]) and image.mask.sum() == 2
    with pytest.raises(ValueError, match="rate must be one of"):
        tr.plot(rate="nope")


# ----------------------------------------------------------------------------- Train, builds, export

def test_training_history_as_frame_table_and_curves():
    t = results.TrainResult(model_id="m-2", model_sha256="ab" * 32, device="cpu")
    for k, (loss, acc) in enumerate(((1.5, 0.4), (0.9, 0.7), (0.6, 0.8)), start=1):
        t.history.add(epoch=k, train_loss=loss, train_accuracy=acc, lr=0.1 / k, wall_seconds=2.0)
    tr = rich.wrap(t)
    df = tr.to_pandas()
    assert df["epoch"].tolist() == [1, 2, 3] and df["train_loss"].tolist() == [1.5, 0.9, 0.6]
    assert "robust accuracy" not in tr._repr_html_() and '<td class="num">70.0%</td>' in tr._repr_html_()
    fig = tr.plot()
    curves = {line.get_gid(): line.get_ydata().tolist() for ax in fig.axes for line in ax.get_lines()}
    assert curves == {"train loss": [1.5, 0.9, 0.6], "train accuracy": [0.4, 0.7, 0.8]}


class _Downloads:
    """A stand-in client: download_dataset answers known images (uint8) and labels."""

    def __init__(self, x, y):
        self.x, self.y, self.asked = x, y, []

    def _blocking(self):
        return self

    def download_dataset(self, dataset_id, split="", *, limit=0):
        self.asked.append((dataset_id, split, limit))
        return self.x[:limit], self.y[:limit]


def test_a_build_shows_its_numbers_and_plots_the_new_datasets_images_with_their_labels():
    x = np.arange(3 * 1 * 4 * 4, dtype=np.uint8).reshape(3, 1, 4, 4) * 5
    fake = _Downloads(x, np.array([7, 1, 2]))
    b = rich.wrap(results.DatasetBuildResult(dataset_id="ds-9", mode="D_det", num_examples=3, target_hit_rate=0.9,
                                             mean_l2=0.4, max_l2=0.5), fake)
    assert isinstance(b, rich.DatasetBuild) and "90.0%" in b._repr_html_()
    assert b.to_pandas().loc[0, "target_hit_rate"] == 0.9
    fig = b.plot(n=2, class_names=[f"c{k}" for k in range(10)])
    assert fake.asked == [("ds-9", "", 2)]
    shown = [ax for ax in fig.axes if ax.images]
    assert [ax.get_xlabel() for ax in shown] == ["label c7", "label c1"]
    assert np.allclose(shown[1].images[0].get_array(), x[1, 0] / 255.0)
    with pytest.raises(RuntimeError, match="no client"):
        rich.wrap(results.DatasetBuildResult(dataset_id="ds-9")).plot()


def test_export_shows_agreement():
    e = rich.wrap(results.ExportResult(model_id="m-onnx", source_model_id="m-1", examples=50, agreement_rate=0.98,
                                       disagreements=1, execution_provider="CPUExecutionProvider"))
    assert "98.0% of 50 (1 disagree)" in e._repr_html_()
    assert e.to_pandas().loc[0, "disagreements"] == 1


# ----------------------------------------------------------------------------- audits

def audit_result() -> results.AuditResult:
    a = results.AuditResult(audit_name="nightly", passed=False)
    for name, passed, measured in (("prod", True, 0.45), ("candidate", False, 0.2)):
        r = a.records.add(id=f"au-{name}", audit_name="nightly", model_id=f"m-{name}", target_name=name,
                          passed=passed, evaluation=evaluation())
        r.evaluation.worst_case[2].robust_accuracy = measured
        r.checks.add(kind="min_robust_accuracy", norm=results.LINF, eps=0.03, on="point", measured=measured,
                     limit=0.3, passed=passed, message=f"Linf 0.03: {measured} vs 0.3")
        r.checks.add(kind="min_clean_accuracy", on="point", measured=0.8, limit=0.5, passed=True, message="clean")
        r.create_time.FromSeconds(1_700_000_000 + (0 if passed else 60))
    return a


def test_audit_frame_has_a_row_per_check_and_the_html_marks_the_failure():
    au = rich.wrap(audit_result())
    df = au.to_pandas()
    assert len(df) == 4 and df["target"].tolist() == ["prod", "prod", "candidate", "candidate"]
    assert df["passed"].tolist() == [True, True, False, True] and df["measured"].tolist()[2] == 0.2
    assert df["norm"].tolist()[:2] == ["Linf", ""] and np.isnan(df["baseline"][0])
    page = au._repr_html_()
    assert '<span class="fail">FAILED</span>' in page and page.count('<tr class="failed">') == 1


def test_audit_plot_marks_the_targets_thresholds():
    au = rich.wrap(audit_result())
    fig = au.plot(target="candidate")
    def marks(ax) -> dict:  # (eps, limit) -> colour of each threshold mark
        return {(float(x), float(y)): line.get_color() for line in ax.get_lines() if line.get_gid() == "threshold"
                for x, y in zip(line.get_xdata(), line.get_ydata())}

    l2, linf_ax = fig.axes[:2]
    assert marks(l2) == {(0.0, 0.5): "#2e7d32"}  # the clean minimum at eps 0 of every panel, met
    assert marks(linf_ax) == {(0.0, 0.5): "#2e7d32", (0.03, 0.3): "#c0392b"}  # Linf 0.03 failed
    linf = [line for line in linf_ax.get_lines() if line.get_gid() == "robust Linf"][0]
    assert linf.get_ydata().tolist() == [0.8, 0.2]
    with pytest.raises(KeyError, match="prod, candidate"):
        au.plot(target="nobody")
    with pytest.raises(IndexError):
        au.plot(target=2)


def test_audit_history_frame_table_and_trend():
    records = list(audit_result().records)
    for k, r in enumerate(records):
        r.model_id, r.id = "m-same", f"au-{k}"
    history = rich.AuditHistory(reversed(records))  # newest first, as the server lists them
    df = history.to_pandas()
    assert df["audit_id"].tolist() == ["au-0"] * 3 + ["au-1"] * 3  # oldest first, a row per radius
    assert df["robust_accuracy"].tolist()[2] == 0.45 and df["robust_accuracy"].tolist()[5] == 0.2
    assert str(df["time"][0]) == "2023-11-14 22:13:20+00:00"
    assert history._repr_html_().count('<tr class="failed">') == 1
    assert repr(history) == "<AuditHistory 2 record(s) of 'nightly'>"
    fig = history.plot()
    trend = [line for line in fig.axes[0].get_lines() if line.get_gid() == "trend Linf 0.03"][0]
    assert trend.get_ydata().tolist() == [0.45, 0.2]
    records[1].audit_name = "weekly"
    with pytest.raises(ValueError, match="'nightly' of m-same, 'weekly' of m-same"):
        rich.AuditHistory(records).plot()
    assert rich.AuditHistory(records).plot(audit_name="weekly") is not None


# ----------------------------------------------------------------------------- Attack

def attack_result() -> rich.AttackResult:
    rng = np.random.default_rng(0)
    x = rng.uniform(0.2, 0.8, size=(3, 1, 5, 5)).astype(np.float32)
    delta = np.zeros_like(x)
    delta[:, 0, 2, 2] = [0.1, -0.05, 0.0]
    return rich.AttackResult(x_adv=x + delta, clean_pred=np.array([1, 2, 3]), adv_pred=np.array([4, 2, 3]),
                             success=np.array([True, False, False]),
                             perturbation_norm=np.array([0.1, 0.05, 0.0], dtype=np.float32),
                             attack=_spec(results.L2, 0.1), model_sha256="00", x=x, y=np.array([1, 2, 0]))


def test_attack_plot_rows_are_clean_adversarial_and_the_scaled_perturbation():
    a = attack_result()
    fig = a.plot(n=2)
    images = {ax.images[0].get_gid(): ax for ax in fig.axes if ax.images}
    assert sorted(images) == ["adversarial 0", "adversarial 1", "clean 0", "clean 1", "perturbation 0",
                              "perturbation 1"]
    assert np.allclose(images["clean 1"].images[0].get_array(), a.x[1, 0])
    assert np.allclose(images["adversarial 0"].images[0].get_array(), a.x_adv[0, 0])
    pert = images["perturbation 0"].images[0].get_array()
    assert pert[2, 2] == pytest.approx(1.0) and np.allclose(np.delete(pert.ravel(), 12), 0.5)
    assert images["perturbation 1"].images[0].get_array()[2, 2] == pytest.approx(0.25)  # -0.05 of max 0.1
    assert images["clean 0"].get_xlabel() == "1 -> 1" and images["adversarial 0"].get_xlabel() == "fooled 4"


def test_attack_html_embeds_the_image_grid_and_frame_has_a_row_per_example():
    a = attack_result()
    page = a._repr_html_()
    assert 'src="data:image/png;base64,' in page and "1 (33.3%)" in page
    df = a.to_pandas()
    assert list(df.columns) == ["label", "clean_pred", "adv_pred", "success", "perturbation_norm", "queries"]
    assert df["label"].tolist() == [1, 2, 0] and df["success"].tolist() == [True, False, False]
    assert "1 of 3 succeeded" in repr(a)


# ----------------------------------------------------------------------------- optional parts, progress

def test_to_pandas_without_pandas_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "pandas", None)
    with pytest.raises(ImportError, match=r"advex\[notebook\]"):
        rich.wrap(evaluation()).to_pandas()


def test_progress_is_shown_in_a_notebook_or_a_terminal_and_otherwise_only_when_asked(monkeypatch):
    monkeypatch.delitem(sys.modules, "IPython", raising=False)
    monkeypatch.setattr(sys, "stderr", types.SimpleNamespace(isatty=lambda: False, write=lambda s: None))
    assert not in_notebook() and not wants_progress(None)
    assert wants_progress(True) and not wants_progress(False)
    monkeypatch.setattr(sys, "stderr", types.SimpleNamespace(isatty=lambda: True))
    assert wants_progress(None)
    monkeypatch.setattr(sys, "stderr", types.SimpleNamespace(isatty=lambda: False))
    shell = types.SimpleNamespace(kernel=object())
    monkeypatch.setitem(sys.modules, "IPython", types.SimpleNamespace(get_ipython=lambda: shell))
    assert in_notebook() and wants_progress(None) and not wants_progress(False)
    terminal_ipython = types.SimpleNamespace(get_ipython=lambda: types.SimpleNamespace())
    monkeypatch.setitem(sys.modules, "IPython", terminal_ipython)
    assert not in_notebook()


def test_a_per_example_tensor_survives_in_the_wrapped_message():
    ev = evaluation()
    ev.worst_case[0].per_example.CopyFrom(to_tensor(np.array([1, 0, 1], dtype=np.uint8)))
    from advex.client.sdk import worst_case_mask

    assert worst_case_mask(rich.wrap(ev), "L2", 0.25).tolist() == [1, 0, 1]
