"""One worker kernel as the server sees it (`WorkerKernel`), and the server's end of each
call running there (`Run`).

`WorkerKernel` speaks the server's side of the worker protocol (`wire`): the typed
methods here are the only place its messages are built, and `on_comm_msg` the only place
the worker's are read. How they travel is the `transport`'s business (`transports`).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from jupyter_client.manager import AsyncKernelManager

from .. import wire
from ..errors import WorkerError, worker_died_error
from .transports import WorkerTransport, transport_class

if TYPE_CHECKING:
    from .pool import WorkerPool

log = logging.getLogger("jupyter_stream")

#: what takes a call's output: each ``out`` message's data and buffers
OnOutput = Callable[[dict[str, Any], list], None]


class Run:
    """The server's end of one call running on a worker: its output goes to `on_output`
    (called with each ``out`` message's data and buffers, the end included), and the
    typed methods below are everything the server may tell the worker about it."""

    def __init__(self, worker: WorkerKernel, call_id: str, window: int, on_output: OnOutput):
        self.worker = worker
        self.id = call_id
        self.window = window
        self.on_output = on_output
        self.error: dict[str, Any] | None = None
        self.ended = False
        self.cancelled = False
        #: cancelled and no longer counted against its worker, but still running there
        self.abandoned = False
        self._unacked = 0

    def feed(self, data: dict[str, Any], buffers: list) -> None:
        """An ``out`` message from the worker (or from `fail`)."""
        if data.get("end"):
            self.error = data.get("error")
            self._end()
        elif self.cancelled:  # nobody reads a cancelled call's last output
            return
        self.on_output(data, buffers)

    def fail(self, error: dict[str, Any]) -> None:
        """End the call from the server side (its worker died)."""
        if not self.ended:
            self.feed({"op": "out", "id": self.id, "end": True, "error": error}, [])

    def _end(self) -> None:
        self.ended = True
        self.worker.run_ended(self)

    def ack(self, nbytes: int) -> None:
        """The consumer has taken `nbytes` more: the worker may run that much further."""
        if not self.ended:
            self.worker.transport.send(wire.ack_message(self.id, nbytes))

    def consumed(self, nbytes: int) -> None:
        """Like `ack`, gathered into steps of a quarter window (fewer messages)."""
        self._unacked += nbytes
        if self._unacked >= self.window // 4:
            self.ack(self._unacked)
            self._unacked = 0

    def send_batch(self, indices: list[int], sizes: list[int], payload: bytes) -> None:
        """More items for this map lane: pickled argument tuples back to back."""
        self.worker.transport.send(wire.batch_message(self.id, indices, sizes), [payload])

    def revoke(self, indices: list[int]) -> None:
        """Ask for map items of this lane back, those not started yet; the lane's output
        names the ones it gave back (``revoked``)."""
        if not self.ended:
            self.worker.transport.send(wire.revoke_message(self.id, indices))

    def close_lane(self) -> None:
        """No more items for this map lane: it ends once it has run what it has."""
        self.worker.transport.send(wire.close_message(self.id))

    def interrupt(self) -> None:
        self.worker.transport.send(wire.interrupt_message(self.id))

    def cancel(self) -> None:
        """Ask the worker to stop this call (its generator's ``finally`` runs). Nobody
        waits for it any more, so its worker takes other calls at once, whether or not
        its code stops (see `WorkerKernel.abandon`)."""
        if not self.ended and not self.cancelled:
            self.cancelled = True
            self.worker.transport.send(wire.cancel_message(self.id))
            self.worker.abandon(self)


class OutputQueue:
    """A call's output kept until its reader takes it (the HTTP handler): the response's
    start, the chunks (views of the IOPub frames, not copies) and the end."""

    def __init__(self, on_print: Callable[[list], None] | None = None) -> None:
        #: takes what the function printed ([stream, text] pairs): it never joins the response
        self.on_print = on_print
        self.start: dict[str, Any] | None = None
        self.chunks: collections.deque[memoryview] = collections.deque()
        self.ended = False
        self.error: dict[str, Any] | None = None
        self._wakeup: asyncio.Future | None = None

    def __call__(self, data: dict[str, Any], buffers: list) -> None:
        if data.get("print") and self.on_print is not None:
            self.on_print(data["print"])
        if "start" in data:
            self.start = data["start"]
        for buffer in buffers:
            if buffer.nbytes:
                self.chunks.append(buffer)
        if data.get("end"):
            self.ended = True
            self.error = data.get("error")
        self.wake()

    def wake(self) -> None:
        """Let the reader look again (new output, or its client left)."""
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
        return self.chunks.popleft()


class WorkerKernel:
    """One worker kernel: its kernel manager and client, the comm, and calls in flight."""

    def __init__(self, pool: WorkerPool, index: int, km: AsyncKernelManager):
        self.pool = pool
        self.index = index
        self.km = km
        self.kc: Any = None
        self.comm_id = uuid.uuid4().hex
        self.runs: dict[str, Run] = {}
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
        self.transport: WorkerTransport | None = None

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
        self.transport = transport_class(self.kc, self.pool.worker_messages)(
            self.kc, self.comm_id, self.on_comm_msg, self.on_stream
        )
        self.transport.start()
        self.transport.open_comm(wire.COMM_TARGET)
        ready = await asyncio.wait_for(self._ready, timeout)
        self.pid = ready.get("pid")
        if ready.get("control"):  # the worker takes our messages on the faster control channel
            self.transport.use_control()
        self.alive = True

    def on_comm_msg(self, data: dict[str, Any], buffers: list) -> None:
        """Route a message from the worker: call output to its `Run`."""
        seq = data.get("seq")
        if seq is not None and seq - self.acked_seq >= wire.ACK_MESSAGES_EVERY:
            self.acked_seq = seq  # the worker's sender may run further ahead
            self.transport.send(wire.acked_message(seq))
        op = data.get("op")
        if op == "out":
            run = self.runs.get(data["id"])
            fatal = data.get("fatal")
            if fatal:
                self.alive = False  # before the call's end frees it: offer it to no one
            if run is not None:
                run.feed(data, buffers)
            if fatal:
                self.retire()
        elif op == "ready" and self._ready is not None and not self._ready.done():
            self._ready.set_result(data)

    def on_stream(self, name: str, text: str) -> None:
        text = text.rstrip("\n")
        if text:
            log.info("[%s %s] %s", self.name, name, text)

    def start_run(
        self, fn_hash: str, fn_blob: bytes, on_output: OnOutput, *, mode: str, args: bytes | None = None,
        kwargs: dict[str, Any] | None = None, media_type: str | None = None, timeout: float | None = None,
        window: int = wire.DEFAULT_WINDOW, request: dict[str, Any] | None = None,
    ) -> Run:
        """Start a call of function `fn_hash` (see `wire` for the modes); its pickle travels
        only if this worker lacks it, `args` is a pickled ``(args, kwargs)``."""
        run = Run(self, uuid.uuid4().hex[:16], window, on_output)
        self.runs[run.id] = run
        if not self.alive:  # replaced between being handed out and this call: fail it
            # on the next loop turn, once the caller holds the call
            asyncio.get_running_loop().call_soon(run.fail, worker_died_error("replaced before the call started"))
            return run
        send_fn = fn_hash not in self.functions
        buffers = ([fn_blob] if send_fn else []) + ([args] if args is not None else [])
        message = wire.call_message(run.id, fn_hash, send_fn, mode, window, media_type=media_type, kwargs=kwargs,
                                    pickled_args=True if args is not None else None, timeout=timeout, request=request)
        self.transport.send(message, buffers)
        self.functions.add(fn_hash)
        return run

    def run_ended(self, run: Run) -> None:
        if self.runs.pop(run.id, None) is not None and not run.abandoned:
            self.pool.release(self)

    def abandon(self, run: Run) -> None:
        """A cancelled call stops counting against this kernel now, whatever its code is
        doing; it still has `cancel_grace_period` seconds to stop by itself. Then its thread
        is interrupted, and after as long again the kernel is replaced in the background."""
        if run.id not in self.runs or run.abandoned:
            return
        run.abandoned = True
        self.pool.release(self)
        grace = self.pool.cancel_grace_period
        loop = asyncio.get_running_loop()
        loop.call_later(grace, self._interrupt_if_running, run)
        loop.call_later(2 * grace, self._recycle_if_running, run)

    @property
    def abandoned(self) -> int:
        """Calls cancelled here whose code has not stopped yet."""
        return sum(1 for run in self.runs.values() if run.abandoned)

    def _interrupt_if_running(self, run: Run) -> None:
        if not run.ended and run.id in self.runs and self.alive:
            log.info("jupyter_stream: a cancelled call on %s has not stopped after %g s; interrupting its thread",
                     self.name, self.pool.cancel_grace_period)
            run.interrupt()

    def _recycle_if_running(self, run: Run) -> None:
        if not run.ended and run.id in self.runs and self.alive:
            self.pool.recycle(self, f"a cancelled call did not stop within {2 * self.pool.cancel_grace_period:g} s "
                                    "(blocked in C code or a long sleep)")

    def died(self, reason: str) -> None:
        """Fail every run in flight: the kernel is gone."""
        self.alive = False
        self.died_with = set(self.runs)  # which runs might have killed it
        error = worker_died_error(reason)
        for run in list(self.runs.values()):
            run.fail(error)

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
        if self.transport is not None:
            self.transport.close()
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
            "transport": type(self.transport).__name__ if self.transport is not None else None,
        }
