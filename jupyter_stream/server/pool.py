"""Worker kernels and the pool that starts, lends out, watches and replaces them.

A `WorkerKernel` (see `kernels`) is one ipykernel started through jupyter_client. The
`WorkerPool` keeps between `min_workers` and `max_workers` kernels, hands an
idle one to each call, and replaces kernels that die.

Where kernels come from is one seam: `kernel_manager_class` (any jupyter_client
`AsyncKernelManager`, so kernel provisioners and gateway kernel managers plug in) and
`worker_env` (per-worker environment, e.g. ``CUDA_VISIBLE_DEVICES``).
"""

from __future__ import annotations

import asyncio
import collections
import hmac
import itertools
import logging
import os
import secrets
from collections.abc import Callable
from typing import Any

from jupyter_client.manager import AsyncKernelManager

from ..errors import WorkerError
from .kernels import WorkerKernel

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
        worker_env: Callable[[int], dict[str, str]] | None = None,
        cancel_grace_period: float = 5.0,
        worker_messages: str = "auto",
    ):
        self.kernel_name = kernel_name
        self.min_workers = min_workers
        self.max_workers = max(max_workers, min_workers, 1)
        self.calls_per_worker = calls_per_worker
        self.startup_timeout = startup_timeout
        self.poll_interval = poll_interval
        self.cwd = cwd
        self.kernel_manager_class = kernel_manager_class
        self.transport = transport
        self.worker_env = worker_env
        self.cancel_grace_period = cancel_grace_period
        self.worker_messages = worker_messages
        self.shutdown_wait_time = 2.5
        self.workers: list[WorkerKernel] = []
        self.draining: list[WorkerKernel] = []
        self.starting = 0
        self.replaced = 0
        self._waiters: collections.deque[asyncio.Future] = collections.deque()
        self._counter = itertools.count(1)
        self._watcher: asyncio.Task | None = None
        self._closed = False
        self._tasks: set[asyncio.Task] = set()
        self._secret = secrets.token_bytes(32)

    async def start(self) -> None:
        """Start the warm minimum of workers and the watcher that replaces dead ones."""
        self._watcher = asyncio.create_task(self._watch())
        await asyncio.gather(*(self._grow() for _ in range(self.min_workers)), return_exceptions=True)

    @property
    def full(self) -> bool:
        """No more kernels may start: the pool is at `max_workers`."""
        return len(self.workers) + self.starting >= self.max_workers

    def worker_key(self, index: int) -> str:
        """What worker `index` shows to say it is that worker (only it has this in its env)."""
        return hmac.new(self._secret, str(index).encode(), "sha256").hexdigest()[:32]

    def worker_named(self, claim: str) -> WorkerKernel | None:
        """The live worker whose ``JUPYTER_STREAM_WORKER`` value is `claim`, or None."""
        index, _, key = claim.partition(":")
        if not index.isdigit() or not hmac.compare_digest(key, self.worker_key(int(index))):
            return None
        return next((w for w in self.workers + self.draining if w.index == int(index) and w.alive), None)

    def try_acquire(self) -> WorkerKernel | None:
        """A worker with room for one more call right now, or None."""
        if not self._waiters:  # never jump the queue
            for worker in self.workers:
                if worker.accepting and worker.load < self.calls_per_worker:
                    worker.load += 1
                    return worker
        return None

    def lend_beside(self, caller: WorkerKernel) -> WorkerKernel | None:
        """`caller` itself, one call over its share, for a call it makes while the pool is
        full: it waits for that call, so waiting for a free worker could wait forever."""
        if caller.alive and self.full:
            caller.load += 1
            return caller
        return None

    async def acquire(self) -> WorkerKernel:
        """A worker with room for one more call, starting a new kernel if the pool may grow."""
        if self._closed:
            raise WorkerError("the worker pool is shut down")
        worker = self.try_acquire()
        if worker is not None:
            return worker
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        if not self.full:
            self._grow()
        try:
            return await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                self.release(waiter.result())
            else:
                self._forget(waiter)
            raise

    def release(self, worker: WorkerKernel) -> None:
        worker.load -= 1
        if worker.draining:
            if worker.load <= 0:
                self._retire_drained(worker)
            return
        self._offer(worker)

    def _offer(self, worker: WorkerKernel) -> None:
        """Hand a worker with spare room to the calls waiting for one."""
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

    def _spawn(self, coro: Any) -> asyncio.Task:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _grow(self) -> asyncio.Task:
        """Start one more kernel. Counted as starting at once, so that calls arriving in
        the same loop turn see it and the pool never grows past `max_workers`."""
        self.starting += 1
        return self._spawn(self._start_worker())

    def _env_for(self, index: int) -> dict[str, str]:
        env = dict(os.environ)
        env["JUPYTER_STREAM_WORKER"] = f"{index}:{self.worker_key(index)}"
        if self.worker_env is not None:
            env.update(self.worker_env(index))
        return env

    def _kernel_manager(self, index: int) -> AsyncKernelManager:
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
        self.starting += 1  # the replacement may take the pool one over max_workers meanwhile
        task = self._spawn(self._start_worker())
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
            self._spawn(worker.shutdown(now=True))

    async def _start_worker(self) -> WorkerKernel | None:
        """Start a kernel counted in `starting` by `_grow`."""
        index = next(self._counter)
        worker = WorkerKernel(self, index, self._kernel_manager(index))
        try:
            await worker.start(self._env_for(index), self.cwd, self.startup_timeout)
        except Exception as exc:
            exc = WorkerError(f"{type(exc).__name__}: {exc}") if not str(exc) else exc
            log.error("jupyter_stream: could not start %s: %s", worker.name, exc)
            await worker.shutdown(now=True)
            if not any(w.alive for w in self.workers):
                # nothing can serve the waiters: tell them why instead of hanging
                while self._waiters:
                    waiter = self._waiters.popleft()
                    if not waiter.done():
                        waiter.set_exception(WorkerError(f"could not start a worker kernel: {exc}"))
            return None
        finally:
            self.starting -= 1
        if self._closed:
            await worker.shutdown(now=True)
            return None
        self.workers.append(worker)
        log.info("jupyter_stream: %s ready (pid %s)", worker.name, worker.pid)
        self._offer(worker)
        return worker

    async def _watch(self) -> None:
        """Notice dead kernels, fail their calls, and keep the warm minimum."""
        while not self._closed:
            await asyncio.sleep(self.poll_interval)
            for worker in list(self.workers):
                if not await worker.is_alive() and worker in self.workers:
                    log.warning("jupyter_stream: %s (pid %s) died; replacing it", worker.name, worker.pid)
                    self.replace(worker, "kernel process exited")
            for worker in list(self.draining):
                if not await worker.is_alive() and worker in self.draining:
                    self.draining.remove(worker)
                    worker.died("kernel process exited")
            missing = self.min_workers - len(self.workers) - self.starting
            if self._waiters and not missing and not self.full:
                missing = 1
            for _ in range(max(missing, 0)):
                self._grow()

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
        self._spawn(worker.shutdown(now=True))

    async def shutdown(self) -> None:
        """Stop every worker kernel (the server is shutting down), gracefully: each kernel
        cancels its runs (their ``finally`` blocks run) and its exit hooks run, and one
        that has not exited after `shutdown_wait_time` is killed."""
        self._closed = True
        if self._watcher is not None:
            self._watcher.cancel()
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_exception(WorkerError("the server is shutting down"))
        workers, self.workers = self.workers + self.draining, []
        self.draining = []
        for worker in workers:  # a kernel asked to shut down gets this long before it is killed
            worker.km.shutdown_wait_time = self.shutdown_wait_time
        await asyncio.gather(*(w.shutdown(now=False) for w in workers), return_exceptions=True)

    def info(self) -> dict[str, Any]:
        return {
            "kernel_name": self.kernel_name,
            "min_workers": self.min_workers,
            "max_workers": self.max_workers,
            "starting": self.starting,
            "waiting_calls": len(self._waiters),
            "replaced": self.replaced,
            "workers": [w.info() for w in self.workers + self.draining],
        }
