"""Running `%%stream_function` calls for clients: one `.remote()` on one worker, or a map
fanned out over lanes on several workers, with retries, timeouts and nothing lost when a
worker dies.

A client (notebook kernel, script, or a worker calling another function) holds one
calls socket (`handlers.CallsHandler`); its `ClientSession` turns frames into calls
(`RemoteCall`, `MapCall`), each carried out by one or more runs on workers (`kernels.Run`),
and the runs' output back into frames. The server never unpickles user data: arguments and results
travel as opaque pickles, the scheduler only reads the JSON headers around them.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import itertools
import logging
import time
from collections.abc import Callable
from typing import Any

from .. import wire
from ..errors import WorkerError, error_info, gave_up_error
from . import metrics, supervision
from .batching import BatchItem, batcher_for
from .kernels import Run, WorkerKernel
from .pool import WorkerPool
from .registry import DEFAULT_QUEUE_TIMEOUT, FunctionSpec, Registry

log = logging.getLogger("jupyter_stream")

#: Largest batch of map items sent to a lane at once (`client.functions.MAX_BATCH` is
#: another thing: inputs per message from the client) ...
MAX_LANE_BATCH = 1024
#: ... and most items a lane has in flight.
MAX_LANE_ITEMS = 2 * MAX_LANE_BATCH

#: A lane keeps about this much work in flight, by the measured time per item: enough that
#: its worker never waits for the server between items (a round trip costs about a
#: millisecond), and little enough that the rest waits on the server, where lanes opened
#: later (workers that start meanwhile) and lanes that ran dry find it. Trivial items go
#: out by the thousand, slow ones `MIN_LANE_ITEMS` at a time; until the first result says
#: how long an item takes, a lane gets one.
LANE_SECONDS = 0.01
MIN_LANE_ITEMS = 2
#: A lane that ran dry takes queued items back from a busy one (work stealing) when they
#: would wait there at least this long: by the time per item, or because the busy lane has
#: sent nothing back for that long (its running item takes longer than most). A steal costs
#: a round trip to that worker.
STEAL_MIN_SECONDS = 0.005

#: A call (or map item) whose worker kernel dies this many times while running it alone is
#: not run again: it is most likely what kills the kernel (os._exit, a crash in C code,
#: running out of memory). Deaths shared with other calls on the kernel count only
#: towards `MAX_SHARED_DEATHS`.
MAX_DEATHS = 3
MAX_SHARED_DEATHS = 10

#: A map lane with nothing to run while the map waits for inputs (its caller holds the
#: iterator without reading on) is closed after this many seconds, so that an idle map
#: never holds workers; more inputs open lanes again ...
LANE_LINGER = 1.0
#: ... and after this many when other calls wait for the pool (not at once: a lane runs
#: dry for a moment between two batches of a map that is read as fast as it runs).
LANE_LINGER_CONTENDED = 0.1


def queue_timeout(spec: FunctionSpec, nested: bool) -> float | None:
    """How long a call of `spec` may wait for a worker: its ``--queue-timeout``; without
    one, a call from inside a worker (its caller holds a worker while it waits, so a
    wait could be a deadlock) waits `DEFAULT_QUEUE_TIMEOUT`, and one from a notebook or
    script as long as it takes, as queued jobs do."""
    if spec.queue_timeout is not None:
        return spec.queue_timeout
    return DEFAULT_QUEUE_TIMEOUT if nested else None


def queue_timeout_error(spec: FunctionSpec, pool: WorkerPool, waited: float) -> dict[str, Any]:
    busy = sum(1 for w in pool.workers if w.load > 0)
    return error_info(
        "TimeoutError",
        f"no worker of function {spec.name!r} became free in {waited:g} s (pool [{pool.key.describe()}]: "
        f"{busy} of {len(pool.workers)} worker(s) busy, at most {pool.max_workers}; the server runs at most "
        f"{pool.placement.max_workers} in all). Raise its --max-workers or --queue-timeout, or the server's "
        "JupyterStream.max_workers", "builtins")


def killed_alone(run: Run) -> bool:
    """Whether `run` was the only one on its kernel when the kernel died (an input of a
    batch: the only input of the only batch there)."""
    died_with = run.worker.died_with
    return died_with == {run.id} or (run.batch is not None and died_with == {run.id, run.batch.id})


class RemoteCall:
    """One `.remote()` call. Retried on another worker if its worker dies before it has
    sent anything, or if it raises and `retries` allow."""

    def __init__(self, session: ClientSession, call_id: str, spec: FunctionSpec, args: bytes):
        self.session, self.id, self.spec, self.args = session, call_id, spec, args
        self.pool = session.pool_for(spec)
        self.attempts = 0
        self.deaths = 0  # of its kernel while it ran alone there
        self.shared_deaths = 0
        self.sent_any = False
        self.run: Run | None = None
        self.cancelled = False
        self.task: asyncio.Task | None = None
        #: its input to its function's batches, when the function is batched (`batching`)
        self.item: BatchItem | None = None
        self.started = time.time()
        self.activity_id: str | None = None  # in the server's `Activity` (the Streams panel)
        self.attempt()

    def info(self) -> dict[str, Any]:
        """What the Streams panel shows of it."""
        return {"kind": "remote", "function": self.spec.name, "started": self.started, "done": 0, "total": 1,
                "failed": 0, "retried": max(self.attempts - 1, 0), "lanes": 0 if self.run is None else 1,
                "client": self.session.client}

    def stop(self, why: str) -> None:
        """Stopped from the Streams panel: its caller gets a WorkerError saying so."""
        self.session.end(self.id, error_info("WorkerError", f"the call was {why}"))
        self.cancel()
    def attempt(self) -> None:
        """Start on an idle worker now (the common, fast case), or wait for one; a batched
        function's call joins its next batch instead."""
        if self.spec.batch is not None:
            self.join_batch()
            return
        worker = self.session.worker_now(self.pool)
        if worker is not None:
            self.launch(worker)
        else:
            self.task = supervision.spawn(self.wait_for_worker(), f"call {self.id} of function {self.spec.name!r}",
                                          on_crash=self.crashed)

    async def wait_for_worker(self) -> None:
        nested = self.session.caller is not None
        timeout = queue_timeout(self.spec, nested)
        try:
            worker = await asyncio.wait_for(self.pool.acquire(nested=nested), timeout)
        except WorkerError as e:
            self.finish_with(error_info("WorkerError", str(e)))
            return
        except asyncio.TimeoutError:
            self.finish_with(queue_timeout_error(self.spec, self.pool, timeout))
            return
        if self.cancelled:
            self.pool.release(worker)
            return
        self.launch(worker)

    def join_batch(self) -> None:
        """Join the function's next batch (`batching`). After its kernel died under it, it
        runs in a batch of its own, so that a death can be blamed on it."""
        nested = self.session.caller is not None
        self.item = BatchItem(self.on_output, {"pickled": self.args}, refused=self.finish_with, timed_out=self.batch_timed_out,
                              queue_timeout=queue_timeout(self.spec, nested), started=self.batch_started, nested=nested,
                              alone=self.shared_deaths > 0)
        batcher_for(self.spec, "function").submit(self.item, self.pool)

    def batch_started(self, run: Run) -> None:
        self.attempts += 1
        self.run = run
        run.on_crash = self.crashed

    def batch_timed_out(self, waited: float) -> None:
        self.finish_with(queue_timeout_error(self.spec, self.pool, round(waited, 1)))

    def crashed(self, exc: BaseException) -> None:
        """A failure of ours while placing or relaying this call: it ends with the error."""
        if self.id in self.session.calls:
            self.finish_with(error_info("WorkerError", f"the server failed while running this call: {type(exc).__name__}: {exc}"))

    def finish_with(self, error: dict[str, Any]) -> None:
        """End the call with `error` before it ran anywhere."""
        if not self.cancelled:
            self.spec.stats["failed"] += 1
            metrics.CALLS.labels(self.spec.name, "failed").inc()
            self.session.end(self.id, error)

    def launch(self, worker: WorkerKernel) -> None:
        self.attempts += 1
        self.run = worker.start_run(
            self.spec.fn_hash, self.spec.fn_blob, self.on_output, mode="values", args=self.args, timeout=self.spec.timeout,
        )
        self.run.on_crash = self.crashed

    def on_output(self, data: dict[str, Any], buffers: list) -> None:
        if self.cancelled:  # the caller left, or it was stopped: nobody reads its end
            return
        printed = data.get("print")
        if printed:  # what the function printed goes to the caller, tagged with its worker
            data = {**data, "worker": self.run.worker.name}
        if data.get("end") and data.get("error") and not self.sent_any and not self.cancelled:
            if printed:  # this attempt printed before it failed: show it even if it is run again
                self.session.send({"op": "out", "id": self.id, "print": printed, "worker": data["worker"]})
                data = {k: v for k, v in data.items() if k != "print"}
            died = data["error"].get("type") == "WorkerDied"
            if died:
                self.deaths += killed_alone(self.run)
                self.shared_deaths += 1
            gave_up = self.deaths >= MAX_DEATHS or self.shared_deaths >= MAX_SHARED_DEATHS
            if (died and not gave_up) or (not died and self.attempts <= self.spec.retries):
                self.spec.stats["retried"] += 1
                self.attempt()  # run it again, on whichever worker is free
                return
            if died:
                data = {**data, "error": gave_up_error(self.shared_deaths)}
        out = {k: data[k] for k in ("start", "sizes", "end", "error", "print", "worker") if k in data}
        payload = buffers[0] if buffers else b""
        if payload:
            self.sent_any = True
        if data.get("end"):
            if data.get("error"):
                self.spec.stats["failed"] += 1
            metrics.CALLS.labels(self.spec.name, "failed" if data.get("error") else "done").inc()
            self.session.forget(self.id, data.get("error"))
        self.session.send({"op": "out", "id": self.id, **out}, payload)

    def ack(self, nbytes: int) -> None:
        if self.run is not None:
            self.run.ack(nbytes)

    def cancel(self) -> None:
        self.cancelled = True
        if self.item is not None:
            self.item.cancel()  # (leaves its batcher's queue)
        if self.run is not None:
            self.run.cancel()
        if self.task is not None and not self.task.done():
            self.task.cancel()


class Lane:
    """A map's share of one worker: a long-running call that runs the items it is fed, in
    the order sent."""

    def __init__(self, worker: WorkerKernel):
        self.worker = worker
        self.run: Run
        #: items sent and not answered, in the order sent: the first one is running
        self.inflight: dict[int, tuple[bytes, int]] = {}
        #: items asked back for another lane (`MapCall.steal`), not answered yet
        self.revoking: set[int] = set()
        #: the worker gave back less than asked: no more asking until its next result
        self.declined = False
        #: when it last sent results, or was given work with nothing in flight (monotonic)
        self.progress = 0.0
        #: told to close while it had nothing to do (`MapCall.close_idle_lanes`): no more items
        self.closing = False
        #: whether any of its items was answered (a lane that fails before is not tried again)
        self.answered = False

    @property
    def queued(self) -> int:
        """Items waiting behind the running one that may still be asked back."""
        if self.revoking or self.declined or self.run.ended or self.closing:
            return 0
        return len(self.inflight) - 1


class MapCall:
    """A `.map()`: inputs arrive from the client in batches and wait here until a lane has
    room; lanes keep about `LANE_SECONDS` of work each (by the measured time per item), a
    lane that runs dry takes back what a busy one has queued (work stealing), and results
    go back as they complete (the client restores input order)."""

    def __init__(self, session: ClientSession, call_id: str, spec: FunctionSpec, kwargs: bytes):
        self.session, self.id, self.spec, self.kwargs = session, call_id, spec, kwargs
        self.pool = session.pool_for(spec)
        self.pending: collections.deque[tuple[int, bytes, int]] = collections.deque()
        self.lanes: list[Lane] = []
        self.lane_tasks: set[asyncio.Task] = set()
        self.inputs_done = False
        self.outstanding = 0  # items received and not yet answered
        self.cancelled = False
        self.finished = False
        self.deaths: dict[int, int] = {}  # item index -> kernels that died running it alone
        self.shared_deaths: dict[int, int] = {}  # ... and while it was first in line on a lane
        self.suspects: set[int] = set()  # items that run alone until answered
        #: seconds one item takes on a worker (a moving average of what workers report),
        #: None until the first result; and the items in flight per lane it makes
        self.item_seconds: float | None = None
        self.lane_items = 1
        self.stolen = 0  # items taken back from a lane and run on another
        self.steal_timer: asyncio.TimerHandle | None = None
        #: closes lanes that have nothing to run while the caller reads no further
        self.idle_timer: asyncio.TimerHandle | None = None
        #: whether a lane ever ran: lanes opened again after idle ones closed wait without a
        #: queue timeout (the map is under way)
        self.had_lane = False
        self.started = time.time()
        self.activity_id: str | None = None  # in the server's `Activity` (the Streams panel)
        #: items received from the client, answered (done or failed), and run again
        self.received = self.done = self.failed = self.retried = 0
        self._counted = (0, 0, 0)  # of those, what the metrics have (`count_items`)

    # -- from the client --------------------------------------------------------------

    def info(self) -> dict[str, Any]:
        """What the Streams panel shows of it (its total is known once its inputs are)."""
        return {"kind": "map", "function": self.spec.name, "started": self.started, "done": self.done,
                "total": self.received if self.inputs_done else None, "failed": self.failed, "retried": self.retried,
                "lanes": len(self.lanes), "client": self.session.client}

    def stop(self, why: str) -> None:
        """Stopped from the Streams panel: its caller gets a WorkerError saying so."""
        if not self.finished:
            self.session.end(self.id, error_info("WorkerError", f"the map was {why}"))
            self.cancel()

    def add_items(self, count: int, payload: memoryview) -> None:
        """An ``items`` frame: `count` inputs (raises `wire.FrameError` before taking any
        when the frame does not hold what it says)."""
        indices, sizes, _, pickles = wire.unpack_items(payload, count, outcomes=False)
        self.received += len(indices)
        self.stop_idle_timer()
        self.pending.extend(zip(indices, wire.cut(pickles, sizes), itertools.repeat(0)))
        self.outstanding += len(indices)
        self.spec.stats["items"] += len(indices)
        self.dispatch()

    def end_of_inputs(self) -> None:
        self.inputs_done = True
        self.maybe_finish()

    def cancel(self) -> None:
        self.cancelled = True
        self.pending.clear()
        self.stop_steal_timer()
        self.stop_idle_timer()
        for task in self.lane_tasks:
            task.cancel()
        for lane in self.lanes:
            lane.run.cancel()
        self.session.forget(self.id)

    # -- lanes --------------------------------------------------------------------------

    def dispatch(self) -> None:
        """Top up every lane (the emptiest first), let lanes that ran dry steal, and ask for
        more lanes while there is more work waiting than lanes."""
        lanes = self.lanes
        if len(lanes) > 1:
            lanes = sorted(lanes, key=lambda lane: len(lane.inflight))
        for lane in lanes:
            self.feed(lane)
        if not self.pending:
            self.steal()
            self.check_idle()
            return
        wanted = min(self.pool.max_workers, self.outstanding)
        while len(self.lanes) + len(self.lane_tasks) < wanted and self.pending:
            task = supervision.spawn(self.open_lane(first=not self.had_lane and not self.lanes and not self.lane_tasks),
                                     f"opening a lane of map {self.id} of function {self.spec.name!r}", on_crash=self.crashed)
            self.lane_tasks.add(task)
            task.add_done_callback(self.lane_tasks.discard)

    async def open_lane(self, first: bool = False) -> None:
        """Borrow a worker for one more lane. The first lane of a map from inside a worker
        may have a kernel started over the server-wide cap (see `WorkerPool.acquire`); while
        the map has no lane at all, it waits at most its queue timeout."""
        nested = first and self.session.caller is not None
        timeout = queue_timeout(self.spec, self.session.caller is not None) if first else None
        try:
            caller_has_lane = any(lane.worker is self.session.caller for lane in self.lanes)
            worker = self.session.worker_now(self.pool, allow_caller=not caller_has_lane)
            if worker is None:
                worker = await asyncio.wait_for(self.pool.acquire(nested=nested), timeout)
        except WorkerError as e:
            if not self.lanes:
                self.fail_all(error_info("WorkerError", str(e)))
            return
        except asyncio.TimeoutError:
            if not self.lanes and not self.finished and not self.cancelled:
                self.fail_all(queue_timeout_error(self.spec, self.pool, timeout))
            return
        if self.cancelled or self.finished or not (self.pending or any(lane.queued for lane in self.lanes)):
            self.pool.release(worker)
            return
        lane = Lane(worker)
        lane.run = worker.start_run(
            self.spec.fn_hash, self.spec.fn_blob, functools.partial(self.on_output, lane), mode="map",
            args=self.kwargs, timeout=self.spec.timeout,
        )
        lane.run.on_crash = self.crashed
        self.had_lane = True
        self.lanes.append(lane)
        self.feed(lane)
        if not lane.inflight:
            self.steal()

    def feed(self, lane: Lane) -> None:
        inflight = lane.inflight
        room = self.lane_items - len(inflight)
        if room <= 0 or not self.pending or lane.run.ended or lane.closing:
            return
        # a suspect (see `blame`) runs alone on its lane, so that a death can be blamed on it
        suspects = self.suspects
        if suspects and any(index in suspects for index in inflight):
            return
        lanes = len(self.lanes)
        if lanes > 1:
            # no lane takes more than its share of what is left, so that the lanes whose
            # results are on their way find work too (a lane with nothing takes one anyway)
            share = (len(self.pending) + sum(len(other.inflight) for other in self.lanes)) // lanes
            room = min(room, max(share - len(inflight), 0 if inflight else 1))
        room = min(room, MAX_LANE_BATCH)
        indices, sizes, blobs = [], [], []
        while self.pending and len(indices) < room:
            alone = bool(suspects) and self.pending[0][0] in suspects
            if alone and (indices or inflight):
                break
            index, blob, attempts = self.pending.popleft()
            inflight[index] = (blob, attempts)
            indices.append(index)
            sizes.append(len(blob))
            blobs.append(blob)
            if alone:
                break
        if not indices:
            return
        if len(inflight) == len(indices):  # it was idle: its work starts now
            lane.progress = time.monotonic()
        lane.run.send_batch(indices, sizes, blobs)

    def victim(self) -> tuple[Lane | None, int, float | None]:
        """The busy lane to take items from, and how many it has queued: of the lanes whose
        queued items would wait there at least `STEAL_MIN_SECONDS`, the one with the most.
        Then, when some lane has items queued that do not qualify yet: in how many seconds
        it would, if its running item takes that long (else None)."""
        now = time.monotonic()
        seconds = self.item_seconds
        victim, most, retry = None, 0, None
        for lane in self.lanes:
            queued = lane.queued
            if not queued:
                continue
            if seconds is None or queued * seconds >= STEAL_MIN_SECONDS:
                stuck_at = now
            else:  # silent for longer than its items should take: its running item is a long one
                stuck_at = lane.progress + STEAL_MIN_SECONDS + len(lane.inflight) * seconds
            if stuck_at <= now:
                if queued > most:
                    victim, most = lane, queued
            else:
                retry = stuck_at - now if retry is None else min(retry, stuck_at - now)
        return victim, most, retry

    def steal(self) -> None:
        """Lanes that ran dry while nothing waits here take items that busy lanes have
        queued but not started (work stealing, as in dask): the busy lane's worker gives
        back those still queued (`Run.revoke`), and they come back here for the emptiest
        lanes (`on_revoked`). Each item is either here, or in flight on exactly one lane."""
        if self.cancelled or self.finished or self.pending:
            return
        idle = sum(1 for lane in self.lanes if not lane.inflight and not lane.run.ended and not lane.closing)
        idle -= sum(len(lane.revoking) for lane in self.lanes)  # already on their way back
        while idle > 0:
            victim, queued, retry = self.victim()
            if victim is None:
                if retry is not None and self.steal_timer is None:
                    self.steal_timer = asyncio.get_running_loop().call_later(max(retry, 0.001), self.steal_again)
                return
            # share the victim's queue out between it and the lanes that ran dry
            take = min(queued, max(1, (queued + 1) * idle // (idle + 1)))
            indices = list(victim.inflight)[-take:]
            victim.revoking.update(indices)
            victim.run.revoke(indices)
            idle -= take

    def steal_again(self) -> None:
        self.steal_timer = None
        self.steal()

    def stop_steal_timer(self) -> None:
        if self.steal_timer is not None:
            self.steal_timer.cancel()
            self.steal_timer = None

    def on_revoked(self, lane: Lane, indices: list[int]) -> None:
        """A lane's worker gave these items back (they never started there)."""
        returned = []
        for index in indices:
            entry = lane.inflight.pop(index, None)
            if entry is not None:
                returned.append((index, *entry))
        lane.declined = len(returned) < len(lane.revoking)
        lane.revoking.clear()
        if returned and not self.cancelled:
            self.stolen += len(returned)
            self.spec.stats["stolen"] += len(returned)
            self.pending.extendleft(reversed(returned))
            self.dispatch()

    # -- lanes with nothing to do --------------------------------------------------------

    def check_idle(self) -> None:
        """A lane ran dry and no inputs wait here, though more may come (the caller has
        not read on): close the idle lanes after `LANE_LINGER` (sooner when other calls
        than this map's own lane openings wait for the pool), so that a map held open
        never holds workers."""
        if self.finished or self.cancelled or self.inputs_done or self.pending or self.idle_timer is not None:
            return
        if not any(not lane.inflight and not lane.closing for lane in self.lanes):
            return
        others_wait = self.pool.waiting > len(self.lane_tasks)
        self.idle_timer = asyncio.get_running_loop().call_later(LANE_LINGER_CONTENDED if others_wait else LANE_LINGER,
                                                                self.close_idle_lanes)

    def close_idle_lanes(self) -> None:
        self.idle_timer = None
        if self.finished or self.cancelled or self.pending or self.inputs_done:
            return
        for lane in self.lanes:
            if not lane.inflight and not lane.closing:
                lane.closing = True
                lane.run.close_lane()  # it ends once it has run what it has: nothing

    def stop_idle_timer(self) -> None:
        if self.idle_timer is not None:
            self.idle_timer.cancel()
            self.idle_timer = None

    def crashed(self, exc: BaseException) -> None:
        """A task of this map failed (a bug of ours): the map ends with the error instead of
        hanging; its lanes are stopped."""
        if not self.finished and not self.cancelled:
            self.fail_all(error_info("WorkerError", f"the server failed while running this map: {type(exc).__name__}: {exc}"))
            for lane in self.lanes:
                lane.run.cancel()

    def on_output(self, lane: Lane, data: dict[str, Any], buffers: list) -> None:
        if data.get("print") and not self.cancelled:
            self.session.send({"op": "out", "id": self.id, "print": data["print"], "worker": lane.worker.name})
        count = data.get("items")
        if count:
            busy = data.get("busy")
            if busy is not None:
                self.observe(count, busy)
            lane.declined = False
            lane.answered = True
            lane.progress = time.monotonic()
            self.on_results(lane, buffers)
            lane.run.consumed(buffers[0].nbytes)  # forwarded: the lane may send more
        revoked = data.get("revoked")
        if revoked is not None:
            self.on_revoked(lane, revoked)
        if data.get("end"):
            self.lane_ended(lane, data)
        elif not self.cancelled:
            self.feed(lane)
            if not lane.inflight and not self.pending:
                self.steal()
                self.check_idle()
        self.maybe_finish()

    def observe(self, count: int, busy: float) -> None:
        """`count` items took `busy` seconds on a worker: update the time per item, and
        with it how many items a lane keeps in flight."""
        seconds = busy / count
        if self.item_seconds is not None:
            seconds = (self.item_seconds + seconds) / 2
        self.item_seconds = seconds
        if seconds * MAX_LANE_ITEMS <= LANE_SECONDS:
            self.lane_items = MAX_LANE_ITEMS
        else:
            self.lane_items = max(MIN_LANE_ITEMS, int(LANE_SECONDS / seconds))

    def on_results(self, lane: Lane, buffers: list) -> None:
        """A lane's results (buffers: pickles, indices, sizes, outcomes; checked by
        `wire.check_worker_message`), forwarded to the client as they came unless an item
        was dropped (no longer in flight there) or failed and runs again."""
        payload, indices, outcomes = buffers[0], wire.unpack_ints(buffers[1]).tolist(), bytes(buffers[3])
        inflight, suspects, pop = lane.inflight, self.suspects, lane.inflight.pop
        failed = outcomes.count(wire.ITEM_FAILED)
        if not failed and not suspects and all(index in inflight for index in indices):  # the hot path
            for index in indices:
                pop(index)
            self.done += len(indices)
            self.outstanding -= len(indices)
            self.count_items()
            if not self.cancelled:
                self.session.send({"op": "out", "id": self.id, "items": len(indices), "lanes": len(self.lanes)},
                                  buffers[1], buffers[2], outcomes, payload)
            return
        forward_indices, forward_outcomes, forward_blobs = [], bytearray(), []
        for index, ok, blob in zip(indices, outcomes, wire.split(payload, wire.unpack_ints(buffers[2]).tolist())):
            entry = pop(index, None)
            if entry is None:
                continue
            if suspects:
                suspects.discard(index)
            args, attempts = entry
            if not ok and attempts < self.spec.retries and not self.cancelled:
                self.pending.appendleft((index, args, attempts + 1))
                self.spec.stats["retried"] += 1
                self.retried += 1
                forward_indices.append(index)  # tell the client: it runs again
                forward_outcomes.append(wire.ITEM_RETRIED)
                forward_blobs.append(b"")
                continue
            if not ok:
                self.spec.stats["failed"] += 1
                self.failed += 1
            self.done += 1
            self.outstanding -= 1
            forward_indices.append(index)
            forward_outcomes.append(ok)
            forward_blobs.append(blob)
        if self.done or self.retried:
            self.count_items()
        if forward_indices and not self.cancelled:
            self.send_results(forward_indices, forward_outcomes, forward_blobs)

    def send_results(self, indices: list[int], outcomes: bytes | bytearray, blobs: list) -> None:
        self.session.send({"op": "out", "id": self.id, "items": len(indices), "lanes": len(self.lanes)},
                          wire.pack_items(indices, map(len, blobs), bytes(outcomes)), *blobs)

    def lane_ended(self, lane: Lane, data: dict[str, Any]) -> None:
        """A lane's call ended: closed by us, cancelled, timed out or its worker died.
        Whatever it still had in flight runs again elsewhere."""
        if lane in self.lanes:
            self.lanes.remove(lane)
        error = data.get("error") or {}
        if error and error.get("type") not in ("WorkerDied", "FunctionTimeoutError") and not lane.answered \
                and not self.cancelled and not self.finished:
            # the lane failed before any item ran (the function does not load there, its
            # arguments do not unpickle): another lane would fail alike, for ever
            for other in self.lanes:
                other.run.cancel()
            self.fail_all(error)
            return
        if error.get("type") == "WorkerDied" and lane.inflight and not self.cancelled:
            self.blame(lane)
        for index, (blob, attempts) in sorted(lane.inflight.items(), reverse=True):
            self.pending.appendleft((index, blob, attempts))
        lane.inflight.clear()
        lane.revoking.clear()  # its worker is gone: what it was asked for is back here
        if not self.cancelled and not self.finished:
            self.dispatch()

    def blame(self, lane: Lane) -> None:
        """The lane's kernel died. Items run in the order sent, so the first one not yet
        answered was running, unless its result was still on its way: a death counts
        against an item only when it was the lane's only one and the lane the kernel's
        only call; otherwise that first item becomes a suspect and next runs alone. After
        `MAX_DEATHS` (or `MAX_SHARED_DEATHS`) an item fails with its own error instead of
        killing kernel after kernel."""
        index = next(iter(lane.inflight))
        self.shared_deaths[index] = self.shared_deaths.get(index, 0) + 1
        if len(lane.inflight) == 1 and killed_alone(lane.run):
            self.deaths[index] = self.deaths.get(index, 0) + 1
        if self.deaths.get(index, 0) < MAX_DEATHS and self.shared_deaths[index] < MAX_SHARED_DEATHS:
            self.suspects.add(index)
            return
        self.suspects.discard(index)
        self.deaths.pop(index, None)
        del lane.inflight[index]
        self.outstanding -= 1
        self.spec.stats["failed"] += 1
        self.failed += 1
        self.done += 1
        self.count_items()
        blob = wire.dumps(gave_up_error(self.shared_deaths.pop(index)))
        self.send_results([index], bytes([wire.ITEM_FAILED]), [blob])

    def count_items(self) -> None:
        """Bring the map item counters (metrics) up to this map's counts."""
        counted = self._counted
        done, failed, retried = self.done - self.failed, self.failed, self.retried
        for outcome, now, before in (("done", done, counted[0]), ("failed", failed, counted[1]), ("retried", retried, counted[2])):
            if now > before:
                metrics.MAP_ITEMS.labels(self.spec.name, outcome).inc(now - before)
        self._counted = (done, failed, retried)

    def maybe_finish(self) -> None:
        if self.finished or self.cancelled or not self.inputs_done or self.outstanding:
            return
        metrics.CALLS.labels(self.spec.name, "done").inc()
        self.finished = True
        self.stop_steal_timer()
        self.stop_idle_timer()
        for task in self.lane_tasks:
            task.cancel()
        for lane in self.lanes:
            if not lane.closing:
                lane.run.close_lane()
        self.session.end(self.id)

    def fail_all(self, error: dict[str, Any]) -> None:
        metrics.CALLS.labels(self.spec.name, "failed").inc()
        self.finished = True
        self.stop_steal_timer()
        self.stop_idle_timer()
        for task in self.lane_tasks:
            task.cancel()
        self.spec.stats["failed"] += 1
        self.session.end(self.id, error)


class BatchedMapCall:
    """A `.map()` (`.starmap`, `.for_each`) of a batched function: each input joins the
    function's batches (`batching`), next to every other caller's inputs, instead of
    lanes of its own. Results go back as they complete (the client restores input order),
    a batch's worth in one frame; failed inputs are retried (`--retries`), and inputs
    whose kernel died under them run again alone, as a map's do."""

    def __init__(self, session: ClientSession, call_id: str, spec: FunctionSpec, kwargs: bytes):
        self.session, self.id, self.spec, self.kwargs = session, call_id, spec, kwargs
        self.pool = session.pool_for(spec)
        self.batcher = batcher_for(spec, "function")
        self.items: dict[int, BatchItem] = {}  # index -> its input, until answered
        self.attempts: dict[int, int] = {}  # index -> times it failed and was run again
        self.deaths: dict[int, int] = {}  # index -> kernels that died running it alone
        self.shared_deaths: dict[int, int] = {}
        self.results: list[tuple[int, bool | None, bytes]] = []  # answered, for the next frame
        self.flushing = False
        self.inputs_done = self.cancelled = self.finished = False
        self.started = time.time()
        self.activity_id: str | None = None
        self.received = self.done = self.failed = self.retried = 0

    def info(self) -> dict[str, Any]:
        return {"kind": "map", "function": self.spec.name, "started": self.started, "done": self.done,
                "total": self.received if self.inputs_done else None, "failed": self.failed, "retried": self.retried,
                "lanes": 0, "client": self.session.client}

    def stop(self, why: str) -> None:
        if not self.finished:
            self.session.end(self.id, error_info("WorkerError", f"the map was {why}"))
            self.cancel()

    def add_items(self, count: int, payload: memoryview) -> None:
        indices, sizes, _, pickles = wire.unpack_items(payload, count, outcomes=False)
        self.received += len(indices)
        self.spec.stats["items"] += len(indices)
        for index, blob in zip(indices, wire.cut(pickles, sizes)):
            self.submit(index, blob)

    def submit(self, index: int, args: bytes, alone: bool = False) -> None:
        item = BatchItem(functools.partial(self.on_output, index), {"args": args, "kwargs": self.kwargs},
                         refused=functools.partial(self.answer, index, False), nested=self.session.caller is not None,
                         alone=alone)
        self.items[index] = item
        self.batcher.submit(item, self.pool)

    def end_of_inputs(self) -> None:
        self.inputs_done = True
        self.maybe_finish()

    def on_output(self, index: int, data: dict[str, Any], buffers: list) -> None:
        item = self.items.get(index)
        if item is None or self.cancelled:
            return
        if data.get("print"):
            self.session.send({"op": "out", "id": self.id, "print": data["print"], "worker": item.worker.name})
        if not data.get("end"):
            if buffers and buffers[0].nbytes:  # its value, ahead of its end
                item.fields["value"] = bytes(buffers[0])
            return
        error = data.get("error")
        if error is None:
            value = bytes(buffers[0]) if buffers and buffers[0].nbytes else item.fields.get("value", b"")
            self.answer(index, True, value)
            return
        args = item.fields["args"]
        if error.get("type") == "WorkerDied":
            self.shared_deaths[index] = self.shared_deaths.get(index, 0) + 1
            if killed_alone(item.run):
                self.deaths[index] = self.deaths.get(index, 0) + 1
            if self.deaths.get(index, 0) < MAX_DEATHS and self.shared_deaths[index] < MAX_SHARED_DEATHS:
                self.again(index, args, alone=True)
                return
            error = gave_up_error(self.shared_deaths[index])
        elif self.attempts.get(index, 0) < self.spec.retries:
            self.attempts[index] = self.attempts.get(index, 0) + 1
            self.again(index, args, alone=False)
            return
        self.answer(index, False, error)

    def again(self, index: int, args: bytes, alone: bool) -> None:
        """Run input `index` again (the client hears it is being retried)."""
        self.spec.stats["retried"] += 1
        self.retried += 1
        self.results.append((index, None, b""))
        self.flush_soon()
        self.submit(index, args, alone)

    def answer(self, index: int, ok: bool, value: Any) -> None:
        """Input `index` is done: its pickled result, or its error (a dict)."""
        if self.items.pop(index, None) is None or self.cancelled:
            return
        if not ok:
            self.spec.stats["failed"] += 1
            self.failed += 1
            value = wire.dumps(value)
        self.done += 1
        metrics.MAP_ITEMS.labels(self.spec.name, "done" if ok else "failed").inc()
        self.results.append((index, ok, value))
        self.flush_soon()

    def flush_soon(self) -> None:
        """Send what is answered in one frame, once this loop turn has answered all it will
        (a batch's inputs end in one message from the worker)."""
        if not self.flushing:
            self.flushing = True
            asyncio.get_running_loop().call_soon(self.flush)

    def flush(self) -> None:
        self.flushing = False
        results, self.results = self.results, []
        if results and not self.cancelled:
            outcomes = bytes(wire.ITEM_RETRIED if ok is None else wire.ITEM_OK if ok else wire.ITEM_FAILED for _, ok, _ in results)
            self.session.send({"op": "out", "id": self.id, "items": len(results), "lanes": 1},
                              wire.pack_items([i for i, _, _ in results], [len(v) for _, _, v in results], outcomes),
                              *(v for _, _, v in results))
        self.maybe_finish()

    def maybe_finish(self) -> None:
        if self.finished or self.cancelled or not self.inputs_done or self.items or self.results:
            return
        self.finished = True
        metrics.CALLS.labels(self.spec.name, "done").inc()
        self.session.end(self.id)

    def cancel(self) -> None:
        self.cancelled = True
        items, self.items = self.items, {}
        for item in items.values():
            item.cancel()
        self.session.forget(self.id)

def check_frame(header: dict[str, Any], payload: memoryview) -> None:
    """Raise `wire.FrameError` unless `header` is a well-formed client op (see `wire`)."""
    op, call_id = header.get("op"), header.get("id")
    if op not in ("call", "items", "inputs_done", "ack", "cancel"):
        raise wire.FrameError(f"unknown op {op!r}; expected call, items, inputs_done, ack or cancel")
    if not isinstance(call_id, str) or not 0 < len(call_id) <= 64:
        raise wire.FrameError(f"{op!r} needs an 'id' string of 1 to 64 characters")
    if op == "call":
        if not isinstance(header.get("fn"), str) or header.get("kind", "remote") not in ("remote", "map"):
            raise wire.FrameError("'call' needs 'fn' (a function name) and 'kind' ('remote' or 'map')")
    elif op == "items":  # what its payload holds is checked as it is read (`MapCall.add_items`)
        if type(header.get("count")) is not int or header["count"] < 0:
            raise wire.FrameError("'items' needs 'count', the number of items in its payload")
    elif op == "ack":
        if type(header.get("bytes")) is not int or header["bytes"] < 0:
            raise wire.FrameError("'ack' needs 'bytes', a whole number")


class ClientSession:
    """The calls of one client connection, keyed by the client's call ids."""

    def __init__(self, pool_for: Callable[[FunctionSpec], WorkerPool], functions: Registry, send: Callable[[bytes], None],
                 caller: WorkerKernel | None = None, activity: Any = None, client: str = ""):
        #: the pool that runs a function's calls (see `server.app.JupyterStream.pool_for`)
        self.pool_for = pool_for
        self.functions = functions
        self._send = send
        #: the worker kernel this client runs in, when a function calls another one
        self.caller = caller
        self.calls: dict[str, Any] = {}
        #: where the calls running now are listed (`events.Activity`), and who the client is there
        self.activity = activity
        self.client = caller.name if caller is not None else client

    def worker_now(self, pool: WorkerPool, allow_caller: bool = True) -> WorkerKernel | None:
        """An idle worker, or None. A call made from inside a worker while every worker is
        busy and the pool is at its maximum runs on that same worker, in a thread of its
        own: its caller is waiting for it, so waiting for a free worker could wait forever
        (dask's `secede` solves the same problem the same way)."""
        worker = pool.try_acquire()
        if worker is None and allow_caller and self.caller is not None and self.caller.pool is pool:
            worker = pool.lend_beside(self.caller)
        return worker

    def send(self, header: dict[str, Any], *payload: bytes | memoryview) -> None:
        self._send(wire.encode_frame(header, *payload))

    def forget(self, call_id: str, error: dict[str, Any] | None = None) -> None:
        """The call has ended (done, failed, cancelled): it is no longer running here."""
        call = self.calls.pop(call_id, None)
        if call is not None and self.activity is not None:
            self.activity.ended(call.activity_id, error)

    def end(self, call_id: str, error: dict[str, Any] | None = None) -> None:
        self.forget(call_id, error)
        header: dict[str, Any] = {"op": "out", "id": call_id, "end": True}
        if error is not None:
            header["error"] = error
        self.send(header)

    def on_frame(self, header: dict[str, Any], payload: memoryview) -> None:
        """Act on one frame from the client; a frame that breaks the protocol raises
        `wire.FrameError` (the handler closes the socket, saying why)."""
        check_frame(header, payload)
        op, call_id = header["op"], header["id"]
        if op == "call":
            if call_id in self.calls:
                raise wire.FrameError(f"call id {call_id!r} is already in use")
            spec = self.functions.get(header.get("fn"))
            if spec is None:
                self.end(call_id, error_info("LookupError", self.functions.not_found(header["fn"]), "builtins"))
                return
            spec.stats["calls"] += 1
            if header.get("kind") == "map":
                kind = MapCall if spec.batch is None else BatchedMapCall
            else:
                kind = RemoteCall
            call = self.calls[call_id] = kind(self, call_id, spec, payload.tobytes())
            if self.activity is not None:
                call.activity_id = self.activity.started(call)
            return
        call = self.calls.get(call_id)
        if call is None:  # ended, or cancelled: frames already on their way are dropped
            return
        if op in ("items", "inputs_done") and isinstance(call, RemoteCall):
            raise wire.FrameError(f"{op!r} is for map calls; call {call_id!r} is a remote call")
        if op == "ack" and not isinstance(call, RemoteCall):
            raise wire.FrameError(f"'ack' is for remote calls; call {call_id!r} is a map")
        if op == "items":
            call.add_items(header["count"], payload)
        elif op == "inputs_done":
            call.end_of_inputs()
        elif op == "ack":
            call.ack(header["bytes"])
        elif op == "cancel":
            call.cancel()
            self.forget(call_id)

    def close(self) -> None:
        """The client went away: stop everything it started."""
        for call_id, call in list(self.calls.items()):
            call.cancel()
            self.forget(call_id)
