"""`advex audit`: a spec run through the service against an uploaded model and a model served by
MLServer, with known answers: a linear model and points whose minimal Linf perturbation is known
in closed form (the first half far from the boundary, the second half near it), so that an audit
of the first half passes, one of all the points breaches both the minimum and the allowed drop
against the first, and the exit codes, records, history, reports and metrics say so."""
from __future__ import annotations

import json
import math

import grpc
import numpy as np
import pytest
import torch
import yaml
from prometheus_client import generate_latest

from advex.client import Client
from advex.client.cli import main
from advex.engine import zoo
from advex.engine.loaders import save_safetensors
from advex.service.inprocess import InProcessServer
from test_audit_report import assert_images_load, chromium_images

pytestmark = pytest.mark.mlserver

HALF = 16


def _linf_distance(x: np.ndarray, w: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The smallest Linf perturbation that changes a linear classifier's prediction (no box)."""
    logits = x @ w.T + b
    y = logits.argmax(1)
    d = np.full(len(x), np.inf)
    for j in range(w.shape[0]):
        margin = logits[np.arange(len(x)), y] - logits[:, j]
        norm1 = np.abs(w[y] - w[j]).sum(1)
        d = np.where(y == j, d, np.minimum(d, margin / np.where(norm1 > 0, norm1, np.inf)))
    return d


@pytest.fixture(scope="module")
def setup(tmp_path_factory, mlserver):
    """A server allowed to query the MLServer, the endpoint's weights uploaded as a torch model,
    and a dataset: HALF far points (minimal Linf distance > 2 eps), then HALF near ones (< eps / 2)."""
    data_dir = tmp_path_factory.mktemp("advex-audit")
    srv = InProcessServer(data_dir=str(data_dir), data_roots=[], endpoint_hosts=[mlserver.host]).start()
    client = Client(srv.target)
    w, b = mlserver.weight, mlserver.bias
    x = (0.25 + 0.5 * np.random.default_rng(3).random((600, 784))).astype(np.float32)
    d = _linf_distance(x, w, b)
    order = np.argsort(d)
    near, far = order[:HALF], order[-HALF:]
    eps = float(math.sqrt(d[near].max() * d[far].min()))
    assert d[far].min() > 2 * eps and d[near].max() < eps / 2 and eps < 0.2
    xs = np.concatenate([x[far], x[near]]).reshape(-1, 1, 28, 28)
    ys = (xs.reshape(len(xs), -1) @ w.T + b).argmax(1)
    dataset = client.upload_dataset((xs, ys), name="audit-data", split="test", num_classes=10)
    net = zoo.Linear(784, 10)
    with torch.no_grad():
        net.head.weight.copy_(torch.from_numpy(w))
        net.head.bias.copy_(torch.from_numpy(b))
    path = tmp_path_factory.mktemp("twin") / "m.safetensors"
    save_safetensors(net, path)
    model = client.upload_model(path, format="safetensors", architecture="linear", input_shape=[1, 28, 28],
                                num_classes=10, name="candidate")
    yield {"server": srv, "client": client, "dataset": dataset, "model": model, "eps": round(eps, 6),
           "data_dir": data_dir}
    client.close()
    srv.stop()


def _spec(setup, mlserver, tmp_path, *, limit: int, name: str = "nightly", endpoint_model: str = "linear",
          **extra) -> str:
    eps = setup["eps"]
    spec = {
        "name": name, "dataset": setup["dataset"].id, "limit": limit,
        "attacks": [{"norm": "Linf", "eps": [eps], "method": "pgd", "steps": 20},
                    {"norm": "Linf", "eps": eps, "method": "square", "steps": 60, "seed": 1}],
        "targets": [{"model": setup["model"].id, "name": "candidate"},
                    {"name": "production", "endpoint": {"url": mlserver.grpc_url, "model_name": endpoint_model,
                                                        "input_shape": [1, 28, 28], "num_classes": 10,
                                                        "retries": 1, "backoff_seconds": 0.01}}],
        "thresholds": [{"norm": "Linf", "eps": eps, "min_robust_accuracy": 0.9}],
        "min_clean_accuracy": 0.9, "max_drop": 0.1, "output": str(tmp_path / "report"),
        **extra}
    path = tmp_path / f"{name}-{limit}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return str(path)


def _audit(setup, *args) -> int:
    return main(["--target", setup["server"].target, "audit", *args, "--quiet"])


def test_audit_passes_then_breaches_against_its_baseline(setup, mlserver, tmp_path, capsys):
    # the far half: nothing breaks (provably), both targets pass
    assert _audit(setup, _spec(setup, mlserver, tmp_path, limit=HALF)) == 0
    out = capsys.readouterr().out
    assert "PASSED" in out and "PASS  candidate" in out and "PASS  production" in out
    first = json.loads((tmp_path / "report" / "report.json").read_text())
    assert first["passed"] is True
    cand, prod = first["targets"]
    assert cand["robust"][0]["accuracy"] == 1.0 and prod["robust"][0]["accuracy"] == 1.0
    assert prod["kind"] == "endpoint" and prod["queries"]["requests"] > 0 and cand["queries"] is None
    assert prod["identity"]["endpoint"]["platform"] == "advex-test-linear"
    assert [s["method"] for s in prod["skipped"]] == ["pgd"]  # white-box: not on a black box
    assert {c["kind"] for c in cand["checks"]} == {"min_clean_accuracy", "min_robust_accuracy", "max_drop"}

    # every point: PGD breaks the near half exactly (50%): the minimum and the drop are breached
    assert _audit(setup, _spec(setup, mlserver, tmp_path, limit=2 * HALF)) == 1
    out = capsys.readouterr().out
    assert "FAILED" in out and "FAIL  candidate" in out
    second = json.loads((tmp_path / "report" / "report.json").read_text())
    cand = second["targets"][0]
    assert cand["robust"][0]["accuracy"] == 0.5
    drop = next(c for c in cand["checks"] if c["kind"] == "max_drop")
    assert not drop["passed"] and drop["baseline"] == 1.0 and abs(drop["measured"] - 0.5) < 1e-12
    assert cand["baseline"]["audit_id"] == first["targets"][0]["history"][-1]["audit_id"]
    assert [h["passed"] for h in cand["history"]] == [True, False]
    for name in ("report.html", "report.md"):
        assert (tmp_path / "report" / name).stat().st_size > 1000
    # the real report in a browser: per target, accuracy against eps and the trend of its two runs
    images = chromium_images(tmp_path / "report" / "report.html", tmp_path)
    assert len(images) == 4
    assert_images_load(images)

    # a third run still compares with the last PASSING audit (the first), not the failed second one
    assert _audit(setup, _spec(setup, mlserver, tmp_path, limit=2 * HALF)) == 1
    capsys.readouterr()
    third, second_record, first_record = setup["client"].list_audits(target="candidate", audit_name="nightly")
    assert [r.passed for r in (first_record, second_record, third)] == [True, False, False]
    assert third.baseline_audit_id == first_record.id == second_record.baseline_audit_id

    # the history, by target name, with its trend
    png = tmp_path / "trend.png"
    assert _audit(setup, "history", "candidate", "--plot", str(png)) == 0
    out = capsys.readouterr().out
    assert "3 run(s)" in out and "FAIL" in out and png.stat().st_size > 1000


def test_the_interval_lower_bound_is_judged_when_asked(setup):
    client, eps = setup["client"], setup["eps"]
    result = client.audit("ci-lower", [setup["model"].id], setup["dataset"].id, limit=HALF,
                          attacks=[{"norm": "Linf", "eps": [eps], "method": "pgd", "steps": 10}],
                          thresholds=[{"norm": "Linf", "eps": eps, "min_robust_accuracy": 0.9, "on_ci_lower": True},
                                      {"norm": "Linf", "eps": eps, "min_robust_accuracy": 0.9}]
                          ).result(progress=False)
    ci, point = result.records[0].checks
    # HALF of HALF robust: the 95% Clopper-Pearson lower bound is 0.025 ** (1 / HALF)
    assert abs(ci.measured - 0.025 ** (1 / HALF)) < 1e-9 and not ci.passed
    assert point.measured == 1.0 and point.passed and not result.passed


def test_history_by_model_id_shows_each_audit_name(setup, tmp_path, capsys):
    client, eps, model_id = setup["client"], setup["eps"], setup["model"].id
    for name in ("first-name", "second-name"):
        client.audit(name, [model_id], setup["dataset"].id, limit=4,
                     attacks=[{"norm": "Linf", "eps": [eps], "method": "pgd", "steps": 1}]).result(progress=False)
    assert _audit(setup, "history", model_id, "--plot", str(tmp_path / "h.png")) == 0
    out = capsys.readouterr().out
    for name in ("first-name", "second-name"):
        assert f"audit {name!r} of {model_id!r}" in out
        assert (tmp_path / f"h-{name}-{model_id}.png").stat().st_size > 1000


def test_spec_and_run_errors_exit_2(setup, mlserver, tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\ndataset: d\ntargets: [{model: m}]\nattacks: [{norm: L3, eps: 1}]\nthreshholds: []\n")
    assert _audit(setup, str(bad)) == 2
    err = capsys.readouterr().err
    assert "attacks.0.norm" in err and "threshholds" in err
    # YAML 1.1 reads an unquoted `on:` as the key True: said so, not "keys should be strings"
    bad.write_text("name: x\ndataset: d\ntargets: [{model: m}]\nattacks: [{norm: Linf, eps: 1}]\n"
                   "thresholds: [{norm: Linf, eps: 1, min_robust_accuracy: 0.5, on: ci_lower}]\n")
    assert _audit(setup, str(bad)) == 2
    assert "thresholds.0: a key reads as True" in capsys.readouterr().err
    # a threshold at a radius the audit does not evaluate: refused by the server before any work
    spec = _spec(setup, mlserver, tmp_path, limit=HALF, name="wrong-eps",
                 thresholds=[{"norm": "L2", "eps": 0.5, "min_robust_accuracy": 0.5}])
    assert _audit(setup, spec) == 2
    assert "INVALID_ARGUMENT" in capsys.readouterr().err
    # a spec nested beyond reason, a report folder that cannot be made, no server: errors, not breaches
    bad.write_text("targets: " + "[" * 5000 + "]" * 5000 + "\n")
    assert _audit(setup, str(bad)) == 2
    assert "nested too deeply" in capsys.readouterr().err
    spec = _spec(setup, mlserver, tmp_path, limit=HALF, name="no-folder")
    assert main(["--target", setup["server"].target, "audit", spec, "--quiet", "--output", "/proc/no/such"]) == 2
    assert "error:" in capsys.readouterr().err
    assert main(["--target", "127.0.0.1:9", "--connect-timeout", "0.5", "audit", spec, "--quiet"]) == 2
    # a target's name must not pass for another model's id (its history is found by name too)
    code, details = _rpc_error(lambda: setup["client"].audit(
        "forge", [{"model_id": setup["model"].id, "name": "m-0123456789ab"}], setup["dataset"].id,
        attacks=[{"norm": "Linf", "eps": [0.01], "method": "pgd", "steps": 1}]))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "targets[0].name" in details
    # an endpoint that fails every batch: the audit cannot run (2), it is not a breach (1)
    spec = _spec(setup, mlserver, tmp_path, limit=HALF, name="down", endpoint_model="linear-fails-batches")
    assert _audit(setup, spec) == 2
    assert "UNAVAILABLE" in capsys.readouterr().err


def _rpc_error(call):
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code(), info.value.details()


def test_the_work_budget_covers_every_target_together(tmp_path, mlserver):
    x = np.random.default_rng(0).random((10, 1, 28, 28), dtype=np.float32)
    y = (x.reshape(10, -1) @ mlserver.weight.T + mlserver.bias).argmax(1)
    pgd = [{"norm": "Linf", "eps": [0.01], "method": "pgd", "steps": 100}]  # 10 x 100 = 1000 example-steps
    with InProcessServer(data_dir=str(tmp_path), data_roots=[], max_operation_cost=1500) as srv, \
            Client(srv.target) as c:
        dataset = c.upload_dataset((x, y), split="test", num_classes=10)
        net = zoo.Linear(784, 10)
        save_safetensors(net, tmp_path / "m.safetensors")
        ids = [c.upload_model(tmp_path / "m.safetensors", format="safetensors", architecture="linear",
                              input_shape=[1, 28, 28], num_classes=10).id for _ in range(2)]
        c.audit("budget", ids[:1], dataset.id, attacks=pgd).result(progress=False)  # one target fits
        code, details = _rpc_error(lambda: c.audit("budget", ids, dataset.id, attacks=pgd))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "max_operation_cost" in details


def _series(srv, name: str) -> dict:
    """{labels: value} of metric `name` in the server's registry."""
    text = generate_latest(srv.running.metrics.registry).decode()
    out = {}
    for line in text.splitlines():
        if line.startswith(name + "{"):
            labels, value = line[len(name):].rsplit(" ", 1)
            out[labels] = float(value)
    return out


def test_gauges_survive_a_restart_and_go_with_the_model(tmp_path, mlserver):
    x = np.random.default_rng(0).random((8, 1, 28, 28), dtype=np.float32)
    y = (x.reshape(8, -1) @ mlserver.weight.T + mlserver.bias).argmax(1)
    settings = dict(data_dir=str(tmp_path / "data"), data_roots=[], endpoint_hosts=[mlserver.host])
    with InProcessServer(**settings) as srv, Client(srv.target) as c:
        dataset = c.upload_dataset((x, y), split="test", num_classes=10)
        model = c.register_endpoint(mlserver.rest_url, "linear", input_shape=[1, 28, 28], num_classes=10)
        c.audit("gauges", [{"model_id": model.id, "name": "prod"}], dataset.id,
                attacks=[{"norm": "Linf", "eps": [0.001], "method": "square", "steps": 20}],
                thresholds=[{"norm": "Linf", "eps": 0.001, "min_robust_accuracy": 0.0}]).result(progress=False)
        before = {n: _series(srv, n) for n in ("advex_audit_robust_accuracy", "advex_audit_passed",
                                                 "advex_audit_last_run_timestamp_seconds", "advex_clean_accuracy",
                                                 "advex_robust_accuracy", "advex_accuracy_timestamp_seconds")}
    key = f'{{audit="gauges",dataset="{dataset.id}",eps="0.001",norm="Linf",suite="",target="{model.id}"}}'
    assert before["advex_audit_robust_accuracy"] == {key: 1.0}
    assert before["advex_audit_passed"] == {f'{{audit="gauges",target="{model.id}"}}': 1.0}
    assert len(before["advex_clean_accuracy"]) == 1 and len(before["advex_accuracy_timestamp_seconds"]) == 1
    with InProcessServer(**settings) as srv, Client(srv.target) as c:
        after = {n: _series(srv, n) for n in before}
        assert after == before  # restored from the store, timestamps included
        # a new measurement at another radius replaces the model's series on that dataset
        c.evaluate(model.id, dataset.id, attacks=[{"norm": "L2", "eps": [0.5], "method": "square", "steps": 5}]
                   ).result(progress=False)
        assert [k for k in _series(srv, "advex_robust_accuracy")] == [
            f'{{dataset="{dataset.id}",eps="0.5",model="{model.id}",norm="L2"}}']
        c.delete_model(model.id)
        gone = {n: _series(srv, n) for n in before}
        assert all(not v for v in gone.values()), gone
    with InProcessServer(**settings) as srv:
        assert all(not _series(srv, n) for n in before)  # and not back after another restart
