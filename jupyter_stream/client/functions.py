"""`Function` handles: Modal's call forms for `%%stream_function` functions.

``.remote()``, ``.map()``, ``.starmap()``, ``.for_each()`` and ``.spawn()`` each have an
``.aio`` form. Calls go to the server over this process's calls socket (`calls.CallsSocket`);
the server runs them on worker kernels. Inputs are pickled here, results unpickled here;
a map pulls its inputs lazily, keeping at most `MAX_IN_FLIGHT` of them outstanding.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import itertools
import pickle
import sys
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from typing import Any

from .. import wire
from ..errors import rebuild
from ..requirements import requirement_fields
from ..signatures import MAX_RETRIES, MAX_TIMEOUT
from .batched import batch_of
from .calls import CallStream, calls_socket
from .connection import ServerConnection, get_connection
from .progress import MapProgress
from .progress import start as start_progress
from .registration import register

#: Map inputs sent but not yet handed to the caller, at most (bounds memory for huge inputs).
MAX_IN_FLIGHT = 20_000
#: Map inputs sent before the first result is back.
FIRST_IN_FLIGHT = 64
#: Map inputs per message: the first batches are small so the first results come fast.
FIRST_BATCH, MAX_BATCH = 4, 2048
#: Map inputs are sent in messages of about this many bytes at most.
MAX_FRAME_BYTES = 4 * 1024 * 1024
#: A generator's output the caller may be behind by before the worker pauses.
ACK_EVERY = wire.DEFAULT_WINDOW // 4


class Method:
    """A call form with its ``.aio`` twin, as in Modal: ``f.remote(...)``, ``await f.remote.aio(...)``."""

    def __init__(self, sync: Callable, aio: Callable, doc: str = ""):
        self._sync = sync
        self.aio = aio
        self.__doc__ = doc or sync.__doc__

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._sync(*args, **kwargs)


#: The C pickler's own ``dump``, under cloudpickle's Python wrapper (which only rewords a
#: RecursionError): one Python call less per map input. cloudpickle's reducers still apply.
_c_dump = pickle.Pickler.dump


def _pack_items(items: Iterable[tuple]) -> Iterator[tuple[list[int], bytes]]:
    """Pickle argument tuples back to back with one reused pickler, in groups of about
    `MAX_FRAME_BYTES` (large inputs must not make one huge message); yields sizes and bytes.
    `items` is read as it is pickled: no list of them is made, so each tuple is gone (and
    `zip` reuses it) before the next, and none lives long enough for the garbage collector
    to move it to an older generation."""
    buf = io.BytesIO()
    pickler = wire.Pickler(buf, protocol=5)
    dump, clear, tell = _c_dump, pickler.clear_memo, buf.tell
    sizes: list[int] = []
    last = 0
    for item in items:
        try:
            dump(pickler, item)
        except Exception:
            clear()
            buf.seek(last)
            buf.truncate()
            pickler.dump(item)  # again through cloudpickle's wrapper: its error, or it works
        clear()
        end = tell()
        sizes.append(end - last)
        last = end
        if end >= MAX_FRAME_BYTES:
            yield sizes, buf.getvalue()
            buf.seek(0)
            buf.truncate()
            sizes, last = [], 0
    if sizes:
        yield sizes, buf.getvalue()


def _values(header: dict[str, Any], payload: memoryview) -> list[Any]:
    sizes = header.get("sizes")
    if not sizes:
        return []
    return [pickle.loads(blob) for blob in wire.split(payload, sizes)]


#: Results smaller than this on average are cut out of their frame as bytes, not views.
SMALL_RESULT = 4096


def _blobs(payload: memoryview, sizes: list[int]) -> list:
    """A results frame's pickles. Small ones are cut out of one copy of the payload as
    ``bytes``: cheaper than a view each, and a view is an object the garbage collector
    tracks, a thousand per frame; large ones stay views of the frame (no copy)."""
    if payload.nbytes > SMALL_RESULT * len(sizes):
        return wire.split(payload, sizes)
    return wire.cut(payload, sizes)


def relay_printed(header: dict[str, Any]) -> None:
    """Write what the remote code printed (a frame's ``print``) to this process's stdout
    and stderr: in a notebook, the cell that made the call."""
    for stream, text in header.get("print", ()):
        out = sys.stderr if stream == "stderr" else sys.stdout
        out.write(text)
        out.flush()


class PrintedLines:
    """A map's prints, relayed a whole line at a time, every line tagged with its worker:
    ``[w1]``, ``[w2]``... in the order the workers first print in this map (short, and
    the same for the whole map, unlike kernel names). A worker's unfinished line is held
    until the rest of it arrives, so lines of different workers never run together."""

    def __init__(self) -> None:
        self.tags: dict[Any, str] = {}  # the server's worker name -> its tag in this map
        self.held: dict[tuple, str] = {}  # (worker, stream) -> its unfinished line

    def relay(self, header: dict[str, Any]) -> None:
        worker = header.get("worker")
        tag = self.tags.setdefault(worker, f"w{len(self.tags) + 1}")
        for stream, text in header.get("print", ()):
            key = (worker, stream)
            lines = (self.held.pop(key, "") + text).splitlines(keepends=True)
            if lines and not lines[-1].endswith(("\n", "\r")):
                self.held[key] = lines.pop()
            if lines:
                out = sys.stderr if stream == "stderr" else sys.stdout
                out.write("".join(f"[{tag}] {line}" for line in lines))
                out.flush()

    def flush(self) -> None:
        """The map is over: lines still unfinished are written as they are."""
        for (worker, stream), text in self.held.items():
            out = sys.stderr if stream == "stderr" else sys.stdout
            out.write(f"[{self.tags[worker]}] {text}\n")
            out.flush()
        self.held.clear()


def _raise_if_error(header: dict[str, Any]) -> None:
    if header.get("error"):
        raise rebuild(header["error"])


class FunctionCall:
    """A call started with ``.spawn()``: ``.get()`` its result later, or ``.cancel()`` it."""

    def __init__(self, stream: CallStream):
        self._stream = stream
        self._done = False
        self._value: Any = None
        self.get = Method(self._get, self._get_aio)

    def _consume(self, frames: list) -> None:
        for header, payload in frames:
            relay_printed(header)
            values = _values(header, payload)
            if values:
                self._value = values[-1]
            if header.get("end"):
                self._done = True
                _raise_if_error(header)

    def _get(self, timeout: float | None = None) -> Any:
        """The call's return value (raising its exception); `TimeoutError` after `timeout` s."""
        while not self._done:
            frames = self._stream.take(timeout=timeout)
            if not frames:
                raise TimeoutError(f"the call did not finish within {timeout} s")
            self._consume(frames)
        return self._value

    async def _get_aio(self) -> Any:
        while not self._done:
            self._consume(await self._stream.atake())
        return self._value

    def cancel(self) -> None:
        """Stop the call; its worker is freed."""
        self._stream.cancel()


class _StreamedValues:
    """What a remote generator yields, frame by frame; returns credit to the worker as the
    caller consumes, so a slow caller pauses the generator."""

    def __init__(self, stream: CallStream):
        self.stream = stream
        self.ended = False
        self.consumed = 0

    def accept(self, frames: list) -> list[Any]:
        values = []
        for header, payload in frames:
            relay_printed(header)
            values.extend(_values(header, payload))
            self.consumed += payload.nbytes
            if header.get("end"):
                self.ended = True
                _raise_if_error(header)
        if self.consumed >= ACK_EVERY and not self.ended:
            self.stream.send({"op": "ack", "bytes": self.consumed})
            self.consumed = 0
        return values


class _MapState:
    """Bookkeeping shared by the sync and async map drivers: what was sent, what came
    back, and the reordering buffer.

    Results come in frames of up to a thousand items, and a trivial function's map moves
    hundreds of thousands a second through this process, so the work per item is kept to
    what cannot be avoided: a frame whose items all succeeded is unpickled in one pass and
    kept as one run of consecutive results (not an entry per item), and no object the
    garbage collector tracks is made per item (see `_pack_items` and `_blobs`)."""

    def __init__(self, stream: CallStream, order_outputs: bool, return_exceptions: bool, progress: MapProgress):
        self.stream = stream
        self.progress = progress
        self.order = order_outputs
        self.return_exceptions = return_exceptions
        self.sent = 0
        self.received = 0
        self.delivered = 0  # handed to the caller (received and buffered ones are still held here)
        self.next_index = 0
        self.runs: dict[int, list[Any]] = {}  # first index -> results of consecutive items, not yet in order
        self.buffered: dict[int, Any] = {}  # index -> a result that came in no such run
        self.inputs_done = False
        self.finished = False
        self.batch = FIRST_BATCH
        self.printed = PrintedLines()

    @property
    def room(self) -> int:
        """How many inputs to send now. Until the first result is back only a few are sent,
        so the workers (and this process) are not busy with a flood of inputs meanwhile."""
        if self.inputs_done:
            return 0
        limit = MAX_IN_FLIGHT if self.received else FIRST_IN_FLIGHT
        return max(0, min(self.batch, limit - (self.sent - self.delivered)))

    def send_items(self, items: Iterable[tuple], want: int) -> None:
        """Send `items` (at most `want` argument tuples, read as they are pickled); fewer
        than `want` means the inputs are exhausted."""
        count = 0
        for sizes, payload in _pack_items(items):
            head = wire.pack_items(range(self.sent, self.sent + len(sizes)), sizes)
            self.stream.send({"op": "items", "count": len(sizes)}, head, payload)
            self.sent += len(sizes)
            count += len(sizes)
        if count:
            self.progress.on_sent(count)
            self.batch = min(self.batch * 2, MAX_BATCH)
        if count < want:
            self.inputs_done = True
            self.stream.send({"op": "inputs_done"})

    def results(self, frames: list) -> list[Any]:
        """Values ready to hand to the caller, in order when ordered."""
        ready: list[Any] = []
        for header, payload in frames:
            if "print" in header:
                self.printed.relay(header)
            if "lanes" in header:
                self.progress.on_lanes(header["lanes"])
            count = header.get("items")
            if count:
                indices, sizes, outcomes, pickles = wire.unpack_items(payload, count, outcomes=True)
                self.take_items(indices, outcomes, _blobs(pickles, sizes), ready)
            if header.get("end"):
                self.finished = True
                _raise_if_error(header)
        if self.order and (self.runs or self.buffered):
            runs, buffered, index = self.runs, self.buffered, self.next_index
            while True:
                run = runs.pop(index, None)
                if run is not None:
                    ready += run
                    index += len(run)
                elif index in buffered:
                    ready.append(buffered.pop(index))
                    index += 1
                else:
                    break
            self.next_index = index
        self.delivered += len(ready)
        self.progress.render()
        return ready

    def take_items(self, indices: list[int], outcomes: bytes, blobs: list, ready: list[Any]) -> None:
        """One frame's results (`outcomes`: a `wire.ITEM_OK`, `ITEM_FAILED` or
        `ITEM_RETRIED` byte each): into `ready` (unordered) or the reordering buffer."""
        count = len(indices)
        if outcomes.count(wire.ITEM_OK) == count == len(blobs):  # all succeeded: the hot path
            values = list(map(pickle.loads, blobs))
            self.received += count
            self.progress.on_results(count)
            if not self.order:
                ready += values
                return
            first = indices[0]
            if first == self.next_index and not self.runs and not self.buffered:
                if indices == list(range(first, first + count)):
                    ready += values  # the next results in order: no buffering
                    self.next_index = first + count
                    return
            elif indices == list(range(first, first + count)):
                self.runs[first] = values
                return
            for index, value in zip(indices, values):
                self.buffered[index] = value
            return
        received, failed = self.received, 0
        try:
            for index, ok, blob in zip(indices, outcomes, blobs):
                if ok == wire.ITEM_RETRIED:  # the item failed and runs again
                    self.progress.on_retry()
                    continue
                self.received += 1
                value = pickle.loads(blob)
                if not ok:
                    failed += 1
                    value = rebuild(value)
                    if not self.return_exceptions:
                        raise value
                if self.order:
                    self.buffered[index] = value
                else:
                    ready.append(value)
        finally:  # counted once per frame, not per item
            self.progress.on_results(self.received - received, failed)

    def close(self, failed: bool) -> None:
        """The caller is done with the map: cancel what is left, and show the final state."""
        self.printed.flush()
        if not self.finished:
            self.stream.cancel()
            state = "failed" if failed else "cancelled"
        else:
            # some items failed and came back as exceptions (return_exceptions): partly done
            state = "failed" if failed else "partial" if self.progress.failed else "success"
        self.progress.finish(state)


class Function:
    """A registered `%%stream_function`. Call it with Modal's call forms; pickles as a
    small reference (its name), so workers can call it too."""

    def __init__(
        self,
        name: str,
        is_generator: bool = False,
        fn: Callable | None = None,
        connection: ServerConnection | None = None,
    ):
        self.name = name
        self.is_generator = is_generator
        self.fn = fn
        self._connection = connection
        self.remote = Method(self._remote, self._remote_aio, "Run on a worker; a generator function returns a streaming iterator.")
        self.remote_gen = self.remote
        self.map = Method(self._map, self._map_aio, "Run once per input over the worker pool; yields results as they complete.")
        self.starmap = Method(self._starmap, self._starmap_aio, "Like map, with each input an argument tuple.")
        self.for_each = Method(self._for_each, self._for_each_aio, "Run once per input for side effects.")
        self.spawn = Method(self._spawn, self._spawn_aio, "Start a call now; returns a FunctionCall to .get() later.")

    def __repr__(self) -> str:
        kind = "generator function" if self.is_generator else "function"
        return f"<Function {self.name!r} ({kind}); call .remote(), .map(), .starmap(), .for_each(), .spawn()>"

    def __reduce__(self) -> Any:
        return (Function, (self.name, self.is_generator))

    @property
    def connection(self) -> ServerConnection:
        if self._connection is None:
            self._connection = get_connection()
        return self._connection

    @classmethod
    def lookup(cls, name: str, connection: ServerConnection | None = None) -> Function:
        """The handle of a function already registered on the server (say, after a kernel restart)."""
        conn = connection or get_connection()
        info = conn.request("GET", f"api/stream/functions/{name}").json()
        return cls(name, info["generator"], None, conn)

    def delete(self) -> None:
        """Unregister the function (and forget it if it was persisted); calls fail from now on."""
        self.connection.request("DELETE", f"api/stream/functions/{self.name}")

    def local(self, *args: Any, **kwargs: Any) -> Any:
        """Run the function here, in this process."""
        if self.fn is None:
            raise RuntimeError(f"function {self.name!r} has no local code here; use .remote()")
        return self.fn(*args, **kwargs)

    __call__ = local

    # -- .remote ------------------------------------------------------------------------

    def _start(self, args: tuple, kwargs: dict) -> CallStream:
        return calls_socket(self.connection).start({"fn": self.name, "kind": "remote"}, wire.dumps((args, kwargs)))

    def _remote(self, *args: Any, **kwargs: Any) -> Any:
        if self.is_generator:
            return self._iterate(args, kwargs)
        stream = self._start(args, kwargs)
        try:
            return FunctionCall(stream)._get()
        except BaseException:  # it raised, or Ctrl-C: stop the call if it still runs
            stream.cancel()
            raise

    def _remote_aio(self, *args: Any, **kwargs: Any) -> Any:
        if self.is_generator:
            return self._aiterate(args, kwargs)
        return self._call_aio(args, kwargs)

    async def _call_aio(self, args: tuple, kwargs: dict) -> Any:
        stream = self._start(args, kwargs)
        try:
            return await FunctionCall(stream)._get_aio()
        except BaseException:  # it raised, or the awaiting task was cancelled
            stream.cancel()
            raise

    # A generator function's call starts at the first next(), so an iterator that is
    # dropped unread never holds a worker.

    def _iterate(self, args: tuple, kwargs: dict) -> Iterator[Any]:
        stream = self._start(args, kwargs)
        values = _StreamedValues(stream)
        try:
            while not values.ended:
                yield from values.accept(stream.take())
        finally:
            stream.cancel()

    async def _aiterate(self, args: tuple, kwargs: dict) -> AsyncIterator[Any]:
        stream = self._start(args, kwargs)
        values = _StreamedValues(stream)
        try:
            while not values.ended:
                for value in values.accept(await stream.atake()):
                    yield value
        finally:
            stream.cancel()

    def _spawn(self, *args: Any, **kwargs: Any) -> FunctionCall:
        if self.is_generator:
            raise TypeError(f"{self.name!r} is a generator function: iterate {self.name}.remote(...) instead of spawning it")
        return FunctionCall(self._start(args, kwargs))

    async def _spawn_aio(self, *args: Any, **kwargs: Any) -> FunctionCall:
        return self._spawn(*args, **kwargs)

    # -- .map and friends ---------------------------------------------------------------

    def _start_map(self, order_outputs: bool, return_exceptions: bool, kwargs: dict | None,
                   total: int | None, progress: bool, form: str = "map") -> _MapState:
        if self.is_generator:
            raise TypeError(
                f"{self.name!r} is a generator function and cannot be mapped: call "
                f"{self.name}.remote(...) for each input and iterate what it yields"
            )
        stream = calls_socket(self.connection).start({"fn": self.name, "kind": "map"}, wire.dumps(((), kwargs or {})))
        return _MapState(stream, order_outputs, return_exceptions, start_progress(f"{self.name}.{form}", total, progress))

    def _map(self, *iterables: Iterable, kwargs: dict | None = None, order_outputs: bool = True,
             return_exceptions: bool = False, progress: bool = True) -> Iterator[Any]:
        return self._run_map(zip(*iterables), _total(*iterables), kwargs, order_outputs, return_exceptions, progress)

    def _starmap(self, iterable: Iterable, kwargs: dict | None = None, order_outputs: bool = True,
                 return_exceptions: bool = False, progress: bool = True) -> Iterator[Any]:
        return self._run_map((tuple(args) for args in iterable), _total(iterable), kwargs, order_outputs,
                             return_exceptions, progress, "starmap")

    def _run_map(self, inputs: Iterator[tuple], total: int | None, kwargs: dict | None, order_outputs: bool,
                 return_exceptions: bool, progress: bool, form: str = "map") -> Iterator[Any]:
        state = self._start_map(order_outputs, return_exceptions, kwargs, total, progress, form)
        inputs = iter(inputs)
        with _closing(state):
            while not state.finished:
                want = state.room
                if want:
                    state.send_items(itertools.islice(inputs, want), want)
                    frames = state.stream.take(block=False)
                else:
                    frames = state.stream.take()
                yield from state.results(frames)

    def _map_aio(self, *iterables: Any, kwargs: dict | None = None, order_outputs: bool = True,
                 return_exceptions: bool = False, progress: bool = True) -> AsyncIterator[Any]:
        inputs = zip(*iterables) if all(hasattr(it, "__iter__") for it in iterables) else _azip(*iterables)
        return self._run_map_aio(inputs, _total(*iterables), kwargs, order_outputs, return_exceptions, progress)

    def _starmap_aio(self, iterable: Any, kwargs: dict | None = None, order_outputs: bool = True,
                     return_exceptions: bool = False, progress: bool = True) -> AsyncIterator[Any]:
        return self._run_map_aio(iterable, _total(iterable), kwargs, order_outputs, return_exceptions, progress, "starmap")

    async def _run_map_aio(self, inputs: Any, total: int | None, kwargs: dict | None, order_outputs: bool,
                           return_exceptions: bool, progress: bool, form: str = "map") -> AsyncIterator[Any]:
        state = self._start_map(order_outputs, return_exceptions, kwargs, total, progress, form)
        source = inputs.__aiter__() if hasattr(inputs, "__aiter__") else iter(inputs)
        with _closing(state):
            while not state.finished:
                if state.room:
                    items, want = [], state.room
                    while len(items) < want:
                        try:
                            item = await source.__anext__() if hasattr(source, "__anext__") else next(source)
                        except (StopIteration, StopAsyncIteration):
                            break
                        items.append(tuple(item))
                    state.send_items(items, want)
                    frames = state.stream.take(block=False)
                else:
                    frames = await state.stream.atake()
                for value in state.results(frames):
                    yield value

    def _for_each(self, *iterables: Iterable, kwargs: dict | None = None, ignore_exceptions: bool = False,
                  progress: bool = True) -> None:
        for _ in self._run_map(zip(*iterables), _total(*iterables), kwargs, False, ignore_exceptions, progress, "for_each"):
            pass

    async def _for_each_aio(self, *iterables: Any, kwargs: dict | None = None, ignore_exceptions: bool = False,
                            progress: bool = True) -> None:
        inputs = zip(*iterables) if all(hasattr(it, "__iter__") for it in iterables) else _azip(*iterables)
        async for _ in self._run_map_aio(inputs, _total(*iterables), kwargs, False, ignore_exceptions, progress, "for_each"):
            pass


@contextlib.contextmanager
def _closing(state: _MapState) -> Iterator[None]:
    """Close a map when its caller is done with it: it failed if an exception left the
    loop, and not if the caller simply stopped iterating (``break``: GeneratorExit)."""
    failed = True
    try:
        yield
        failed = False
    except GeneratorExit:
        failed = False
        raise
    finally:
        state.close(failed)


def _total(*iterables: Any) -> int | None:
    """The number of inputs when every iterable knows its length (lists, ranges), else None."""
    try:
        return min(len(it) for it in iterables) if iterables else None
    except TypeError:
        return None


async def _azip(*iterables: Any) -> AsyncIterator[tuple]:
    iterators = [it.__aiter__() if hasattr(it, "__aiter__") else iter(it) for it in iterables]
    while True:
        item = []
        for it in iterators:
            try:
                item.append(await it.__anext__() if hasattr(it, "__anext__") else next(it))
            except (StopIteration, StopAsyncIteration):
                return
        yield tuple(item)


def register_function(
    fn: Callable,
    name: str | None = None,
    retries: int = 0,
    timeout: float | None = None,
    connection: ServerConnection | None = None,
    persist: bool = False,
    queue_timeout: float | None = None,
    batch: dict[str, Any] | None = None,
    **requirements: Any,
) -> Function:
    """Register `fn` with the server so workers can run it; returns its `Function` handle.
    Like endpoints, it belongs to the server, and `requirements` choose its workers (see
    `register_endpoint`). `queue_timeout`: seconds a call may wait for a worker (default:
    as long as it takes, 60 for a call made from inside a worker). `batch`
    (``{"max_batch_size", "wait_ms"}``, else what ``@jupyter_stream.batched`` marked):
    the server runs its callers' inputs in batches (`batched`)."""
    if isinstance(retries, bool) or not isinstance(retries, int) or not 0 <= retries <= MAX_RETRIES:
        raise ValueError(f"retries must be a whole number from 0 to {MAX_RETRIES}")
    if timeout is not None and not 0 < timeout <= MAX_TIMEOUT:
        raise ValueError(f"timeout must be a positive number of seconds, at most {MAX_TIMEOUT:g} (7 days)")
    is_generator = inspect.isgeneratorfunction(fn) or inspect.isasyncgenfunction(fn)
    fields = requirement_fields(**requirements)
    extra: dict[str, Any] = {"queue_timeout": queue_timeout} if queue_timeout is not None else {}
    batch = batch_of(fn, batch)
    if batch is not None:
        extra["batch"] = batch
    name, _, conn = register("function", fn, name, connection, persist, generator=is_generator, retries=retries, timeout=timeout,
                             requirements=fields, **extra)
    return Function(name, is_generator, fn, conn)


def function(fn: Callable | None = None, *, name: str | None = None, retries: int = 0, timeout: float | None = None,
             persist: bool = False, gpu: str | list[str] | None = None, min_workers: int | None = None,
             max_workers: int | None = None, scaledown_window: float | None = None, kernel: str | None = None,
             env: dict[str, str] | None = None, concurrency: int | None = None, queue_timeout: float | None = None) -> Any:
    """Decorator: run this function on worker kernels, with Modal's call forms::

        @jupyter_stream.function(retries=2, gpu="H100:2")
        def square(x):
            return x * x

        list(square.map(range(10)))
    """
    requirements = dict(gpu=gpu, min_workers=min_workers, max_workers=max_workers,
                        scaledown_window=scaledown_window, kernel=kernel, env=env, concurrency=concurrency)
    if fn is not None:
        return register_function(fn, name, retries, timeout, persist=persist, queue_timeout=queue_timeout, **requirements)
    return lambda f: register_function(f, name, retries, timeout, persist=persist, queue_timeout=queue_timeout, **requirements)
