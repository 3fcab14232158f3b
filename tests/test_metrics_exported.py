"""Every metric that the alert rules (deploy/prometheus/alerts.yml) and the Grafana dashboards
(deploy/grafana/*.json) query is one a real server exports: an in-process server runs a short
workload through the SDK (train, evaluate with PGD, audit, ONNX export, a failing request) and
its registry is scraped. A renamed or dropped metric fails here instead of leaving an alert that
never fires or an empty panel. (tests/test_alert_rules.py checks the rules themselves.)"""
from __future__ import annotations

import json
import re
from pathlib import Path

import grpc
import pytest
import yaml

from conftest import require_module

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "deploy" / "prometheus" / "alerts.yml"
DASHBOARDS = sorted((ROOT / "deploy" / "grafana").glob("*.json"))
METRIC = re.compile(r"\badvex_[a-z0-9_]+")
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")
ONNX_ONLY = "advex_model_execution_provider_info"  # set only for ONNX models
PGD = {"norm": "Linf", "eps": [0.6], "method": "pgd", "steps": 5}


def _queries(node) -> list[str]:
    """The PromQL of a dashboard: every panel target's `expr` and every templating query."""
    found = []
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("expr", "definition") and isinstance(value, str):
                found.append(value)
            elif key == "query" and isinstance(value, str) and "(" in value:  # label_values(...)
                found.append(value)
            else:
                found.extend(_queries(value))
    elif isinstance(node, list):
        for value in node:
            found.extend(_queries(value))
    return found


def _base(name: str) -> str:
    for suffix in HISTOGRAM_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def used_metrics() -> dict[str, set[str]]:
    """Metric name (histogram suffixes stripped) -> the files that query it."""
    used: dict[str, set[str]] = {}
    doc = yaml.safe_load(RULES.read_text())
    sources = [(RULES, r["expr"]) for g in doc["groups"] for r in g["rules"]]
    for path in DASHBOARDS:
        sources += [(path, q) for q in _queries(json.loads(path.read_text()))]
    for path, query in sources:
        for name in METRIC.findall(str(query)):
            used.setdefault(_base(name), set()).add(str(path.relative_to(ROOT)))
    return used


@pytest.fixture(scope="module")
def scrape(tmp_path_factory):
    """Sample name -> label sets of an in-process server's registry after a short workload."""
    from prometheus_client import generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from advex.client import Client
    from advex.service.inprocess import InProcessServer

    with InProcessServer(data_dir=str(tmp_path_factory.mktemp("metrics")), data_roots=[]) as srv, \
            Client(srv.target) as c:
        trained = c.train("linear", "tsipras", epochs=1, batch_size=200, limit=400).result(timeout=300, progress=False)
        model_id = trained.model_id
        c.evaluate(model_id, "tsipras", limit=200, attacks=[PGD]).result(timeout=300, progress=False)
        c.audit("nightly", [model_id], "tsipras", limit=200, attacks=[PGD],
                thresholds=[{"norm": "Linf", "eps": 0.6, "min_robust_accuracy": 0.0}]
                ).result(timeout=300, progress=False)
        if ONNX_ONLY in used_metrics():
            require_module("onnxruntime", "pip install 'advex[server]' (onnxruntime-gpu)")
            c.export_model(model_id, "tsipras", limit=100).result(timeout=300, progress=False)
        with pytest.raises(grpc.RpcError) as info:
            c.get_model("m-nope")
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
        text = generate_latest(srv.running.metrics.registry).decode()
    samples: dict[str, list[dict]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append(sample.labels)
    return samples


def test_the_rules_and_dashboards_query_metrics():
    used = used_metrics()
    # the rules' metrics at least (a broken parse would otherwise pass vacuously)
    assert {"advex_audit_passed", "advex_operations_total", "advex_queue_depth"} <= set(used), used


def test_every_queried_metric_is_exported(scrape):
    missing = {name: sorted(files) for name, files in used_metrics().items()
               if name not in scrape and not any(name + s in scrape for s in HISTOGRAM_SUFFIXES)}
    assert not missing, f"queried but not in a server's scrape: {missing}\n(exported: {sorted(scrape)})"


def test_the_rules_label_matchers_match_exported_series(scrape):
    """The label values the alert rules select on occur in the scrape."""
    assert any(labels.get("pool") == "operations" for labels in scrape["advex_queue_depth"])
    states = {labels["state"] for labels in scrape["advex_operations_total"]}
    assert "SUCCEEDED" in states and states <= {"QUEUED", "RUNNING", "SUCCEEDED", "FAILED", "CANCELLED"}, states
    errors = {labels["code"] for labels in scrape["advex_requests_total"]}
    assert "NOT_FOUND" in errors, errors
    audited = scrape["advex_audit_robust_accuracy"]
    assert audited and set(audited[0]) == {"target", "audit", "dataset", "norm", "eps", "suite"}, audited
