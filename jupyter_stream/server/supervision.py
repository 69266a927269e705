"""Tasks and loops that cannot die unseen.

Every task the server starts that outlives one request (a kernel start, a pool's watcher,
the share expiry, restoring persisted registrations, a map's lane opening) goes through
`spawn`, whose owner learns when it fails: one log line says what failed and why, and its
``on_crash`` puts the system in a defined state (the call ends with an error, the worker
is replaced). Periodic work runs through `every`, where a failing step is logged and the
loop goes on. This is supervision as Erlang/OTP and asyncio's TaskGroup mean it; tests
inject faults at these boundaries (`tests/test_faults.py`).
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
from collections.abc import Awaitable, Callable
from typing import Any

log = logging.getLogger("jupyter_stream")

#: tasks running now (asyncio keeps only weak references to tasks)
_running: set[asyncio.Task] = set()

OnCrash = Callable[[BaseException], Any]


def spawn(coro: Awaitable[Any], what: str, on_crash: OnCrash | None = None) -> asyncio.Task:
    """Run `coro` as a task. If it fails, log one line naming `what` and the error, and
    call `on_crash` with the error (a cancelled task is not a failure)."""
    task = asyncio.ensure_future(coro)
    _running.add(task)
    task.add_done_callback(functools.partial(_ended, what, on_crash))
    return task


def _ended(what: str, on_crash: OnCrash | None, task: asyncio.Task) -> None:
    _running.discard(task)
    if task.cancelled():
        return
    exc = task.exception()
    if exc is None:
        return
    report(what, exc)
    if on_crash is not None:
        try:
            on_crash(exc)
        except Exception as again:  # noqa: BLE001 - nothing left to hand it to
            report(f"recovering from the failure of {what}", again)


def report(what: str, exc: BaseException) -> None:
    """The one line a failure costs the log (its traceback at debug level)."""
    log.error("jupyter_stream: %s failed: %s: %s", what, type(exc).__name__, exc)
    log.debug("jupyter_stream: %s failed", what, exc_info=exc)


async def every(seconds: float | Callable[[], float], step: Callable[[], Any], what: str,
                running: Callable[[], bool] = lambda: True) -> None:
    """Run `step` (a function or coroutine function) every `seconds` while `running()`:
    a step that fails is reported (once, then every 100th time in a row) and the loop
    goes on, so that one bad turn never ends the work for good."""
    failures = 0
    while running():
        await asyncio.sleep(seconds() if callable(seconds) else seconds)
        if not running():
            return
        try:
            result = step()
            if inspect.isawaitable(result):
                await result
            failures = 0
        except Exception as exc:  # noqa: BLE001 - the loop outlives its failing turns
            failures += 1
            if failures == 1 or failures % 100 == 0:
                report(f"{what} (it goes on; {failures} failed turn(s) in a row)", exc)
