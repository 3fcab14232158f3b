"""Audits: an evaluation of each target judged against thresholds and against the target's last
passing audit of the same name, kept as a record per target (advex.v1.AuditRecord).

Checks, per target:
- min_clean_accuracy: clean accuracy >= the minimum.
- min_robust_accuracy (one per threshold): the worst case over the audit's attacks at the
  threshold's norm and eps (or the lower end of its 95% interval, on_ci_lower) >= the minimum.
  A threshold nothing measured on this target (every attack skipped) fails, saying so.
- max_drop: at every norm and eps measured now and in the baseline (the last passing audit of
  this target and name on the same dataset and split), baseline accuracy - accuracy <= max_drop.
  No baseline, or no radius in common with it: nothing to compare, recorded as a passing check
  that says so."""
from __future__ import annotations

import math
import re
import uuid

from google.protobuf import json_format

from advex.service.convert import NORM_NAMES
from advex.service.errors import invalid
from advex.service.registry import check_text, now
from advex.v1 import results_pb2 as results
from advex.v1 import robustness_pb2 as rpc

NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}")
MODEL_ID_SHAPE = re.compile(r"m-[0-9a-f]{12}")  # a target name must not pass for another target's id
BASELINE_SEARCH = 200  # passing records of a target and name searched for one on the same data
MAX_TARGETS = 16
MAX_THRESHOLDS = 64
MAX_SPEC_TEXT = 64 << 10
EPS_MATCH = 1e-9  # thresholds name eps as the request does; compared with this tolerance


def check_request(request: rpc.AuditRequest) -> None:
    """Everything of an AuditRequest that does not need the registry, bounded."""
    if not NAME_PATTERN.fullmatch(request.name):
        raise invalid("name", "required: a letter or digit, then up to 63 letters, digits, '_', '.', '-' "
                              f"(the audit's history key), got {request.name[:80]!r}")
    if not 1 <= len(request.targets) <= MAX_TARGETS:
        raise invalid("targets", f"need 1 to {MAX_TARGETS} targets, got {len(request.targets)}")
    seen = set()
    for k, t in enumerate(request.targets):
        check_text(t.name, f"targets[{k}].name")
        if MODEL_ID_SHAPE.fullmatch(t.name) and t.name != t.model_id:
            raise invalid(f"targets[{k}].name", f"{t.name!r} has the form of a model id: a target's name must not "
                                                "pass for another model (its history is found by name too)")
        if t.model_id in seen:
            raise invalid(f"targets[{k}].model_id", f"{t.model_id!r} is audited twice in one request")
        seen.add(t.model_id)
    if len(request.thresholds) > MAX_THRESHOLDS:
        raise invalid("thresholds", f"at most {MAX_THRESHOLDS}, got {len(request.thresholds)}")
    for k, th in enumerate(request.thresholds):
        if th.norm not in NORM_NAMES:
            raise invalid(f"thresholds[{k}].norm", "required: LINF or L2")
        if not (math.isfinite(th.eps) and th.eps > 0):
            raise invalid(f"thresholds[{k}].eps", f"must be a finite number > 0, got {th.eps}")
        _fraction(th.min_robust_accuracy, f"thresholds[{k}].min_robust_accuracy")
    if request.HasField("min_clean_accuracy"):
        _fraction(request.min_clean_accuracy, "min_clean_accuracy")
    if request.HasField("max_drop"):
        _fraction(request.max_drop, "max_drop")
    if len(request.spec_text.encode("utf-8", "surrogatepass")) > MAX_SPEC_TEXT:
        raise invalid("spec_text", f"at most {MAX_SPEC_TEXT} bytes")


def _fraction(value: float, field: str) -> None:
    if not (math.isfinite(value) and 0.0 <= value <= 1.0):
        raise invalid(field, f"a fraction in [0, 1] (0.5 = 50%), got {value}")


def _radii(sweeps) -> set[tuple[str, float]]:
    return {(c.norm, c.eps) for sw in sweeps for c in sw.configs()}


def _same_eps(a: float, b: float) -> bool:
    return abs(a - b) <= EPS_MATCH * max(1.0, b)


def _has(radii, norm: str, eps: float) -> bool:
    return any(n == norm and _same_eps(e, eps) for n, e in radii)


def _at(by_radius: dict, norm: str, eps: float):
    """The value of by_radius ({(norm, eps): value}) at this norm and eps, or None."""
    return next((v for (n, e), v in by_radius.items() if n == norm and _same_eps(e, eps)), None)


def check_thresholds(request: rpc.AuditRequest, plan, field: str) -> None:
    """Every threshold names a norm and eps the audit evaluates, and a target evaluates something:
    a black box (ONNX graph, endpoint) with only white-box attacks would measure nothing."""
    requested, runnable = _radii(plan.requested), _radii(plan.runnable)
    for k, th in enumerate(request.thresholds):
        norm = NORM_NAMES[th.norm]
        if not _has(requested, norm, th.eps):
            shown = ", ".join(f"{n} {e:g}" for n, e in sorted(requested)) or "none"
            raise invalid(f"thresholds[{k}]", f"{norm} eps {th.eps:g} is not evaluated by this audit (evaluated: "
                                              f"{shown}); add it to the attacks")
    if requested and not runnable:
        raise invalid(f"{field}.model_id", f"model {plan.model.id!r} has no gradients (a black box) and none of the "
                                           "audit's attacks is gradient-free: use suite 'autoattack' (its Square "
                                           "part runs on black boxes) or attacks with method 'square'")


class TargetProgress:
    """An operation context for one target of several: the stage names the target, and progress
    counts this target's own images (its position shows in the stage)."""

    def __init__(self, ctx, k: int, n: int, name: str) -> None:
        self._ctx, self._prefix = ctx, f"target {k + 1}/{n} ({name[:40]})"

    def progress(self, done: int, total: int, unit: str = "images", stage: str = "") -> None:
        self._ctx.progress(done, total, unit, f"{self._prefix}: {stage}" if stage else self._prefix)

    def __getattr__(self, name):
        return getattr(self._ctx, name)


def _pct(v: float) -> str:
    return f"{100 * v:.1f}%"


def baseline(store, model_id: str, request: rpc.AuditRequest) -> "results.AuditRecord | None":
    """The last passing audit of this target and name on the same dataset and split (the number
    of examples may differ: a larger sample is still the same measurement)."""
    split = request.split or "test"
    for blob in store.recent_audits(model_id, request.name, passed_only=True, limit=BASELINE_SEARCH):
        record = results.AuditRecord.FromString(blob)
        if record.evaluation.dataset_id == request.dataset_id and record.evaluation.split == split:
            return record
    return None


def judge(request: rpc.AuditRequest, target: rpc.AuditTarget, model, evaluation: results.EvaluateResult,
          operation_id: str, baseline: "results.AuditRecord | None", identity: tuple[str, str]) -> results.AuditRecord:
    """The record of one target's audit: its checks and verdict. identity: (endpoint metadata
    JSON or "", sha256) of the target as it was audited."""
    record = results.AuditRecord(
        id=f"au-{uuid.uuid4().hex[:12]}", operation_id=operation_id, audit_name=request.name,
        model_id=model.id, target_name=target.name or model.id, model_sha256=identity[1],
        endpoint_metadata_json=identity[0], create_time=now(), evaluation=evaluation,
        request_json=json_format.MessageToJson(request, indent=None, preserving_proto_field_name=True))
    if request.HasField("min_clean_accuracy"):
        acc, limit = evaluation.clean_accuracy, request.min_clean_accuracy
        ok = acc >= limit
        record.checks.add(kind="min_clean_accuracy", on="point", measured=acc, limit=limit, passed=ok,
                          message=f"clean accuracy {_pct(acc)} {'>=' if ok else '<'} minimum {_pct(limit)}")
    worst = {(NORM_NAMES[wc.norm], wc.eps): wc for wc in evaluation.worst_case}
    for th in request.thresholds:
        norm = NORM_NAMES[th.norm]
        wc = _at(worst, norm, th.eps)
        on = "ci_lower" if th.on_ci_lower else "point"
        where = f"{norm} eps {th.eps:g}"
        if wc is None:
            record.checks.add(kind="min_robust_accuracy", norm=th.norm, eps=th.eps, on=on, limit=th.min_robust_accuracy,
                              passed=False, message=f"{where}: not measured (every attack at this radius was "
                                                    "skipped on this target; see the evaluation's skipped list)")
            continue
        if th.on_ci_lower:
            measured = wc.robust_accuracy_ci.lower if wc.HasField("robust_accuracy_ci") else 0.0
            what = "lower 95% bound"
        else:
            measured, what = wc.robust_accuracy, "robust accuracy"
        ok = measured >= th.min_robust_accuracy
        record.checks.add(kind="min_robust_accuracy", norm=th.norm, eps=th.eps, on=on, measured=measured,
                          limit=th.min_robust_accuracy, passed=ok,
                          message=f"{where}: {what} {_pct(measured)} {'>=' if ok else '<'} minimum "
                                  f"{_pct(th.min_robust_accuracy)}")
    if request.HasField("max_drop"):
        if baseline is None:
            record.checks.add(kind="max_drop", on="point", limit=request.max_drop, passed=True,
                              message=f"no earlier passing audit {request.name!r} of this target: nothing to "
                                      "compare with (this one becomes the baseline if it passes)")
        else:
            record.baseline_audit_id = baseline.id
            before = {(NORM_NAMES[wc.norm], wc.eps): wc.robust_accuracy for wc in baseline.evaluation.worst_case}
            compared = 0
            for (norm, eps), wc in sorted(worst.items()):
                base = _at(before, norm, eps)
                if base is None:
                    continue
                compared += 1
                drop = base - wc.robust_accuracy
                ok = drop <= request.max_drop + 1e-12
                record.checks.add(kind="max_drop", norm=wc.norm, eps=eps, on="point", measured=drop,
                                  limit=request.max_drop, baseline=base, passed=ok,
                                  message=f"{norm} eps {eps:g}: {_pct(wc.robust_accuracy)} against {_pct(base)} in "
                                          f"audit {baseline.id}, a drop of {100 * drop:.1f} points "
                                          f"({'within' if ok else 'beyond'} the {100 * request.max_drop:.1f} allowed)")
            if not compared:
                record.checks.add(kind="max_drop", on="point", limit=request.max_drop, passed=True,
                                  message=f"no radius in common with audit {baseline.id}: nothing to compare with")
    record.passed = all(c.passed for c in record.checks)
    return record
