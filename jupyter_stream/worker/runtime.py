"""The worker side: runs inside a worker kernel (ipykernel) and carries out the server's runs.

The pool bootstraps each kernel with `wire.BOOTSTRAP`, which calls `register()`. The
server then opens a comm; every run gets a thread that runs the user's function and
iterates its output, and one sender thread per kernel ships whatever output has piled up
since its last send as a single IOPub message. A tight generator therefore goes out in
large batches while a slow one is flushed the moment it yields. The sender stops a run
from running more than its credit window ahead of the HTTP client (backpressure).
"""

from __future__ import annotations

import asyncio
import atexit
import contextvars
import ctypes
import gc
import inspect
import io
import json
import os
import pickle
import sys
import threading
import time
from typing import Any

import cloudpickle

from .. import wire
from ..errors import error_info, error_payload, timeout_error
from ..responses import SSE, Finish, Finished, StreamingResponse, encoder_for, plain_response
from . import arguments, batches
from .direct import DirectChannel
from .runs import Run, RunCancelled, RunThreads, pack, text_safe

_worker: Worker | None = None
#: the run whose code is running here (this thread, or this task on the worker's event
#: loop), if any (see `RunOutput`)
_current_run: contextvars.ContextVar[Run | None] = contextvars.ContextVar("jupyter_stream_run", default=None)


class RunOutput(io.TextIOBase):
    """A worker's ``sys.stdout`` / ``sys.stderr``: what a run's code writes (print,
    logging, warnings, tracebacks) goes back to whoever made the call, with the run's
    output; what other threads write goes to the kernel's own stream (the server log)."""

    def __init__(self, name: str, fallback: Any):
        self.name = name
        self.fallback = fallback

    def write(self, text: str) -> int:
        run = _current_run.get()
        if run is None or not text:
            return self.fallback.write(text)
        run.print(self.name, text)
        return len(text)

    def flush(self) -> None:
        if _current_run.get() is None:
            self.fallback.flush()

    def writable(self) -> bool:
        return True

    @property
    def encoding(self) -> str:
        return getattr(self.fallback, "encoding", "utf-8")

    def fileno(self) -> int:
        return self.fallback.fileno()


def log_line(text: str) -> None:
    """One line to the kernel process's own stderr, which reaches the server's log: for
    what goes wrong in the worker's own threads, where no call is there to report it."""
    try:
        sys.__stderr__.write(f"jupyter_stream worker (pid {os.getpid()}): {text}\n")
        sys.__stderr__.flush()
    except Exception:  # noqa: BLE001 - nowhere left to say it
        pass


def jsonable(value: Any) -> Any:
    """`value` as JSON the kernel's message packer takes: text without lone surrogates,
    and anything JSON has no type for as its repr (the fallback for a message that would
    not encode, so that a strange header or error text cannot stop the sender)."""
    if isinstance(value, str):
        return text_safe(value)
    if value is None or isinstance(value, (bool, int)):
        return value
    if isinstance(value, float):
        return value if value == value and value not in (float("inf"), float("-inf")) else repr(value)
    if isinstance(value, dict):
        return {text_safe(str(k)): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return text_safe(repr(value))


class Worker:
    """Owns the comm to the server, the function cache and the running calls."""

    def __init__(self, comm: Any, options: dict[str, Any] | None = None):
        self.comm = comm
        options = options or {}
        # a gateway kernel gets what its start request could not carry here (the
        # gateway passes on KERNEL_* variables only): set before any call's code runs
        os.environ.update({str(k): str(v) for k, v in (options.get("env") or {}).items()})
        #: seconds a timed-out call's code gets to stop after its thread is interrupted,
        #: before the server is told it is stuck (and replaces this kernel)
        self.grace = float(options.get("cancel_grace_period") or 5.0)
        #: runs that timed out, with the time by which their code must have stopped
        self.stopping: dict[Run, float] = {}
        #: ``ping`` numbers to answer through the sender thread
        self.pongs: list[int] = []
        self.functions: dict[str, Any] = {}
        self.pickled: dict[str, bytes] = {}  # functions received and not loaded yet
        self.loading = threading.Lock()
        self.runs: dict[str, Run] = {}
        self.lock = threading.Lock()
        self.has_output = threading.Condition(self.lock)
        #: held from taking runs' output to writing it (the sender's batch, or one run's
        #: output sent by its own thread: `send_now`), so messages go out in the order taken
        self.sending = threading.Lock()
        self.dirty: list[Run] = []
        self.seq = 0  # messages the sender thread has sent, and the server has acknowledged
        self.acked_seq = 0
        self.threads = RunThreads()
        self.watched: set[Run] = set()
        self.watchdog: threading.Thread | None = None
        self.loop: asyncio.AbstractEventLoop | None = None  # see `event_loop`
        from IPython import get_ipython

        self.kernel = get_ipython().kernel
        self.session = self.kernel.session
        self.topic = f"comm-{comm.comm_id}".encode()
        comm.on_msg(self.on_msg)
        # Also take this comm's messages on the control channel: ipykernel handles those on
        # its control thread, skipping the shell thread -> main thread hop (lower latency).
        handlers = getattr(self.kernel, "control_handlers", None)
        if isinstance(handlers, dict):
            handlers["comm_msg"] = self.on_control_msg
        sys.stdout = RunOutput("stdout", sys.stdout)
        sys.stderr = RunOutput("stderr", sys.stderr)
        #: the direct channel to the server (see `direct`), if it asked for one and it opened
        self.direct: DirectChannel | None = None
        offer, problem = None, None
        if options.get("direct"):
            try:
                self.direct = DirectChannel(self.on_direct_msg, self.on_direct_connected)
                offer = self.direct.offer()
                threading.Thread(target=self.direct_loop, name="jupyter-stream-direct", daemon=True).start()
                atexit.register(self.direct.remove)
            except Exception as exc:  # noqa: BLE001 - the comm carries everything then
                problem = f"{type(exc).__name__}: {exc}"
                log_line(f"no direct channel ({problem}); its messages go through the comm")
                self.direct = None
        threading.Thread(target=self.send_loop, name="jupyter-stream-sender", daemon=True).start()
        atexit.register(self.stop_runs)
        if options.get("freeze_gc"):
            # the kernel's start-up objects (IPython, ipykernel, this module) leave the garbage
            # collector's generations: a full collection, which holds the GIL and so pauses every
            # call's thread, then walks only what calls make (see `JupyterStream.freeze_gc`)
            gc.freeze()
        global _worker
        _worker = self  # before "ready": the first call may come at once, and may look for it
        self.send({"op": "ready", "pid": os.getpid(), "python": sys.version.split()[0], "control": isinstance(handlers, dict),
                   "version": wire.PROTOCOL_VERSION, "direct": offer, "direct_problem": problem})

    # -- messages from the server (kernel main thread) -------------------------------

    def on_control_msg(self, stream: Any, ident: Any, msg: dict[str, Any]) -> None:
        if msg["content"].get("comm_id") == self.comm.comm_id:
            self.on_msg(msg)

    def on_msg(self, msg: dict[str, Any]) -> None:
        try:
            self.handle(msg["content"]["data"], msg.get("buffers") or [])
        except Exception as exc:  # noqa: BLE001 - one bad message must not stop the next
            log_line(f"could not handle a message from the server: {type(exc).__name__}: {exc}")

    def on_direct_msg(self, data: dict[str, Any], buffers: list) -> None:
        try:
            self.handle(data, buffers)
        except Exception as exc:  # noqa: BLE001 - one bad message must not stop the next
            log_line(f"could not handle a message from the server: {type(exc).__name__}: {exc}")

    def on_direct_connected(self) -> None:
        """The server said hello on the direct channel: from now on everything this worker
        sends goes that way (the first message says so)."""
        self.send({"op": "direct"})

    def direct_loop(self) -> None:
        """The direct channel's reader thread, supervised as the sender is. When the server
        closes the channel it is shutting this kernel down (or gone): what is still sent
        goes through the comm, and the kernel ends the usual way, its calls' ``finally``
        blocks and exit handlers run. If the reader fails otherwise, nothing the server
        says arrives any more: the worker says why and exits."""
        try:
            self.direct.read_forever()
        except (ConnectionError, EOFError) as exc:  # the server closed it
            self.direct.connected = False
            log_line(f"the server closed the direct channel ({exc}); what is left goes through the comm")
        except BaseException as exc:  # noqa: BLE001
            reason = f"its direct channel's reader failed: {type(exc).__name__}: {exc}"
            log_line(f"{reason}; exiting so that the server replaces this kernel")
            try:
                self.send({"op": "broken", "reason": reason})
            finally:
                time.sleep(0.5)
                self.direct.remove()  # (exit handlers do not run on os._exit)
                os._exit(70)

    def handle(self, data: dict[str, Any], buffers: list) -> None:
        op = data.get("op")
        if op == "ping":
            with self.lock:  # answered by the sender thread: a pong says it still sends
                self.pongs.append(data["n"])
                self.has_output.notify()
        elif op == "acked":
            with self.lock:
                self.acked_seq = max(self.acked_seq, data["seq"])
                self.has_output.notify()
        elif op == "ack":
            run = self.runs.get(data["id"])
            if run is not None:
                with self.lock:
                    run.unacked -= data["bytes"]
                    run.wake()
        elif op == "call":
            self.start_run(data, buffers)
        elif op == "batch":
            self.add_batch(data, buffers)
        elif op == "close":
            run = self.runs.get(data["id"])
            if run is not None:
                with self.lock:
                    run.closed = True
                    run.has_batch.notify()
        elif op == "revoke":
            self.revoke(data["id"], data["indices"])
        elif op == "cancel":
            self.cancel(data["id"])
        elif op == "interrupt":
            self.interrupt(data["id"])
        elif op == "forget":  # calls that have their function already keep it (see `start_run`)
            for key in data["fns"]:
                self.functions.pop(key, None)
                self.pickled.pop(key, None)

    def start_run(self, data: dict[str, Any], buffers: list) -> None:
        """Take a call: its function (or its pickle) is taken here, as the message comes, so a
        ``forget`` right behind it cannot take it away; the call runs in a thread of its own.
        A call that cannot even start ends with the error."""
        run = Run(self, data["id"], data.get("window", wire.DEFAULT_WINDOW))
        self.runs[run.id] = run
        try:
            if data.get("mode") == "batch":
                batches.prepare(self, run, data)
            key = data["fn"]
            fn = self.functions.get(key)
            if fn is None:
                if data.get("send_fn"):
                    self.pickled[key] = bytes(buffers[0])
                fn = self.pickled.get(key)
            if data.get("mode", "http") == "http" and not data.get("timeout") and starts_on_loop(fn):
                self.event_loop().call_soon_threadsafe(self.start_on_loop, run, data, buffers, fn)
            else:
                self.threads.submit(self.execute, run, data, buffers, fn)
        except BaseException as exc:  # noqa: BLE001 - say so to the caller rather than leave it waiting
            error = error_payload(exc, pickled=data.get("mode") != "http")
            for each in (*run.items, run):
                each.finish(error)

    def add_batch(self, data: dict[str, Any], buffers: list) -> None:
        """More map items for a lane: (index, pickled args) pairs cut from one buffer."""
        run = self.runs.get(data["id"])
        if run is None:
            return
        view, items, offset = memoryview(buffers[0]), [], 0
        for index, size in zip(wire.unpack_ints(buffers[1]), wire.unpack_ints(buffers[2])):
            items.append((index, view[offset : offset + size]))
            offset += size
        with self.lock:
            run.batches.extend(items)
            run.has_batch.notify()

    def revoke(self, call_id: str, indices: list[int]) -> None:
        """The server takes back map items of a lane for another lane that ran dry: those
        still queued here are removed, and the lane's next message names them (an item
        already started is not among them: it runs here, once)."""
        wanted = set(indices)
        with self.lock:
            run = self.runs.get(call_id)
            if run is None:  # ended: its end, already on its way, tells the server
                return
            batches = run.batches
            taken = [index for index, _ in batches if index in wanted]
            if taken:
                kept = [item for item in batches if item[0] not in wanted]
                batches.clear()  # in place: `run_lane` holds this deque
                batches.extend(kept)
            run.give_back(taken)

    def cancel(self, call_id: str) -> None:
        run = self.runs.get(call_id)
        if run is None:
            return
        with self.lock:
            run.cancelled = True
            run.batches.clear()
            run.wake()
            run.has_batch.notify_all()
        if run.batch is not None:  # one input of a batch: it ends now, the batch goes on for the others
            run.finish(None)
        if run.loop is not None and run.task is not None:
            run.loop.call_soon_threadsafe(run.task.cancel)

    def interrupt(self, call_id: str) -> None:
        """Raise `RunCancelled` in the thread of a cancelled call whose code did not stop
        (it never yields, or ignores the cancel). Python delivers it at the thread's next
        bytecode; code blocked in C (a long sleep, a native run) is not reached, and the
        server replaces the kernel if the call still runs later."""
        run = self.runs.get(call_id)
        if run is None:
            return
        with self.lock:
            if run.cancelled and run.thread is not None:
                ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(run.thread), ctypes.py_object(RunCancelled))

    def stop_runs(self, timeout: float = 1.5) -> None:
        """At exit (the server shuts this kernel down): cancel the runs still going and
        interrupt their threads, so their ``finally`` blocks and context managers run
        before the process ends (its call threads are daemons, which would just vanish)."""
        running = [run for run in list(self.runs.values()) if not run.done]
        for run in running:
            self.cancel(run.id)
            self.interrupt(run.id)
        deadline = time.monotonic() + timeout
        for run in running:
            while not run.done and time.monotonic() < deadline:
                time.sleep(0.01)

    def settle(self, run: Run) -> None:
        """The call's code is done: no interrupt may reach its thread (reused for the next
        run) from now on, and one already raised but not yet delivered is withdrawn."""
        with self.lock:
            ident, run.thread = run.thread, None
        if ident is not None:
            ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(ident), None)

    # -- running a call (its own thread) ----------------------------------------------

    def execute(self, run: Run, data: dict[str, Any], buffers: list, fn_or_pickle: Any = None) -> None:
        error = None
        mode = data.get("mode", "http")
        run.thread = threading.get_ident()
        run.running_code = True
        token = _current_run.set(run)
        on_loop = False  # an async function's run goes on on the worker's event loop
        try:
            if mode == "batch":  # one call for several callers' inputs
                batches.run_batch(self, run, data, buffers, fn_or_pickle)
                return
            fn = self.function(data["fn"], fn_or_pickle)
            if mode == "load":  # the server only checks that the pickle loads here
                return
            args, kwargs = (), dict(data.get("kwargs") or {})
            if data.get("json_kwargs"):
                kwargs = json.loads(bytes(buffers[-1]))
            if data.get("pickled_args"):
                args, more = cloudpickle.loads(buffers[-1])
                kwargs.update(more)
            if mode == "map":
                self.run_lane(run, fn, kwargs, data.get("timeout"))
                return
            if mode == "http":
                kwargs = arguments.prepare(fn, kwargs, data.get("request"))
                run.reads_finish = bool(data.get("finish"))
            if data.get("timeout"):
                run.deadline = time.monotonic() + data["timeout"]
                self.watch(run)
            result = fn(*args, **kwargs)
            if inspect.isawaitable(result):  # an async def function
                pending = self.await_then_emit(run, result, mode, data.get("media_type"))
            else:
                pending = self.emit(run, result, mode, data.get("media_type"))
            if pending is not None:  # async: a task on the worker's one event loop, not this thread
                asyncio.run_coroutine_threadsafe(self.run_async(run, pending, mode), self.event_loop())
                on_loop = True
        except RunCancelled:
            pass
        except BaseException as exc:  # noqa: BLE001 - every failure goes back to the caller
            error = error_payload(exc, pickled=mode != "http")
        finally:
            _current_run.reset(token)
            while True:
                try:
                    self.settle(run)
                    break
                except RunCancelled:  # the interrupt landed here, after the user's code
                    continue
            if not on_loop:
                run.running_code = False
                run.finish(error)

    def start_on_loop(self, run: Run, data: dict[str, Any], buffers: list, fn: Any) -> None:
        """An HTTP call of an async function already loaded here starts on the event loop
        itself, one thread hand-off less than `execute` then `run_async`: calling the
        function only makes its generator or coroutine, so none of the user's code runs
        here. A JSON body that becomes a dataclass or pydantic model (whose validators are
        the user's code) is handed to `execute` in a thread instead."""
        if run.cancelled:  # cancelled before it started
            run.finish(None)
            return
        try:
            kwargs = json.loads(bytes(buffers[-1])) if data.get("json_kwargs") else dict(data.get("kwargs") or {})
            if any(isinstance(value, dict) for value in kwargs.values()):
                self.threads.submit(self.execute, run, data, buffers, fn)
                return
            run.running_code = True
            kwargs = arguments.prepare(fn, kwargs, data.get("request"))  # (only a `Request` to make)
            run.reads_finish = bool(data.get("finish"))
            result = fn(**kwargs)
            if inspect.isawaitable(result):
                pending = self.await_then_emit(run, result, "http", data.get("media_type"))
            else:
                pending = self.emit(run, result, "http", data.get("media_type"))
        except BaseException as exc:  # noqa: BLE001 - every failure goes back to the caller
            run.running_code = False
            run.finish(error_payload(exc, pickled=False))
            return
        if pending is None:
            run.running_code = False
            run.finish(None)
        else:
            # (`run.loop` and `run.task` are set by its first step, which sees a cancel that came before)
            run.task = self.loop.create_task(self.run_async(run, pending, "http"))

    def event_loop(self) -> asyncio.AbstractEventLoop:
        """The worker's event loop (its own thread, started on first use): every running
        async call is a task on it, so a thousand concurrent async streams are a thousand
        tasks, not a thousand threads."""
        with self.loading:
            if self.loop is None:
                self.loop = asyncio.new_event_loop()
                threading.Thread(target=self.loop.run_forever, name="jupyter-stream-async", daemon=True).start()
        return self.loop

    async def run_async(self, run: Run, pending: Any, mode: str) -> None:
        """An async call on the event loop, from its first await to its end."""
        _current_run.set(run)  # this task's own context: its prints go to its caller
        error = None
        try:
            await pending
        except RunCancelled:
            pass
        except BaseException as exc:  # noqa: BLE001 - every failure goes back to the caller
            error = error_payload(exc, pickled=mode != "http")
        finally:
            run.running_code = False
            run.finish(error)

    def run_lane(self, run: Run, fn: Any, kwargs: dict[str, Any], timeout: float | None) -> None:
        """A map lane: run the items the server sends, one after another, until closed."""
        run.framed = True
        run.start = {}
        loads, dumps, clock = pickle.loads, wire.dumps, time.perf_counter
        lock, batches = self.lock, run.batches
        if timeout:
            self.watch(run)
        while True:
            with lock:
                while not batches and not run.closed and not run.cancelled:
                    run.has_batch.wait()
                if run.cancelled or (run.closed and not batches):
                    return
                index, blob = batches.popleft()
                if timeout:
                    run.running_index = index
                    run.deadline = time.monotonic() + timeout
            started = clock()
            try:
                result, ok = dumps(fn(*loads(blob), **kwargs)), True
            except RunCancelled:
                raise
            except BaseException as exc:  # noqa: BLE001 - the item fails, the lane goes on
                result, ok = dumps(error_payload(exc, pickled=True)), False
            if timeout:
                with lock:
                    run.deadline = None
                    if run.running_index != index:  # the watchdog already failed this item
                        continue
            run.put(result, index, ok, busy=clock() - started)

    # -- timeouts (watchdog thread) ---------------------------------------------------

    def watch(self, run: Run) -> None:
        with self.lock:
            self.watched.add(run)
            if self.watchdog is None:
                self.watchdog = threading.Thread(target=self.watch_loop, name="jupyter-stream-watchdog", daemon=True)
                self.watchdog.start()

    def watch_loop(self) -> None:
        """The watchdog thread: supervised, so that a failure in it is logged and the
        watching goes on (a timeout that never fires would hang its caller)."""
        while True:
            time.sleep(0.02)
            try:
                self.check_deadlines()
            except Exception as exc:  # noqa: BLE001 - log it and keep watching
                log_line(f"the timeout watchdog failed: {type(exc).__name__}: {exc}")

    def check_deadlines(self) -> None:
        """End calls (or map items) that run past their timeout with a
        `FunctionTimeoutError` at once, and stop their code: an async call's task is
        cancelled, a thread is interrupted at its next bytecode. Other calls on this
        kernel (``--concurrency``) and a class's loaded model are left alone. Code that
        has not stopped `grace` seconds later is stuck (in C, a long sleep): the server
        is told, and replaces this kernel once its other calls are done."""
        now = time.monotonic()
        expired = []
        with self.lock:
            for run in list(self.watched):
                if run.done:
                    self.watched.discard(run)
                elif run.deadline is not None and now > run.deadline:
                    expired.append((run, run.running_index))
                    run.deadline = None
                    run.running_index = None
                    self.watched.discard(run)
        for run, index in expired:
            error = timeout_error()
            if index is not None:
                try:
                    run.put(wire.dumps(error), index, False, wait=False)
                except RunCancelled:
                    pass
            run.finish(error)
            self.stop_code(run)
        for run, deadline in list(self.stopping.items()):
            if not run.running_code:
                del self.stopping[run]
            elif now > deadline:
                del self.stopping[run]
                log_line(f"a timed-out call's code has not stopped {self.grace:g} s after its thread was interrupted")
                self.send({"op": "stuck", "id": run.id, "reason": f"a call ran past its timeout and its code did not stop "
                                                                  f"within {self.grace:g} s of being interrupted"})

    def stop_code(self, run: Run) -> None:
        """Stop a timed-out run's code: cancel its task or interrupt its thread, and
        check on it after `grace` seconds (`check_deadlines`)."""
        with self.lock:
            run.cancelled = True
            run.batches.clear()
            run.wake()
            run.has_batch.notify_all()
            if run.thread is not None:
                ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(run.thread), ctypes.py_object(RunCancelled))
        if run.loop is not None and run.task is not None:
            run.loop.call_soon_threadsafe(run.task.cancel)
        if run.running_code:
            self.stopping[run] = time.monotonic() + self.grace

    def function(self, key: str, fn_or_pickle: Any) -> Any:
        """The function `key` (as `start_run` found it: the function, or its pickle),
        unpickled once. One thread loads it while calls that arrive meanwhile wait; if
        loading fails (a module missing here), the pickle is kept and the next call tries
        again."""
        if fn_or_pickle is None:
            raise RuntimeError(f"function {key} was not sent to this worker")
        if not isinstance(fn_or_pickle, bytes):
            return fn_or_pickle
        with self.loading:
            fn = self.functions.get(key)
            if fn is not None:
                return fn
            try:
                fn = cloudpickle.loads(fn_or_pickle)
            except ModuleNotFoundError as e:
                raise ModuleNotFoundError(
                    f"{e} on the worker kernel: install it in the workers' environment "
                    "(or define what the function needs in the notebook), then call again",
                    name=e.name,
                ) from None
            if self.pickled.pop(key, None) is not None:  # not forgotten meanwhile: cache it
                self.functions[key] = fn
        return fn

    async def await_then_emit(self, run: Run, awaitable: Any, mode: str, media_type: str | None) -> None:
        run.loop = asyncio.get_running_loop()
        run.task = asyncio.current_task()
        if run.cancelled:  # before its task could be cancelled
            close = getattr(awaitable, "close", None)
            if close is not None:
                close()
            raise RunCancelled()
        try:
            result = await awaitable
        except asyncio.CancelledError:
            raise RunCancelled() from None
        pending = self.emit(run, result, mode, media_type)
        if pending is not None:
            await pending

    def emit(self, run: Run, result: Any, mode: str, media_type: str | None) -> Any:
        """Send what the function returned: HTTP chunks encoded for the media type, or
        pickled values. Sync iterables are drained here; for async ones the coroutine
        that drains them is returned, to run in an event loop."""
        declared, announce = media_type, False
        if mode == "http":
            status, headers = 200, {}
            if isinstance(result, StreamingResponse):
                status, headers = result.status_code, result.headers
                media_type = result.media_type or media_type
                result = result.body_iterator
            elif isinstance(result, Finish):  # nothing to send, only why it ended
                run.ending, result = result, ()
            else:
                plain = plain_response(result, media_type)
                if plain is not None:  # a value, not a stream: one response, as FastAPI sends it
                    body, media_type = plain
                    run.chunks = 1 if body else 0
                    run.start = {"status": status, "headers": headers, "media_type": media_type}
                    run.put(body, last=True)
                    return None
            media_type = media_type or SSE
            run.start = {"status": status, "headers": headers, "media_type": media_type}
            # Until told otherwise the server answers as the endpoint declared: a start that
            # says only that (200, no headers, the declared media type) goes with the first
            # chunk, not in a message of its own (one message less each way per call).
            announce = not (status == 200 and not headers and media_type == declared)
            encode = encoder_for(media_type)
            if result is None:
                return None
            single = isinstance(result, (str, bytes, bytearray, memoryview)) or not (
                hasattr(result, "__iter__") or hasattr(result, "__aiter__")
            )
        else:
            run.framed = True
            streaming = inspect.isgenerator(result) or inspect.isasyncgen(result)
            run.start = {"stream": streaming}
            encode = wire.dumps
            single = not streaming
        if single:
            run.put(encode(result), last=True)
            return None
        if announce:
            run.announce()
        if hasattr(result, "__aiter__"):
            return self.drain_async(run, counted_async(run, result) if run.reads_finish else result, encode)
        if run.reads_finish:  # (the OpenAI route) counted, and a generator's return value kept
            result = counted(run, result)
        put = run.put
        try:
            for chunk in result:
                put(encode(chunk))
        except Finished as finished:  # a yielded Finish: the stream ends here
            run.ending = finished.finish
        finally:
            if inspect.isgenerator(result):
                result.close()
        return None

    async def drain_async(self, run: Run, result: Any, encode: Any) -> None:
        run.loop = asyncio.get_running_loop()
        run.task = asyncio.current_task()
        if run.cancelled:
            raise RunCancelled()
        aput = run.aput
        try:
            async for chunk in result:
                await aput(encode(chunk))
        except Finished as finished:
            run.ending = finished.finish
        except asyncio.CancelledError:
            raise RunCancelled() from None
        finally:
            aclose = getattr(result, "aclose", None)
            if aclose is not None:
                await aclose()

    # -- sending (sender thread) ------------------------------------------------------

    def send_loop(self) -> None:
        """The sender thread, supervised: a message that cannot be sent ends its call with
        an error (`ship`), and should the loop itself fail, the worker says so and exits,
        so that the server replaces it rather than keep a worker that never answers."""
        try:
            self.send_forever()
        except BaseException as exc:  # noqa: BLE001 - nothing the worker sends would arrive any more
            reason = f"its sender thread failed: {type(exc).__name__}: {exc}"
            log_line(f"{reason}; exiting so that the server replaces this kernel")
            try:
                self.send({"op": "broken", "reason": reason})
            finally:
                time.sleep(0.5)  # what the kernel's IOPub thread has queued goes out first
                os._exit(70)

    def send_forever(self) -> None:
        """Ship what has piled up, one message per run, numbered; wait while the server
        is `MAX_UNACKED_MESSAGES` behind (IOPub would drop messages past its limit).
        Pings are answered here, so that a pong proves this thread still sends."""
        while True:
            with self.lock:
                while not self.pongs and (not self.dirty or self.seq - self.acked_seq >= wire.MAX_UNACKED_MESSAGES):
                    self.has_output.wait()
            with self.sending:  # what is taken here is written before anybody's later output
                with self.lock:
                    pongs, self.pongs = self.pongs, []
                    messages = []
                    if self.dirty and self.seq - self.acked_seq < wire.MAX_UNACKED_MESSAGES:
                        batch, self.dirty = self.dirty, []
                        messages = [self.take_output(run) for run in batch]
                    first, self.seq = self.seq + 1, self.seq + len(messages)
                for n in pongs:
                    self.send({"op": "pong", "n": n})
                for seq, (out, _) in enumerate(messages, first):
                    out["seq"] = seq
                if len(messages) > 1 and self.ship_together(messages):
                    continue
                for out, buffers in messages:
                    self.ship(out, buffers)

    def send_now(self, run: Run) -> None:
        """Send `run`'s output from the calling thread (its first output, a spaced token, its
        start), which marked it dirty without queueing it for the sender. While the sender
        is writing what it took, the output is queued for it instead: it goes out after
        those messages, never before one of the run's earlier chunks, and the calling
        thread (perhaps the event loop) does not wait. The run's own thread is not
        interrupted meanwhile (`interrupt`): holding `sending`, or a message taken and not
        yet written, it would stop the worker's output; a cancel raises once it is done."""
        me = threading.get_ident()
        with self.lock:
            mine = run.thread == me
            if mine:
                run.thread = None  # no interrupt is raised in this thread from now on...
        if mine:
            ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(me), None)  # ...and one on its way is withdrawn
        try:
            if not self.sending.acquire(blocking=False):
                with self.lock:
                    self.dirty.append(run)
                    self.has_output.notify()
                return
            try:
                with self.lock:
                    out, buffers = self.take_output(run)
                self.ship(out, buffers)
            finally:
                self.sending.release()
        finally:
            if mine:
                with self.lock:
                    run.thread = me
                    cancelled = run.cancelled
                if cancelled:  # what an interrupt would have raised
                    raise RunCancelled()

    def ship_together(self, messages: list[tuple[dict[str, Any], list]]) -> bool:
        """Several runs' messages in one write on the direct channel (tokens of concurrent
        streams often come due together: one system call and one wake-up of the server
        for all of them). False, with nothing sent, where each must go on its own: no
        channel, or one of them does not encode (`ship` says why for that one)."""
        if not self.direct_connected():
            return False
        try:
            parts = [part for out, buffers in messages for part in wire.direct_parts(out, buffers)]
        except (TypeError, ValueError):
            return False
        try:
            self.direct.send_parts(parts)
        except (BrokenPipeError, ConnectionResetError):  # the server closed it: the comm carries them
            self.direct.connected = False
            return False
        return True

    def ship(self, out: dict[str, Any], buffers: list) -> None:
        """Send one run's message; if it cannot be sent (say, its headers do not encode),
        end that run with an error saying why instead, and go on."""
        try:
            self.send(out, buffers)
        except Exception as exc:  # noqa: BLE001 - this run fails, the sender goes on
            run = self.runs.pop(out["id"], None)
            if run is not None:
                with self.lock:
                    run.done = run.cancelled = True
                    run.wake()
            reason = f"the worker could not send this call's output: {type(exc).__name__}: {exc}"
            log_line(f"call {out['id']}: {reason}")
            end = {"op": "out", "id": out["id"], "end": True, "error": error_info("WorkerError", text_safe(reason))}
            if "seq" in out:  # (what a run sends itself is not numbered: `send_now`)
                end["seq"] = out["seq"]
            self.send(end)

    def take_output(self, run: Run) -> tuple[dict[str, Any], list[bytes]]:
        """The next message for `call`: its pending bytes joined, and its start/end. Holds the lock."""
        run.dirty = False
        out: dict[str, Any] = {"op": "out", "id": run.id}
        if run.indices:  # map results: their indices, sizes and outcomes packed (see `wire`)
            out["items"] = len(run.indices)
            out["busy"], run.busy = run.busy, 0.0
            buffers = [b"".join(run.pending), wire.pack_ints(run.indices), wire.pack_ints(map(len, run.pending)),
                       bytes(run.outcomes)]
            run.indices, run.outcomes = [], bytearray()
        else:
            if run.framed:
                out["sizes"] = [len(b) for b in run.pending]
            buffers = pack(run.pending) if run.has_large and not run.framed else [b"".join(run.pending)]
        if run.revoked is not None:
            out["revoked"], run.revoked = run.revoked, None
        run.pending.clear()
        run.has_large = False
        run.unacked += run.pending_bytes
        run.pending_bytes = 0
        if run.start is not None:
            out["start"], run.start = run.start, None
        if run.printed:
            out["print"], run.printed = run.printed, []
            run.printed_chars = 0
        if run.done:
            out["end"] = True
            if run.error is not None:
                out["error"] = run.error
            elif run.ending is not None or run.reads_finish:
                out["finish"] = {**(run.ending or Finish()).info(), "chunks": run.chunks}
            self.runs.pop(run.id, None)
        return out, buffers

    def direct_connected(self) -> bool:
        direct = self.direct
        return direct is not None and direct.connected

    def send(self, data: dict[str, Any], buffers: list | None = None) -> None:
        """One message to the server: on the direct channel once the server is there,
        else a comm message on IOPub. What the JSON encoder refuses (a lone surrogate, a
        header of no JSON type) is made safe and sent again."""
        direct = self.direct
        if direct is not None and direct.connected:
            try:
                try:
                    direct.send(data, buffers)
                except (TypeError, ValueError):
                    direct.send(jsonable(data), buffers)
                return
            except (BrokenPipeError, ConnectionResetError):  # the server closed it (see `direct_loop`): the comm carries it
                direct.connected = False
        content = {"comm_id": self.comm.comm_id, "data": data}
        try:
            self.session.send(self.kernel.iopub_socket, "comm_msg", content, ident=self.topic, buffers=buffers)
        except (TypeError, ValueError):
            content["data"] = jsonable(data)
            self.session.send(self.kernel.iopub_socket, "comm_msg", content, ident=self.topic, buffers=buffers)


def starts_on_loop(fn: Any) -> bool:
    """Whether a call of `fn` (a loaded function, or its pickle) can start on the event loop."""
    return inspect.isasyncgenfunction(fn) or inspect.iscoroutinefunction(fn)


def counted(run: Run, result: Any) -> Any:
    """`result`'s chunks, counted in `run.chunks` (a `Finish` and empty text are not
    chunks), with a generator's returned `Finish` kept as `run.ending`. Only calls that
    report how they ended (the OpenAI route) go through here: other streams keep their
    plain loop."""
    iterator = iter(result)
    try:
        while True:
            try:
                chunk = next(iterator)
            except StopIteration as stop:
                if isinstance(stop.value, Finish):
                    run.ending = stop.value
                return
            count(run, chunk)
            yield chunk
    finally:
        close = getattr(iterator, "close", None)
        if close is not None:
            close()


def count(run: Run, chunk: Any) -> None:
    if isinstance(chunk, (str, bytes)):
        if chunk:
            run.chunks += 1
    elif not isinstance(chunk, Finish):
        run.chunks += 1


async def counted_async(run: Run, result: Any) -> Any:
    """`counted` for an async iterable (an async generator cannot return a value)."""
    try:
        async for chunk in result:
            count(run, chunk)
            yield chunk
    finally:
        aclose = getattr(result, "aclose", None)
        if aclose is not None:
            await aclose()


def register() -> None:
    """Called once in a fresh worker kernel: accept the server's comm."""

    def on_open(comm: Any, msg: dict[str, Any]) -> None:
        global _worker
        _worker = Worker(comm, msg["content"].get("data") or {})

    from IPython import get_ipython

    get_ipython().kernel.comm_manager.register_target(wire.COMM_TARGET, on_open)
