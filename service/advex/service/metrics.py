"""Prometheus metrics: requests by method and code, latency, operations by kind and state,
images processed, queue depth, GPU memory, and the last measured clean / robust accuracy
per model, dataset, norm and eps (what scheduled audits alert on)."""
from __future__ import annotations

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
        self.queue_depth = Gauge("advex_queue_depth", "Queued + running work items", ["pool"], registry=r)
        self.gpu_memory = Gauge("advex_gpu_memory_bytes", "GPU memory allocated by the engine", registry=r)
        self.clean_accuracy = Gauge("advex_clean_accuracy", "Last measured clean accuracy", ["model", "dataset"],
                                    registry=r)
        self.robust_accuracy = Gauge("advex_robust_accuracy", "Last measured robust accuracy (suite-wide worst case)",
                                     ["model", "dataset", "norm", "eps"], registry=r)
        self.execution_provider = Gauge("advex_model_execution_provider",
                                        "1 for the onnxruntime execution provider that runs each ONNX model",
                                        ["model", "provider"], registry=r)
        self.gpu_memory.set_function(_gpu_memory)

    def serve(self, port: int, host: str = "127.0.0.1"):
        """Start the /metrics HTTP endpoint; returns (server, thread)."""
        return start_http_server(port, addr=host, registry=self.registry)


def _gpu_memory() -> float:
    try:
        import torch

        return float(torch.cuda.memory_allocated()) if torch.cuda.is_available() else 0.0
    except Exception:  # metrics must never fail a scrape
        return 0.0
