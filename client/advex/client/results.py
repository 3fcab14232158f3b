"""Results that show themselves where people look at them.

`Operation.result()` hands back the result message wrapped in one of the classes below. A wrapper
reads like its message (every field and method of the message is there: `ev.clean_accuracy`,
`ev.robust[0].attack.eps`, `ev.HasField(...)`; `.proto` is the message itself, for protobuf APIs)
and adds three things:

- `_repr_html_()`: a notebook shows it as tables (values as rates with their 95% intervals);
- `to_pandas()`: the result as a DataFrame with one row per measurement and numbers as numbers
  (pandas is optional: it is imported there, and only there);
- `plot()`: a matplotlib Figure (the `plot` extra), drawn without pyplot, that a notebook shows
  and `plot(path)` also saves as a PNG.

Attack results carry their images: `_repr_html_` and `plot()` show clean, adversarial and
perturbation rows. Nothing here calls the server, except `DatasetBuild.plot()`, which fetches the
examples it draws, and nothing here imports torch.
"""
from __future__ import annotations

import base64
import html
import io
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional, Sequence, Union

import numpy as np

from advex.client.render import fmt_ci, fmt_rate, html_table
from advex.v1 import operation_pb2 as op_pb
from advex.v1 import results_pb2 as results

if TYPE_CHECKING:  # pragma: no cover
    import pandas
    from matplotlib.figure import Figure

__all__ = ["AttackResult", "Audit", "AuditHistory", "DatasetBuild", "Evaluation", "Export", "Training",
           "Transfer", "wrap"]

NOTEBOOK_EXTRA = "advex[notebook]"
_NORMS = {results.LINF: "Linf", results.L2: "L2"}
_STYLE = ("<style>.advex-result{font-size:13px}.advex-result .fail{color:#c0392b;font-weight:600}"
          ".advex-result .pass{color:#2e7d32;font-weight:600}.advex-result td.num{text-align:right;"
          "font-variant-numeric:tabular-nums}.advex-result p{margin:4px 0}</style>")


def _pandas():
    try:
        import pandas
    except ImportError:
        raise ImportError(f"to_pandas() needs pandas: pip install '{NOTEBOOK_EXTRA}'") from None
    return pandas


def _norm(value: int) -> str:
    return _NORMS.get(value, "")


def _ci(message, name: str) -> tuple[float, float]:
    """An Interval field as (lower, upper); (nan, nan) when the server left it unset."""
    if not message.HasField(name):
        return math.nan, math.nan
    ci = getattr(message, name)
    return ci.lower, ci.upper


def _rate_ci(message, value: float, name: str) -> str:
    return f"{fmt_rate(value)} ({fmt_ci(message, name)})" if message.HasField(name) else fmt_rate(value)


def _h(text: object) -> str:
    return html.escape(str(text), quote=True)


def _block(title: str, lines: Sequence[str], tables: Sequence[str] = (), verdict: Optional[bool] = None) -> str:
    """One result as HTML: a bold title (with PASSED / FAILED when judged), lines of text, tables."""
    badge = "" if verdict is None else (' <span class="pass">PASSED</span>' if verdict
                                        else ' <span class="fail">FAILED</span>')
    out = [_STYLE, '<div class="advex-result">', f"<p><b>{_h(title)}</b>{badge}</p>"]
    out += [f"<p>{_h(line)}</p>" for line in lines if line]
    out += list(tables)
    out.append("</div>")
    return "\n".join(out)


def _key_values(pairs: Sequence[tuple[str, object]]) -> str:
    """A two-column table of names and values, without a head."""
    return html_table(["", ""], [[k, v] for k, v in pairs], header=False)


def _png_img(fig, alt: str) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi="figure")
    data = base64.b64encode(buf.getvalue()).decode("ascii")
    return f'<img alt="{_h(alt)}" src="data:image/png;base64,{data}">'


class Result:
    """A result message that reads like the message (every field, every method) and shows itself:
    `_repr_html_`, `to_pandas()`, `plot()`. `.proto` is the message."""

    def __init__(self, proto, client=None, operation_id: str = "") -> None:
        object.__setattr__(self, "proto", proto)
        object.__setattr__(self, "_client", client)
        object.__setattr__(self, "operation_id", operation_id)  # the operation that made it, when known

    def __getattr__(self, name: str) -> Any:
        if name in ("proto", "_client", "operation_id"):  # not set yet (copy, unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.proto, name)

    def __dir__(self) -> list[str]:
        return sorted(set(super().__dir__()) | set(dir(self.proto)))

    def __eq__(self, other: object) -> bool:
        return self.proto == (other.proto if isinstance(other, Result) else other)

    __hash__ = None  # type: ignore[assignment]  (like the message: mutable, unhashable)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self._summary()}>"

    def _summary(self) -> str:
        return type(self.proto).__name__

    def _repr_html_(self) -> str:
        raise NotImplementedError

    def to_pandas(self) -> "pandas.DataFrame":
        return _pandas().DataFrame.from_records(self._records(), columns=self._columns)

    _columns: Sequence[str] = ()

    def _records(self) -> list[dict]:
        """The rows of to_pandas(); by default one row of the message's fields named in _columns."""
        return [{k: getattr(self.proto, k) for k in self._columns}]



# ----------------------------------------------------------------------------- Evaluate

class Evaluation(Result):
    """Evaluate's result (an EvaluateResult): clean accuracy, and robust accuracy per attack and eps
    with 95% intervals. `to_pandas()` has one row per attack and eps (`to_pandas("worst_case")`: per
    norm and eps, the worst over the attacks); `plot()` draws robust accuracy over eps per norm."""

    _columns = ("attack", "suite", "norm", "eps", "steps", "robust_accuracy", "ci_lower", "ci_upper",
                "robust_correct", "total", "success_rate", "mean_queries", "wall_seconds")
    _worst_columns = ("norm", "eps", "robust_accuracy", "ci_lower", "ci_upper", "robust_correct", "total")

    def _summary(self) -> str:
        ev = self.proto
        return (f"{ev.model_id} on {ev.dataset_id}/{ev.split} ({ev.num_examples} examples): clean "
                f"{fmt_rate(ev.clean_accuracy)}, {len(ev.robust)} robust measurement(s)")

    def _records(self) -> list[dict]:
        return [{"attack": r.attack.method, "suite": r.suite, "norm": _norm(r.attack.norm), "eps": r.attack.eps,
                 "steps": r.attack.steps, "robust_accuracy": r.robust_accuracy,
                 "ci_lower": _ci(r, "robust_accuracy_ci")[0], "ci_upper": _ci(r, "robust_accuracy_ci")[1],
                 "robust_correct": r.robust_correct, "total": r.total, "success_rate": r.success_rate,
                 "mean_queries": r.mean_queries, "wall_seconds": r.wall_seconds} for r in self.proto.robust]

    def to_pandas(self, table: str = "robust") -> "pandas.DataFrame":
        """table "robust": a row per attack and eps; "worst_case": a row per norm and eps, an example
        counting as robust only when it survived every attack there."""
        if table == "robust":
            return super().to_pandas()
        if table != "worst_case":
            raise ValueError(f"table must be 'robust' or 'worst_case', got {table!r}")
        rows = [{"norm": _norm(w.norm), "eps": w.eps, "robust_accuracy": w.robust_accuracy,
                 "ci_lower": _ci(w, "robust_accuracy_ci")[0], "ci_upper": _ci(w, "robust_accuracy_ci")[1],
                 "robust_correct": w.robust_correct, "total": self.proto.num_examples}
                for w in self.proto.worst_case]
        return _pandas().DataFrame.from_records(rows, columns=self._worst_columns)

    def _repr_html_(self) -> str:
        ev = self.proto
        lines = [f"model {ev.model_id} on {ev.dataset_id}/{ev.split or 'default split'}: {ev.num_examples} "
                 f"examples, {ev.wall_seconds:.1f} s on {ev.device or 'the server'}",
                 f"clean accuracy {_rate_ci(ev, ev.clean_accuracy, 'clean_accuracy_ci')} "
                 f"({ev.clean_correct} of {ev.num_examples})"]
        rows = [[r.suite or r.attack.method, _norm(r.attack.norm), f"{r.attack.eps:.4g}",
                 _rate_ci(r, r.robust_accuracy, "robust_accuracy_ci"), f"{r.robust_correct} of {r.total}",
                 fmt_rate(r.success_rate), f"{r.wall_seconds:.1f}"] for r in ev.robust]
        tables = []
        if rows:
            tables.append(html_table(["attack", "norm", "eps", "robust accuracy (95% CI)", "correct",
                                      "success rate", "seconds"], rows))
        if len(ev.worst_case) < len(ev.robust):
            tables.append("<p>worst case over the attacks at each radius:</p>")
            tables.append(html_table(["norm", "eps", "robust accuracy (95% CI)", "correct"],
                                     [[_norm(w.norm), f"{w.eps:.4g}", _rate_ci(w, w.robust_accuracy,
                                                                                "robust_accuracy_ci"),
                                       f"{w.robust_correct} of {ev.num_examples}"] for w in ev.worst_case]))
        if ev.gradient_masking_suspected:
            lines.append("warning: gradient masking suspected (see the notes)")
        lines += [f"note: {n}" for n in ev.notes]
        lines += [f"skipped {s.attack.method} {_norm(s.attack.norm)} eps {s.attack.eps:.4g}: {s.reason}"
                  for s in ev.skipped]
        return _block("Evaluate", lines, tables)

    def plot(self, path: Union[str, Path, None] = None, *, title: str = "") -> "Figure":
        """Accuracy over eps, one panel per norm: clean accuracy at eps 0, then the worst case over the
        attacks at each eps, with 95% whiskers (the audit report's chart)."""
        from advex.client import audit, audit_report

        ev = self.proto
        target = {"robust": audit.robust_rows(ev), "checks": [],
                  "clean": {"accuracy": ev.clean_accuracy, "ci": list(_ci(ev, "clean_accuracy_ci"))
                            if ev.HasField("clean_accuracy_ci") else None}}
        return audit_report.draw_robust(target, path, title=title or f"{ev.model_id} on {ev.dataset_id}")


# ----------------------------------------------------------------------------- TransferRate

class Transfer(Result):
    """TransferRate's result: one pair per (source, target). `to_pandas()` has a row per pair with
    every rate and its interval; `plot()` is the matrix as a heat map."""

    _rates = ("transfer_rate", "conditional_transfer_rate", "unconditional_rate", "white_box_success_rate")
    _columns = ("source_model_id", "target_model_id", "examples", "correct_on_source", "correct_on_target",
                "successful_on_source", "transferred", "fooled_target") + tuple(
        f"{r}{suffix}" for r in _rates for suffix in ("", "_ci_lower", "_ci_upper"))

    def _summary(self) -> str:
        return f"{len(self.proto.pairs)} pair(s) on {self.proto.dataset_id}"

    def _records(self) -> list[dict]:
        out = []
        for p in self.proto.pairs:
            row = {k: getattr(p, k) for k in self._columns[:8]}
            for r in self._rates:
                row[r] = getattr(p, r)
                row[f"{r}_ci_lower"], row[f"{r}_ci_upper"] = _ci(p, f"{r}_ci")
            out.append(row)
        return out

    def _matrix(self, rate: str) -> tuple[list[str], list[str], dict]:
        if rate not in self._rates:
            raise ValueError(f"rate must be one of {', '.join(self._rates)}, got {rate!r}")
        sources = list(dict.fromkeys(p.source_model_id for p in self.proto.pairs))
        targets = list(dict.fromkeys(p.target_model_id for p in self.proto.pairs))
        return sources, targets, {(p.source_model_id, p.target_model_id): p for p in self.proto.pairs}

    def _repr_html_(self, rate: str = "transfer_rate") -> str:
        sources, targets, pairs = self._matrix(rate)
        rows = [[s] + [_rate_ci(pairs[s, t], getattr(pairs[s, t], rate), f"{rate}_ci") if (s, t) in pairs
                       else "" for t in targets] for s in sources]
        a = self.proto.attack
        lines = [f"{rate.replace('_', ' ')} of {a.method} {_norm(a.norm)} eps {a.eps:.4g} on "
                 f"{self.proto.dataset_id}/{self.proto.split or 'default split'}: rows are sources, columns "
                 "targets", self.proto.definition]
        return _block("TransferRate", lines, [html_table(["source \\ target"] + targets, rows)])

    def plot(self, path: Union[str, Path, None] = None, *, rate: str = "transfer_rate",
             title: str = "") -> "Figure":
        """The rate (transfer_rate, conditional_transfer_rate, unconditional_rate or
        white_box_success_rate) of every source (rows) on every target (columns)."""
        from advex.client import plots

        sources, targets, pairs = self._matrix(rate)
        values = [[getattr(pairs[s, t], rate) if (s, t) in pairs and _defined(pairs[s, t], rate) else None
                   for t in targets] for s in sources]
        return plots.heatmap(values, sources, targets, path, title=title or rate.replace("_", " "),
                             xlabel="target model", ylabel="source model", label=rate.replace("_", " "))


def _defined(pair, rate: str) -> bool:
    """A rate over nothing (no interval: 0 successes, 0 examples) is not measured, not 0%."""
    return pair.HasField(f"{rate}_ci")


# ----------------------------------------------------------------------------- builds, training, export

class DatasetBuild(Result):
    """Robustify's or BuildNonRobustDataset's result (a DatasetBuildResult). `plot()` fetches the
    first examples of the new dataset and shows them with their labels."""

    _columns = ("dataset_id", "mode", "num_examples", "target_hit_rate", "mean_l2", "max_l2",
                "mean_l2_from_start", "feature_distance_mean", "feature_distance_p95",
                "feature_distance_start_mean", "wall_seconds", "device")

    def _summary(self) -> str:
        return f"{self.proto.mode} dataset {self.proto.dataset_id} ({self.proto.num_examples} examples)"

    def _repr_html_(self) -> str:
        b = self.proto
        pairs = [("dataset", b.dataset_id), ("mode", b.mode), ("examples", b.num_examples)]
        if b.mode in ("D_rand", "D_det") or b.target_hit_rate:
            pairs.append(("target hit rate", fmt_rate(b.target_hit_rate)))
        pairs += [("mean / max L2 change", f"{b.mean_l2:.3g} / {b.max_l2:.3g}")]
        if b.feature_distance_mean or b.feature_distance_start_mean:
            pairs += [("feature distance (mean, p95)", f"{b.feature_distance_mean:.3g}, {b.feature_distance_p95:.3g}"),
                      ("feature distance at the start", f"{b.feature_distance_start_mean:.3g}"),
                      ("mean L2 from the start", f"{b.mean_l2_from_start:.3g}")]
        pairs.append(("time", f"{b.wall_seconds:.1f} s on {b.device or 'the server'}"))
        return _block(f"Dataset build ({b.mode})", [], [_key_values(pairs)])

    def plot(self, path: Union[str, Path, None] = None, *, n: int = 10, split: str = "",
             class_names: Sequence[str] = (), title: str = "") -> "Figure":
        """The new dataset's first `n` examples with their labels (one download of n examples)."""
        from advex.client import plots

        if self._client is None:
            raise RuntimeError("this result has no client to fetch the dataset from")
        x, y = self._client._blocking().download_dataset(self.proto.dataset_id, split, limit=n)
        names = [_class_name(k, class_names) for k in y]
        return plots.image_rows([(self.proto.mode, _as_unit(x), [f"label {c}" for c in names])], path,
                                title=title or f"{self.proto.mode}: {self.proto.dataset_id}")


class Training(Result):
    """Train's result: `to_pandas()` is the history, a row per epoch; `plot()` its curves."""

    _columns = ("epoch", "train_loss", "train_accuracy", "train_robust_accuracy", "lr", "wall_seconds")

    def _summary(self) -> str:
        return f"model {self.proto.model_id} after {len(self.proto.history)} epoch(s)"

    def _records(self) -> list[dict]:
        return [{k: getattr(e, k) for k in self._columns} for e in self.proto.history]

    def _robust(self) -> bool:
        return any(e.train_robust_accuracy for e in self.proto.history)

    def _repr_html_(self) -> str:
        t = self.proto
        headers = ["epoch", "loss", "accuracy"] + (["robust accuracy"] if self._robust() else []) + ["lr", "seconds"]
        rows = [[e.epoch, f"{e.train_loss:.4f}", fmt_rate(e.train_accuracy)]
                + ([fmt_rate(e.train_robust_accuracy)] if self._robust() else [])
                + [f"{e.lr:.4g}", f"{e.wall_seconds:.1f}"] for e in t.history]
        return _block("Train", [f"model {t.model_id} (sha256 {t.model_sha256[:12]}), {t.wall_seconds:.1f} s on "
                                f"{t.device or 'the server'}"], [html_table(headers, rows)])

    def plot(self, path: Union[str, Path, None] = None, *, title: str = "") -> "Figure":
        from advex.client import plots

        h = self.proto.history
        series = {"train loss": [e.train_loss for e in h], "train accuracy": [e.train_accuracy for e in h]}
        if self._robust():
            series["train robust accuracy"] = [e.train_robust_accuracy for e in h]
        return plots.curves([e.epoch for e in h], series, path, xlabel="epoch",
                            title=title or f"training of {self.proto.model_id}",
                            percent=("train accuracy", "train robust accuracy"))


class Export(Result):
    """ExportModel's result: the ONNX model and how often it agrees with its source."""

    _columns = ("model_id", "source_model_id", "examples", "agreement_rate", "disagreements",
                "max_abs_logit_difference", "execution_provider", "wall_seconds")

    def _summary(self) -> str:
        return f"{self.proto.model_id} from {self.proto.source_model_id}: agreement {fmt_rate(self.proto.agreement_rate)}"

    def _repr_html_(self) -> str:
        e = self.proto
        return _block("ExportModel", [], [_key_values([
            ("ONNX model", e.model_id), ("source model", e.source_model_id),
            ("agreement", f"{fmt_rate(e.agreement_rate)} of {e.examples} ({e.disagreements} disagree)"),
            ("max |logit difference|", f"{e.max_abs_logit_difference:.3g}"),
            ("execution provider", e.execution_provider)])])


# ----------------------------------------------------------------------------- audits

def _target_name(record) -> str:
    return record.target_name or record.model_id


class Audit(Result):
    """Audit's result: a verdict per target with its checks. `to_pandas()` has a row per check;
    `plot(target)` draws the target's accuracy over eps with the thresholds marked."""

    _columns = ("audit_name", "target", "model_id", "target_passed", "check", "norm", "eps", "on", "measured",
                "limit", "baseline", "passed", "message")

    def _summary(self) -> str:
        return f"{self.proto.audit_name!r} {'PASSED' if self.proto.passed else 'FAILED'} ({len(self.proto.records)} target(s))"

    def _records(self) -> list[dict]:
        return [{"audit_name": r.audit_name, "target": _target_name(r), "model_id": r.model_id,
                 "target_passed": r.passed, "check": c.kind, "norm": _norm(c.norm), "eps": c.eps, "on": c.on,
                 "measured": c.measured, "limit": c.limit,
                 "baseline": c.baseline if c.kind == "max_drop" and r.baseline_audit_id else math.nan,
                 "passed": c.passed, "message": c.message}
                for r in self.proto.records for c in r.checks]

    def _repr_html_(self) -> str:
        tables = []
        for r in self.proto.records:
            ev = r.evaluation
            verdict = '<span class="pass">pass</span>' if r.passed else '<span class="fail">FAIL</span>'
            tables.append(f"<p>{verdict} <b>{_h(_target_name(r))}</b> ({_h(r.model_id)}): clean "
                          f"{_h(_rate_ci(ev, ev.clean_accuracy, 'clean_accuracy_ci'))}</p>")
            rows = [["ok" if c.passed else "FAIL", c.kind, _norm(c.norm), f"{c.eps:.4g}" if c.norm else "",
                     c.on, f"{c.measured:.4g}", f"{c.limit:.4g}", c.message] for c in r.checks]
            if rows:
                tables.append(html_table(["", "check", "norm", "eps", "on", "measured", "limit", "message"], rows,
                                         failed=[k for k, c in enumerate(r.checks) if not c.passed]))
        return _block(f"Audit {self.proto.audit_name!r}", [], tables, verdict=self.proto.passed)

    def _record(self, target: Union[int, str]):
        records = list(self.proto.records)
        if isinstance(target, int):
            if not -len(records) <= target < len(records):
                raise IndexError(f"target {target} out of range: the audit has {len(records)} target(s)")
            return records[target]
        for r in records:
            if target in (r.model_id, r.target_name):
                return r
        raise KeyError(f"no target {target!r}: the audit's targets are "
                       f"{', '.join(_target_name(r) for r in records) or 'none'}")

    def write_reports(self, out_dir: Union[str, Path]) -> dict[str, Path]:
        """report.html (self-contained), report.md and report.json in out_dir, as `advex audit`
        writes them, each target with its history from the server. Returns their paths."""
        from advex.client import audit, audit_report

        if self._client is None:
            raise RuntimeError("this result has no client to read the targets' histories from")
        data = audit.report_data(self._client._blocking(), None, self.proto, self.operation_id)
        return audit_report.write_reports(data, out_dir)

    def plot(self, path: Union[str, Path, None] = None, *, target: Union[int, str] = 0,
             title: str = "") -> "Figure":
        """One target's (an index, a model id or a target name) accuracy over eps: clean at eps 0,
        the worst case per eps with 95% whiskers, and each threshold marked met or failed."""
        from advex.client import audit, audit_report

        record = self._record(target)
        entry = audit.target_entry(record, [], "model", None)
        verdict = "passed" if record.passed else "FAILED"
        return audit_report.draw_robust(entry, path, title=title or f"{_target_name(record)}: {verdict}")


class AuditHistory(list):
    """Audit records (list_audits), newest first as the server lists them: a list, with a table,
    `to_pandas()` (a row per record and radius) and `plot()` (the trend of one audit of one model)."""

    _columns = ("time", "audit_name", "target", "model_id", "audit_id", "passed", "clean_accuracy", "norm", "eps",
                "robust_accuracy", "ci_lower", "ci_upper")

    def __repr__(self) -> str:
        names = sorted({r.audit_name for r in self})
        return f"<AuditHistory {len(self)} record(s) of {', '.join(repr(n) for n in names) or 'no audit'}>"

    def _entries(self) -> list[tuple[Any, dict]]:
        from advex.client import audit

        ordered = sorted(self, key=lambda r: (r.create_time.seconds, r.create_time.nanos, r.id))
        return [(r, audit.history_entry(r)) for r in ordered]

    def to_pandas(self) -> "pandas.DataFrame":
        rows = []
        for r, e in self._entries():
            base = {"time": _pandas().Timestamp(e["time"]), "audit_name": r.audit_name, "target": _target_name(r),
                    "model_id": r.model_id, "audit_id": r.id, "passed": r.passed, "clean_accuracy": e["clean"]}
            for x in e["robust"] or [{"norm": "", "eps": math.nan, "accuracy": math.nan, "ci": None}]:
                ci = x["ci"] or (math.nan, math.nan)
                rows.append({**base, "norm": x["norm"], "eps": x["eps"], "robust_accuracy": x["accuracy"],
                             "ci_lower": ci[0], "ci_upper": ci[1]})
        return _pandas().DataFrame.from_records(rows, columns=self._columns)

    def _repr_html_(self) -> str:
        from advex.client.audit_report import _history_rows

        groups: dict = {}
        for r, e in self._entries():
            groups.setdefault((r.audit_name, r.model_id, _target_name(r)), []).append(e)
        tables = []
        for (name, model_id, target), entries in groups.items():
            headers, rows = _history_rows(entries)
            tables.append(f"<p>audit <b>{_h(name)}</b> of {_h(target)} ({_h(model_id)}): {len(entries)} run(s)</p>")
            tables.append(html_table(headers, rows, failed=[k for k, e in enumerate(entries) if not e["passed"]]))
        return _block("Audit history", [] if tables else ["no audits"], tables)

    def plot(self, path: Union[str, Path, None] = None, *, audit_name: str = "", model_id: str = "",
             title: str = "") -> "Figure":
        """The trend of one audit of one model over time (robust accuracy per norm and eps, failed
        runs crossed out); audit_name and model_id choose it when the records hold several."""
        from advex.client import audit_report

        chosen = [(r, e) for r, e in self._entries() if (not audit_name or r.audit_name == audit_name)
                  and (not model_id or r.model_id == model_id)]
        groups = sorted({(r.audit_name, r.model_id) for r, _ in chosen})
        if len(groups) != 1:
            raise ValueError("plot() draws one audit of one model; choose with audit_name= and model_id= among: "
                             + (", ".join(f"{a!r} of {m}" for a, m in groups) or "none"))
        name, model = groups[0]
        return audit_report.draw_history([e for _, e in chosen], path, title=title or f"{name}: {model}")


# ----------------------------------------------------------------------------- Attack

@dataclass(eq=False)
class AttackResult:
    """Attack's result, as numpy arrays, with the inputs it was made from (x, y: kept by the client,
    not sent back). A notebook shows the numbers and an image grid: clean, adversarial, perturbation."""

    x_adv: np.ndarray              # float32, shape of x, in [0,1]
    clean_pred: np.ndarray         # int64 [N]
    adv_pred: np.ndarray           # int64 [N]
    success: np.ndarray            # bool [N]
    perturbation_norm: np.ndarray  # float32 [N]
    attack: results.AttackSpec     # settings used, defaults filled in
    model_sha256: str
    queries: Optional[np.ndarray] = None  # int64 [N]: model queries (black-box attacks)
    x: Optional[np.ndarray] = field(default=None, repr=False)  # the inputs, as sent
    y: Optional[np.ndarray] = field(default=None, repr=False)  # the labels (or targets), as sent

    _columns = ("label", "clean_pred", "adv_pred", "success", "perturbation_norm", "queries")

    def __repr__(self) -> str:
        return (f"<AttackResult {self.attack.method} {_norm(self.attack.norm)} eps {self.attack.eps:.4g}: "
                f"{int(np.sum(self.success))} of {len(self.success)} succeeded>")

    def to_pandas(self) -> "pandas.DataFrame":
        """A row per example: its label (or target), the predictions, success, the perturbation's
        size in the attack's norm and (black-box attacks) the queries spent."""
        n = len(self.success)
        labels = np.asarray(self.y).reshape(-1) if self.y is not None else np.full(n, -1)
        queries = self.queries if self.queries is not None else np.zeros(n, dtype=np.int64)
        return _pandas().DataFrame({"label": labels.astype(np.int64), "clean_pred": self.clean_pred,
                                    "adv_pred": self.adv_pred, "success": self.success.astype(bool),
                                    "perturbation_norm": self.perturbation_norm, "queries": queries},
                                   columns=list(self._columns))

    def _rows(self, n: int, class_names: Sequence[str] = ()) -> list[tuple[str, np.ndarray, list[str]]]:
        def name(k) -> str:
            return _class_name(k, class_names)

        k = min(n, len(self.x_adv))
        adv = _as_unit(self.x_adv[:k])
        rows = []
        if self.x is not None and np.shape(self.x)[1:] == np.shape(self.x_adv)[1:]:
            clean = _as_unit(np.asarray(self.x)[:k])
            labels = np.asarray(self.y).reshape(-1) if self.y is not None else self.clean_pred
            rows.append(("clean", clean, [f"{name(labels[i])} -> {name(self.clean_pred[i])}" for i in range(k)]))
        rows.append(("adversarial", adv, [("fooled " if self.success[i] else "") + name(self.adv_pred[i])
                                          for i in range(k)]))
        if rows[0][0] == "clean":
            rows.append(("perturbation", adv - rows[0][1],
                         [f"{_norm(self.attack.norm)} {self.perturbation_norm[i]:.3g}" for i in range(k)]))
        return rows

    def plot(self, path: Union[str, Path, None] = None, *, n: int = 8, class_names: Sequence[str] = (),
             title: str = "") -> "Figure":
        """The first `n` examples in rows: clean (label -> prediction), adversarial (its prediction)
        and the perturbation (around grey, scaled to the row's largest value). Image inputs only;
        class_names name the classes in the captions."""
        from advex.client import plots

        if np.ndim(self.x_adv) != 4:
            raise ValueError(f"plot() shows images [N,C,H,W]; these inputs have shape {np.shape(self.x_adv)}")
        return plots.image_rows(self._rows(n, class_names), path, title=title or repr(self)[1:-1],
                                signed=("perturbation",))

    def _repr_html_(self) -> str:
        n = len(self.success)
        pairs = [("examples", n), ("succeeded", f"{int(np.sum(self.success))} ({fmt_rate(np.mean(self.success))})"
                                   if n else "0"),
                 ("perturbation norm (mean, max)", f"{float(np.mean(self.perturbation_norm)):.3g}, "
                                                   f"{float(np.max(self.perturbation_norm)):.3g}" if n else "n/a")]
        if self.queries is not None and n:
            pairs.append(("mean queries", f"{float(np.mean(self.queries)):.1f}"))
        tables = [_key_values(pairs)]
        if n and np.ndim(self.x_adv) == 4:
            from advex.client.plots import missing_plot_extra

            missing = missing_plot_extra()
            tables.append(f"<p>{_h(missing)}</p>" if missing else _png_img(self.plot(), "clean, adversarial and "
                                                                                         "perturbation images"))
        a = self.attack
        return _block(f"Attack: {a.method} {_norm(a.norm)} eps {a.eps:.4g}", [], tables)


def _class_name(k, class_names: Sequence[str]) -> str:
    return str(class_names[int(k)]) if 0 <= int(k) < len(class_names) else str(int(k))


def _as_unit(x: np.ndarray) -> np.ndarray:
    """Images as float in [0,1] (uint8 inputs are scaled)."""
    x = np.asarray(x)
    return x.astype(np.float32) / 255.0 if x.dtype == np.uint8 else x.astype(np.float32)


# ----------------------------------------------------------------------------- wrapping

_KINDS: dict[type, Callable] = {
    results.EvaluateResult: Evaluation,
    results.TransferRateResult: Transfer,
    results.DatasetBuildResult: DatasetBuild,
    results.TrainResult: Training,
    results.ExportResult: Export,
    results.AuditResult: Audit,
}


def wrap(message, client=None, operation_id: str = ""):
    """The result class for an operation's result message (the message itself when there is none)."""
    kind = _KINDS.get(type(message))
    return message if kind is None else kind(message, client, operation_id)


def operation_html(op: op_pb.Operation) -> str:
    p = op.progress
    done = f"{p.done}/{p.total} {p.unit}".strip() if p.total else ""
    state = op_pb.Operation.State.Name(op.state)
    error = f": {op.error.message}" if op.error.message else ""
    return _block(f"Operation {op.id}", [f"{op.kind} {state}{error}", f"{p.stage} {done}".strip()])
