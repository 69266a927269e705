"""A pool of interchangeable worker kernels: it starts, lends out, watches, replaces and
scales them down.

A `WorkerKernel` (see `kernels`) is one ipykernel started through jupyter_client. A
`WorkerPool` runs the functions of one set of requirements (kernel, GPU spec, env; see
`placement`): it keeps between `min_workers` and `max_workers` kernels, hands an idle one
to each call, replaces kernels that die and stops those idle for `scaledown_window`
seconds down to its minimum. Each start goes through the `Placement`, which caps all
pools together and gives a GPU pool's kernel its own GPUs (``CUDA_VISIBLE_DEVICES``).

Where kernels come from is one seam: `kernel_manager_class` (any jupyter_client
`AsyncKernelManager`, so kernel provisioners plug in), or `gateway` (a `WorkerGateway`:
kernels started on a Kernel or Enterprise Gateway, see `gateway`).

Nothing here dies unseen: the watcher runs its turns through `supervision.every` (a turn
that fails is logged, the next one runs), every kernel start and stop is a supervised
task, each worker is pinged every poll (one that stops answering is offered no new calls,
and is replaced after `ping_timeout`), and a pool whose kernels fail to start backs off
(2, 4, 8 ... 60 s) and tells the calls waiting for it why instead of leaving them hanging.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import time
from typing import Any

from jupyter_client.manager import AsyncKernelManager

from ..errors import WorkerError
from ..requirements import parse_gpu_spec
from . import metrics, supervision
from .kernels import WorkerKernel
from .placement import DEFAULT_SCALEDOWN_WINDOW, Placement, PoolKey, Seat

#: Environment variables a worker kernel never inherits from the server: the server's own
#: token (workers get `worker_env`'s narrower one instead).
PRIVATE_ENV = ("JUPYTER_TOKEN", "JUPYTER_TOKEN_FILE", "JUPYTERHUB_API_TOKEN", "JPY_API_TOKEN")
#: Longest wait between two tries to start a kernel of a pool whose starts fail.
MAX_START_BACKOFF = 60.0

log = logging.getLogger("jupyter_stream")


class WorkerPool:
    """Lends worker kernels to calls: at most `calls_per_worker` calls on each kernel at once."""

    def __init__(
        self,
        *,
        kernel_name: str = "python3",
        min_workers: int = 1,
        max_workers: int = 4,
        calls_per_worker: int = 1,
        startup_timeout: float = 60.0,
        poll_interval: float = 0.5,
        cwd: str | None = None,
        kernel_manager_class: type[AsyncKernelManager] = AsyncKernelManager,
        transport: str = "tcp",
        cancel_grace_period: float = 5.0,
        freeze_gc: bool = False,
        worker_messages: str = "auto",
        gpu: str | None = None,
        env: dict[str, str] | None = None,
        scaledown_window: float = DEFAULT_SCALEDOWN_WINDOW,
        placement: Placement | None = None,
        concurrency: int | None = None,
        ping_timeout: float = 60.0,
        worker_env: dict[str, str] | None = None,
        gateway: Any = None,
    ):
        self.kernel_name = kernel_name
        self.gpu = parse_gpu_spec(gpu)
        self.env = dict(env or {})
        self.key = PoolKey(kernel_name, gpu, tuple(sorted(self.env.items())), concurrency)
        self.min_workers = min_workers
        self.max_workers = max(max_workers, min_workers, 1)
        self.scaledown_window = scaledown_window
        self.calls_per_worker = calls_per_worker
        self.startup_timeout = startup_timeout
        self.poll_interval = poll_interval
        self.cwd = cwd
        self.kernel_manager_class = kernel_manager_class
        self.transport = transport
        self.cancel_grace_period = cancel_grace_period
        self.freeze_gc = freeze_gc  # the workers freeze their start-up objects (`JupyterStream.freeze_gc`)
        #: how the server exchanges messages with this pool's workers (see `transports.transport_class`):
        #: a gateway's kernels have no ZMQ sockets here, so 'direct' and 'zmq' are 'channels' for them
        #: (the app says so once in the log; `/api/stream/workers` shows each worker's transport)
        self.worker_messages = "channels" if gateway is not None and worker_messages in ("direct", "zmq") else worker_messages
        #: seconds a worker may leave a ping unanswered before it is replaced; after a
        #: shorter while it is offered no new calls (`unresponsive_after`)
        self.ping_timeout = ping_timeout
        #: what every worker's environment gets on top of the server's (its narrow token)
        self.worker_env = dict(worker_env or {})
        #: the `WorkerGateway` this pool's kernels are started on (None: this machine)
        self.gateway = gateway
        self.shutdown_wait_time = 2.5
        #: kernel starts that failed in a row, when the next may be tried (monotonic), and why
        self.start_failures = 0
        self.retry_at = 0.0
        self.start_error: str | None = None
        #: calls from inside a worker waiting here (their callers hold seats while they wait)
        self.nested_waiting = 0
        self.last_turn = 0.0  # when the watcher last looked (monotonic)
        self._nested: set[asyncio.Future] = set()  # their waiters, served first by a worker started over the cap
        self.number = 0  # the placement numbers its pools (see `info`)
        self.workers: list[WorkerKernel] = []
        self.draining: list[WorkerKernel] = []
        self.starting = 0
        self.replaced = 0
        self.seats: dict[WorkerKernel, Seat] = {}
        self.idle_since: dict[WorkerKernel, float] = {}  # time.time() a worker last became idle
        self.stopping: dict[WorkerKernel, asyncio.Task] = {}  # evicted, not exited yet
        self._waiters: collections.deque[asyncio.Future] = collections.deque()
        self._watcher: asyncio.Task | None = None
        self._closed = False
        self._tasks: set[asyncio.Task] = set()
        self.placement = placement if placement is not None else Placement(max_workers=self.max_workers)
        self.placement.add_pool(self)

    async def start(self) -> None:
        """Start the warm minimum of workers and the watcher that replaces dead ones and
        scales idle ones down."""
        if self._watcher is None:
            what = f"the watcher of pool [{self.key.describe()}]"
            self._watcher = supervision.spawn(
                supervision.every(lambda: self.poll_interval, self.watch_once, what, lambda: not self._closed), what)
        tasks = [self._grow(evict=False) for _ in range(max(self.min_workers - len(self.workers) - self.starting, 0))]
        await asyncio.gather(*(t for t in tasks if t is not None), return_exceptions=True)

    @property
    def unresponsive_after(self) -> float:
        """Seconds without an answer to a ping after which a worker gets no new calls."""
        return min(max(2.0, 4 * self.poll_interval), self.ping_timeout)

    @property
    def watched(self) -> bool:
        """Whether `start` has run: dead kernels are replaced, idle ones scaled down."""
        return self._watcher is not None

    @property
    def waiting(self) -> int:
        """Calls waiting for a worker of this pool."""
        return len(self._waiters)

    @property
    def full(self) -> bool:
        """No more kernels may start: the pool is at `max_workers`."""
        return len(self.workers) + self.starting >= self.max_workers

    def worker_key(self, index: int) -> str:
        return self.placement.worker_key(index)

    def worker_named(self, claim: str) -> WorkerKernel | None:
        """The live worker (of any pool) whose ``JUPYTER_STREAM_WORKER`` value is `claim`."""
        return self.placement.worker_named(claim)

    def try_acquire(self) -> WorkerKernel | None:
        """A worker with room for one more call right now, or None."""
        if not self._waiters:  # never jump the queue
            for worker in self.workers:
                if worker.accepting and worker.load < self.calls_per_worker:
                    worker.load += 1
                    return worker
        return None

    def lend_beside(self, caller: WorkerKernel) -> WorkerKernel | None:
        """`caller` itself, one call over its share, for a call it makes while the pool cannot
        grow: it waits for that call, so waiting for a free worker could wait forever."""
        if caller.alive and not self.placement.can_start(self):  # full, or the machine is (other pools, GPUs)
            caller.load += 1
            return caller
        return None

    async def acquire(self, nested: bool = False) -> WorkerKernel:
        """A worker with room for one more call, starting a new kernel if the pool may grow.
        `nested`: the call comes from inside a worker of another pool, whose caller waits
        for it holding its seat; if the machine is full it may start a kernel over the
        server-wide cap, or the two could wait for each other for ever."""
        if self._closed:
            raise WorkerError("the worker pool is shut down")
        worker = self.try_acquire()
        if worker is not None:
            return worker
        self.check_can_start()
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        self.nested_waiting += nested
        if nested:
            self._nested.add(waiter)
        since = time.monotonic()
        try:
            self.grow_for_waiters()
            worker = await waiter
            metrics.QUEUE_WAIT_SECONDS.labels(metrics.pool_label(self)).observe(time.monotonic() - since)
            return worker
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                self.release(waiter.result())
            else:
                self._forget(waiter)
            raise
        finally:
            self.nested_waiting -= nested
            self._nested.discard(waiter)

    def check_can_start(self) -> None:
        """Raise `WorkerError` saying why when nothing could serve a call now: no worker
        runs, none is starting, and the last starts failed (the pool is backing off)."""
        if self.start_error is None or self.starting or any(w.accepting for w in self.workers):
            return
        wait = self.retry_at - time.monotonic()
        if wait > 0:
            raise WorkerError(f"could not start a worker kernel: {self.start_error} (the next try is in {wait:.0f} s)")

    def release(self, worker: WorkerKernel) -> None:
        worker.load -= 1
        if worker.draining:
            if worker.load <= 0:
                self._retire_drained(worker)
            return
        self._offer(worker)
        if worker.load <= 0:
            self.idle_since[worker] = time.time()
            if self.placement.blocked:  # another pool may stop this idle kernel to start its own
                self.placement.wake()

    def available(self, worker: WorkerKernel) -> None:
        """A worker that was silent answers again: the calls waiting here may have it."""
        self._offer(worker)

    def _offer(self, worker: WorkerKernel) -> None:
        """Hand a worker with spare room to the calls waiting for one, in arrival order;
        one started over the server-wide cap serves the calls from inside workers first
        (it was started for them)."""
        seat = self.seats.get(worker)
        if seat is not None and seat.over_cap and self._nested:
            for waiter in [w for w in self._waiters if w in self._nested]:
                if not (worker.accepting and worker.load < self.calls_per_worker):
                    return
                self._waiters.remove(waiter)
                if not waiter.done():
                    worker.load += 1
                    waiter.set_result(worker)
        while worker.accepting and worker.load < self.calls_per_worker and self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                worker.load += 1
                waiter.set_result(worker)

    def _forget(self, waiter: asyncio.Future) -> None:
        try:
            self._waiters.remove(waiter)
        except ValueError:
            pass

    def _spawn(self, coro: Any, what: str) -> asyncio.Task:
        task = supervision.spawn(coro, what)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _grow(self, over_max: bool = False, evict: bool = True, over_cap: bool = False) -> asyncio.Task | None:
        """Start one more kernel if the placement finds room (None if not: the pool is
        woken when room frees up), unless starts failed lately and the next try is not due.
        Counted as starting at once, so that calls arriving in the same loop turn see it
        and the pool never grows past `max_workers`."""
        if not over_max and time.monotonic() < self.retry_at:
            return None
        seat = self.placement.reserve(self, over_max=over_max, evict=evict, over_cap=over_cap)
        if seat is None:
            return None
        self.starting += 1
        return self._spawn(self._start_worker(seat), f"starting a worker of pool [{self.key.describe()}]")

    def grow_for_waiters(self) -> None:
        """Start kernels for calls waiting here, one per waiting call not already covered.
        A call from inside a worker may have one started over the server-wide cap."""
        while not self._closed and len(self._waiters) > self.starting and not self.full:
            if self._grow() is None:
                if self.nested_waiting <= self.starting or self._grow(over_cap=True) is None:
                    break

    def _env_for(self, seat: Seat) -> dict[str, str]:
        if self.gateway is not None:  # nothing of this machine's environment leaves it; the gateway places GPUs
            env = {**self.worker_env, **self.env}
            env["JUPYTER_STREAM_WORKER"] = f"{seat.index}:{self.worker_key(seat.index)}"
            return env
        env = {k: v for k, v in os.environ.items() if k not in PRIVATE_ENV}
        env.update(self.worker_env)
        env.update(self.env)
        env["JUPYTER_STREAM_WORKER"] = f"{seat.index}:{self.worker_key(seat.index)}"
        # exactly its own GPUs, numbered as NVML numbers them; none at all for a CPU pool,
        # so that code there cannot take GPU memory by accident
        env["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(i) for i in seat.gpus)
        return env

    def _kernel_manager(self, seat: Seat) -> Any:
        if self.gateway is not None:
            from .gateway import GatewayWorkerManager

            devices = [self.placement.inventory.devices[i] for i in seat.gpus]
            return GatewayWorkerManager(self.gateway, self.kernel_name, devices, self.placement.default_kernel)
        index = seat.index
        if self.transport != "ipc":
            return self.kernel_manager_class(kernel_name=self.kernel_name)
        # unix sockets in the runtime dir: faster than loopback TCP for local kernels
        from jupyter_core.paths import jupyter_runtime_dir

        prefix = os.path.join(jupyter_runtime_dir(), f"jupyter-stream-{os.getpid()}-{index}")
        return self.kernel_manager_class(kernel_name=self.kernel_name, transport="ipc", ip=prefix)

    def recycle(self, worker: WorkerKernel, reason: str) -> None:
        """Replace a kernel that still works but holds a call that will not stop: start its
        replacement first, then take it out of the pool and shut it down once the calls
        that still have clients there are done. The others keep serving meanwhile."""
        if worker.draining or worker not in self.workers or self._closed:
            return
        log.warning("jupyter_stream: replacing %s (pid %s): %s", worker.name, worker.pid, reason)
        worker.draining = True
        task = self._grow(over_max=True)  # the replacement may take the pool one over max_workers meanwhile
        if task is None:  # its GPUs are needed: this one goes first, the replacement follows
            self._drain(worker)
        else:
            task.add_done_callback(lambda _: self._drain(worker))

    def _drain(self, worker: WorkerKernel) -> None:
        if worker in self.workers:
            self.workers.remove(worker)
            self.replaced += 1
            self.draining.append(worker)
        if worker.load <= 0:
            self._retire_drained(worker)

    def _retire_drained(self, worker: WorkerKernel) -> None:
        if worker in self.draining:
            self.draining.remove(worker)
            log.info("jupyter_stream: %s (pid %s) has no more calls with clients; shutting it down", worker.name, worker.pid)
            worker.died("it was replaced")
            self._spawn(self._stop(worker, now=True), f"stopping {worker.name}")

    async def _start_worker(self, seat: Seat) -> WorkerKernel | None:
        """Start a kernel counted in `starting` by `_grow`, in `seat` (after the idle
        kernels stopped to make room for it have exited)."""
        worker = WorkerKernel(self, seat.index, self._kernel_manager(seat))
        seat.worker = worker
        self.seats[worker] = seat
        try:
            if seat.victims:
                await asyncio.gather(*(v.pool.stopped(v) for v in seat.victims), return_exceptions=True)
            await worker.start(self._env_for(seat), self.cwd, self.startup_timeout)
        except BaseException as exc:
            self.starting -= 1
            if not isinstance(exc, Exception):  # cancelled: the server is stopping
                await self._stop(worker, now=True)
                raise
            self.start_failed(worker, str(exc) or type(exc).__name__)
            await self._stop(worker, now=True)
            return None
        self.starting -= 1
        if self._closed:
            await self._stop(worker, now=True)
            return None
        self.start_failures, self.retry_at, self.start_error = 0, 0.0, None
        self.workers.append(worker)
        self.idle_since[worker] = time.time()
        gpus = f" on GPU {','.join(map(str, seat.gpus))}" if seat.gpus else ""
        log.info("jupyter_stream: %s ready (pid %s)%s", worker.name, worker.pid, gpus)
        self._offer(worker)
        return worker

    def start_failed(self, worker: WorkerKernel, problem: str) -> None:
        """A kernel did not start: one log line, no new start before the backoff is over
        (2, 4, 8 ... 60 s), and the calls waiting here hear why, unless a kernel of this
        pool runs or another start may still serve them."""
        self.start_failures += 1
        backoff = min(MAX_START_BACKOFF, 2.0 ** self.start_failures)
        self.retry_at, self.start_error = time.monotonic() + backoff, problem
        log.error("jupyter_stream: could not start %s of pool [%s]: %s (next try in %g s)",
                  worker.name, self.key.describe(), problem, backoff)
        if not any(w.accepting for w in self.workers) and not self.starting:
            while self._waiters:
                waiter = self._waiters.popleft()
                if not waiter.done():
                    waiter.set_exception(WorkerError(f"could not start a worker kernel: {problem}"))

    async def _stop(self, worker: WorkerKernel, now: bool = False) -> None:
        """Shut a kernel down; its seat and GPUs are free once it has exited."""
        try:
            await worker.shutdown(now=now)
        finally:
            self.idle_since.pop(worker, None)
            seat = self.seats.pop(worker, None)
            if seat is not None:
                self.placement.free(seat)

    def evict(self, worker: WorkerKernel) -> None:
        """Take an idle kernel out of the pool at once and stop it in the background
        (gracefully: its exit hooks run); `stopped` waits for it."""
        if worker in self.workers:
            self.workers.remove(worker)
        worker.draining = True
        self.stopping[worker] = task = self._spawn(self._stop(worker), f"stopping {worker.name}")
        task.add_done_callback(lambda _: self.stopping.pop(worker, None))

    async def stopped(self, worker: WorkerKernel) -> None:
        task = self.stopping.get(worker)
        if task is not None:
            await asyncio.shield(task)

    def _scale_down(self) -> None:
        """Stop kernels idle for longer than `scaledown_window`, down to `min_workers`."""
        now = time.time()
        idle = [w for w in self.workers if w.accepting and w.load <= 0
                and now - self.idle_since.get(w, now) > self.scaledown_window]
        for worker in sorted(idle, key=lambda w: self.idle_since.get(w, now))[: max(len(self.workers) - self.min_workers, 0)]:
            log.info("jupyter_stream: stopping %s (pid %s): idle for %.0f s", worker.name, worker.pid,
                     now - self.idle_since.get(worker, now))
            self.evict(worker)

    async def watch_once(self) -> None:
        """One turn of the watcher (every `poll_interval`, supervised): notice dead and
        silent kernels, scale idle ones down, keep the warm minimum, serve the waiters."""
        now = time.monotonic()
        stalled = self.last_turn and now - self.last_turn > self.poll_interval + 1.0
        self.last_turn = now
        if stalled:  # the event loop was held: pongs may wait unread in the sockets
            for worker in self.workers:
                worker.excuse_silence(now)
        for worker in list(self.workers) + list(self.draining):
            if not await self._is_alive(worker):
                if worker in self.workers:
                    log.warning("jupyter_stream: %s (pid %s) died; replacing it", worker.name, worker.pid)
                    self.replace(worker, "kernel process exited")
                elif worker in self.draining:
                    self.replace(worker, "kernel process exited")  # also frees its seat and GPUs
            elif worker in self.workers:
                self._check_answers(worker, now)
        self._scale_down()
        missing = self.min_workers - len(self.workers) - self.starting
        for _ in range(max(missing, 0)):  # the warm minimum takes free room only: no other pool's kernel is stopped for it
            if self._grow(evict=False) is None:
                break
        self.grow_for_waiters()

    async def _is_alive(self, worker: WorkerKernel) -> bool:
        """Whether the kernel process runs; one whose kernel manager cannot say (it raises
        or hangs) counts as alive this turn, with a log line."""
        try:
            return await asyncio.wait_for(worker.is_alive(), timeout=max(5.0, self.poll_interval))
        except Exception as exc:  # noqa: BLE001 - asked again next turn
            log.warning("jupyter_stream: could not tell whether %s (pid %s) is alive: %s: %s",
                        worker.name, worker.pid, type(exc).__name__, exc)
            return True

    def _check_answers(self, worker: WorkerKernel, now: float) -> None:
        """Ping the worker; one silent for `unresponsive_after` gets no new calls, one
        silent for `ping_timeout` is replaced (its calls end with WorkerDied)."""
        silent = worker.silent_for(now)
        if silent > self.ping_timeout:
            log.error("jupyter_stream: %s (pid %s) has not answered for %.0f s; replacing it", worker.name, worker.pid, silent)
            self.replace(worker, f"it stopped answering ({silent:.0f} s without a reply)")
            return
        if silent > self.unresponsive_after and not worker.unresponsive:
            log.warning("jupyter_stream: %s (pid %s) has not answered for %.1f s; no new calls go to it until it does",
                        worker.name, worker.pid, silent)
            worker.unresponsive = True
        worker.ping(now)

    def replace(self, worker: WorkerKernel, reason: str) -> None:
        """Take a dead or doomed worker out of the pool, fail what it still runs, and
        stop its kernel; the watcher starts a replacement to keep the warm minimum."""
        if worker in self.draining:
            self.draining.remove(worker)  # counted as replaced when it began draining
        elif worker in self.workers:
            self.workers.remove(worker)
            self.replaced += 1
        else:
            return
        worker.died(reason)
        self._spawn(self._stop(worker, now=True), f"stopping {worker.name}")

    async def shutdown(self) -> None:
        """Stop every worker kernel (the server is shutting down), gracefully: each kernel
        cancels its runs (their ``finally`` blocks run) and its exit hooks run, and one
        that has not exited after `shutdown_wait_time` is killed."""
        self._closed = True
        if self._watcher is not None:
            self._watcher.cancel()
        self.nested_waiting = 0
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_exception(WorkerError("the server is shutting down"))
        workers, self.workers = self.workers + self.draining, []
        self.draining = []
        for worker in workers:  # a kernel asked to shut down gets this long before it is killed
            worker.km.shutdown_wait_time = self.shutdown_wait_time
        await asyncio.gather(*(self._stop(w) for w in workers), *self.stopping.values(), return_exceptions=True)

    def info(self) -> dict[str, Any]:
        """The pool as `GET /api/stream/workers` shows it."""
        return {
            "name": f"pool {self.number}: {self.key.describe()}",  # tells two pools of the same GPU spec apart
            "kernel_name": self.kernel_name,
            "source": "gateway" if self.gateway is not None else "local",
            "gateway": self.gateway.url if self.gateway is not None else None,
            "gpu": self.key.gpu,
            "env": sorted(self.env),  # names only: values may be secrets
            "concurrency": self.key.concurrency,
            "min_workers": self.min_workers,
            "max_workers": self.max_workers,
            "scaledown_window": self.scaledown_window,
            "calls_per_worker": self.calls_per_worker,
            "starting": self.starting,
            "waiting_calls": len(self._waiters),
            "replaced": self.replaced,
            "workers": [self.worker_info(w) for w in self.workers + self.draining],
        }

    def worker_info(self, worker: WorkerKernel) -> dict[str, Any]:
        seat = self.seats.get(worker)
        idle = worker.load <= 0 and worker.accepting
        return {**worker.info(), "state": "draining" if worker.draining else "busy" if worker.load > 0 else "idle",
                "idle_since": self.idle_since.get(worker) if idle else None,
                # a gateway kernel's pid is another machine's
                "rss": rss_bytes(worker.pid) if self.gateway is None else None,
                "gpus": self.placement.inventory.usage(seat.gpus) if seat is not None else []}


def rss_bytes(pid: int | None) -> int | None:
    """A process's resident memory, from /proc (None where there is no /proc)."""
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None
