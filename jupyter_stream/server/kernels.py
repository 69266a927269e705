"""One worker kernel as the server sees it (`WorkerKernel`), and the server's end of each
call running there (`Run`).

`WorkerKernel` speaks the server's side of the worker protocol (`wire`): the typed
methods here are the only place its messages are built, and `on_comm_msg` the only place
the worker's are read. How they travel is the `transport`'s business (`transports`).
"""

from __future__ import annotations

import asyncio
import collections
import functools
import inspect
import logging
import time
import uuid
from collections.abc import Callable
from typing import Any, Protocol

from jupyter_client.manager import AsyncKernelManager

from .. import wire
from ..errors import MessageTooLarge, WorkerError, error_info, error_payload, worker_died_error
from .transports import WorkerTransport, transport_class

log = logging.getLogger("jupyter_stream")

#: what takes a call's output: each ``out`` message's data and buffers
OnOutput = Callable[[dict[str, Any], list], None]


class WorkerOwner(Protocol):
    """What a worker kernel tells the pool that owns it (the pool passes itself): the
    kernel never imports its pool."""

    worker_messages: str  # the transport mode (see `transports.transport_class`)
    cancel_grace_period: float
    freeze_gc: bool

    def release(self, worker: WorkerKernel) -> None:
        """A call stopped counting against `worker`."""

    def available(self, worker: WorkerKernel) -> None:
        """`worker` takes calls again (it answers after a silence)."""

    def recycle(self, worker: WorkerKernel, reason: str) -> None:
        """`worker` still works but holds code that will not stop: replace it in the
        background, letting its other calls finish."""

    def replace(self, worker: WorkerKernel, reason: str) -> None:
        """`worker` cannot go on: fail what it runs and replace it now."""


class Run:
    """The server's end of one call running on a worker: its output goes to `on_output`
    (called with each ``out`` message's data and buffers, the end included), and the
    typed methods below are everything the server may tell the worker about it."""

    #: of a batch (`WorkerKernel.start_batch`): an input's run names its batch's run, which
    #: holds the worker's seat; the batch's run lists its inputs' runs
    batch: Run | None = None
    items: list[Run] = []

    def __init__(self, worker: WorkerKernel, call_id: str, window: int, on_output: OnOutput):
        self.worker = worker
        self.id = call_id
        self.window = window
        self.on_output = on_output
        #: told (the exception) when `on_output` failed: the owner ends its call (see `abort`)
        self.on_crash: Callable[[BaseException], None] | None = None
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

    def abort(self, exc: BaseException) -> None:
        """The server failed while handling this call's output (`on_output` raised): stop it
        on the worker, free the worker, and have its owner end the call (`on_crash`), so
        that it neither holds its worker for nobody nor leaves its caller waiting."""
        if not self.ended:
            self.cancel()
            self._end()
        if self.on_crash is not None:
            try:
                self.on_crash(exc)
            except Exception:  # noqa: BLE001 - nothing more can be done for this call
                log.warning("jupyter_stream: %s: call %s could not be told it failed", self.worker.name, self.id, exc_info=True)

    def _end(self) -> None:
        self.ended = True
        self.worker.run_ended(self)

    def ack(self, nbytes: int) -> None:
        """The consumer has taken `nbytes` more: the worker may run that much further."""
        if not self.ended:
            self.worker.send(wire.ack_message(self.id, nbytes))

    def consumed(self, nbytes: int) -> None:
        """Like `ack`, gathered into steps of a quarter window (fewer messages)."""
        self._unacked += nbytes
        if self._unacked >= self.window // 4:
            self.ack(self._unacked)
            self._unacked = 0

    def send_batch(self, indices: list[int], sizes: list[int], blobs: list[bytes]) -> None:
        """More items for this map lane: their pickled argument tuples joined, then their
        indices and sizes packed."""
        self.worker.send(wire.batch_message(self.id, len(indices)),
                         [b"".join(blobs), wire.pack_ints(indices), wire.pack_ints(sizes)])

    def revoke(self, indices: list[int]) -> None:
        """Ask for map items of this lane back, those not started yet; the lane's output
        names the ones it gave back (``revoked``)."""
        if not self.ended:
            self.worker.send(wire.revoke_message(self.id, indices))

    def close_lane(self) -> None:
        """No more items for this map lane: it ends once it has run what it has."""
        self.worker.send(wire.close_message(self.id))

    def interrupt(self) -> None:
        self.worker.send(wire.interrupt_message(self.id))

    def cancel(self) -> None:
        """Ask the worker to stop this call (its generator's ``finally`` runs). Nobody
        waits for it any more, so its worker takes other calls at once, whether or not
        its code stops (see `WorkerKernel.abandon`)."""
        if not self.ended and not self.cancelled:
            self.cancelled = True
            self.worker.send(wire.cancel_message(self.id))
            self.worker.abandon(self)


class OutputQueue:
    """A call's output kept until its reader takes it (the HTTP handler): the response's
    start, the chunks (views of the IOPub frames, not copies) and the end."""

    def __init__(self, on_print: Callable[[list], None] | None = None) -> None:
        #: takes what the function printed ([stream, text] pairs): it never joins the response
        self.on_print = on_print
        self.start: dict[str, Any] | None = None
        self.start_unread = False  # the start came and its reader has not taken it (`take_start`)
        self.chunks: collections.deque[memoryview] = collections.deque()
        self.ended = False
        self.error: dict[str, Any] | None = None
        #: how the call ended (its end's ``finish``: reason, usage, chunks), when it says
        self.finish: dict[str, Any] | None = None
        self._wakeup: asyncio.Future | None = None
        #: while its reader is waiting with nothing queued, it may take a chunk right away:
        #: ``sink(chunk)`` writes it to the client and says whether it did (see `relay`)
        self.sink: Callable[[memoryview], bool] | None = None
        #: chunks the sink took (the reader sees traffic even though it was not woken), and
        #: when it last took one (`time.monotonic`: a heartbeat counts from there)
        self.sunk = 0
        self.sunk_at = 0.0

    def __call__(self, data: dict[str, Any], buffers: list) -> None:
        if data.get("print") and self.on_print is not None:
            self.on_print(data["print"])
        if "start" in data:
            self.start = data["start"]
            self.start_unread = True
        for buffer in buffers:
            if buffer.nbytes:
                sink = self.sink
                if sink is not None and not self.chunks and sink(buffer):
                    self.sunk += 1
                    self.sunk_at = time.monotonic()
                    continue
                self.chunks.append(buffer)
        if data.get("end"):
            self.ended = True
            self.error = data.get("error")
            self.finish = data.get("finish")
        if self.ready:  # (a chunk the sink wrote needs no reader)
            self.wake()

    @property
    def ready(self) -> bool:
        """Whether its reader has something to handle: chunks, the start, or the end."""
        return bool(self.chunks) or self.ended or self.start_unread

    def wake(self) -> None:
        """Let the reader look again (new output, or its client left)."""
        if self._wakeup is not None and not self._wakeup.done():
            self._wakeup.set_result(True)

    async def wait(self, timeout: float | None = None) -> bool:
        """Wait until there is output (its start, chunks) or the call ended; False on timeout."""
        if self.ready:
            return True
        loop = asyncio.get_running_loop()
        self._wakeup = wakeup = loop.create_future()
        # a timer of its own rather than asyncio.wait_for (a task step, a second future and
        # callbacks per wait: about 5 us of every chunk relayed)
        timer = loop.call_later(timeout, _time_out, wakeup) if timeout is not None else None
        try:
            return await wakeup
        finally:
            self._wakeup = None
            if timer is not None:
                timer.cancel()

    def take(self) -> memoryview:
        return self.chunks.popleft()

    def take_start(self) -> dict[str, Any] | None:
        """The response's start (status, headers, media type), once it has come."""
        self.start_unread = False
        return self.start


def _no_output(data: dict[str, Any], buffers: list) -> None:
    pass


def _batch_output(batch: Run, data: dict[str, Any], buffers: list) -> None:
    """Output of a batch's own run: what its code printed goes to every caller whose input
    is in it; its end (after its inputs' ends) fails the inputs it did not end, with its
    error (its worker died, it timed out, it could not start) or saying so."""
    printed = data.get("print")
    if printed:
        for run in batch.items:
            if not run.ended and not run.cancelled:
                run.on_output({"print": printed}, [])
    if data.get("end"):
        error = data.get("error") or error_info("WorkerError", "the batch ended without a result for this input")
        for run in batch.items:
            run.fail(error)


def _batch_crashed(batch: Run, exc: BaseException) -> None:
    """Relaying a batch's own output failed (a bug of ours): its inputs end with the error."""
    error = error_info("WorkerError", f"the server failed while relaying this batch: {type(exc).__name__}: {exc}")
    for run in batch.items:
        if not run.ended:
            run.cancel()
            run.fail(error)


def _time_out(wakeup: asyncio.Future) -> None:
    if not wakeup.done():
        wakeup.set_result(False)


class WorkerKernel:
    """One worker kernel: its kernel manager and client, the comm, and calls in flight."""

    def __init__(self, pool: WorkerOwner, index: int, km: AsyncKernelManager):
        self.pool = pool
        self.index = index
        self.km = km
        self.kc: Any = None
        self.comm_id = uuid.uuid4().hex
        self.runs: dict[str, Run] = {}
        #: functions this worker has been sent, least recently used first
        self.functions: collections.OrderedDict[str, None] = collections.OrderedDict()
        self.load = 0
        self.acked_seq = 0
        self.died_with: set[str] = set()
        self.alive = False
        #: a call's code would not stop: this kernel takes no new calls and is shut down
        #: once the calls that have clients are done (a replacement is started first)
        self.draining = False
        #: pings (see `ping`): the first one not answered yet (None when all were), when it
        #: went, and the number of the last one sent
        self.pinged: int | None = None
        self.pinged_at = 0.0
        self.pings = 0
        #: it has not answered a ping for a while: offered no new calls until it does
        self.unresponsive = False
        self.pid: int | None = None
        self._ready: asyncio.Future | None = None
        self.transport: WorkerTransport | None = None

    @property
    def name(self) -> str:
        return f"worker-{self.index}"

    @property
    def accepting(self) -> bool:
        """Whether new calls may be placed on this kernel."""
        return self.alive and not self.draining and not self.unresponsive

    async def start(self, env: dict[str, str], cwd: str | None, timeout: float) -> None:
        """Start the kernel, load the worker code into it and open the comm."""
        await self.km.start_kernel(env=env, cwd=cwd)
        self.kc = self.km.client()
        started = self.kc.start_channels()
        if inspect.isawaitable(started):  # a gateway kernel's WebSocket
            await started
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
            self.kc, self.comm_id, self.on_comm_msg, self.on_stream, self.transport_broken
        )
        self.transport.start()
        options = {"version": wire.PROTOCOL_VERSION, "direct": self.transport.offers_direct,
                   "cancel_grace_period": self.pool.cancel_grace_period, "freeze_gc": self.pool.freeze_gc}
        comm_env = getattr(self.km, "comm_env", None)
        if comm_env:  # what a gateway does not pass on: the worker sets it itself
            options["env"] = comm_env
        self.transport.open_comm(wire.COMM_TARGET, options)
        ready = await asyncio.wait_for(self._ready, timeout)
        if ready.get("version") != wire.PROTOCOL_VERSION:
            from .. import __version__

            raise WorkerError(
                f"kernel {self.km.kernel_name!r} runs another version of jupyter-stream (its worker protocol "
                f"{ready.get('version')!r}, the server's {wire.PROTOCOL_VERSION}): install jupyter-stream "
                f"{__version__} into that kernel's environment"
            )
        self.pid = ready["pid"]
        if ready.get("control"):  # the worker takes our messages on the faster control channel
            self.transport.use_control()
        if self.transport.offers_direct:
            problem = ready.get("direct_problem") or "it did not offer one"
            if isinstance(ready.get("direct"), dict):
                try:
                    self.transport.use_direct(ready["direct"])
                    problem = None
                except (OSError, WorkerError) as exc:
                    problem = f"it could not be reached: {exc}"
            if problem:
                log.warning("jupyter_stream: %s (pid %s) has no direct channel (%s); its messages go through the comm",
                            self.name, self.pid, problem)
        self.alive = True

    def send(self, data: dict[str, Any], buffers: list | None = None) -> bool:
        """A message to the worker. One that cannot go out means the worker cannot be
        reached: it is replaced (its calls end with an error), never left looking idle.
        That happens on the next loop turn, once whoever sent (say, a call starting) holds
        what it started."""
        try:
            self.transport.send(data, buffers)
            return True
        except MessageTooLarge as exc:  # nothing went out: only the call it belongs to fails
            run = self.runs.get(data.get("id")) if isinstance(data, dict) else None
            if run is not None:
                asyncio.get_running_loop().call_soon(run.fail, error_payload(exc))
        except Exception as exc:  # noqa: BLE001 - the channel is gone
            reason = f"a message to it could not be sent: {type(exc).__name__}: {exc}"
            asyncio.get_running_loop().call_soon(self.transport_broken, reason)
        return False

    # -- from the worker ----------------------------------------------------------------

    def on_comm_msg(self, data: Any, buffers: list) -> None:
        """Route a message from the worker: call output to its `Run`. A message that breaks
        the protocol gets the worker replaced; a failure while a call's consumer handles
        its output ends that call only."""
        try:
            wire.check_worker_message(data, buffers)
        except wire.ProtocolError as e:
            self.broken(f"it sent a malformed message ({e})")
            return
        seq = data.get("seq")
        if seq is not None and seq - self.acked_seq >= wire.ACK_MESSAGES_EVERY:
            self.acked_seq = seq  # the worker's sender may run further ahead
            self.send(wire.acked_message(seq))
        op = data["op"]
        if op == "out":
            run = self.runs.get(data["id"])
            if run is not None:
                try:
                    run.feed(data, buffers)
                except Exception as exc:  # noqa: BLE001 - our consumer failed: that call ends, the worker goes on
                    log.error("jupyter_stream: %s: relaying call %s failed (%s: %s); ending that call",
                              self.name, run.id, type(exc).__name__, exc, exc_info=True)
                    run.abort(exc)
        elif op == "pong":
            if self.pinged is not None and data["n"] >= self.pinged:  # it answers: the silence is over
                self.pinged = None
                if self.unresponsive:
                    log.info("jupyter_stream: %s (pid %s) answers again", self.name, self.pid)
                    self.unresponsive = False
                    self.pool.available(self)
        elif op == "ready":
            if self._ready is not None and not self._ready.done():
                self._ready.set_result(data)
        elif op == "stuck":
            self.pool.recycle(self, data["reason"])
        elif op == "broken":
            self.broken(data["reason"])

    def on_stream(self, name: str, text: str) -> None:
        text = text.rstrip("\n")
        if text:
            log.info("[%s %s] %s", self.name, name, text)

    def broken(self, reason: str) -> None:
        """The worker cannot be trusted to go on: one log line, and it is replaced."""
        if self.alive:
            log.error("jupyter_stream: %s (pid %s) %s; replacing it", self.name, self.pid, reason)
        self.alive = False
        self.pool.replace(self, f"the worker was replaced: {reason}")

    def transport_broken(self, reason: str) -> None:
        """The transport can no longer carry this worker's messages (see `transports`)."""
        if self.transport is not None and self.transport.closed:
            return  # shut down on purpose
        if self.transport is not None:
            self.transport.broken = True  # nothing more is sent through it
        self.broken(f"cannot be reached: {reason}")

    # -- liveness -----------------------------------------------------------------------

    def ping(self, now: float) -> None:
        """Ask the worker to answer through its sender (the pool does, every poll). A new
        ping goes every time, so one lost answer costs a poll, not the worker; the silence
        counts from the first ping not answered."""
        if not self.alive:
            return
        self.pings += 1
        if self.pinged is None:
            self.pinged, self.pinged_at = self.pings, now
        self.send(wire.ping_message(self.pings))

    def excuse_silence(self, now: float) -> None:
        """The server itself could not listen for a while (its event loop was held):
        the worker's silence counts from now."""
        if self.pinged is not None:
            self.pinged_at = now

    def silent_for(self, now: float) -> float:
        """Seconds the oldest unanswered ping has waited (0 when none waits)."""
        return now - self.pinged_at if self.pinged is not None else 0.0

    # -- calls --------------------------------------------------------------------------

    def start_run(
        self, fn_hash: str, fn_blob: bytes, on_output: OnOutput, *, mode: str, args: bytes | None = None,
        kwargs: dict[str, Any] | None = None, json_kwargs: bytes | None = None, media_type: str | None = None,
        timeout: float | None = None, window: int = wire.DEFAULT_WINDOW, request: dict[str, Any] | None = None,
        finish: bool = False,
    ) -> Run:
        """Start a call of function `fn_hash` (see `wire` for the modes); its pickle travels
        only if this worker lacks it, `args` is a pickled ``(args, kwargs)``, `json_kwargs`
        keyword arguments as JSON; with `finish` its end says how it ended (``finish``)."""
        run = Run(self, uuid.uuid4().hex[:16], window, on_output)
        self.runs[run.id] = run
        if not self.alive:  # replaced between being handed out and this call: fail it
            # on the next loop turn, once the caller holds the call
            asyncio.get_running_loop().call_soon(run.fail, worker_died_error("replaced before the call started"))
            return run
        send_fn = fn_hash not in self.functions
        buffers = ([fn_blob] if send_fn else []) + ([args] if args is not None else [])
        if json_kwargs is not None:
            buffers.append(json_kwargs)
        message = wire.call_message(run.id, fn_hash, send_fn, mode, window, media_type=media_type, kwargs=kwargs,
                                    pickled_args=True if args is not None else None, timeout=timeout, request=request,
                                    json_kwargs=True if json_kwargs is not None else None, finish=True if finish else None)
        if self.send(message, buffers):  # (one that did not go out left the worker without the function)
            self.remember(fn_hash)
        return run

    def remember(self, fn_hash: str) -> None:
        """`fn_hash` is in the worker's cache (just used); beyond `MAX_WORKER_FUNCTIONS`,
        the least recently used one is forgotten there."""
        functions = self.functions
        functions[fn_hash] = None
        functions.move_to_end(fn_hash)
        if len(functions) > wire.MAX_WORKER_FUNCTIONS:
            oldest, _ = functions.popitem(last=False)
            self.send(wire.forget_message([oldest]))

    def forget(self, fn_hashes: list[str]) -> None:
        """Tell the worker to drop these functions (no registration uses them any more)."""
        known = [h for h in fn_hashes if h in self.functions]
        for fn_hash in known:
            del self.functions[fn_hash]
        if known and self.alive:
            self.send(wire.forget_message(known))

    def start_batch(self, fn_hash: str, fn_blob: bytes, inputs: list[tuple[OnOutput, dict[str, Any]]], *, mode: str,
                    media_type: str | None = None, timeout: float | None = None) -> list[Run]:
        """Start one batch of a batched function (``mode: "batch"`` in `wire`): one call that
        runs the function once on several callers' inputs. Each input (its output taker,
        and ``pickled`` arguments, or ``args`` and the map's ``kwargs``, or ``json``
        arguments and a ``request``) gets a run of its own, which carries its output and
        can be cancelled alone; the batch's own run holds the worker's seat, ends after
        its inputs' runs and fails those it did not end (`_batch_output`). `mode` is how
        each input's result travels: ``values`` or ``http``. Returns the inputs' runs."""
        batch = Run(self, uuid.uuid4().hex[:16], wire.DEFAULT_WINDOW, _no_output)
        batch.on_output = functools.partial(_batch_output, batch)
        batch.on_crash = functools.partial(_batch_crashed, batch)
        batch.items = []
        self.runs[batch.id] = batch
        send_fn = fn_hash not in self.functions
        buffers: list[bytes] = [fn_blob] if send_fn else []
        shared: dict[int, int] = {}  # a map's kwargs travel once for all its inputs
        described = []
        for on_output, fields in inputs:
            run = Run(self, uuid.uuid4().hex[:16], wire.DEFAULT_WINDOW, on_output)
            run.batch = batch
            self.runs[run.id] = run
            batch.items.append(run)
            entry: dict[str, Any] = {"id": run.id}
            for key in ("pickled", "args", "json"):
                if key in fields:
                    entry[key] = len(buffers)
                    buffers.append(fields[key])
            if "kwargs" in fields:
                blob = fields["kwargs"]
                if id(blob) not in shared:
                    shared[id(blob)] = len(buffers)
                    buffers.append(blob)
                entry["kwargs"] = shared[id(blob)]
            if fields.get("request") is not None:
                entry["request"] = fields["request"]
            described.append(entry)
        runs = list(batch.items)
        if not self.alive:  # replaced between being handed out and this batch: fail it next turn
            asyncio.get_running_loop().call_soon(batch.fail, worker_died_error("replaced before the batch started"))
            return runs
        message = wire.call_message(batch.id, fn_hash, send_fn, "batch", wire.DEFAULT_WINDOW, media_type=media_type,
                                    timeout=timeout, batch={"mode": mode, "items": described})
        if self.send(message, buffers):
            self.remember(fn_hash)
        return runs

    def run_ended(self, run: Run) -> None:
        if self.runs.pop(run.id, None) is not None and not run.abandoned and run.batch is None:
            self.pool.release(self)  # (a batch's input holds no seat: its batch does)

    def abandon(self, run: Run) -> None:
        """A cancelled call stops counting against this kernel now, whatever its code is
        doing; it still has `cancel_grace_period` seconds to stop by itself. Then its thread
        is interrupted, and after as long again the kernel is replaced in the background."""
        if run.id not in self.runs or run.abandoned:
            return
        run.abandoned = True
        batch = run.batch
        if batch is not None:  # one input of a batch: the batch keeps its seat while others want it
            if all(item.abandoned or item.ended for item in batch.items):
                batch.cancel()  # (which frees the seat, and stops its code as a single call's)
            return
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
            try:
                run.fail(error)
            except Exception:  # noqa: BLE001 - the others must still hear it
                log.error("jupyter_stream: %s: call %s could not be told its worker died", self.name, run.id, exc_info=True)
                if not run.ended:
                    run._end()

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
            "abandoned": self.abandoned, "draining": self.draining, "unresponsive": self.unresponsive,
            "kernel": self.km.kernel_name,
            "source": getattr(self.km, "source", "local"),
            "transport": self.transport.kind if self.transport is not None else None,
        }
