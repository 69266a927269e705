"""Dynamic batching (`@jupyter_stream.batched`): the inputs of a batched function's
callers, from every notebook, script, worker and HTTP client, gathered into batches that
run as one call each.

Why in the server: only the server sees every caller; a batch formed in one client would
only ever hold that client's inputs. Why a module of its own: the scheduler and the HTTP
handlers hand each call a worker of its own; a batched function's inputs instead wait in
its `Batcher`, which decides when a batch goes (``max_batch_size`` inputs are there, or
``wait_ms`` have passed since the first one came: Modal's rule), takes one seat on a
worker for it and starts it there (`WorkerKernel.start_batch`). Under load the batch that
waits for a seat keeps filling, so batches grow with the load by themselves.

Each input is a `BatchItem`, which its caller (`scheduler.RemoteCall`,
`scheduler.BatchedMapCall`, `handlers.EndpointHandler`) holds as it would hold a
`kernels.Run`: its output, credit and cancellation are its own; only the code runs once
for all. The worker splits the results (`worker.batches`).

Nothing dies unseen: a batcher's loop is one supervised task per function with inputs
waiting (it ends when none wait). If it fails, one log line names the function and why,
and every input still waiting fails with that error instead of hanging. An input that
waits past its queue timeout fails alone. A worker that dies mid-batch ends each input's
run with `WorkerDied`, and each caller re-runs or fails its input as it would a single
call; an input whose batch died with others in it runs next in a batch of its own
(``alone``), so that one that kills kernels is found and fails by itself.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Callable
from typing import Any

from ..errors import WorkerError, error_info
from . import supervision
from .kernels import OnOutput, Run, WorkerKernel
from .pool import WorkerPool


class BatchItem:
    """One caller's input to a batched function: waiting in its `Batcher`, then one input
    of a batch running on a worker (`run`)."""

    __slots__ = ("on_output", "fields", "queue_timeout", "timed_out", "refused", "started", "nested", "alone", "run",
                 "batcher", "cancelled", "since")

    def __init__(self, on_output: OnOutput, fields: dict[str, Any], *, refused: Callable[[dict[str, Any]], None],
                 timed_out: Callable[[float], None] | None = None, queue_timeout: float | None = None,
                 started: Callable[[Run], None] | None = None, nested: bool = False, alone: bool = False):
        #: takes its output once its batch runs, as a `Run`'s owner does
        self.on_output = on_output
        #: its arguments as they travel (see `WorkerKernel.start_batch`)
        self.fields = fields
        #: told the error when it cannot run at all (no worker can start, the batcher failed)
        self.refused = refused
        #: told the seconds it waited when that passed `queue_timeout`
        self.timed_out = timed_out
        self.queue_timeout = queue_timeout
        #: told its run when its batch starts
        self.started = started
        #: its caller is a worker (which waits holding its own seat)
        self.nested = nested
        #: it runs in a batch of its own (its last batch died with others in it)
        self.alone = alone
        self.run: Run | None = None
        self.batcher: Batcher | None = None
        self.cancelled = False
        self.since = 0.0  # when it began to wait (monotonic)

    @property
    def worker(self) -> WorkerKernel | None:
        return self.run.worker if self.run is not None else None

    def cancel(self) -> None:
        """Its caller is gone: it leaves the queue, or its run is cancelled (the batch goes
        on for the others; it stops once no input of it is wanted)."""
        if self.cancelled:
            return
        self.cancelled = True
        if self.run is not None:
            self.run.cancel()
        elif self.batcher is not None:
            self.batcher.discard(self)

    def ack(self, nbytes: int) -> None:
        if self.run is not None:
            self.run.ack(nbytes)

    def consumed(self, nbytes: int) -> None:
        if self.run is not None:
            self.run.consumed(nbytes)


class Batcher:
    """The inputs of one batched function (one registration) waiting for their batch, and
    the supervised loop that forms batches and starts them."""

    def __init__(self, name: str, spec: Any, mode: str):
        self.name = name  # "function 'f'" or "endpoint 'e'", for log lines and errors
        self.spec = spec
        self.mode = mode  # how results travel: "values" (functions) or "http" (endpoints)
        self.size: int = spec.batch["max_batch_size"]
        self.wait: float = spec.batch["wait_ms"] / 1000
        self.pool: WorkerPool | None = None
        self.pending: collections.deque[BatchItem] = collections.deque()
        self.task: asyncio.Task | None = None
        self._wakeup: asyncio.Future | None = None
        #: batches started, and inputs in them (what `info` shows)
        self.batches = self.inputs = 0

    def info(self) -> dict[str, Any]:
        return {"waiting": len(self.pending), "batches": self.batches, "inputs": self.inputs,
                "mean_batch_size": round(self.inputs / self.batches, 2) if self.batches else None}

    def submit(self, item: BatchItem, pool: WorkerPool) -> None:
        """Queue `item` for the next batch (its caller's `pool`: the function's)."""
        self.pool = pool
        item.batcher = self
        item.since = time.monotonic()
        self.pending.append(item)
        if self.task is None:
            self.task = supervision.spawn(self.form(), f"the batcher of {self.name}", on_crash=self.crashed)
        elif len(self.pending) >= self.size or item.alone:
            self.wake()

    def discard(self, item: BatchItem) -> None:
        """`item` leaves the queue (its caller left): it will not run."""
        try:
            self.pending.remove(item)
        except ValueError:
            pass

    def wake(self) -> None:
        if self._wakeup is not None and not self._wakeup.done():
            self._wakeup.set_result(None)

    async def sleep(self, seconds: float) -> None:
        """Wait `seconds`, or less when `wake` is called (the batch is full)."""
        self._wakeup = asyncio.get_running_loop().create_future()
        try:
            await asyncio.wait({self._wakeup}, timeout=seconds)
        finally:
            self._wakeup = None

    async def form(self) -> None:
        """Form batches while inputs wait: each one goes when it is full, or `wait` after
        its first input came (at once for an input that runs alone), as soon as it has a
        seat on a worker. The task ends when nothing waits; the next input starts another."""
        try:
            while self.pending:
                first = self.pending[0]
                while len(self.pending) < self.size and not first.alone:
                    remaining = first.since + self.wait - time.monotonic()
                    if remaining <= 0:
                        break
                    await self.sleep(remaining)
                    if not self.pending:
                        break
                    first = self.pending[0]  # (the first may have left)
                if not self.pending:
                    break
                worker = await self.seat()
                if worker is None:
                    continue
                batch = self.take()
                if not batch:
                    self.pool.release(worker)
                    continue
                self.launch(worker, batch)
        finally:
            self.task = None

    async def seat(self) -> WorkerKernel | None:
        """A seat on a worker for the next batch: an idle one now, else the first the pool
        hands out, while inputs whose queue timeout passes meanwhile fail (each alone).
        None when no input is left to run, or none can (`WorkerError`: they fail with it)."""
        pool = self.pool
        worker = pool.try_acquire()
        if worker is not None:
            return worker
        waiter = asyncio.ensure_future(pool.acquire(nested=any(item.nested for item in self.pending)))
        try:
            while True:
                done, _ = await asyncio.wait({waiter}, timeout=self.next_expiry())
                if done:
                    return waiter.result()
                self.expire()
                if not self.pending:
                    return None
        except WorkerError as e:
            self.fail_pending(error_info("WorkerError", str(e)))
            return None
        finally:
            if not waiter.done():
                waiter.cancel()  # leaves the pool's queue (a worker it got meanwhile goes back)

    def next_expiry(self) -> float | None:
        """Seconds until the first waiting input's queue timeout passes (None: none has one)."""
        now, soonest = time.monotonic(), None
        for item in self.pending:
            if item.queue_timeout is not None:
                left = item.since + item.queue_timeout - now
                soonest = left if soonest is None else min(soonest, left)
        return None if soonest is None else max(soonest, 0.0)

    def expire(self) -> None:
        now = time.monotonic()
        late = [item for item in self.pending if item.queue_timeout is not None and now >= item.since + item.queue_timeout]
        for item in late:
            self.pending.remove(item)
            item.batcher = None
            if item.timed_out is not None:
                item.timed_out(now - item.since)

    def take(self) -> list[BatchItem]:
        """The next batch: the first input alone if it must run alone, else up to `size`
        inputs in arrival order (those that must run alone wait for a batch of their own)."""
        pending = self.pending
        if not pending:
            return []
        if pending[0].alone:
            return [pending.popleft()]
        batch: list[BatchItem] = []
        later: list[BatchItem] = []
        while pending and len(batch) < self.size:
            item = pending.popleft()
            (later if item.alone else batch).append(item)
        pending.extendleft(reversed(later))
        return batch

    def launch(self, worker: WorkerKernel, batch: list[BatchItem]) -> None:
        spec = self.spec
        runs = worker.start_batch(spec.fn_hash, spec.fn_blob, [(item.on_output, item.fields) for item in batch],
                                  mode=self.mode, media_type=getattr(spec, "media_type", None) if self.mode == "http" else None,
                                  timeout=getattr(spec, "timeout", None))
        self.batches += 1
        self.inputs += len(batch)
        for item, run in zip(batch, runs):
            item.run = run
            item.batcher = None
            if item.started is not None:
                item.started(run)

    def fail_pending(self, error: dict[str, Any]) -> None:
        """Every input still waiting fails with `error` (none is left hanging)."""
        items = list(self.pending)
        self.pending.clear()
        for item in items:
            item.batcher = None
            try:
                item.refused(error)
            except Exception as exc:  # noqa: BLE001 - the others must still hear it
                supervision.report(f"failing an input of {self.name}", exc)

    def crashed(self, exc: BaseException) -> None:
        """The loop failed (a bug of ours; `supervision` logged the line): what waits fails."""
        self.fail_pending(error_info("WorkerError", f"the server failed while forming batches of {self.name}: "
                                                    f"{type(exc).__name__}: {exc}"))


def batcher_for(spec: Any, kind: str) -> Batcher:
    """The batcher of registration `spec` (a batched function or endpoint: `kind`). A
    registration is replaced whole when its cell runs again: inputs already waiting run
    with the code they were called with, new ones with the new code."""
    batcher = spec.batcher
    if batcher is None:
        batcher = spec.batcher = Batcher(f"{kind} {spec.name!r}", spec, "http" if kind == "endpoint" else "values")
    return batcher
