"""One call running on a worker: its output buffer, credit and state (`Run`), and the
threads calls run in (`RunThreads`). The `Worker` (see `runtime`) owns the lock they
share and ships their output."""

from __future__ import annotations

import asyncio
import collections
import queue
import threading
import time
from typing import TYPE_CHECKING, Any

from ..responses import text_safe

if TYPE_CHECKING:
    from .runtime import Worker

#: Characters of printed text a run may have waiting for the sender (then it is dropped).
MAX_PRINTED = 1 << 20

#: A run's output that comes this long (seconds) after its previous message is sent by the
#: thread that put it, on a direct channel: a token of a paced stream then reaches the
#: server without waking the sender thread (a thread hop of tens of microseconds, more on
#: busy cores). Output that comes faster waits for the sender, which ships it in batches.
SPACED = 0.001

#: Chunks this large travel as buffers of their own instead of being copied into a join.
LARGE_CHUNK = 64 * 1024


def pack(chunks: list[bytes]) -> list[bytes]:
    """Join runs of small chunks into one buffer each; keep large chunks as they are."""
    buffers: list[bytes] = []
    small: list[bytes] = []
    for chunk in chunks:
        if len(chunk) >= LARGE_CHUNK:
            if small:
                buffers.append(b"".join(small))
                small = []
            buffers.append(chunk)
        else:
            small.append(chunk)
    if small:
        buffers.append(b"".join(small))
    return buffers


class RunCancelled(BaseException):
    """Raised inside a call's thread when the server cancels it (a BaseException, so a
    user's ``except Exception`` does not swallow it)."""


class Run:
    """One running call: its output buffer, credit and state, guarded by the worker lock."""

    #: of a batch (see `batches`): an input's run names its batch's run, which runs the
    #: code; the batch's run lists its inputs' runs
    batch: Run | None = None
    items: list[Run] = []

    def __init__(self, worker: Worker, call_id: str, window: int):
        self.worker = worker
        self.id = call_id
        self.window = window
        self.can_put = threading.Condition(worker.lock)
        self.pending: list[bytes] = []
        self.pending_bytes = 0
        self.has_large = False
        self.unacked = 0
        self.dirty = False
        self.sent_directly = False  # the first output skips the sender thread
        self.sent_at = 0.0  # (time.monotonic) when this thread last sent the run's output itself
        self.start: dict[str, Any] | None = None
        self.done = False
        self.error: dict[str, Any] | None = None
        self.cancelled = False
        self.loop: asyncio.AbstractEventLoop | None = None
        self.task: asyncio.Task | None = None
        self.room: asyncio.Future | None = None  # an async run waiting for credit (see `aput`)
        self.framed = False  # values: each put() is one pickled object; sizes are sent along
        #: map lanes: each pickled result's item index, and its outcome (`wire.ITEM_OK` or
        #: `wire.ITEM_FAILED`)
        self.indices: list[int] = []
        self.outcomes = bytearray()
        #: the call's code is running (its thread, or its task on the worker's loop)
        self.running_code = False
        # map lanes only: batches of (index, pickled args) waiting to run
        self.batches: collections.deque = collections.deque()
        self.has_batch = threading.Condition(worker.lock)
        self.closed = False
        #: seconds spent running the map items whose results wait for the sender
        self.busy = 0.0
        #: map items the server took back (`Worker.revoke`), to name in the next message
        self.revoked: list[int] | None = None
        self.deadline: float | None = None
        self.running_index: int | None = None
        #: the thread running the call's code, while it runs (for `Worker.interrupt`)
        self.thread: int | None = None
        #: what the run's code printed since the last message: [stream name, text] pairs
        self.printed: list[list[str]] = []
        self.printed_chars = 0
        #: the caller reads how the stream ended (``finish`` in the call: the OpenAI route):
        #: its chunks are counted and a generator's returned `Finish` is kept
        self.reads_finish = False
        #: the `Finish` the function yielded or returned, sent with the end (``finish``)
        self.ending: Any = None
        self.chunks = 0

    def print(self, stream: str, text: str) -> None:
        """Text the run's code wrote to stdout or stderr: it goes to the caller with the
        run's next message (many prints of a fast loop travel together). Past
        `MAX_PRINTED` characters waiting, more is dropped with a note, so printing cannot
        outrun the caller without bound."""
        worker = self.worker
        text = text_safe(text)
        with worker.lock:
            if self.printed_chars >= MAX_PRINTED:
                return
            self.printed_chars += len(text)
            if self.printed_chars >= MAX_PRINTED:
                text += "\n[jupyter-stream: output dropped: the caller is not reading it fast enough]\n"
            if self.printed and self.printed[-1][0] == stream:
                self.printed[-1][1] += text
            else:
                self.printed.append([stream, text])
            if not self.dirty and not self.done:
                self.dirty = True
                worker.dirty.append(self)
                worker.has_output.notify()

    def put(self, data: bytes, item: int | None = None, ok: bool = True, last: bool = False, busy: float = 0.0,
            wait: bool = True) -> None:
        """Queue output bytes for the sender; block while the client is a window behind.
        The first output of a run is sent right here, saving a thread hop on the time to
        first byte; so is a call's `last` and only output (a plain return value), which
        goes out with the call's end: a `.remote()` costs one message back, not two; and
        so is output that comes `SPACED` after the run's previous message (a token).
        A map item's result comes with the seconds it took (`busy`), which the server
        adds up to size the lane's batches. `wait=False` (the watchdog's timeout errors)
        queues it without waiting for credit."""
        worker = self.worker
        with worker.lock:
            while wait and self.unacked + self.pending_bytes >= self.window and not self.cancelled:
                self.can_put.wait()
            if self.cancelled or self.done:
                raise RunCancelled()
            self.pending.append(data)
            if item is not None:
                self.indices.append(item)
                self.outcomes.append(ok)
                self.busy += busy
            self.pending_bytes += len(data)
            if len(data) >= LARGE_CHUNK:
                self.has_large = True
            self.done = last
            if self.dirty:  # the sender has this call queued (and ships its end too)
                return
            self.dirty = True
            now = time.monotonic()
            if self.sent_directly and not last and not (now - self.sent_at >= SPACED and worker.direct_connected()):
                worker.dirty.append(self)
                worker.has_output.notify()
                return
            self.sent_directly = True
            self.sent_at = now
        worker.send_now(self)

    async def aput(self, data: bytes) -> None:
        """`put` for a run on the worker's event loop: wait for credit without blocking the
        loop (the other async runs on it go on meanwhile)."""
        worker = self.worker
        while True:
            with worker.lock:
                if self.cancelled or self.done or self.unacked + self.pending_bytes < self.window:
                    break
                room = self.room = asyncio.get_running_loop().create_future()
            await room
        self.put(data)

    def wake(self) -> None:
        """Credit came back, or the run was cancelled: wake a thread or a task waiting in
        `put` / `aput`. Holds the lock."""
        self.can_put.notify_all()
        room, self.room = self.room, None
        if room is not None and self.loop is not None:
            self.loop.call_soon_threadsafe(lambda: room.done() or room.set_result(None))

    def give_back(self, indices: list[int]) -> None:
        """Map items taken back by the server: say which in the next message. Holds the lock."""
        self.revoked = (self.revoked or []) + indices
        if not self.dirty:
            self.dirty = True
            self.worker.dirty.append(self)
            self.worker.has_output.notify()

    def announce(self) -> None:
        """Send the response's start (status, headers, media type) now, before the first
        chunk: the server then knows the real media type, so a slow first chunk gets SSE
        heartbeats only on an SSE response."""
        worker = self.worker
        with worker.lock:
            if self.dirty:
                return
            self.dirty = True
        worker.send_now(self)

    def finish(self, error: dict[str, Any] | None = None) -> None:
        """Mark the call as ended; the sender ships the end (and error) with the last bytes."""
        with self.worker.lock:
            if self.done:
                return
            self.done = True
            self.error = error
            if not self.dirty:
                self.dirty = True
                self.worker.dirty.append(self)
                self.worker.has_output.notify()


class RunThreads:
    """Threads that run calls, kept alive between calls: each call gets a thread of its own
    (it may block for as long as it streams), without paying a thread start per call."""

    def __init__(self) -> None:
        self.tasks: queue.SimpleQueue = queue.SimpleQueue()
        self.idle = 0
        self.lock = threading.Lock()

    def submit(self, fn: Any, *args: Any) -> None:
        with self.lock:
            spawn = self.idle == 0
            if not spawn:
                self.idle -= 1
        if spawn:
            threading.Thread(target=self.run, args=((fn, args),), name="jupyter-stream-call", daemon=True).start()
        else:
            self.tasks.put((fn, args))

    def run(self, task: Any) -> None:
        while True:
            fn, args = task
            try:
                fn(*args)
            except RunCancelled:  # an interrupt that arrived as the call was ending
                pass
            except BaseException as exc:  # noqa: BLE001 - the thread serves the next call
                from .runtime import log_line

                log_line(f"a call thread failed: {type(exc).__name__}: {exc}")
            with self.lock:
                self.idle += 1
            task = self.tasks.get()
