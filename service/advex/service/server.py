"""Assemble and run the gRPC server: servicer, health, reflection, metrics endpoint,
graceful SIGTERM (stop accepting, finish or cancel running work, close the store)."""
from __future__ import annotations

import asyncio
import logging
import signal
from dataclasses import dataclass
from typing import Optional

import grpc
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from advex.engine.models import device_for
from advex.service.config import ServerConfig
from advex.service.metrics import Metrics
from advex.service.operations import OperationManager
from advex.service.registry import Registry
from advex.service.servicer import RobustnessServicer
from advex.service.store import Store
from advex.v1 import robustness_pb2, robustness_pb2_grpc

log = logging.getLogger("advex.server")
SERVICE_NAME = robustness_pb2.DESCRIPTOR.services_by_name["Robustness"].full_name
MAX_MESSAGE = 64 << 20


@dataclass
class RunningServer:
    server: grpc.aio.Server
    port: int
    cfg: ServerConfig
    store: Store
    ops: OperationManager
    metrics: Metrics
    registry: Registry
    health: health.HealthServicer
    metrics_http: Optional[object] = None

    async def stop(self, grace: Optional[float] = None) -> None:
        grace = self.cfg.shutdown_grace_s if grace is None else grace
        pending = self.health.enter_graceful_shutdown()
        if asyncio.iscoroutine(pending):
            await pending
        await self.ops.shutdown(grace)
        await self.server.stop(grace=1.0)
        self.store.close()
        if self.metrics_http is not None:
            self.metrics_http[0].shutdown()


async def start(cfg: ServerConfig) -> RunningServer:
    """Start serving on cfg.host:cfg.port (port 0 = any free port; see .port)."""
    if cfg.torch_threads:
        torch.set_num_threads(cfg.torch_threads)
    device = device_for(cfg.device)
    store = Store(cfg.store_path)
    metrics = Metrics()
    registry = Registry(store, cfg.artifacts, list(cfg.data_roots), device)
    ops = OperationManager(store, metrics, workers=cfg.workers, max_queue=cfg.max_queue)
    ops.start(asyncio.get_running_loop())
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", MAX_MESSAGE),
                                      ("grpc.max_send_message_length", MAX_MESSAGE)])
    robustness_pb2_grpc.add_RobustnessServicer_to_server(
        RobustnessServicer(cfg, registry, ops, metrics, device), server)
    health_servicer = health.aio.HealthServicer() if hasattr(health, "aio") else health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection((SERVICE_NAME, reflection.SERVICE_NAME, health.SERVICE_NAME), server)
    port = server.add_insecure_port(f"{cfg.host}:{cfg.port}")
    if port == 0:
        raise RuntimeError(f"cannot listen on {cfg.host}:{cfg.port}")
    await server.start()
    for name in ("", SERVICE_NAME):
        res = health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
        if asyncio.iscoroutine(res):
            await res
    metrics_http = metrics.serve(cfg.metrics_port, cfg.host) if cfg.metrics_port else None
    log.info("advex serving on %s:%d (device %s, data dir %s, datasets %s)", cfg.host, port, device,
             cfg.data_dir, sorted(registry.builtins))
    return RunningServer(server, port, cfg, store, ops, metrics, registry, health_servicer, metrics_http)


async def serve(cfg: ServerConfig, ready: Optional[asyncio.Event] = None) -> None:
    """Run until SIGTERM / SIGINT, then shut down gracefully."""
    running = await start(cfg)
    print(f"advex: serving on {cfg.host}:{running.port}"
          + (f", metrics on http://{cfg.host}:{cfg.metrics_port}/metrics" if cfg.metrics_port else ""), flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):  # not the main thread
            pass
    if ready is not None:
        ready.set()
    await stop.wait()
    print("advex: shutting down (finishing or cancelling running work)", flush=True)
    await running.stop()
    print("advex: stopped", flush=True)
