"""Dynamic batching of interactive Attack calls, in the manner of an inference server's batcher.

Concurrent Attack calls that ask the same model for the same PGD or FGSM settings are merged into
one engine batch: a call waits at most `window` seconds for company when the engine is idle for
its key, and while a batch of its key runs, arriving calls gather into the next one (up to
`max_rows` rows), which starts as soon as the first ends. Under load the batches grow by
themselves; alone, a call waits only the window.

Each call of a merged batch draws its random start from its own generator (the engine's
`segments`), so it gets what it would get alone up to the float rounding of a larger matrix
product. A call whose client has gone away drops out of the results; when every call of a
running batch has gone, the batch stops at its next step. A failure of the batch fails each of
its calls with the same status.
"""
from __future__ import annotations

import asyncio
import dataclasses
from dataclasses import dataclass, field
from typing import Callable, Hashable, Optional

import grpc
import numpy as np

from advex.engine.attacks import AttackOutput
from advex.service.errors import ServiceError, exhausted
from advex.service.operations import Cancelled, OperationManager

#: attack methods whose calls merge: their only randomness is the start, which segments keep per call
MERGEABLE = ("pgd", "fgsm")

#: run(x, y, eps, segments, on_step) -> (AttackOutput, endpoint usage): the engine call for one batch
Runner = Callable[..., tuple[AttackOutput, object]]


@dataclass
class _Call:
    x: np.ndarray
    y: np.ndarray
    eps: Optional[np.ndarray]
    run: Runner
    future: asyncio.Future = field(repr=False)


class AttackBatcher:
    """Merges concurrent Attack calls of one key (model, settings, domain, shape) into engine
    batches run in the interactive pool of `ops`. window_s: how long a call waits for company
    when nothing of its key runs; max_rows: the largest merged batch (0 = no merging);
    max_waiting_rows: the rows a key may have waiting before new calls get RESOURCE_EXHAUSTED."""

    def __init__(self, ops: OperationManager, *, window_s: float, max_rows: int, max_waiting_rows: int,
                 on_batch: Optional[Callable[[int, int], None]] = None) -> None:
        self.ops = ops
        self.window_s = window_s
        self.max_rows = max_rows
        self.max_waiting_rows = max_waiting_rows
        self.on_batch = on_batch  # (calls, rows) of every batch that runs: metrics
        self._waiting: dict[Hashable, list[_Call]] = {}
        self._running: set[Hashable] = set()
        self._timers: dict[Hashable, asyncio.TimerHandle] = {}
        self._tasks: set[asyncio.Task] = set()

    def merges(self, method: str) -> bool:
        return self.max_rows > 0 and method in MERGEABLE

    async def submit(self, key: Hashable, x: np.ndarray, y: np.ndarray, eps: Optional[np.ndarray],
                     run: Runner) -> tuple[AttackOutput, object]:
        """This call's share of the batch it joins: (its AttackOutput rows, the batch's usage). A call
        admitted here runs even if the server begins to stop before its batch does (as a call
        already in the interactive pool would)."""
        if not self.ops.accepting:
            raise ServiceError(grpc.StatusCode.UNAVAILABLE, "server is shutting down")
        waiting = self._waiting.setdefault(key, [])
        rows = sum(len(c.x) for c in waiting)
        if rows and rows + len(x) > self.max_waiting_rows:
            raise exhausted(f"{rows} rows of attacks with these settings are already waiting for this model "
                            f"(limit {self.max_waiting_rows}); retry later")
        loop = asyncio.get_running_loop()
        call = _Call(x, y, eps, run, loop.create_future())
        waiting.append(call)
        if key not in self._running:
            if rows + len(x) >= self.max_rows:
                self._start(key)
            elif key not in self._timers:
                self._timers[key] = loop.call_later(self.window_s, self._start, key)
        # the client may go away (cancel, deadline): its future is cancelled, the batch goes on for the rest
        return await call.future

    def _start(self, key: Hashable) -> None:
        """Run the next batch of `key`: waiting calls, oldest first, up to max_rows rows (at least one call)."""
        timer = self._timers.pop(key, None)
        if timer is not None:
            timer.cancel()
        waiting = self._waiting.get(key, [])
        while waiting and waiting[0].future.done():  # clients that left before their batch began
            waiting.pop(0)
        if not waiting or key in self._running:
            if not waiting:
                self._waiting.pop(key, None)
            return
        batch, rows = [], 0
        while waiting and (not batch or rows + len(waiting[0].x) <= self.max_rows):
            call = waiting.pop(0)
            if not call.future.done():
                batch.append(call)
                rows += len(call.x)
        self._running.add(key)
        task = asyncio.get_running_loop().create_task(self._execute(key, batch))
        self._tasks.add(task)  # referenced until done (the loop keeps only weak references)
        task.add_done_callback(self._tasks.discard)

    async def _execute(self, key: Hashable, batch: list[_Call]) -> None:
        stopping = False
        try:
            x = np.concatenate([c.x for c in batch])
            y = np.concatenate([c.y for c in batch])
            eps = np.concatenate([c.eps for c in batch]) if batch[0].eps is not None else None
            sizes = [len(c.x) for c in batch]
            if self.on_batch is not None:
                self.on_batch(len(batch), len(x))

            def work(check: Callable[..., None]):
                def on_step(step: int = 0, total: int = 0) -> None:
                    check()
                    if all(c.future.done() for c in batch):  # every client has gone: nobody to answer
                        raise Cancelled()

                return batch[0].run(x, y, eps, sizes if len(sizes) > 1 else None, on_step)

            out, usage = await self.ops.run_interactive(work, cancellable=True, admitted=True)
            start = 0
            for c in batch:
                if not c.future.done():
                    c.future.set_result((rows_of(out, start, start + len(c.x)), usage))
                start += len(c.x)
        except asyncio.CancelledError:  # the server is stopping: the callers are cancelled with it
            stopping = True
            for c in batch:
                c.future.cancel()
            raise
        except Exception as exc:  # noqa: BLE001  whatever went wrong, every call of the batch fails the same way
            for c in batch:
                if not c.future.done():
                    c.future.set_exception(exc)
        finally:
            self._running.discard(key)
            if self._waiting.get(key) and not stopping:
                self._start(key)  # those that gathered while this batch ran go at once
            else:
                self._waiting.pop(key, None)


def rows_of(out: AttackOutput, start: int, stop: int) -> AttackOutput:
    """The rows start:stop of an attack's output."""
    cut = {f.name: getattr(out, f.name)[start:stop] for f in dataclasses.fields(out)
           if f.name != "config" and getattr(out, f.name) is not None}
    return dataclasses.replace(out, **cut)
