"""Long-running operations: a bounded worker pool beside the event loop, progress with ETA,
cancellation that stops the work at its next step, SQLite persistence, watch/wait, and
restart recovery: resumable work (dataset builds, training) checkpoints into its job folder
(<artifacts>/jobs/<operation id>) and goes on from there under the same operation id after a
crash or a restart; at SIGTERM it checkpoints and stops instead of being cancelled. Other work
interrupted by a restart fails with ABORTED, saying so. Also the small pool that runs
interactive (unary) engine calls."""
from __future__ import annotations

import asyncio
import logging
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import AsyncIterator, Awaitable, Callable, Optional, TypeVar

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
MAX_RESUMES = 5  # crashes in a row an operation is resumed after; then it fails (it may be what crashes the server)
SUSPENDED = "suspended by a server shutdown; resumes from its last checkpoint when the server starts again"
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
    resumable: bool = False
    resumed_from: int = 0     # progress units done before this run (a resumed operation's checkpoint)
    suspending: bool = False  # set at shutdown: stop at the next step, keep the checkpoint, resume at restart

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

    @property
    def job_dir(self) -> Path:
        """This operation's own folder for checkpoints (created on first use); it survives
        restarts while the operation is unfinished and is removed when it finishes."""
        folder = self._m.job_dir(self._live.op.id)
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    @property
    def suspending(self) -> bool:
        """True when the work is being stopped by a shutdown, to resume later: write a
        checkpoint before stopping."""
        return self._live.suspending

    def check_cancelled(self) -> None:
        if self._live.cancel.is_set():
            raise Cancelled()

    def resumed_from(self, done: int) -> None:
        """Work that goes on from a checkpoint says where, so that the ETA counts only the
        units done since (in the units of its progress reports)."""
        self._live.resumed_from = int(done)

    def progress(self, done: int, total: int, unit: str = "images", stage: str = "") -> None:
        self.check_cancelled()
        live = self._live
        with live.lock:
            p = live.op.progress
            p.done, p.total, p.unit = int(done), int(total), unit
            if stage:
                p.stage = stage
            elapsed, rate_done = time.monotonic() - live.started, done - live.resumed_from
            p.eta_seconds = elapsed * (total - done) / rate_done if rate_done > 0 and total >= done else -1.0
            live.op.update_time.CopyFrom(now())
        self._m._changed(live, persist=False)


Work = Callable[[OpContext], tuple[str, Message]]
# Rebuilds the work of an unfinished operation from its request after a restart (validating it
# again, like the RPC did); raises ServiceError when it can no longer run.
Resumer = Callable[[Message], Awaitable[tuple[Work, frozenset]]]


class OperationManager:
    def __init__(self, store: Store, metrics: Metrics, workers: int = 1, max_queue: int = 16,
                 interactive_workers: int = 1, max_interactive: int = 8, jobs_dir: Optional[Path] = None) -> None:
        self.store = store
        self.jobs_dir = jobs_dir
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

    # ------------------------------------------------------------------ submit / run
    def submit(self, kind: str, request: Message, work: Work, resources: frozenset = frozenset(), *,
               resumable: bool = False) -> Op:
        """Queue `work`. resumable: it checkpoints into ctx.job_dir and goes on from there when
        run again under the same operation id (after a crash or a restart)."""
        if not self.accepting:
            raise ServiceError(grpc.StatusCode.UNAVAILABLE, "server is shutting down")
        active = sum(1 for live in self._live.values() if not live.op.done)
        if active >= self.max_queue:
            raise exhausted(f"operation queue is full ({active} queued or running, limit {self.max_queue}); retry later")
        op = Op(id=new_id("op"), kind=kind, state=Op.QUEUED, create_time=now(), update_time=now(),
                request_json=json_format.MessageToJson(request, indent=None, preserving_proto_field_name=True))
        op.progress.eta_seconds = -1
        return self._enqueue(op, work, resources, resumable)

    def _enqueue(self, op: Op, work: Work, resources: frozenset, resumable: bool) -> Op:
        live = LiveOp(op, resources, changed=asyncio.Event(), resumable=resumable)
        self._live[op.id] = live
        log.info("operation %s (%s) queued", op.id, op.kind, extra={"operation_id": op.id, "kind": op.kind,
                                                                     "state": "QUEUED"})
        self._persist(live)
        self._update_depth()
        self._futures[op.id] = self._loop.run_in_executor(self._pool, self._run, live, work)
        return live.snapshot()

    def job_dir(self, op_id: str) -> Path:
        if self.jobs_dir is None:
            raise RuntimeError("this OperationManager has no jobs_dir")
        return self.jobs_dir / op_id

    def _run(self, live: LiveOp, work: Work) -> None:
        if live.cancel.is_set():
            return  # cancelled while queued: already marked
        with live.lock:
            live.op.state = Op.RUNNING
            live.started = time.monotonic()
        self._changed(live, persist=True)
        log.info("operation %s (%s) started", live.op.id, live.op.kind,
                 extra={"operation_id": live.op.id, "kind": live.op.kind, "state": "RUNNING"})
        try:
            field_name, result = work(OpContext(self, live))
        except Cancelled:
            if live.suspending:
                self._suspend(live)
            else:
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
        name = Op.State.Name(state)
        self.metrics.operations.labels(live.op.kind, name).inc()
        took = time.monotonic() - live.started if live.started else 0.0
        if live.started:
            self.metrics.operation_duration.labels(live.op.kind, name).observe(took)
        line = {"operation_id": live.op.id, "kind": live.op.kind, "state": name, "duration_ms": round(took * 1000)}
        if error is not None:
            line["code"], line["error"] = error[0].name, error[1][:300]
            log.log(logging.WARNING if state == Op.FAILED else logging.INFO, "operation %s (%s) %s: %s: %s",
                    live.op.id, live.op.kind, name, error[0].name, error[1][:300], extra=line)
        else:
            log.info("operation %s (%s) %s in %.1f s", live.op.id, live.op.kind, name, took, extra=line)
        self._changed(live, persist=True)
        if self.jobs_dir is not None:  # recorded as finished: its checkpoints have served
            shutil.rmtree(self.job_dir(live.op.id), ignore_errors=True)

    def _suspend(self, live: LiveOp) -> None:
        """Leave a resumable operation unfinished in the store (QUEUED, saying why), its
        checkpoint in place: the next server start resumes it."""
        with live.lock:
            live.op.state = Op.QUEUED
            live.op.progress.stage = SUSPENDED
            live.op.progress.eta_seconds = -1
            live.op.update_time.CopyFrom(now())
        self._changed(live, persist=True)
        if self.jobs_dir is not None:  # a planned stop: not one of the crashes that MAX_RESUMES counts
            (self.job_dir(live.op.id) / "resumes").unlink(missing_ok=True)

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

    def list(self, kind: str = "", page_size: int = 100, page_token: str = "") -> tuple[list[Op], str]:
        """One page of operations, newest first (live ones as they are now), and the next page's
        token ("" after the last page); see paging. page_size: already checked."""
        from advex.service import paging

        ops, token = paging.list_page(self.store, "operations", Op, page_size, page_token, scope=kind,
                                      match={"kind": kind}, newest_first=True)
        return [self._live[o.id].snapshot() if o.id in self._live else o for o in ops], token

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
    async def run_interactive(self, fn: Callable[..., T], *, cancellable: bool = False, admitted: bool = False) -> T:
        """fn() in the small interactive pool. cancellable: fn(check) instead, where
        check(step=0, total=0) raises Cancelled once this coroutine has been cancelled (the
        client cancelled, its deadline passed, the server stops): pass it as the engine's
        on_step and the work ends at its next step, freeing the pool, instead of running on.
        admitted: the work was accepted before the server began to stop (a merged Attack batch)."""
        if not self.accepting and not admitted:
            raise ServiceError(grpc.StatusCode.UNAVAILABLE, "server is shutting down")
        if self._interactive_inflight >= self.max_interactive:
            raise exhausted(f"too many interactive requests in flight (limit {self.max_interactive}); retry later")
        stop = threading.Event()

        def check(step: int = 0, total: int = 0) -> None:
            if stop.is_set():
                raise Cancelled()

        self._interactive_inflight += 1
        self.metrics.queue_depth.labels("interactive").set(self._interactive_inflight)
        try:
            return await self._loop.run_in_executor(self._interactive, (lambda: fn(check)) if cancellable else fn)
        except asyncio.CancelledError:
            stop.set()  # the thread cannot be interrupted; the work sees this at its next check
            raise
        finally:
            self._interactive_inflight -= 1
            self.metrics.queue_depth.labels("interactive").set(self._interactive_inflight)

    # ------------------------------------------------------------------ lifecycle
    async def recover(self, resumers: dict[str, tuple[type, Resumer]]) -> None:
        """Operations a previous process left unfinished: those of a resumable kind (resumers:
        kind -> (request type, resumer)) are queued again under their own id and go on from
        their checkpoint; the others, and those that can no longer run, fail, saying why."""
        for raw in self.store.unfinished_operations((Op.QUEUED, Op.RUNNING)):
            op = Op.FromString(raw)
            if op.kind not in resumers:
                self._fail_at_start(op, grpc.StatusCode.ABORTED,
                                    f"interrupted: the server stopped before this operation finished; {op.kind} "
                                    "operations do not resume (only dataset builds and training do): submit it again")
                continue
            request_type, resumer = resumers[op.kind]
            resumes = self._count_resume(op.id)
            if resumes > MAX_RESUMES:
                self._fail_at_start(op, grpc.StatusCode.ABORTED,
                                    f"interrupted by {resumes} crashes in a row (the server died while it ran, "
                                    f"perhaps because of it); not resumed after {MAX_RESUMES}: submit it again")
                continue
            try:
                request = json_format.Parse(op.request_json, request_type())
                work, resources = await resumer(request)
            except ServiceError as exc:
                self._fail_at_start(op, exc.code, f"could not resume after a restart: {exc.message}")
                continue
            except json_format.ParseError as exc:
                self._fail_at_start(op, grpc.StatusCode.ABORTED, f"could not resume after a restart: {exc}")
                continue
            op.state = Op.QUEUED
            op.progress.stage = f"resumed after a server restart ({resumes}); goes on from its last checkpoint"
            op.progress.eta_seconds = -1
            op.update_time.CopyFrom(now())
            log.info("resuming operation %s (%s) from its checkpoint", op.id, op.kind)
            self._enqueue(op, work, resources, resumable=True)

    def _count_resume(self, op_id: str) -> int:
        folder = self.job_dir(op_id)
        folder.mkdir(parents=True, exist_ok=True)
        counter = folder / "resumes"
        try:
            count = int(counter.read_text()) + 1
        except (OSError, ValueError):
            count = 1
        counter.write_text(str(count))
        return count

    def _fail_at_start(self, op: Op, code: grpc.StatusCode, message: str) -> None:
        op.state, op.done = Op.FAILED, True
        op.error.code = code.value[0]
        op.error.message = message
        op.progress.eta_seconds = -1
        op.update_time.CopyFrom(now())
        self.store.put_operation(op.id, op.kind, op.state, op.create_time.ToDatetime().timestamp(),
                                 op.SerializeToString())
        if self.jobs_dir is not None:
            shutil.rmtree(self.job_dir(op.id), ignore_errors=True)

    def unfinished_ids(self) -> set[str]:
        """Ids of the operations not finished (live or left in the store by a shutdown)."""
        return {Op.FromString(raw).id for raw in self.store.unfinished_operations((Op.QUEUED, Op.RUNNING))}

    async def shutdown(self, grace: float) -> None:
        """Stop accepting; resumable work checkpoints and stops at once (it resumes at the next
        start); other running work may finish within `grace` seconds, then it is cancelled."""
        self.accepting = False
        for live in list(self._live.values()):
            if live.resumable and not live.op.done:
                live.suspending = True
                live.cancel_reason = "server shut down"
                live.cancel.set()
                if live.op.state == Op.QUEUED:  # never started: stays queued in the store
                    self._suspend(live)
        pending = [f for f in self._futures.values() if not f.done()]
        if pending:
            await asyncio.wait(pending, timeout=grace)
        for live in list(self._live.values()):
            if not live.op.done and not live.suspending:
                self._cancel(live, "server shut down")
        pending = [f for f in self._futures.values() if not f.done()]
        if pending:
            await asyncio.wait(pending, timeout=max(grace, 5.0))
        for live in list(self._live.values()):  # work that ignored cancellation: record it
            if not live.op.done and not live.suspending:
                self._finish(live, Op.CANCELLED, error=(grpc.StatusCode.CANCELLED, "server shut down"))
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._interactive.shutdown(wait=False, cancel_futures=True)


def _running_loop() -> Optional[asyncio.AbstractEventLoop]:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None
