"""One batch of a batched function (`@jupyter_stream.batched`), run as one call here.

The server sends a batch as one call (``mode: "batch"``, see `wire`) with one sub-call per
input: each input's `Run` carries that input's output back to its own caller, exactly as
a single call's run would (values pickled, or HTTP chunks for an endpoint), while the
batch's own run holds the thread, the timeout and the prints. Here each input's arguments
are bound to the function's signature (defaults applied), the function is called once
with one list per parameter, and what it returns (or each list a generator yields) is
split back: element i to input i.

An input whose arguments do not bind fails alone. An element that is an exception
instance fails its input alone (the others get their results): that is how a batched
function reports one bad input. A result that is not a list of one element per input,
or an exception the function raises, fails every input of the batch with that error.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import pickle
from typing import TYPE_CHECKING, Any

import cloudpickle

from .. import wire
from ..errors import error_payload
from ..responses import SSE, encoder_for
from . import arguments
from .runs import Run, RunCancelled

if TYPE_CHECKING:
    from .runtime import Worker


def prepare(worker: Worker, batch: Run, data: dict[str, Any]) -> None:
    """The runs of the batch's inputs, made (and registered) as its message arrives, so that
    a cancel of one right behind it finds it."""
    batch.items = []
    for entry in data["batch"]["items"]:
        run = Run(worker, entry["id"], data.get("window", wire.DEFAULT_WINDOW))
        run.batch = batch
        worker.runs[run.id] = run
        batch.items.append(run)


def run_batch(worker: Worker, batch: Run, data: dict[str, Any], buffers: list, fn_or_pickle: Any) -> None:
    """Run one batch (in the batch's call thread): every input ends, with its result or an
    error, before this returns."""
    http = data["batch"]["mode"] == "http"
    media_type = data.get("media_type")
    error = None
    try:
        fn = worker.function(data["fn"], fn_or_pickle)
        if data.get("timeout"):
            import time

            batch.deadline = time.monotonic() + data["timeout"]
            worker.watch(batch)
        runs, calls = bind_inputs(fn, batch.items, data["batch"]["items"], buffers, http)
        if not runs:
            return
        args, kwargs = as_lists(fn, calls)
        result = fn(*args, **kwargs)
        if inspect.isawaitable(result):
            result = on_loop(worker, result)
        if inspect.isgenerator(result) or inspect.isasyncgen(result):
            stream(worker, batch, runs, result, http, media_type)
        else:
            deliver(worker, batch, runs, result, http, media_type)
    except RunCancelled:  # timed out (the batch's error says so), or no input is wanted any more
        error = batch.error
    except BaseException as exc:  # noqa: BLE001 - the batch failed: each of its inputs fails with it
        error = error_payload(exc, pickled=not http)
    finally:
        for run in batch.items:
            if not run.done:
                run.finish(error)


def bind_inputs(fn: Any, items: list[Run], entries: list[dict[str, Any]], buffers: list,
                http: bool) -> tuple[list[Run], list[inspect.BoundArguments]]:
    """Each input's arguments bound to `fn`'s signature, defaults applied; an input whose
    arguments do not fit fails alone (its caller gets the TypeError)."""
    signature = inspect.signature(fn)
    runs, calls = [], []
    common: dict[int, dict[str, Any]] = {}
    for run, entry in zip(items, entries):
        try:
            if "json" in entry:
                args, kwargs = (), json.loads(bytes(buffers[entry["json"]]))
                kwargs = arguments.prepare(fn, kwargs, entry.get("request")) if http else kwargs
            elif "pickled" in entry:
                args, kwargs = cloudpickle.loads(buffers[entry["pickled"]])
            else:
                args = pickle.loads(buffers[entry["args"]])
                index = entry.get("kwargs")
                if index not in common:
                    common[index] = cloudpickle.loads(buffers[index])[1] if index is not None else {}
                kwargs = common[index]
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
        except BaseException as exc:  # noqa: BLE001 - this input's own mistake
            run.finish(error_payload(exc, pickled=not http))
            continue
        runs.append(run)
        calls.append(bound)
    return runs, calls


def as_lists(fn: Any, calls: list[inspect.BoundArguments]) -> tuple[list[list], dict[str, list]]:
    """The batch's arguments: for each parameter, the list of every input's value."""
    args: list[list] = []
    kwargs: dict[str, list] = {}
    for p in inspect.signature(fn).parameters.values():
        values = [call.arguments[p.name] for call in calls]
        if p.kind is p.KEYWORD_ONLY:
            kwargs[p.name] = values
        else:
            args.append(values)
    return args, kwargs


def check_length(result: Any, count: int, what: str) -> list:
    if not isinstance(result, (list, tuple)):
        raise TypeError(f"a batched function {what} a list with one result per input; it {what} "
                        f"{type(result).__name__}")
    if len(result) != count:
        raise ValueError(f"a batched function {what} a list with one result per input: this batch had {count} "
                         f"input(s) and it {what} {len(result)}")
    return list(result)


def deliver(worker: Worker, batch: Run, runs: list[Run], result: Any, http: bool, media_type: str | None) -> None:
    """Element i of what the function returned goes to input i, as a single call's return
    value would (an endpoint's as its response); an exception element fails input i."""
    results = check_length(result, len(runs), "returns")
    mode = "http" if http else "values"
    for run, value in zip(runs, results):
        if isinstance(value, BaseException):
            run.finish(error_payload(value, pickled=not http))
            continue
        try:
            pending = worker.emit(run, value, mode, media_type)
            if pending is not None:
                on_loop(worker, pending)
        except RunCancelled:
            if batch.cancelled:
                raise
            continue  # its caller left
        except BaseException as exc:  # noqa: BLE001 - say a result that does not pickle: that input fails
            run.finish(error_payload(exc, pickled=not http))
            continue
        run.finish(None)


def stream(worker: Worker, batch: Run, runs: list[Run], result: Any, http: bool, media_type: str | None) -> None:
    """A batched generator: each list it yields holds one chunk per input, element i for
    input i (an exception element ends input i with that error). The batch stops early
    once no input is wanted any more (every caller left)."""
    if http:
        media_type = media_type or SSE
        encode = encoder_for(media_type)
        for run in runs:
            run.start = {"status": 200, "headers": {}, "media_type": media_type}
    else:
        encode = wire.dumps
        for run in runs:
            run.framed = True
            run.start = {"stream": True}
    step = (lambda: on_loop(worker, result.__anext__())) if inspect.isasyncgen(result) else result.__next__
    try:
        while not batch.cancelled:
            try:
                chunks = step()
            except (StopIteration, StopAsyncIteration):
                break
            chunks = check_length(chunks, len(runs), "yields")
            for run, chunk in zip(runs, chunks):
                if run.done:
                    continue
                if isinstance(chunk, BaseException):
                    run.finish(error_payload(chunk, pickled=not http))
                    continue
                try:
                    run.put(encode(chunk))
                except RunCancelled:
                    if batch.cancelled:
                        raise
            if all(run.done for run in runs):
                break
    finally:
        if inspect.isasyncgen(result):
            on_loop(worker, result.aclose())
        else:
            result.close()


def on_loop(worker: Worker, awaitable: Any) -> Any:
    """Run an awaitable of the batch (an ``async def`` function, an async generator's
    step) on the worker's event loop, and wait for it in the batch's thread."""
    async def run() -> Any:
        return await awaitable

    return asyncio.run_coroutine_threadsafe(run(), worker.event_loop()).result()
