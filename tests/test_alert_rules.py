"""deploy/prometheus/alerts.yml: the alert rules (audits and server) are valid (`promtool check
rules`), pass their unit tests (`promtool test rules` on alerts.test.yml), and use only metrics
that advex exports (a renamed gauge breaks this test rather than silencing an alert).
tests/test_metrics_exported.py checks that a real server's scrape holds every one of them."""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "deploy" / "prometheus" / "alerts.yml"
RULE_TESTS = ROOT / "deploy" / "prometheus" / "alerts.test.yml"
METRICS_SOURCE = ROOT / "service" / "advex" / "service" / "metrics.py"
GROUPS = {
    "advex-audits": ("AdvexAuditFailed", "AdvexAuditStale", "AdvexAuditRobustAccuracyDropped"),
    "advex-server": ("AdvexDown", "AdvexMetricsAbsent", "AdvexOperationsFailing", "AdvexQueueSaturated",
                     "AdvexRobustAccuracyBelowThreshold"),
}
ALERTS = tuple(name for names in GROUPS.values() for name in names)


def _promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail("promtool not found: apt-get install prometheus (scripts/test.sh installs it)")
    return path


def _run(*args: str) -> str:
    proc = subprocess.run([_promtool(), *args], cwd=ROOT, capture_output=True, text=True, timeout=120)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"promtool {' '.join(args)} exited {proc.returncode}:\n{output}"
    return output


def test_rules_are_valid():
    out = _run("check", "rules", str(RULES.relative_to(ROOT)))
    assert f"SUCCESS: {len(ALERTS)} rules found" in out, out


def test_rule_unit_tests_pass():
    out = _run("test", "rules", str(RULE_TESTS.relative_to(ROOT)))
    assert "SUCCESS" in out and "FAILED" not in out, out


def test_every_alert_is_defined_and_tested():
    rules, rule_tests = RULES.read_text(), RULE_TESTS.read_text()
    for name in ALERTS:
        assert f"alert: {name}" in rules, name
        # one case where it fires (an exp_alerts list with entries) and one where it does not
        cases = re.findall(rf"alertname: {name}\n\s+exp_alerts:(.*?)(?=\n\s+- eval_time:|\n\s*#|\Z)",
                           rule_tests, re.S)
        assert any(c.strip() == "[]" for c in cases), f"{name}: no non-firing case"
        assert any("exp_labels" in c for c in cases), f"{name}: no firing case"


def _rule_text() -> str:
    """The rules' expressions, labels and annotations (not the file's comments)."""
    doc = yaml.safe_load(RULES.read_text())
    assert [g["name"] for g in doc["groups"]] == list(GROUPS)
    for group in doc["groups"]:
        assert [r["alert"] for r in group["rules"]] == list(GROUPS[group["name"]]), group["name"]
    rules = [r for group in doc["groups"] for r in group["rules"]]
    return "\n".join(str(v) for r in rules
                     for v in [r["expr"], *r.get("labels", {}).values(), *r.get("annotations", {}).values()])


def test_alerts_use_exported_metrics():
    names = set(re.findall(r"advex_[a-z_]+", _rule_text()))
    assert {"advex_audit_passed", "advex_audit_last_run_timestamp_seconds", "advex_audit_robust_accuracy",
            "advex_operations_total", "advex_queue_depth"} <= names, names
    source = METRICS_SOURCE.read_text()
    unknown = sorted(n for n in names if f'"{n}"' not in source)
    assert not unknown, f"alerts.yml uses metrics that {METRICS_SOURCE.relative_to(ROOT)} does not export: {unknown}"


def test_server_alerts_assume_the_scrape_job_and_queue_limit():
    """AdvexDown / AdvexMetricsAbsent match the scrape job "advex"; AdvexQueueSaturated's 14
    assumes the default max_queue of 16 (alerts.yml says so: keep the two in step)."""
    from advex.service.config import ServerConfig

    doc = yaml.safe_load(RULES.read_text())
    rules = {r["alert"]: r for g in doc["groups"] for r in g["rules"]}
    assert rules["AdvexDown"]["expr"].strip() == 'up{job="advex"} == 0'
    assert rules["AdvexMetricsAbsent"]["expr"].strip() == 'absent(up{job="advex"})'
    assert ServerConfig.__dataclass_fields__["max_queue"].default == 16
    assert rules["AdvexQueueSaturated"]["expr"].strip() == 'advex_queue_depth{pool="operations"} >= 14'
    assert rules["AdvexRobustAccuracyBelowThreshold"]["labels"]["threshold"] == "0.3"
    assert "< 0.3" in rules["AdvexRobustAccuracyBelowThreshold"]["expr"]
