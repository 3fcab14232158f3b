"""Long-running operations: a bounded worker pool beside the event loop, progress with ETA,
cancellation that stops the work at its next step, SQLite persistence, watch/wait, and
restart recovery. Also the small pool that runs interactive (unary) engine calls."""
from __future__ import annotations

import asyncio
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable, Optional, TypeVar

import grpc
from google.protobuf import json_format
from google.protobuf.message import Message

from advex.service.errors import ServiceError, exhausted, not_found, precondition
from advex.service.metrics import Metrics
from advex.service.registry import new_id, now
from advex.service.store import Store
from advex.v1 import operation_pb2 as op_pb

log = logging.getLogger("advex.operations")
Op = op_pb.Operation
DONE_STATES = (Op.SUCCEEDED, Op.FAILED, Op.CANCELLED)
PERSIST_EVERY_S = 1.0
T = TypeVar("T")


class Cancelled(Exception):
    """Raised inside work when its operation was cancelled."""


@dataclass
class LiveOp:
    op: Op
    resources: frozenset
    cancel: threading.Event = field(default_factory=threading.Event)
    cancel_reason: str = "cancelled"
    lock: threading.Lock = field(default_factory=threading.Lock)
    changed: Optional[asyncio.Event] = None
    started: float = 0.0
    persisted: float = 0.0

    def snapshot(self) -> Op:
        with self.lock:
            copy = Op()
            copy.CopyFrom(self.op)
            return copy


class OpContext:
    """What a work function sees: progress reporting (which is also the cancellation point)."""

    def __init__(self, manager: "OperationManager", live: LiveOp) -> None:
        self._m = manager
        self._live = live

    @property
    def operation_id(self) -> str:
        return self._live.op.id

    def check_cancelled(self) -> None:
        if self._live.cancel.is_set():
            raise Cancelled()

    def progress(self, done: int, total: int, unit: str = "images", stage: str = "") -> None:
        self.check_cancelled()
        live = self._live
        with live.lock:
            p = live.op.progress
            p.done, p.total, p.unit = int(done), int(total), unit
            if stage:
                p.stage = stage
            elapsed = time.monotonic() - live.started
            p.eta_seconds = elapsed * (total - done) / done if done > 0 and total >= done else -1.0
            live.op.update_time.CopyFrom(now())
        self._m._changed(live, persist=False)


Work = Callable[[OpContext], tuple[str, Message]]


class OperationManager:
    def __init__(self, store: Store, metrics: Metrics, workers: int = 1, max_queue: int = 16,
                 interactive_workers: int = 1, max_interactive: int = 8) -> None:
        self.store = store
        self.metrics = metrics
        self.max_queue = max_queue
        self.max_interactive = max_interactive
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="advex-op")
        self._interactive = ThreadPoolExecutor(max_workers=interactive_workers, thread_name_prefix="advex-rpc")
        self._live: dict[str, LiveOp] = {}
        self._futures: dict[str, asyncio.Future] = {}
        self._interactive_inflight = 0
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self.accepting = True

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._recover()

    # ------------------------------------------------------------------ submit / run
    def submit(self, kind: str, request: Message, work: Work, resources: frozenset = frozenset()) -> Op:
        if not self.accepting:
            raise ServiceError(grpc.StatusCode.UNAVAILABLE, "server is shutting down")
        active = sum(1 for live in self._live.values() if not live.op.done)
        if active >= self.max_queue:
            raise exhausted(f"operation queue is full ({active} queued or running, limit {self.max_queue}); retry later")
        op = Op(id=new_id("op"), kind=kind, state=Op.QUEUED, create_time=now(), update_time=now(),
                request_json=json_format.MessageToJson(request, indent=None, preserving_proto_field_name=True))
        op.progress.eta_seconds = -1
        live = LiveOp(op, resources, changed=asyncio.Event())
        self._live[op.id] = live
        self._persist(live)
        self._update_depth()
        self._futures[op.id] = self._loop.run_in_executor(self._pool, self._run, live, work)
        return live.snapshot()

    def _run(self, live: LiveOp, work: Work) -> None:
        if live.cancel.is_set():
            return  # cancelled while queued: already marked
        with live.lock:
            live.op.state = Op.RUNNING
            live.started = time.monotonic()
        self._changed(live, persist=True)
        try:
            field_name, result = work(OpContext(self, live))
        except Cancelled:
            self._finish(live, Op.CANCELLED, error=(grpc.StatusCode.CANCELLED, live.cancel_reason))
        except ServiceError as exc:
            self._finish(live, Op.FAILED, error=(exc.code, exc.message))
        except ValueError as exc:
            self._finish(live, Op.FAILED, error=(grpc.StatusCode.INVALID_ARGUMENT, str(exc)))
        except Exception as exc:  # a bug or a resource failure: the op fails, the server lives
            log.exception("operation %s failed", live.op.id)
            self._finish(live, Op.FAILED, error=(grpc.StatusCode.INTERNAL, f"{type(exc).__name__}: {exc}"))
        else:
            self._finish(live, Op.SUCCEEDED, result=(field_name, result))

    def _finish(self, live: LiveOp, state: int, *, error=None, result=None) -> None:
        with live.lock:
            if live.op.done:
                return
            live.op.state = state
            live.op.done = True
            live.op.update_time.CopyFrom(now())
            live.op.progress.eta_seconds = 0 if state == Op.SUCCEEDED else -1
            if error is not None:
                live.op.error.code = error[0].value[0]
                live.op.error.message = error[1]
            if result is not None:
                getattr(live.op, result[0]).CopyFrom(result[1])
        self.metrics.operations.labels(live.op.kind, Op.State.Name(state)).inc()
        self._changed(live, persist=True)

    def _persist(self, live: LiveOp) -> None:
        with live.lock:
            data = live.op.SerializeToString()
            args = (live.op.id, live.op.kind, live.op.state, live.op.create_time.ToDatetime().timestamp())
            live.persisted = time.monotonic()
        self.store.put_operation(*args, data)

    def _changed(self, live: LiveOp, persist: bool) -> None:
        """Called from any thread after live.op changed."""
        if persist or time.monotonic() - live.persisted >= PERSIST_EVERY_S:
            self._persist(live)
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        if _running_loop() is loop:
            self._notify(live)
        else:
            loop.call_soon_threadsafe(self._notify, live)

    def _notify(self, live: LiveOp) -> None:
        event, live.changed = live.changed, asyncio.Event()
        event.set()
        if live.op.done:  # the store has it now; watchers hold their own reference
            self._futures.pop(live.op.id, None)
            self._live.pop(live.op.id, None)
            self._update_depth()

    def _update_depth(self) -> None:
        self.metrics.queue_depth.labels("operations").set(sum(1 for l in self._live.values() if not l.op.done))

    # ------------------------------------------------------------------ queries
    def get(self, op_id: str) -> Op:
        live = self._live.get(op_id)
        if live is not None:
            return live.snapshot()
        raw = self.store.get_operation(op_id) if op_id else None
        if raw is None:
            raise not_found("operation", op_id)
        return Op.FromString(raw)

    def list(self, kind: str = "", limit: int = 100) -> list[Op]:
        ops = [Op.FromString(raw) for raw in self.store.list_operations(kind, limit)]
        return [self._live[o.id].snapshot() if o.id in self._live else o for o in ops]

    def cancel(self, op_id: str) -> Op:
        live = self._live.get(op_id)
        if live is None:
            return self.get(op_id)  # finished earlier (or NOT_FOUND): nothing to stop
        self._cancel(live, "cancelled by request")
        return live.snapshot()

    def _cancel(self, live: LiveOp, reason: str) -> None:
        """Running work stops at its next progress report; queued work never starts."""
        live.cancel_reason = reason
        live.cancel.set()
        if live.op.state == Op.QUEUED:
            self._finish(live, Op.CANCELLED, error=(grpc.StatusCode.CANCELLED, reason + " (before it started)"))

    async def wait(self, op_id: str, timeout: float) -> Op:
        """The operation once done, or its state when `timeout` seconds have passed."""
        live = self._live.get(op_id)
        if live is None:
            return self.get(op_id)
        deadline = time.monotonic() + max(0.0, timeout)
        while True:
            event = live.changed
            snap = live.snapshot()
            remaining = deadline - time.monotonic()
            if snap.done or remaining <= 0:
                return snap
            try:
                await asyncio.wait_for(event.wait(), remaining)
            except asyncio.TimeoutError:
                return live.snapshot()

    async def watch(self, op_id: str) -> AsyncIterator[Op]:
        """Yields the operation now and after every change; ends after it is done."""
        live = self._live.get(op_id)
        if live is None:
            yield self.get(op_id)
            return
        while True:
            event = live.changed
            snap = live.snapshot()
            yield snap
            if snap.done:
                return
            await event.wait()

    def in_use(self, resource: tuple[str, str]) -> Optional[str]:
        """The id of an unfinished operation using resource ("model"|"dataset", id), if any."""
        for live in self._live.values():
            if not live.op.done and resource in live.resources:
                return live.op.id
        return None

    def ensure_unused(self, resource: tuple[str, str]) -> None:
        op_id = self.in_use(resource)
        if op_id is not None:
            raise precondition(f"{resource[0]} {resource[1]!r} is in use by operation {op_id}; "
                               "cancel it or wait for it to finish")

    # ------------------------------------------------------------------ interactive work
    async def run_interactive(self, fn: Callable[[], T]) -> T:
        if not self.accepting:
            raise ServiceError(grpc.StatusCode.UNAVAILABLE, "server is shutting down")
        if self._interactive_inflight >= self.max_interactive:
            raise exhausted(f"too many interactive requests in flight (limit {self.max_interactive}); retry later")
        self._interactive_inflight += 1
        self.metrics.queue_depth.labels("interactive").set(self._interactive_inflight)
        try:
            return await self._loop.run_in_executor(self._interactive, fn)
        finally:
            self._interactive_inflight -= 1
            self.metrics.queue_depth.labels("interactive").set(self._interactive_inflight)

    # ------------------------------------------------------------------ lifecycle
    def _recover(self) -> None:
        """Operations left QUEUED/RUNNING by a previous process are marked FAILED (ABORTED)."""
        for raw in self.store.unfinished_operations((Op.QUEUED, Op.RUNNING)):
            op = Op.FromString(raw)
            op.state, op.done = Op.FAILED, True
            op.error.code = grpc.StatusCode.ABORTED.value[0]
            op.error.message = "interrupted: the server stopped before this operation finished; submit it again"
            op.update_time.CopyFrom(now())
            self.store.put_operation(op.id, op.kind, op.state, op.create_time.ToDatetime().timestamp(),
                                     op.SerializeToString())

    async def shutdown(self, grace: float) -> None:
        """Stop accepting; let running work finish within `grace` seconds, then cancel the rest."""
        self.accepting = False
        pending = [f for f in self._futures.values() if not f.done()]
        if pending:
            await asyncio.wait(pending, timeout=grace)
        for live in list(self._live.values()):
            if not live.op.done:
                self._cancel(live, "server shut down")
        pending = [f for f in self._futures.values() if not f.done()]
        if pending:
            await asyncio.wait(pending, timeout=max(grace, 5.0))
        for live in list(self._live.values()):  # work that ignored cancellation: record it
            if not live.op.done:
                self._finish(live, Op.CANCELLED, error=(grpc.StatusCode.CANCELLED, "server shut down"))
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._interactive.shutdown(wait=False, cancel_futures=True)


def _running_loop() -> Optional[asyncio.AbstractEventLoop]:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None
