"""Prometheus metrics: requests by method and code, latency (of calls that do not wait by design:
streams and WaitOperation are left out), operations by kind and state and their duration, build
info,
images processed, queue depth, GPU memory, the last measured clean / robust accuracy per model,
dataset, norm and eps with its time, and each audit's results, verdict and time (what scheduled
audits alert on: a breach, and an audit that stopped running).

The accuracy and audit gauges are per model: `restore` sets them from the store at startup (they
survive a restart), and `forget_model` removes every series of a deleted model."""
from __future__ import annotations

import threading
from collections import defaultdict

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("advex_requests_total", "RPCs handled", ["method", "code"], registry=r)
        self.latency = Histogram("advex_request_latency_seconds", "RPC latency", ["method"], registry=r,
                                 buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
        self.operations = Counter("advex_operations_total", "Operations that reached a state", ["kind", "state"],
                                  registry=r)
        self.images = Counter("advex_images_processed_total", "Images run through attacks, training or evaluation",
                              ["kind"], registry=r)
        self.attack_batch_calls = Histogram("advex_attack_batch_calls", "Attack calls merged into each engine batch",
                                            registry=r, buckets=(1, 2, 4, 8, 16, 32, 64, 128))
        self.queue_depth = Gauge("advex_queue_depth", "Queued + running work items", ["pool"], registry=r)
        self.gpu_memory = Gauge("advex_gpu_memory_bytes", "GPU memory allocated by the engine", registry=r)
        self.clean_accuracy = Gauge("advex_clean_accuracy", "Last measured clean accuracy", ["model", "dataset"],
                                    registry=r)
        self.robust_accuracy = Gauge("advex_robust_accuracy", "Last measured robust accuracy (suite-wide worst case)",
                                     ["model", "dataset", "norm", "eps"], registry=r)
        self.execution_provider = Gauge("advex_model_execution_provider_info",
                                        "1 for the onnxruntime execution provider that runs each ONNX model",
                                        ["model", "provider"], registry=r)
        self.operation_duration = Histogram(
            "advex_operation_duration_seconds", "Wall time of operations from start to end, by kind and final state",
            ["kind", "state"], registry=r,
            buckets=(1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200, 21600, 86400))
        self.build_info = Gauge("advex_build_info", "1, labelled with the versions this server runs",
                                ["version", "python", "torch", "grpc", "device"], registry=r)
        self.accuracy_time = Gauge("advex_accuracy_timestamp_seconds",
                                   "When the accuracies of a model on a dataset were last measured (Unix time)",
                                   ["model", "dataset"], registry=r)
        self.audit_robust = Gauge("advex_audit_robust_accuracy",
                                  "Robust accuracy (worst case over the audit's attacks) in the last audit of a target",
                                  ["target", "audit", "dataset", "norm", "eps", "suite"], registry=r)
        self.audit_clean = Gauge("advex_audit_clean_accuracy", "Clean accuracy in the last audit of a target",
                                 ["target", "audit", "dataset"], registry=r)
        self.audit_passed = Gauge("advex_audit_passed", "1 when the last audit of a target passed every check, else 0",
                                  ["target", "audit"], registry=r)
        self.audit_time = Gauge("advex_audit_last_run_timestamp_seconds", "When a target was last audited (Unix time)",
                                ["target", "audit"], registry=r)
        self.gpu_memory.set_function(_gpu_memory)
        self._series: dict[str, set] = defaultdict(set)  # model id -> (gauge, labels) it set
        self._series_lock = threading.Lock()

    def _set(self, model_id: str, gauge: Gauge, labels: tuple, value: float) -> None:
        gauge.labels(*labels).set(value)
        with self._series_lock:
            self._series[model_id].add((gauge, labels))

    def _drop(self, model_id: str, which) -> None:
        """Remove the series of a model for which which(gauge, labels) is true."""
        with self._series_lock:
            stale = {(g, labels) for g, labels in self._series[model_id] if which(g, labels)}
            self._series[model_id] -= stale
        for gauge, labels in stale:
            gauge.remove(*labels)

    def record_accuracy(self, model_id: str, dataset_id: str, clean: float, robust, when: float) -> None:
        """robust: (norm, eps, accuracy) of each worst case. The series of the previous
        measurement on this dataset go first (its eps may have been others)."""
        self._drop(model_id, lambda g, labels: g is self.robust_accuracy and labels[1] == dataset_id)
        self._set(model_id, self.clean_accuracy, (model_id, dataset_id), clean)
        for norm, eps, acc in robust:
            self._set(model_id, self.robust_accuracy, (model_id, dataset_id, norm, f"{eps:g}"), acc)
        self._set(model_id, self.accuracy_time, (model_id, dataset_id), when)

    def record_audit(self, model_id: str, audit: str, dataset_id: str, suite: str, clean: float, robust,
                     passed: bool, when: float) -> None:
        """A target's audit; robust: (norm, eps, accuracy) of each worst case. The series of the
        target's previous audit under this name go first (its eps may have been others)."""
        self._drop(model_id, lambda g, labels: g in (self.audit_robust, self.audit_clean) and labels[1] == audit)
        self._set(model_id, self.audit_clean, (model_id, audit, dataset_id), clean)
        for norm, eps, acc in robust:
            self._set(model_id, self.audit_robust, (model_id, audit, dataset_id, norm, f"{eps:g}", suite), acc)
        self._set(model_id, self.audit_passed, (model_id, audit), 1.0 if passed else 0.0)
        self._set(model_id, self.audit_time, (model_id, audit), when)

    def forget_model(self, model_id: str) -> None:
        """Remove every accuracy and audit series of a model (it was deleted)."""
        with self._series_lock:
            series = self._series.pop(model_id, set())
        for gauge, labels in series:
            try:
                gauge.remove(*labels)
            except KeyError:
                pass

    def record_provider(self, model_id: str, provider: str) -> None:
        self._set(model_id, self.execution_provider, (model_id, provider), 1.0)

    def record_build(self, device: str) -> None:
        import platform
        from importlib.metadata import PackageNotFoundError, version

        def ver(dist: str) -> str:
            try:
                return version(dist)
            except PackageNotFoundError:
                return "unknown"

        self.build_info.labels(ver("advex-server"), platform.python_version(), ver("torch"), ver("grpcio"),
                               device).set(1)

    def serve(self, port: int, host: str = "127.0.0.1"):
        """Start the /metrics HTTP endpoint; returns (server, thread)."""
        return start_http_server(port, addr=host, registry=self.registry)


def _gpu_memory() -> float:
    try:
        import torch

        return float(torch.cuda.memory_allocated()) if torch.cuda.is_available() else 0.0
    except Exception:  # metrics must never fail a scrape
        return 0.0
