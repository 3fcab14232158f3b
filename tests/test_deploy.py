"""deploy/: offline checks of the container images, compose stack, Kubernetes manifests and
Grafana dashboard (no container daemon or cluster is needed; each check can fail).

- Kubernetes: every manifest (as written, and as `kubectl kustomize` renders the base and the GPU
  overlay, when kubectl is installed) validates against the Kubernetes JSON schemas bundled by
  `kubernetes-validate`, strictly (an unknown field is an error); the CRDs (ServiceMonitor,
  PrometheusRule) are checked by hand; the probes, grace period, GPU limit and PrometheusRule's
  equality with deploy/prometheus/alerts.yml are asserted.
- compose: deploy/compose.yaml (and the GPU override) validate against the compose-spec JSON
  schema vendored in deploy/compose/compose-spec.json, and every file they mount or build from
  exists.
- Dockerfiles: a line parser checks the user, health check, volume, ports, entry point, COPY
  sources (and that .dockerignore keeps them), no remote ADD, and a client image without torch.
- The server config (advex.toml) uses only `advex serve` settings; the audit specs load with the
  client's own spec checker.
- The dashboard: valid JSON, every panel has a data source and queries, every metric is exported.

When deploy/prometheus/alerts.yml changes, regenerate the PrometheusRule with
`python tests/test_deploy.py --write-prometheusrule`.
"""
from __future__ import annotations

import fnmatch
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import require_module
import yaml

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = None

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
K8S_BASE = DEPLOY / "k8s" / "base"
K8S_GPU = DEPLOY / "k8s" / "overlays" / "gpu"
K8S_TLS = DEPLOY / "k8s" / "components" / "tls"  # a kustomize Component: TLS on the gRPC port
K8S_GPU_TLS = DEPLOY / "k8s" / "overlays" / "gpu-tls"  # the GPU overlay + the TLS component
TLS_DIR = "/run/secrets/advex-tls"
TLS_KEYS = {"tls.crt", "tls.key", "ca.crt"}
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
PROMETHEUS_RULE = K8S_BASE / "prometheusrule.yaml"
DOCKER = DEPLOY / "docker"
SERVER_DOCKERFILES = ("Dockerfile.cpu", "Dockerfile.gpu")
K8S_VERSION = "1.32.0"  # oldest Kubernetes these manifests target (grpc probes, CronJob timeZone)
GRPC_PORT, METRICS_PORT = 50051, 9108

# The metrics the server exports (README.md, "Metrics"); the dashboard may use no other.
METRICS = {
    "advex_requests_total", "advex_request_latency_seconds", "advex_operations_total",
    "advex_operation_duration_seconds", "advex_images_processed_total", "advex_queue_depth",
    "advex_gpu_memory_bytes", "advex_clean_accuracy", "advex_robust_accuracy",
    "advex_accuracy_timestamp_seconds", "advex_audit_robust_accuracy", "advex_audit_clean_accuracy",
    "advex_audit_passed", "advex_audit_last_run_timestamp_seconds",
    "advex_model_execution_provider_info", "advex_build_info",
}
# advex.toml keys that are settings of `advex serve` but not flags of its parser: the config file
# itself and the logging settings.
CONFIG_ONLY_KEYS = {"config", "log_format", "log_level"}


# ---------------------------------------------------------------------------------------------
# Kubernetes


def _yaml_docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _base_manifests() -> list[tuple[str, dict]]:
    out = []
    for path in sorted(K8S_BASE.glob("*.yaml")):
        if path.name in ("kustomization.yaml", "audit.yaml"):
            continue
        out += [(path.name, d) for d in _yaml_docs(path)]
    return out


def _kustomize(folder: Path) -> list[dict]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:  # under CI a missing tool is a failure, not a skipped check
        message = "kubectl not installed: the kustomize render is not checked here"
        pytest.fail(message) if os.environ.get("CI") else pytest.skip(message)
    proc = subprocess.run([kubectl, "kustomize", str(folder)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"kubectl kustomize {folder.relative_to(ROOT)}:\n{proc.stderr}"
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


def _validate_k8s(where: str, doc: dict) -> None:
    kv = require_module("kubernetes_validate", "pip install -c ci/constraints.txt kubernetes-validate (the dev extra)")
    api, kind = doc.get("apiVersion", ""), doc.get("kind", "")
    if api.startswith("monitoring.coreos.com/"):
        _validate_crd(where, doc)
        return
    try:
        kv.validate(doc, K8S_VERSION, strict=True)
    except kv.ValidationError as exc:
        pytest.fail(f"{where}: {kind} {doc.get('metadata', {}).get('name')}: {exc.message} "
                    f"at {'/'.join(map(str, exc.path))}")
    except kv.SchemaNotFoundError:
        pytest.fail(f"{where}: no Kubernetes {K8S_VERSION} schema for {api} {kind}")


def _validate_crd(where: str, doc: dict) -> None:
    """The Prometheus Operator's CRDs are not in the core schemas: their required fields by hand."""
    assert doc["apiVersion"] == "monitoring.coreos.com/v1", where
    assert doc["kind"] in ("ServiceMonitor", "PrometheusRule"), where
    assert set(doc) <= {"apiVersion", "kind", "metadata", "spec"}, where
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", doc["metadata"]["name"]), where
    spec = doc["spec"]
    if doc["kind"] == "ServiceMonitor":
        assert spec["selector"]["matchLabels"], where
        assert spec["endpoints"], where
        for ep in spec["endpoints"]:
            assert isinstance(ep.get("port"), str) and ep["port"], f"{where}: an endpoint names its port"
            assert ep.get("path", "/metrics").startswith("/"), where
            assert re.fullmatch(r"\d+(ms|s|m|h)", ep.get("interval", "30s")), where
    else:
        assert spec["groups"], where
        for group in spec["groups"]:
            assert group["name"] and group["rules"], where
            for rule in group["rules"]:
                assert ("alert" in rule) != ("record" in rule), f"{where}: {rule}"
                assert isinstance(rule["expr"], str) and rule["expr"].strip(), where


def test_k8s_manifests_as_written_validate():
    docs = _base_manifests()
    kinds = {d["kind"] for _, d in docs}
    assert {"Deployment", "Service", "PersistentVolumeClaim", "CronJob", "ServiceMonitor",
            "PrometheusRule"} <= kinds, kinds
    for name, doc in docs:
        _validate_k8s(f"deploy/k8s/base/{name}", doc)


@pytest.mark.parametrize("folder", [K8S_BASE, K8S_GPU], ids=["base", "gpu"])
def test_kustomize_renders_valid_manifests(folder):
    _rendered_and_valid(folder, secrets=1)


def _rendered_and_valid(folder: Path, secrets: int) -> list[dict]:
    """`kubectl kustomize folder`: two ConfigMaps, `secrets` Secrets, every document valid against
    the Kubernetes schemas, every reference of a pod rendered."""
    docs = _kustomize(folder)
    kinds = sorted(d["kind"] for d in docs)
    assert kinds.count("ConfigMap") == 2 and kinds.count("Secret") == secrets, kinds
    for doc in docs:
        _validate_k8s(f"kubectl kustomize {folder.relative_to(ROOT)}", doc)
    _check_pod_references(docs)
    return docs


def _check_pod_references(docs: list[dict]) -> None:
    names = {(d["kind"], d["metadata"]["name"]) for d in docs}
    # every ConfigMap and Secret the pods use is one the render defines (generated names included)
    for doc in docs:
        if doc["kind"] not in ("Deployment", "CronJob"):
            continue
        pod = (doc["spec"]["template"] if doc["kind"] == "Deployment"
               else doc["spec"]["jobTemplate"]["spec"]["template"])["spec"]
        for vol in pod["volumes"]:
            if "configMap" in vol:
                assert ("ConfigMap", vol["configMap"]["name"]) in names, vol
            if "secret" in vol:
                assert ("Secret", vol["secret"]["secretName"]) in names, vol
            if "persistentVolumeClaim" in vol:
                assert ("PersistentVolumeClaim", vol["persistentVolumeClaim"]["claimName"]) in names, vol


def _deployment(docs: list[dict]) -> dict:
    (dep,) = [d for d in docs if d["kind"] == "Deployment"]
    return dep


def _check_server_pod(dep: dict, tls: bool = False) -> dict:
    pod = dep["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] >= 60
    assert dep["spec"]["replicas"] == 1 and dep["spec"]["strategy"]["type"] == "Recreate"
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] == 10001
    (c,) = pod["containers"]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        if tls:  # the kubelet's gRPC probes speak plaintext: exec `advex health` over TLS instead
            assert "grpc" not in c[probe] and set(c[probe]) & {"exec", "httpGet", "tcpSocket"} == {"exec"}, probe
            assert c[probe]["exec"]["command"] == [
                "advex", "--target", f"127.0.0.1:{GRPC_PORT}", "--tls-ca", f"{TLS_DIR}/ca.crt", "health"], probe
        else:
            assert c[probe]["grpc"]["port"] == GRPC_PORT, probe
            assert "exec" not in c[probe], probe
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    assert {"/var/lib/advex", "/tmp", "/etc/advex"} <= set(mounts)
    assert mounts["/usr/share/datasets"].get("readOnly") is True
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"grpc": GRPC_PORT, "metrics": METRICS_PORT}
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["ADVEX_CONFIG"] == "/etc/advex/advex.toml"
    assert env["ADVEX_TOKEN_FILE"].startswith("/run/secrets/advex/")
    return c


def test_base_deployment_is_cpu_with_grpc_probes():
    dep = _deployment([d for _, d in _base_manifests()])
    c = _check_server_pod(dep)
    assert "nvidia.com/gpu" not in c["resources"].get("limits", {})
    assert {e["name"]: e.get("value") for e in c["env"]}["ADVEX_DEVICE"] == "cpu"


def test_gpu_overlay_asks_for_a_gpu():
    base = _deployment(_kustomize(K8S_BASE))
    gpu = _deployment(_kustomize(K8S_GPU))
    c = _check_server_pod(gpu)
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert {e["name"]: e.get("value") for e in c["env"]}["ADVEX_DEVICE"] == "auto"
    assert c["image"].endswith("-gpu"), c["image"]
    assert base["spec"]["template"]["spec"]["containers"][0]["image"].endswith("-cpu")


def _cronjob_container(docs: list[dict]) -> dict:
    (cj,) = [d for d in docs if d["kind"] == "CronJob"]
    (c,) = cj["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"]
    return c


def _pod_volumes(doc: dict) -> dict[str, dict]:
    pod = (doc["spec"]["template"] if doc["kind"] == "Deployment"
           else doc["spec"]["jobTemplate"]["spec"]["template"])["spec"]
    return {v["name"]: v for v in pod["volumes"]}


@pytest.mark.parametrize("folder", [K8S_BASE, K8S_GPU], ids=["base", "gpu"])
def test_base_and_gpu_overlay_stay_plaintext(folder):
    # the TLS component is opt-in: without it, no TLS Secret, env or flag, and native gRPC probes
    docs = _kustomize(folder)
    assert not [d for d in docs if d["kind"] == "Secret" and d["metadata"]["name"].startswith("advex-tls")]
    c = _check_server_pod(_deployment(docs))
    assert not {e["name"] for e in c["env"]} & {"ADVEX_TLS_CERT", "ADVEX_TLS_KEY"}
    assert TLS_DIR not in {m["mountPath"] for m in c["volumeMounts"]}
    assert "--tls-ca" not in _cronjob_container(docs)["args"]


def test_tls_component_is_a_component_with_placeholders():
    kust = yaml.safe_load((K8S_TLS / "kustomization.yaml").read_text())
    assert kust["apiVersion"] == "kustomize.config.k8s.io/v1alpha1" and kust["kind"] == "Component"
    (gen,) = kust["secretGenerator"]
    assert gen["name"] == "advex-tls" and gen["type"] == "kubernetes.io/tls"
    assert set(gen["files"]) == TLS_KEYS
    for patch in kust["patches"]:
        assert (K8S_TLS / patch["path"]).is_file(), patch
    # the PEM files are placeholders, never a real certificate or key
    for name in TLS_KEYS:
        text = (K8S_TLS / name).read_text()
        assert "REPLACE-ME" in text and text.startswith("-----BEGIN "), name
        assert not re.search(r"^[A-Za-z0-9+/=]{64}$", text, re.M), f"{name}: looks like real PEM data"
    overlay = yaml.safe_load((K8S_GPU_TLS / "kustomization.yaml").read_text())
    assert overlay["resources"] == ["../gpu"] and overlay["components"] == ["../../components/tls"]


def test_gpu_tls_overlay_renders_valid_manifests():
    docs = _rendered_and_valid(K8S_GPU_TLS, secrets=2)
    # everything else is the GPU overlay's: the same kinds and names, bar the TLS Secret
    gpu = {(d["kind"], d["metadata"]["name"]) for d in _kustomize(K8S_GPU)}
    tls = {(d["kind"], d["metadata"]["name"]) for d in docs}
    (extra,) = tls - gpu
    assert extra[0] == "Secret" and extra[1].startswith("advex-tls-"), extra


def test_gpu_tls_overlay_secret_is_kubernetes_tls():
    docs = _kustomize(K8S_GPU_TLS)
    (secret,) = [d for d in docs if d["kind"] == "Secret" and d["metadata"]["name"].startswith("advex-tls")]
    assert secret["type"] == "kubernetes.io/tls"
    assert set(secret["data"]) == TLS_KEYS


def test_gpu_tls_overlay_server_serves_tls_with_exec_probes():
    docs = _kustomize(K8S_GPU_TLS)
    (secret,) = [d for d in docs if d["kind"] == "Secret" and d["metadata"]["name"].startswith("advex-tls")]
    dep = _deployment(docs)
    c = _check_server_pod(dep, tls=True)
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["ADVEX_TLS_CERT"] == f"{TLS_DIR}/tls.crt" and env["ADVEX_TLS_KEY"] == f"{TLS_DIR}/tls.key"
    assert "ADVEX_TLS_CLIENT_CA" not in env  # no mutual TLS: the probes present no client certificate
    # still the GPU overlay
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1 and env["ADVEX_DEVICE"] == "auto"
    (mount,) = [m for m in c["volumeMounts"] if m["mountPath"] == TLS_DIR]
    assert mount.get("readOnly") is True
    assert _pod_volumes(dep)[mount["name"]]["secret"]["secretName"] == secret["metadata"]["name"]
    # the probes keep the GPU overlay's periods and thresholds (its longer startup included)
    gpu = _deployment(_kustomize(K8S_GPU))["spec"]["template"]["spec"]["containers"][0]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        for key in ("periodSeconds", "failureThreshold"):
            assert c[probe][key] == gpu[probe][key], (probe, key)
        assert c[probe]["timeoutSeconds"] >= 5, probe  # exec's default 1 s is short for the CLI


def test_gpu_tls_overlay_cronjob_verifies_the_server():
    docs = _kustomize(K8S_GPU_TLS)
    (secret,) = [d for d in docs if d["kind"] == "Secret" and d["metadata"]["name"].startswith("advex-tls")]
    (cj,) = [d for d in docs if d["kind"] == "CronJob"]
    c = _cronjob_container(docs)
    args = c["args"]
    # global flags go before the subcommand
    assert args[:4] == ["--target", f"advex:{GRPC_PORT}", "--tls-ca", f"{TLS_DIR}/ca.crt"], args
    assert args[4] == "audit" and args[5].endswith("/audit.yaml"), args
    (mount,) = [m for m in c["volumeMounts"] if m["mountPath"] == TLS_DIR]
    assert mount.get("readOnly") is True
    vol = _pod_volumes(cj)[mount["name"]]["secret"]
    assert vol["secretName"] == secret["metadata"]["name"]
    assert [i["key"] for i in vol.get("items", [])] == ["ca.crt"]  # the CA only, not the server's key


def test_service_and_servicemonitor_match_the_deployment():
    docs = [d for _, d in _base_manifests()]
    (svc,) = [d for d in docs if d["kind"] == "Service"]
    (sm,) = [d for d in docs if d["kind"] == "ServiceMonitor"]
    pod_labels = _deployment(docs)["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= pod_labels.items()
    assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    ports = {p["name"]: p["port"] for p in svc["spec"]["ports"]}
    assert ports == {"grpc": GRPC_PORT, "metrics": METRICS_PORT}
    assert [ep["port"] for ep in sm["spec"]["endpoints"]] == ["metrics"]


def test_cronjob_runs_the_client_audit():
    (cj,) = [d for _, d in _base_manifests() if d["kind"] == "CronJob"]
    pod = cj["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert c["image"] == "advex-client"  # the kustomization's images: sets the tag
    args = c["args"]
    assert args[:2] == ["--target", f"advex:{GRPC_PORT}"] and args[2] == "audit"
    spec_mount = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}["spec"]
    assert args[3] == f"{spec_mount}/audit.yaml"
    assert {e["name"] for e in c["env"]} >= {"ADVEX_TOKEN_FILE"}
    assert c["securityContext"]["readOnlyRootFilesystem"] is True


def _rule_groups() -> list[dict]:
    return yaml.safe_load(ALERTS.read_text())["groups"]


def test_prometheusrule_equals_alerts_yml():
    (rule,) = _yaml_docs(PROMETHEUS_RULE)
    assert rule["spec"]["groups"] == _rule_groups(), (
        "deploy/k8s/base/prometheusrule.yaml differs from deploy/prometheus/alerts.yml: "
        "run `python tests/test_deploy.py --write-prometheusrule`")


def test_k8s_config_copies_equal_their_sources():
    # kustomize reads files only below the kustomization: the copies must not drift
    assert (K8S_BASE / "advex.toml").read_text() == (DOCKER / "advex.toml").read_text()
    assert (K8S_BASE / "audit.yaml").read_text() == (DEPLOY / "compose" / "audit.yaml").read_text()
    kust = yaml.safe_load((K8S_BASE / "kustomization.yaml").read_text())
    for gen in kust["configMapGenerator"] + kust["secretGenerator"]:
        for f in gen["files"]:
            assert (K8S_BASE / f.split("=")[-1]).is_file(), f
    for res in kust["resources"]:
        assert (K8S_BASE / res).is_file(), res
    # the token is a placeholder, never a real secret
    assert "REPLACE-ME" in (K8S_BASE / "secrets" / "token").read_text()


# ---------------------------------------------------------------------------------------------
# The server config and the audit specs


def _serve_settings() -> set[str]:
    proc = subprocess.run([sys.executable, "-m", "advex", "serve", "--help"], capture_output=True,
                          text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    return {m.replace("-", "_") for m in re.findall(r"--([a-z][a-z0-9-]+)", proc.stdout)} - {"help"}


def test_advex_toml_uses_serve_settings():
    if tomllib is None:
        pytest.skip("tomllib needs Python 3.11")
    config = tomllib.loads((DOCKER / "advex.toml").read_text())
    unknown = set(config) - _serve_settings() - CONFIG_ONLY_KEYS
    assert not unknown, f"deploy/docker/advex.toml: not settings of advex serve: {sorted(unknown)}"
    assert config["host"] == "0.0.0.0" and config["metrics_host"] == "0.0.0.0"
    assert (config["port"], config["metrics_port"]) == (GRPC_PORT, METRICS_PORT)
    assert config["data_dir"] == "/var/lib/advex"
    assert config["shutdown_grace_s"] + 20 <= 60
    for secret in ("token", "token_file", "tls_key"):
        assert secret not in config, secret


@pytest.mark.parametrize("spec", [DEPLOY / "compose" / "audit.yaml", K8S_BASE / "audit.yaml"],
                         ids=["compose", "k8s"])
def test_audit_spec_is_valid(spec):
    from advex.client.audit import load_spec

    parsed, _ = load_spec(spec)
    assert parsed.targets and all(t.model or t.endpoint for t in parsed.targets)


# ---------------------------------------------------------------------------------------------
# compose


def _compose_files() -> list[Path]:
    return [DEPLOY / "compose.yaml", DEPLOY / "compose" / "gpu.yaml"]


@pytest.mark.parametrize("path", _compose_files(), ids=lambda p: p.name)
def test_compose_validates_against_the_compose_spec(path):
    jsonschema = require_module("jsonschema", "pip install -c ci/constraints.txt jsonschema (the dev extra)")
    schema = json.loads((DEPLOY / "compose" / "compose-spec.json").read_text())
    doc = yaml.safe_load(path.read_text())
    errors = sorted(jsonschema.Draft7Validator(schema).iter_errors(doc), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{'/'.join(map(str, e.path))}: {e.message}" for e in errors)


def test_compose_schema_rejects_a_bad_file():
    jsonschema = require_module("jsonschema", "pip install -c ci/constraints.txt jsonschema (the dev extra)")
    schema = json.loads((DEPLOY / "compose" / "compose-spec.json").read_text())
    bad = {"services": {"advex": {"image": "advex", "ports": [{"target": "x"}], "bogus": 1}}}
    assert list(jsonschema.Draft7Validator(schema).iter_errors(bad))


def test_compose_mounts_and_builds_exist():
    doc = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    gpu = yaml.safe_load((DEPLOY / "compose" / "gpu.yaml").read_text())
    for name, svc in list(doc["services"].items()) + list(gpu["services"].items()):
        for vol in svc.get("volumes", []):
            src = vol.split(":")[0] if isinstance(vol, str) else vol.get("source", "")
            if src.startswith((".", "/")) and not src.startswith("${"):
                if src.startswith("."):
                    assert (DEPLOY / src).exists(), f"{name}: {src} does not exist"
        if "build" in svc:
            ctx = (DEPLOY / svc["build"]["context"]).resolve()
            assert ctx == ROOT, ctx
            assert (ctx / svc["build"]["dockerfile"]).is_file(), svc["build"]
    services = doc["services"]
    assert services["audit"]["profiles"] == ["audit"]
    assert services["audit"]["depends_on"]["advex"]["condition"] == "service_healthy"
    assert "advex" in services["audit"]["command"][-3:-1] or "audit" in services["audit"]["command"]
    assert services["advex"]["healthcheck"]["test"][1:3] == ["advex", "health"]
    assert services["advex"]["stop_grace_period"] == "60s"
    # every published port stays on loopback: the stack has no token and no TLS
    for name, svc in services.items():
        for port in svc.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), (name, port)
    # Prometheus scrapes advex and loads the alert rules where compose mounts them
    prom = yaml.safe_load((DEPLOY / "compose" / "prometheus.yml").read_text())
    mounts = {v.split(":")[1] for v in services["prometheus"]["volumes"]}
    assert set(prom["rule_files"]) <= mounts
    assert "./prometheus/alerts.yml:/etc/prometheus/alerts.yml:ro" in services["prometheus"]["volumes"]
    targets = [t for job in prom["scrape_configs"] for sc in job.get("static_configs", []) for t in sc["targets"]]
    assert f"advex:{METRICS_PORT}" in targets
    # Grafana's provisioning points at the mounted dashboard
    provider = yaml.safe_load((DEPLOY / "grafana" / "provisioning" / "dashboards" / "advex.yml").read_text())
    path = provider["providers"][0]["options"]["path"]
    assert any(v.split(":")[1].startswith(path + "/") and v.startswith("./grafana/advex.json")
               for v in services["grafana"]["volumes"])
    ds = yaml.safe_load((DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml").read_text())
    assert ds["datasources"][0]["url"] == "http://prometheus:9090"


# ---------------------------------------------------------------------------------------------
# Dockerfiles


def _instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out, buf = [], ""
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if not buf and (not stripped or stripped.startswith("#")):
            continue
        if buf and stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            buf += stripped[:-1] + " "
            continue
        buf += stripped
        word, _, rest = buf.partition(" ")
        out.append((word.upper(), rest.strip()))
        buf = ""
    assert not buf, f"{path.name}: a trailing continuation"
    return out


def _dockerignored(rel: str) -> bool:
    """Whether .dockerignore keeps `rel` out of the build context (last matching rule wins)."""
    ignored = False
    for raw in (ROOT / ".dockerignore").read_text().splitlines():
        rule = raw.strip()
        if not rule or rule.startswith("#"):
            continue
        negate = rule.startswith("!")
        pattern = rule.lstrip("!").strip("/")
        parts = rel.split("/")
        prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
        if any(fnmatch.fnmatch(p, pattern) or fnmatch.fnmatch(p, pattern.replace("**/", "")) for p in prefixes):
            ignored = not negate
    return ignored


@pytest.mark.parametrize("name", ["Dockerfile.cpu", "Dockerfile.gpu", "Dockerfile.client"])
def test_dockerfile(name):
    path = DOCKER / name
    ins = _instructions(path)
    final = ins[max(i for i, (w, _) in enumerate(ins) if w == "FROM"):]  # the runtime stage
    words = [w for w, _ in final]
    users = [a for w, a in final if w == "USER"]
    assert users and users[-1].split(":")[0] == "10001", f"{name}: runs as {users}"
    for w, a in ins:
        assert not (w == "ADD" and re.search(r"https?://", a)), f"{name}: ADD from the network"
        if w == "COPY" and "--from=" not in a:
            *sources, _dest = [t for t in a.split() if not t.startswith("--")]
            for src in sources:
                assert (ROOT / src).exists(), f"{name}: COPY {src}: no such file"
                assert not _dockerignored(src.rstrip("/")), f"{name}: COPY {src}: excluded by .dockerignore"
    entry = [json.loads(a) for w, a in final if w == "ENTRYPOINT"]
    assert entry == [["advex"]], entry
    env = " ".join(a for w, a in final if w == "ENV")
    if name in SERVER_DOCKERFILES:
        (health,) = [a for w, a in final if w == "HEALTHCHECK"]
        cmd = json.loads(health.split("CMD", 1)[1])
        assert cmd == ["advex", "health", "--target", f"127.0.0.1:{GRPC_PORT}"], health
        assert any(json.loads(a) == ["/var/lib/advex"] for w, a in final if w == "VOLUME")
        assert sorted(a.split() for w, a in final if w == "EXPOSE") == [[str(GRPC_PORT), str(METRICS_PORT)]]
        assert [json.loads(a) for w, a in final if w == "CMD"] == [["serve"]]
        assert "ADVEX_CONFIG=/etc/advex/advex.toml" in env
        assert "COPY" in words and any("advex.toml /etc/advex/advex.toml" in a for w, a in final if w == "COPY")
        # no dataset baked in: nothing is copied to /usr/share/datasets
        assert not any("/usr/share/datasets" in a for w, a in ins if w in ("COPY", "ADD"))
    else:
        assert "HEALTHCHECK" in words  # HEALTHCHECK NONE: a job


def _pip_installs(path: Path) -> list[list[str]]:
    out = []
    for w, a in _instructions(path):
        if w != "RUN":
            continue
        for cmd in re.split(r"&&|;", a):
            toks = cmd.split()
            if "pip" in " ".join(toks[:1]) and "install" in toks:
                out.append(toks[toks.index("install") + 1:])
    return out


def test_client_image_installs_no_torch():
    path = DOCKER / "Dockerfile.client"
    installs = _pip_installs(path)
    assert installs, "no pip install in Dockerfile.client"
    for args in installs:
        for tok in args:
            low = tok.lower()
            assert not any(bad in low for bad in ("torch", "engine", "service", "server", "onnx")), tok
    copies = [a for w, a in _instructions(path) if w == "COPY"]
    assert not any(re.search(r"\b(engine|service)/", a) for a in copies), copies


def test_server_images_install_in_setup_order():
    # scripts/setup.sh's order: protos, client, engine, service, then the root with its extras
    for name in SERVER_DOCKERFILES:
        (args,) = [a for a in _pip_installs(DOCKER / name) if "./protos" in a]
        local = [a for a in args if a.startswith(("./", '".'))]
        assert local == ["./protos", "./client", "./engine", "./service", '".[server,plot]"'], local
        assert args[:2] == ["-c", "ci/constraints.txt"], args
    cpu_torch = [a for a in _pip_installs(DOCKER / "Dockerfile.cpu") if "https://download.pytorch.org/whl/cpu" in a]
    assert cpu_torch, "the CPU image installs torch from PyTorch's CPU index"


# ---------------------------------------------------------------------------------------------
# The dashboard


def _panels(items: list[dict]):
    for p in items:
        yield p
        yield from _panels(p.get("panels", []))


def test_dashboard():
    dash = json.loads((DEPLOY / "grafana" / "advex.json").read_text())
    assert dash["uid"] and dash["title"]
    panels = [p for p in _panels(dash["panels"]) if p["type"] != "row"]
    assert len(panels) >= 8
    ids = [p["id"] for p in _panels(dash["panels"])]
    assert len(ids) == len(set(ids)), "panel ids repeat"
    variables = {v["name"] for v in dash["templating"]["list"]}
    used = set()
    for p in panels:
        assert p.get("datasource", {}).get("type") == "prometheus", p["title"]
        assert p.get("targets"), p["title"]
        for t in p["targets"]:
            expr = t["expr"]
            assert expr.count("(") == expr.count(")"), expr
            for var in re.findall(r"\$([a-z_]+)", expr):
                assert var in variables or var.startswith("__"), (p["title"], var)
            for m in re.findall(r"advex_[a-z_]+", expr):
                m = re.sub(r"_(bucket|sum|count)$", "", m)
                assert m in METRICS, f"{p['title']}: {m} is not an exported metric"
                used.add(m)
    # what the dashboard must show
    assert {"advex_requests_total", "advex_request_latency_seconds", "advex_operations_total",
            "advex_operation_duration_seconds", "advex_queue_depth", "advex_gpu_memory_bytes",
            "advex_audit_robust_accuracy", "advex_audit_passed",
            "advex_audit_last_run_timestamp_seconds"} <= used


# ---------------------------------------------------------------------------------------------


def _write_prometheusrule() -> None:
    """Regenerate deploy/k8s/base/prometheusrule.yaml from deploy/prometheus/alerts.yml."""
    header = "".join(l + "\n" for l in PROMETHEUS_RULE.read_text().splitlines() if l.startswith("#")) \
        if PROMETHEUS_RULE.exists() else ""
    doc = {"apiVersion": "monitoring.coreos.com/v1", "kind": "PrometheusRule",
           "metadata": {"name": "advex", "labels": {"app.kubernetes.io/name": "advex"}},
           "spec": {"groups": _rule_groups()}}
    PROMETHEUS_RULE.write_text(header + yaml.safe_dump(doc, sort_keys=False, width=100))
    print(f"wrote {PROMETHEUS_RULE.relative_to(ROOT)}")


if __name__ == "__main__":
    if sys.argv[1:] == ["--write-prometheusrule"]:
        _write_prometheusrule()
    else:
        sys.exit("usage: python tests/test_deploy.py --write-prometheusrule")
