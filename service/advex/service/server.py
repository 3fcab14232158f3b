"""Assemble and run the gRPC server: servicer, health, reflection, metrics endpoint,
graceful SIGTERM (stop accepting, finish or cancel running work, close the store)."""
from __future__ import annotations

import asyncio
import gc
import logging
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import grpc
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from advex.engine.models import device_for
from advex.service.config import ServerConfig, address, bare_host, tls_credentials
from advex.service.listen import ListenError, check_server_addresses, reason
from advex.service.metrics import Metrics
from advex.service.operations import OperationManager
from advex.service import paths
from advex.service import sandbox
from advex.service.registry import Registry
from advex.service.servicer import RobustnessServicer, add_to_server, token_problem
from advex.service.store import Store
from advex.v1 import robustness_pb2

log = logging.getLogger("advex.server")
SERVICE_NAME = robustness_pb2.DESCRIPTOR.services_by_name["Robustness"].full_name
MAX_MESSAGE = 64 << 20
__all__ = ["ListenError", "RunningServer", "grpc_options", "start", "serve"]


REFLECTION_PREFIX = "/grpc.reflection."


class ReflectionTokenInterceptor(grpc.aio.ServerInterceptor):
    """With a token set: reflection calls (grpc.reflection.*) need it too. Health checks and
    the Robustness RPCs (which check the token in their _guard) pass untouched."""

    def __init__(self, token: str) -> None:
        self.token = token

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        method = handler_call_details.method or ""
        if handler is None or not method.startswith(REFLECTION_PREFIX):
            return handler
        problem = token_problem(handler_call_details.invocation_metadata, self.token)
        if not problem:
            return handler

        async def refuse(request, context):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, problem)

        kind = {(False, False): grpc.unary_unary_rpc_method_handler,
                (False, True): grpc.unary_stream_rpc_method_handler,
                (True, False): grpc.stream_unary_rpc_method_handler,
                (True, True): grpc.stream_stream_rpc_method_handler}[handler.request_streaming,
                                                                      handler.response_streaming]
        return kind(refuse, request_deserializer=handler.request_deserializer,
                    response_serializer=handler.response_serializer)


def _ms(seconds: float) -> int:
    return max(1, int(round(seconds * 1000)))


def grpc_options(cfg: ServerConfig) -> list[tuple[str, int]]:
    """The gRPC server's channel arguments: message sizes, SO_REUSEPORT off, and the connection
    and stream limits of the settings (see config.py for their meaning)."""
    # gRPC sets SO_REUSEPORT by default: a second server on a port in use would start and quietly
    # take a share of the new connections. Off, binding a port in use fails.
    options = [("grpc.max_receive_message_length", MAX_MESSAGE),
               ("grpc.max_send_message_length", MAX_MESSAGE),
               ("grpc.so_reuseport", 0),
               ("grpc.max_concurrent_streams", cfg.max_streams_per_connection),
               ("grpc.max_allowed_incoming_connections", cfg.max_connections),
               ("grpc.keepalive_time_ms", _ms(cfg.keepalive_time_s)),
               ("grpc.keepalive_timeout_ms", _ms(cfg.keepalive_timeout_s)),
               # keep probing a connection whose streams are quiet (a Watch of a queued operation, a
               # long WaitOperation): by default the server stops pinging after 2 pings without data
               ("grpc.http2.max_pings_without_data", 0),
               ("grpc.http2.min_ping_interval_without_data_ms", _ms(cfg.keepalive_min_client_interval_s))]
    if cfg.max_connection_idle_s > 0:
        options.append(("grpc.max_connection_idle_ms", _ms(cfg.max_connection_idle_s)))
    if cfg.max_connection_age_s > 0:
        options += [("grpc.max_connection_age_ms", _ms(cfg.max_connection_age_s)),
                    ("grpc.max_connection_age_grace_ms", int(round(cfg.max_connection_age_grace_s * 1000)))]
    return options


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
            self.metrics_http[0].server_close()  # and free the port


async def recover(registry: Registry, ops: OperationManager, servicer: RobustnessServicer, cfg: ServerConfig) -> None:
    """What a crash or a restart left: orphaned files are removed; unfinished builds and
    training runs go on from their checkpoints; other unfinished operations fail, saying why."""
    removed, freed = registry.reclaim(cfg.jobs, ops.unfinished_ids(), scratch=(Path(cfg.data_dir) / paths.TMP,))
    if removed:
        log.warning("reclaimed %d orphaned artifact folder(s) or file(s), %.1f MB, left by an interrupted run",
                    removed, freed / 1e6)
    await ops.recover(servicer.resumers())


async def start(cfg: ServerConfig) -> RunningServer:
    """Start serving on cfg.host:cfg.port (port 0 = any free port; see .port). Both addresses
    are taken before the data dir is touched, so a second server on a port in use leaves the
    first one's store, uploads and operations alone: it raises ListenError, having released
    what it took."""
    host, metrics_host = bare_host(cfg.host), cfg.metrics_bind_host
    tls = tls_credentials(cfg)  # the TLS files are read now (ConfigError when one cannot be used)
    check_server_addresses(host, cfg.port, metrics_host, cfg.metrics_port)
    paths.confine(cfg.data_dir)  # temporary files and caches inside the data dir; onnxruntime telemetry off
    interceptors = []
    if cfg.token and cfg.reflection_requires_token:
        interceptors.append(ReflectionTokenInterceptor(cfg.token))
    # beyond maximum_concurrent_rpcs calls in progress, gRPC answers RESOURCE_EXHAUSTED itself
    server = grpc.aio.server(interceptors=interceptors, options=grpc_options(cfg),
                             maximum_concurrent_rpcs=cfg.max_concurrent_rpcs)
    metrics = Metrics()
    metrics_http = None
    store: Optional[Store] = None
    ops: Optional[OperationManager] = None
    try:
        try:
            if tls is None:
                port = server.add_insecure_port(address(host, cfg.port))
            else:
                chain, key, client_ca = tls
                creds = grpc.ssl_server_credentials([(key, chain)], root_certificates=client_ca,
                                                    require_client_auth=client_ca is not None)
                port = server.add_secure_port(address(host, cfg.port), creds)
        except RuntimeError as exc:  # grpcio >= 1.5x raises; older ones return 0
            port = 0
            cause: Optional[BaseException] = exc
        else:
            cause = None
        if port == 0:
            raise ListenError(f"cannot listen on {address(host, cfg.port)}: gRPC could not bind it "
                              "(in use, or not an address of this machine)") from cause
        if cfg.metrics_port:
            try:
                metrics_http = metrics.serve(cfg.metrics_port, metrics_host)
            except OSError as exc:
                raise ListenError(f"cannot serve metrics on {address(metrics_host, cfg.metrics_port)}: "
                                  f"{reason(exc, '--metrics-port')}") from exc
        if cfg.torch_threads:
            torch.set_num_threads(cfg.torch_threads)
        device = device_for(cfg.device)
        metrics.record_build(str(device))
        store = Store(cfg.store_path)
        registry = Registry(store, cfg.artifacts, list(cfg.data_roots), device, max_dataset_mb=cfg.max_dataset_mb,
                            check_limits=sandbox.Limits(timeout_s=cfg.upload_check_timeout_s,
                                                        memory_mb=cfg.upload_check_memory_mb), config=cfg)
        ops = OperationManager(store, metrics, workers=cfg.workers, max_queue=cfg.max_queue, jobs_dir=cfg.jobs)
        ops.start(asyncio.get_running_loop())
        # not the generated add_RobustnessServicer_to_server: requests reach the handlers as bytes,
        # so that an undecodable one is INVALID_ARGUMENT (see add_to_server)
        servicer = RobustnessServicer(cfg, registry, ops, metrics, device)
        add_to_server(servicer, server)
        servicer.restore_gauges()  # the accuracy and audit gauges, as the store last saw them
        await recover(registry, ops, servicer, cfg)
        health_servicer = health.aio.HealthServicer() if hasattr(health, "aio") else health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        reflection.enable_server_reflection((SERVICE_NAME, reflection.SERVICE_NAME, health.SERVICE_NAME), server)
        # Everything alive now (torch, grpc, protobuf: hundreds of thousands of objects) is moved
        # out of the cycle collector's sight: a full collection, which runs on whichever thread
        # allocates (the event loop too), then scans only what requests made. Without it one took
        # 80-130 ms in the test process, and a health check waited for it. (Garbage is collected
        # first, so none is frozen.)
        gc.collect()
        gc.freeze()
        await server.start()
    except BaseException:
        if metrics_http is not None:
            metrics_http[0].shutdown()
            metrics_http[0].server_close()
        await server.stop(grace=None)
        if ops is not None:
            await ops.shutdown(0)
        if store is not None:
            store.close()
        raise
    for name in ("", SERVICE_NAME):
        res = health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
        if asyncio.iscoroutine(res):
            await res
    log.info("advex serving on %s%s (device %s, data dir %s, datasets %s)", address(host, port),
             " with TLS" if tls else "", device, cfg.data_dir, sorted(registry.builtins))
    return RunningServer(server, port, cfg, store, ops, metrics, registry, health_servicer, metrics_http)


async def serve(cfg: ServerConfig, ready: Optional[asyncio.Event] = None) -> None:
    """Run until SIGTERM / SIGINT, then shut down gracefully."""
    running = await start(cfg)
    print(f"advex: serving on {address(cfg.host, running.port)}"
          + (f", metrics on http://{address(cfg.metrics_bind_host, cfg.metrics_port)}/metrics"
             if cfg.metrics_port else ""),
          flush=True)
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
