"""Worker kernels and the pool that starts, lends out, watches and replaces them.

A `WorkerKernel` is one ipykernel started through jupyter_client; the server talks to it
over one comm (see `wire`). A `RemoteCall` is the server's end of one call running on a
worker. The `WorkerPool` keeps between `min_workers` and `max_workers` kernels, hands an
idle one to each call, and replaces kernels that die.

Where kernels come from is one seam: `kernel_manager_class` (any jupyter_client
`AsyncKernelManager`, so kernel provisioners and gateway kernel managers plug in) and
`worker_env` (per-worker environment, e.g. ``CUDA_VISIBLE_DEVICES``).
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import hmac
import os
import secrets
import uuid
from typing import Any, Callable

import zmq
from jupyter_client.manager import AsyncKernelManager

from . import wire

log = logging.getLogger("jupyter_stream")


class WorkerError(RuntimeError):
    """A worker kernel could not be started or bootstrapped."""


class RemoteCall:
    """The server's end of one call: a queue of output from the worker, and credit back."""

    def __init__(self, worker: "WorkerKernel", call_id: str, window: int):
        self.worker = worker
        self.id = call_id
        self.window = window
        self.start: dict[str, Any] | None = None
        self.chunks: collections.deque[memoryview] = collections.deque()
        self.error: dict[str, Any] | None = None
        self.ended = False
        self.cancelled = False
        #: cancelled and no longer counted against its worker, but still running there
        self.abandoned = False
        self._wakeup: asyncio.Future | None = None
        self._unacked = 0
        #: set by the scheduler to take output as it arrives instead of through `wait`/`take`
        self.on_output: Callable[[dict[str, Any], list[memoryview]], None] | None = None

    # called by the worker's IOPub reader
    def feed(self, data: dict[str, Any], buffers: list[memoryview]) -> None:
        if self.on_output is not None:
            if data.get("end"):
                self.error = data.get("error")
                self._end()
            self.on_output(data, buffers)
            return
        if "start" in data:
            self.start = data["start"]
        if not self.cancelled:  # nobody reads a cancelled call's last output
            for buffer in buffers:
                if buffer.nbytes:
                    self.chunks.append(buffer)
        if data.get("end"):
            self.error = data.get("error")
            self._end()
        self._wake()

    def fail(self, error: dict[str, Any]) -> None:
        """End the call from the server side (its worker died)."""
        if not self.ended:
            if self.on_output is not None:
                self.feed({"end": True, "error": error}, [])
                return
            self.error = error
            self._end()
            self._wake()

    def _end(self) -> None:
        self.ended = True
        self.worker.call_ended(self)

    def _wake(self) -> None:
        if self._wakeup is not None and not self._wakeup.done():
            self._wakeup.set_result(None)

    async def wait(self, timeout: float | None = None) -> bool:
        """Wait until there is output or the call ended; False on timeout."""
        if self.chunks or self.ended:
            return True
        self._wakeup = asyncio.get_running_loop().create_future()
        try:
            await asyncio.wait_for(self._wakeup, timeout)
            return True
        except asyncio.TimeoutError:
            return False
        finally:
            self._wakeup = None

    def take(self) -> memoryview:
        """The oldest buffer of output received (a view of the IOPub frame, not a copy)."""
        return self.chunks.popleft()

    def consumed(self, nbytes: int) -> None:
        """The client has taken `nbytes`: return credit to the worker in large steps."""
        self._unacked += nbytes
        if self._unacked >= self.window // 4 and not self.ended:
            self.worker.send({"op": "ack", "id": self.id, "bytes": self._unacked})
            self._unacked = 0

    def cancel(self) -> None:
        """Ask the worker to stop this call (its generator's ``finally`` runs). Nobody
        waits for it any more, so its worker takes other calls at once, whether or not
        its code stops (see `WorkerKernel.abandon`)."""
        if not self.ended and not self.cancelled:
            self.cancelled = True
            self.chunks.clear()
            self.worker.send({"op": "cancel", "id": self.id})
            self.worker.abandon(self)


class WorkerKernel:
    """One worker kernel: its kernel manager and client, the comm, and calls in flight."""

    def __init__(self, pool: "WorkerPool", index: int, km: AsyncKernelManager):
        self.pool = pool
        self.index = index
        self.km = km
        self.kc: Any = None
        self.comm_id = uuid.uuid4().hex
        self.calls: dict[str, RemoteCall] = {}
        self.functions: set[str] = set()
        self.load = 0
        self.acked_seq = 0
        self.died_with: set[str] = set()
        self.alive = False
        #: a call's code would not stop: this kernel takes no new calls and is shut down
        #: once the calls that have clients are done (a replacement is started first)
        self.draining = False
        self.pid: int | None = None
        self._ready: asyncio.Future | None = None
        self._reader: asyncio.Task | None = None

    @property
    def name(self) -> str:
        return f"worker-{self.index}"

    @property
    def accepting(self) -> bool:
        """Whether new calls may be placed on this kernel."""
        return self.alive and not self.draining

    async def start(self, env: dict[str, str], cwd: str | None, timeout: float) -> None:
        """Start the kernel, load the worker code into it and open the comm."""
        await self.km.start_kernel(env=env, cwd=cwd)
        self.kc = self.km.client()
        self.kc.start_channels()
        await self.kc.wait_for_ready(timeout=timeout)
        msg_id = self.kc.execute(wire.BOOTSTRAP, silent=True, store_history=False)
        while True:
            reply = await self.kc.get_shell_msg(timeout=timeout)
            if reply["parent_header"].get("msg_id") == msg_id:
                break
        if reply["content"]["status"] != "ok":
            content = reply["content"]
            raise WorkerError(
                f"kernel {self.km.kernel_name!r} could not load jupyter_stream's worker code: "
                f"{content.get('ename')}: {content.get('evalue')}. Install jupyter-stream into "
                "that kernel's environment, or set JupyterStream.kernel_name to a kernelspec that has it."
            )
        self._ready = asyncio.get_running_loop().create_future()
        # IOPub from now on: only this worker's comm and its prints. zmq drops the kernel's
        # status messages (two for every message it handles) before they reach this process.
        iopub = self.kc.iopub_channel.socket
        iopub.setsockopt(zmq.UNSUBSCRIBE, b"")
        for topic in (f"comm-{self.comm_id}".encode(), b"stream."):
            iopub.setsockopt(zmq.SUBSCRIBE, topic)
        self._reader = asyncio.create_task(self._read_iopub())
        self._channel = self.kc.shell_channel
        self.kc.shell_channel.send(
            self.kc.session.msg("comm_open", {"comm_id": self.comm_id, "target_name": wire.COMM_TARGET, "data": {}})
        )
        ready = await asyncio.wait_for(self._ready, timeout)
        self.pid = ready.get("pid")
        if ready.get("control"):  # the worker takes our messages on the faster control channel
            self._channel = self.kc.control_channel
        self.alive = True

    async def _read_iopub(self) -> None:
        """Route the worker's IOPub messages: call output to its `RemoteCall`, prints to the
        log. Reads the socket directly, without jupyter_client's channel machinery."""
        socket = self.kc.iopub_channel.socket
        session = self.kc.session
        while True:
            try:
                frames = await socket.recv_multipart(copy=False)
                _, frames = session.feed_identities(frames, copy=False)
                msg = session.deserialize(frames, content=False, copy=False)
            except asyncio.CancelledError:
                raise
            except Exception:  # a closed socket when the kernel goes away, or a bad signature
                if not self.alive and self._ready is not None and self._ready.done():
                    return
                log.debug("%s: error reading IOPub", self.name, exc_info=True)
                await asyncio.sleep(0)
                continue
            msg_type = msg["header"]["msg_type"]
            content = session.unpack(msg["content"])
            if msg_type == "comm_msg":
                if content.get("comm_id") != self.comm_id:
                    continue
                data = content["data"]
                seq = data.get("seq")
                if seq is not None and seq - self.acked_seq >= wire.ACK_MESSAGES_EVERY:
                    self.acked_seq = seq  # the worker's sender may run further ahead
                    self.send({"op": "acked", "seq": seq})
                op = data.get("op")
                if op == "out":
                    call = self.calls.get(data["id"])
                    fatal = data.get("fatal")
                    if fatal:
                        self.alive = False  # before the call's end frees it: offer it to no one
                    if call is not None:
                        call.feed(data, msg["buffers"])
                    if fatal:
                        self.retire()
                elif op == "ready" and self._ready is not None and not self._ready.done():
                    self._ready.set_result(data)
            elif msg_type == "stream":
                text = content.get("text", "").rstrip("\n")
                if text:
                    log.info("[%s %s] %s", self.name, content.get("name"), text)

    def send(self, data: dict[str, Any], buffers: list[bytes] | None = None) -> None:
        msg = self.kc.session.msg("comm_msg", {"comm_id": self.comm_id, "data": data})
        if buffers:
            msg["buffers"] = buffers
        self._channel.send(msg)

    def call(self, fn_hash: str, fn_blob: bytes, extra_buffers: list[bytes] = (), **params: Any) -> RemoteCall:
        """Start a call of the function `fn_hash`; send its pickle only if this worker lacks it."""
        call = RemoteCall(self, uuid.uuid4().hex[:16], params.setdefault("window", wire.DEFAULT_WINDOW))
        self.calls[call.id] = call
        if not self.alive:  # replaced between being handed out and this call: fail it
            # on the next loop turn, once the caller has attached its output handler
            asyncio.get_running_loop().call_soon(call.fail, wire.worker_died_payload("replaced before the call started"))
            return call
        send_fn = fn_hash not in self.functions
        buffers = ([fn_blob] if send_fn else []) + list(extra_buffers)
        self.send({"op": "call", "id": call.id, "fn": fn_hash, "send_fn": send_fn, **params}, buffers)
        self.functions.add(fn_hash)
        return call

    def call_ended(self, call: RemoteCall) -> None:
        if self.calls.pop(call.id, None) is not None and not call.abandoned:
            self.pool.release(self)

    def abandon(self, call: RemoteCall) -> None:
        """A cancelled call stops counting against this kernel now, whatever its code is
        doing; it still has `cancel_grace_period` seconds to stop by itself. Then its thread
        is interrupted, and after as long again the kernel is replaced in the background."""
        if call.id not in self.calls or call.abandoned:
            return
        call.abandoned = True
        self.pool.release(self)
        grace = self.pool.cancel_grace_period
        loop = asyncio.get_running_loop()
        loop.call_later(grace, self._interrupt_if_running, call)
        loop.call_later(2 * grace, self._recycle_if_running, call)

    @property
    def abandoned(self) -> int:
        """Calls cancelled here whose code has not stopped yet."""
        return sum(1 for call in self.calls.values() if call.abandoned)

    def _interrupt_if_running(self, call: RemoteCall) -> None:
        if not call.ended and call.id in self.calls and self.alive:
            log.info("jupyter_stream: a cancelled call on %s has not stopped after %g s; interrupting its thread",
                     self.name, self.pool.cancel_grace_period)
            self.send({"op": "interrupt", "id": call.id})

    def _recycle_if_running(self, call: RemoteCall) -> None:
        if not call.ended and call.id in self.calls and self.alive:
            self.pool.recycle(self, f"a cancelled call did not stop within {2 * self.pool.cancel_grace_period:g} s "
                                    "(blocked in C code or a long sleep)")

    def died(self, reason: str) -> None:
        """Fail every call in flight: the kernel is gone."""
        self.alive = False
        self.died_with = set(self.calls)  # which calls might have killed it
        error = wire.worker_died_payload(reason)
        for call in list(self.calls.values()):
            call.fail(error)

    def retire(self) -> None:
        """Replace this kernel now (a call timed out and its thread may be stuck): it
        leaves the pool at once, so no new call lands on it while it is being killed."""
        if self in self.pool.workers:
            log.warning("jupyter_stream: %s (pid %s) ran a call past its timeout; restarting it", self.name, self.pid)
            self.pool.replace(self, "the kernel was restarted after a call ran past its timeout")

    async def is_alive(self) -> bool:
        return await self.km.is_alive()

    async def shutdown(self, now: bool = False) -> None:
        self.alive = False
        if self._reader is not None:
            self._reader.cancel()
        if self.kc is not None:
            self.kc.stop_channels()
        try:
            await self.km.shutdown_kernel(now=now)
        except Exception:  # already gone
            log.debug("%s: shutdown failed", self.name, exc_info=True)

    def info(self) -> dict[str, Any]:
        return {
            "name": self.name, "pid": self.pid, "alive": self.alive, "busy": self.load,
            "abandoned": self.abandoned, "draining": self.draining, "kernel": self.km.kernel_name,
        }


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
        """Stop every worker kernel (the server is shutting down)."""
        self._closed = True
        if self._watcher is not None:
            self._watcher.cancel()
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_exception(WorkerError("the server is shutting down"))
        workers, self.workers = self.workers + self.draining, []
        self.draining = []
        await asyncio.gather(*(w.shutdown(now=True) for w in workers), return_exceptions=True)

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
