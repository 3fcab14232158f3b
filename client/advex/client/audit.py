"""`advex audit SPEC.yaml`: a declarative robustness audit, run through the service.

The spec (YAML) names the targets (model ids, or models served by inference endpoints, which are
registered on the way), the data, the attacks (a suite or explicit ones) and the thresholds. It is
checked field by field before anything is sent (pydantic); the server checks it again. The
server evaluates and judges every target, keeps a record per target, and compares each with the
target's last passing audit of the same name. The command writes report.html (self-contained),
report.md and report.json into the spec's output folder, prints the verdict, and exits 0 when
every threshold holds, 1 when one is breached, 2 when the audit could not run.

Example spec::

    name: nightly-fashion
    dataset: fashion-mnist
    split: test
    limit: 500
    suite: autoattack            # or attacks: [{norm: Linf, eps: [0.03], method: square, steps: 1000}]
    eps: {Linf: [0.03], L2: [0.5]}
    targets:
      - model: m-0123456789ab
        name: candidate
      - name: production
        endpoint:
          url: grpc://models.internal:8081
          model_name: fashion-clf
          input_shape: [1, 28, 28]
          num_classes: 10
    thresholds:
      - {norm: Linf, eps: 0.03, min_robust_accuracy: 0.30, judge: ci_lower}
    min_clean_accuracy: 0.80
    max_drop: 0.02
    output: audit-reports/nightly
"""
from __future__ import annotations

import datetime as _dt
import math
from pathlib import Path
from typing import Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from advex.v1 import results_pb2 as results

EXIT_PASS, EXIT_BREACH, EXIT_ERROR = 0, 1, 2
HISTORY_LIMIT = 50  # earlier audits shown in a report's trend
MAX_SPEC_BYTES = 64 << 10  # what the server keeps of a spec (AuditRequest.spec_text)
NORM_NAMES = {results.LINF: "Linf", results.L2: "L2"}


class SpecError(ValueError):
    """The spec cannot be used: str() lists every problem, one per line, by field path."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class EndpointTarget(_Strict):
    url: str = Field(description="http(s)://host:port (REST) or grpc(s)://host:port")
    model_name: str
    model_version: str = ""
    input_shape: list[int] = Field(min_length=1, max_length=3)
    num_classes: int = Field(ge=2)
    input_name: str = ""
    output_name: str = ""
    layout: Literal["", "NCHW", "NHWC"] = ""
    value_range: Literal["", "0-1", "0-255"] = ""
    mean: list[float] = []
    std: list[float] = []
    max_batch_size: int = Field(0, ge=0)
    timeout_seconds: float = Field(0.0, ge=0)
    retries: Optional[int] = Field(None, ge=0)
    backoff_seconds: float = Field(0.0, ge=0)
    max_qps: float = Field(0.0, ge=0)
    credential: str = ""

    @field_validator("url")
    @classmethod
    def _scheme(cls, v: str) -> str:
        if not v.split("://", 1)[0] in ("http", "https", "grpc", "grpcs") or "://" not in v:
            raise ValueError("must start with http://, https://, grpc:// or grpcs://")
        return v


class Target(_Strict):
    model: str = Field("", description="a registered model's id")
    endpoint: Optional[EndpointTarget] = None
    name: str = ""

    @model_validator(mode="after")
    def _one(self) -> "Target":
        if bool(self.model) == (self.endpoint is not None):
            raise ValueError("give exactly one of model (a model id) or endpoint")
        if self.endpoint is not None and not self.name:
            raise ValueError("an endpoint target needs a name (its reports and history are found by it)")
        return self


class Attack(_Strict):
    norm: Literal["Linf", "L2"]
    eps: Union[float, list[float]]
    method: str = ""
    steps: int = Field(0, ge=0)
    step_size: float = Field(0.0, ge=0)
    restarts: int = Field(0, ge=0)
    seed: int = 0

    def eps_list(self) -> list[float]:
        return [float(e) for e in (self.eps if isinstance(self.eps, list) else [self.eps])]


class Threshold(_Strict):
    norm: Literal["Linf", "L2"]
    eps: float = Field(gt=0)
    min_robust_accuracy: float = Field(ge=0, le=1)
    # what is compared with the minimum: the measured accuracy, or the lower end of its 95% interval
    judge: Literal["point", "ci_lower"] = "point"


class AuditSpec(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$")
    dataset: str
    split: str = ""
    limit: int = Field(0, ge=0)
    suite: str = ""
    eps: dict[Literal["Linf", "L2"], list[float]] = Field(default_factory=dict,
                                                           description="with a suite: the radii per norm")
    attacks: list[Attack] = []
    targets: list[Target] = Field(min_length=1)
    thresholds: list[Threshold] = []
    min_clean_accuracy: Optional[float] = Field(None, ge=0, le=1)
    max_drop: Optional[float] = Field(None, ge=0, le=1)
    batch_size: int = Field(0, ge=0)
    output: str = "audit-report"

    @model_validator(mode="after")
    def _attacks(self) -> "AuditSpec":
        if self.suite and self.attacks:
            raise ValueError("give a suite (with eps per norm) or attacks, not both")
        if self.suite and not self.eps:
            raise ValueError("a suite needs eps: the radii per norm, e.g. {Linf: [0.03]}")
        if not self.suite and not self.attacks:
            raise ValueError("give a suite (e.g. autoattack, with eps) or attacks")
        for values in self.eps.values():
            if not values or any(not (math.isfinite(v) and v > 0) for v in values):
                raise ValueError("eps: each norm needs radii > 0")
        return self

    def attack_dicts(self) -> list[dict]:
        if self.suite:
            return [{"norm": norm, "eps": list(values)} for norm, values in self.eps.items()]
        return [{k: v for k, v in a.model_dump().items() if k != "eps"} | {"eps": a.eps_list()}
                for a in self.attacks]


def load_spec(path: Union[str, Path]) -> tuple[AuditSpec, str]:
    """The checked spec and its text; SpecError naming every problem by its place in the file."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise SpecError(f"{path}: cannot read the spec ({getattr(exc, 'strerror', None) or exc})") from None
    if len(text) > MAX_SPEC_BYTES:
        raise SpecError(f"{path}: {len(text)} characters; a spec has at most {MAX_SPEC_BYTES} (the server keeps it)")
    try:
        data = yaml.safe_load(text)  # plain data only: no Python objects from YAML tags
    except yaml.YAMLError as exc:
        raise SpecError(f"{path}: not valid YAML: {' '.join(str(exc).split())}") from None
    except RecursionError:
        raise SpecError(f"{path}: nested too deeply to be a spec") from None
    if not isinstance(data, dict):
        raise SpecError(f"{path}: the spec must be a mapping of fields (name, dataset, targets, ...)")
    try:
        odd = _non_text_keys(data)
    except RecursionError:
        raise SpecError(f"{path}: nested too deeply to be a spec") from None
    if odd:
        raise SpecError(f"{path}: {odd[0]}: a key reads as {odd[1]!r}, not text (YAML takes on, off, yes, no, y, n "
                        "unquoted as true or false): quote it or rename it")
    try:
        return AuditSpec.model_validate(data), text
    except RecursionError:
        raise SpecError(f"{path}: nested too deeply to be a spec") from None
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            where = ".".join(str(p) for p in err["loc"]) or "spec"
            lines.append(f"{path}: {where}: {err['msg']}")
        raise SpecError("\n".join(lines)) from None


def _non_text_keys(value, where: str = "spec"):
    """(place, key) of the first mapping key that YAML did not read as text, or None."""
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                return where, key
            found = _non_text_keys(item, f"{where}.{key}" if where != "spec" else key)
            if found:
                return found
    elif isinstance(value, list):
        for k, item in enumerate(value):
            found = _non_text_keys(item, f"{where}.{k}")
            if found:
                return found
    return None


def register_targets(client, spec: AuditSpec) -> list[dict]:
    """Model ids for the spec's targets (endpoints registered, or found registered: the same
    url, model and version keep one id)."""
    out = []
    for t in spec.targets:
        if t.endpoint is None:
            out.append({"model_id": t.model, "name": t.name or t.model, "kind": "model"})
            continue
        e = t.endpoint
        model = client.register_endpoint(
            e.url, e.model_name, model_version=e.model_version, input_shape=e.input_shape, num_classes=e.num_classes,
            input_name=e.input_name, output_name=e.output_name, name=t.name, layout=e.layout,
            value_range=e.value_range, mean=e.mean, std=e.std, max_batch_size=e.max_batch_size,
            timeout_seconds=e.timeout_seconds, retries=e.retries, backoff_seconds=e.backoff_seconds,
            max_qps=e.max_qps, credential=e.credential)
        out.append({"model_id": model.id, "name": t.name, "kind": "endpoint"})
    return out


def run(client, spec: AuditSpec, spec_text: str, *, progress: Optional[bool] = None
        ) -> tuple[results.AuditResult, str, dict[str, str]]:
    """Register the endpoints, run the audit on the server and wait: (result, operation id,
    model id -> "model" or "endpoint")."""
    targets = register_targets(client, spec)
    op = client.audit(spec.name, [{"model_id": t["model_id"], "name": t["name"]} for t in targets], spec.dataset,
                      attacks=spec.attack_dicts(), suite=spec.suite, split=spec.split, limit=spec.limit,
                      thresholds=[{"norm": th.norm, "eps": th.eps, "min_robust_accuracy": th.min_robust_accuracy,
                                   "on_ci_lower": th.judge == "ci_lower"} for th in spec.thresholds],
                      min_clean_accuracy=spec.min_clean_accuracy, max_drop=spec.max_drop,
                      batch_size=spec.batch_size, spec_text=spec_text)
    return op.result(progress=progress), op.id, {t["model_id"]: t["kind"] for t in targets}


# ---------------------------------------------------------------- the report's data

def _time(ts) -> str:
    return _dt.datetime.fromtimestamp(ts.seconds + ts.nanos / 1e9, _dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _ci(message, field: str) -> Optional[list[float]]:
    return [getattr(message, field).lower, getattr(message, field).upper] if message.HasField(field) else None


def robust_rows(ev: results.EvaluateResult) -> list[dict]:
    return [{"norm": NORM_NAMES.get(wc.norm, "?"), "eps": wc.eps, "accuracy": wc.robust_accuracy,
             "correct": wc.robust_correct, "n": ev.num_examples, "ci": _ci(wc, "robust_accuracy_ci")}
            for wc in ev.worst_case]


def history_entry(record: results.AuditRecord) -> dict:
    ev = record.evaluation
    return {"time": _time(record.create_time), "audit_id": record.id, "passed": record.passed,
            "clean": ev.clean_accuracy,
            "robust": [{k: r[k] for k in ("norm", "eps", "accuracy", "ci")} for r in robust_rows(ev)]}


def target_entry(record: results.AuditRecord, history: list[results.AuditRecord], kind: str,
                 baseline: Optional[results.AuditRecord]) -> dict:
    import json

    ev = record.evaluation
    identity: dict = {"sha256": record.model_sha256}
    if record.endpoint_metadata_json:
        meta = json.loads(record.endpoint_metadata_json)
        identity["endpoint"] = {"url": meta.get("url", ""), "model_name": meta.get("model_name", ""),
                                "model_version": meta.get("model_version", ""),
                                "platform": (meta.get("model") or {}).get("platform", "")}
    usage = ev.endpoint_usage if ev.HasField("endpoint_usage") else None
    return {
        "name": record.target_name, "model_id": record.model_id, "kind": kind, "identity": identity,
        "passed": record.passed,
        "clean": {"accuracy": ev.clean_accuracy, "correct": ev.clean_correct, "n": ev.num_examples,
                  "ci": _ci(ev, "clean_accuracy_ci")},
        "robust": robust_rows(ev),
        "attacks": [{"method": r.attack.method, "norm": NORM_NAMES.get(r.attack.norm, "?"), "eps": r.attack.eps,
                     "accuracy": r.robust_accuracy, "ci": _ci(r, "robust_accuracy_ci"),
                     "mean_queries": r.mean_queries, "suite": r.suite} for r in ev.robust],
        "checks": [{"kind": c.kind, "norm": NORM_NAMES.get(c.norm, ""), "eps": c.eps, "on": c.on,
                    "measured": c.measured, "limit": c.limit, "passed": c.passed, "message": c.message,
                    **({"baseline": c.baseline} if c.kind == "max_drop" and record.baseline_audit_id else {})}
                   for c in record.checks],
        "baseline": ({"audit_id": baseline.id, "time": _time(baseline.create_time)} if baseline is not None
                     else None),
        "queries": ({"requests": usage.requests, "rows": usage.rows, "retries": usage.retries}
                    if usage is not None else None),
        "skipped": [{"method": s.attack.method, "norm": NORM_NAMES.get(s.attack.norm, "?"), "eps": s.attack.eps,
                     "reason": s.reason} for s in ev.skipped],
        "notes": list(ev.notes),
        "history": [history_entry(h) for h in history],
    }


def report_data(client, spec: Optional[AuditSpec], result: results.AuditResult, operation_id: str = "",
                kinds: Optional[dict[str, str]] = None) -> dict:
    """The report's data (what report.json holds): every target with its history from the server.
    spec: the audit's spec, or None for an audit run through the SDK (name, data and suite are then
    read from the result). kinds: model id -> "model" or "endpoint" (default "model")."""
    kinds = kinds or {}
    targets = []
    for record in result.records:
        history = client.list_audits(target=record.model_id, audit_name=record.audit_name, limit=HISTORY_LIMIT)
        history = sorted(history, key=lambda r: (r.create_time.seconds, r.create_time.nanos, r.id))
        baseline = next((h for h in history if h.id == record.baseline_audit_id), None)
        targets.append(target_entry(record, history, kinds.get(record.model_id, "model"), baseline))
    first = result.records[0] if result.records else None
    ev = first.evaluation if first else None
    if spec is not None:
        name, dataset, split, limit, suite = spec.name, spec.dataset, spec.split, spec.limit, spec.suite
    else:
        name, dataset, split = result.audit_name, ev.dataset_id if ev else "", ev.split if ev else ""
        limit, suite = ev.num_examples if ev else 0, next((r.suite for r in ev.robust if r.suite), "") if ev else ""
    return {
        "audit": name, "passed": result.passed,
        "time": _time(first.create_time) if first else "",
        "server": getattr(client, "target", ""), "operation_id": operation_id,
        "dataset": {"id": dataset, "split": ev.split if ev else split, "limit": limit},
        "suite": suite,
        "targets": targets,
    }
