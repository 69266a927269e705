"""Resumable streams: an SSE response that outlives its connection (``--resumable``).

Why: a token stream dies with its connection (a phone changing networks, a proxy's
timeout, a laptop lid), and a browser ``EventSource`` that reconnects would run the whole
function again. For an endpoint registered with ``resumable=WINDOW`` the request that
starts a run owns a `ResumableStream`: every SSE event it sends is numbered
(``id: <stream>:<n>``, after the stream's id, so that the ``Last-Event-ID`` an
``EventSource`` sends back on its own names the stream too; an event the function gave an
id keeps it, as ``<stream>:<n>:<its id>``) and kept in a buffer bounded in events and
bytes. When the last client goes away, the run goes on for WINDOW seconds instead of being
cancelled; a client that comes back with ``Last-Event-ID`` (or ``?last_event_id=``), or
another one with ``?stream=<id>``, gets what it missed from the buffer and then the live
rest, from the same run. Past the window the run is cancelled the normal way (its
``finally`` runs) and the buffer dropped; what can no longer be given is said in an SSE
error event.

Who does what: `EndpointHandler` (handlers.py) still runs the call and is the stream's
producer (`ResumableStream.feed`); it and every follower write events to their own
sockets. This module keeps the events, the followers and the window, and nothing else:
it never touches a worker or a socket. Its only background work is the window's timer,
whose failure is logged in one line and still forgets the stream (`ResumableStreams`).
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import json
import logging
import re
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from . import supervision

log = logging.getLogger("jupyter_stream")

#: The window of ``resumable=True`` (``--resumable`` without a number), in seconds.
DEFAULT_WINDOW = 30.0
#: The longest window a registration may ask for: a run nobody follows holds its worker.
MAX_WINDOW = 24 * 3600.0
#: An SSE event (the text up to its blank line) larger than this ends the stream with an
#: error: it is held whole until it is complete, to be numbered and kept.
MAX_EVENT_BYTES = 64 * 1024 * 1024
#: Streams that ended or were cancelled, remembered (id -> why) to say so to a late client.
GONE_KEPT = 4096

#: a stream's id: 128 random bits (only its endpoint's clients are ever told it, and a
#: client must hold that endpoint's credentials to use it; see `ResumableStreams.get`)
STREAM_ID = re.compile(r"[A-Za-z0-9_-]{22}")
#: query names a resumable endpoint keeps for itself
RESUME_QUERY = ("stream", "last_event_id")


@dataclass
class Event:
    seq: int
    data: bytes  # the whole event as sent: its lines, its ``id:`` line and the blank line


class SSESplitter:
    """Cuts the bytes of an SSE response into its blocks (each ending with a blank line),
    across chunk boundaries; line ends are made ``\\n`` (the SSE spec reads all three alike)."""

    def __init__(self) -> None:
        self.pending = b""

    def feed(self, data: bytes) -> list[bytes]:
        text = self.pending + data
        if b"\r" in text:
            held = text.endswith(b"\r")  # may be the first half of a \r\n
            text = text[:-1] if held else text
            text = text.replace(b"\r\n", b"\n").replace(b"\r", b"\n") + (b"\r" if held else b"")
        blocks = text.split(b"\n\n")
        self.pending = blocks.pop()
        if len(self.pending) > MAX_EVENT_BYTES:
            raise ValueError(f"an event of this resumable stream grew past {MAX_EVENT_BYTES >> 20} MiB without "
                             "its blank line; send large data in smaller events")
        return [b for b in (block.lstrip(b"\n") for block in blocks) if b]

    def flush(self) -> list[bytes]:
        """What is left at the end of the stream, as a last block."""
        rest, self.pending = self.pending.replace(b"\r", b"\n").strip(b"\n"), b""
        return [rest] if rest else []


def number(block: bytes, event_id: str) -> bytes:
    """An SSE block with its ``id:`` line: ``event_id``, followed by the id the function
    gave it (``:<its id>``) if it gave one."""
    lines = block.split(b"\n")
    own = [line for line in lines if line == b"id" or line.startswith(b"id:")]
    if own:
        lines = [line for line in lines if not (line == b"id" or line.startswith(b"id:"))]
        given = own[-1][3:]
        given = given[1:] if given.startswith(b" ") else given
        if given:
            event_id = f"{event_id}:{given.decode('utf-8', 'replace')}"
    lines.append(b"id: " + event_id.encode())
    return b"\n".join(lines) + b"\n\n"


def error_event(kind: str, message: str, event_id: str | None = None, **fields: Any) -> bytes:
    """An SSE ``event: error`` in the shape the endpoints' other error events have."""
    body = json.dumps({"error": {"type": kind, "message": message}, **fields})
    line = f"id: {event_id}\n" if event_id else ""
    return f"event: error\n{line}data: {body}\n\n".encode()


@dataclass
class Resume:
    """What a request asks to resume: stream `stream` after its event `after`; `gone`: the
    client was already told the stream is gone (its ``Last-Event-ID`` is ``<id>:gone``)."""

    stream: str
    after: int = 0
    gone: bool = False


class ResumeError(ValueError):
    """A ``Last-Event-ID`` or ``?stream=`` that names no event of any stream (a 400)."""


def parse_resume(stream: str | None, last_event_id: str | None) -> Resume | None:
    """The resume a request asks for, from ``?stream=`` and ``Last-Event-ID`` (header or
    ``?last_event_id=``); None when it asks for none (a ``Last-Event-ID`` that is not one
    of ours, with no ``?stream=``: the function may read it itself). Ids are
    ``<stream>:<n>[:<the function's id>]``, or just ``<n>`` beside ``?stream=``."""
    parts = (last_event_id or "").split(":", 2)
    named = parts[0] if len(parts) > 1 and STREAM_ID.fullmatch(parts[0]) else None
    if stream is None and named is None:
        return None
    if stream is not None and not STREAM_ID.fullmatch(stream):
        raise ResumeError(f"?stream={stream[:40]!r} is not a stream id (the X-Stream-Id header of a resumable stream names it)")
    if stream is not None and named is not None and named != stream:
        raise ResumeError("?stream= and Last-Event-ID name different streams; send one of them")
    sid = stream or named
    if not last_event_id:
        return Resume(sid)
    count = parts[1] if named is not None else parts[0]
    if named is not None and count == "gone":
        return Resume(sid, gone=True)
    if not count.isdigit() or len(count) > 18:
        raise ResumeError(f"Last-Event-ID {last_event_id[:80]!r} names no event: ids are <stream>:<n>, as sent")
    return Resume(sid, int(count))


class ResumableStream:
    """One run's numbered SSE events, the clients following it, and its window."""

    def __init__(self, sid: str, endpoint: str, window: float, max_events: int, max_bytes: int,
                 on_idle: Callable[[ResumableStream], None]):
        self.id = sid
        self.endpoint = endpoint
        self.window = window
        self.max_events = max(1, max_events)
        self.max_bytes = max(1, max_bytes)
        self.on_idle = on_idle  # no client follows it now (`ResumableStreams` starts its window)
        self.events: collections.deque[Event] = collections.deque()
        self.bytes = 0
        self.last_seq = 0  # the number of the last event made
        self.splitter = SSESplitter()
        #: what its followers' responses start with: status and the function's headers (`begin`)
        self.start: dict[str, Any] | None = None
        self.ended = False
        self.paced = True  # its producer waits for lagging followers (`room`) until `release`
        self.followers: set[Any] = set()  # handlers sending it to their clients; each has ``sent_seq``
        self.idle_since: float | None = None
        self._changed: asyncio.Future | None = None  # followers wait on it for new events
        self._room: asyncio.Future | None = None  # the producer waits on it for a lagging follower

    @property
    def first_seq(self) -> int:
        """The number of the oldest event still kept (`last_seq` + 1 when none are)."""
        return self.events[0].seq if self.events else self.last_seq + 1

    def begin(self, status: int, headers: dict[str, str] | None) -> None:
        self.start = {"status": status, "headers": dict(headers or {})}

    def feed(self, data: bytes) -> list[Event]:
        """The producer's bytes: the events they complete, numbered and kept; the oldest
        kept ones go when the buffer is past its bounds. Returns the new events."""
        return self._add(self.splitter.feed(data))

    def end(self) -> list[Event]:
        """The run ended (the last, unterminated block becomes an event); followers finish."""
        if self.ended:
            return []
        new = self._add(self.splitter.flush())
        self.ended = True
        self.notify()
        return new

    def _add(self, blocks: list[bytes]) -> list[Event]:
        new = []
        for block in blocks:
            self.last_seq += 1
            event = Event(self.last_seq, number(block, f"{self.id}:{self.last_seq}"))
            self.events.append(event)
            self.bytes += len(event.data)
            new.append(event)
        # past its bounds, the oldest go; not those a client that follows has yet to be
        # sent (over by at most a chunk, until `room` lets the producer go on)
        unsent = min((f.sent_seq for f in self.followers), default=self.last_seq) if self.paced else self.last_seq
        while len(self.events) > 1 and self.over() and self.events[0].seq <= unsent:
            self.bytes -= len(self.events.popleft().data)
        if new:
            self.notify()
        return new

    def since(self, after: int) -> tuple[tuple[int, int] | None, list[Event]]:
        """For a client that has events up to `after`: the events it lost (first, last)
        when the buffer no longer holds them, and the kept events after it."""
        first = self.first_seq
        lost = (after + 1, first - 1) if after + 1 < first else None
        count = self.last_seq - max(after, first - 1)  # taken from the newest end: a follower that keeps up costs O(new)
        kept = list(itertools.islice(reversed(self.events), max(0, count)))
        kept.reverse()
        return lost, kept

    def over(self) -> bool:
        return len(self.events) > self.max_events or self.bytes > self.max_bytes

    async def room(self) -> None:
        """Wait, before the producer adds more, while the buffer is past its bounds with
        events a client that follows has not been sent: a slow follower pauses the run (as
        a slow client of any endpoint does) instead of losing events. With nobody
        following, the run goes on and the oldest events make room."""
        while self.paced and self.over() and any(f.sent_seq < self.last_seq for f in self.followers) and not self.ended:
            self._room = asyncio.get_running_loop().create_future()
            try:
                await self._room
            finally:
                self._room = None

    def release(self) -> None:
        """Its producer is being stopped (the server stops, or the call was stopped): it
        waits for no follower any more, so that it can say so and end."""
        self.paced = False
        self.advanced()

    def advanced(self) -> None:
        """A follower sent more of the stream to its client."""
        if self._room is not None and not self._room.done():
            self._room.set_result(None)

    async def changed(self, timeout: float) -> bool:
        """Wait for new events or the end; False after `timeout` seconds without."""
        if self._changed is None or self._changed.done():
            self._changed = asyncio.get_running_loop().create_future()
        try:
            await asyncio.wait_for(asyncio.shield(self._changed), timeout)
            return True
        except asyncio.TimeoutError:
            return False

    def notify(self) -> None:
        """Wake the followers: new events, the end, or one of them lost its client."""
        if self._changed is not None and not self._changed.done():
            self._changed.set_result(None)

    def attach(self, follower: Any) -> None:
        self.followers.add(follower)
        self.idle_since = None

    def detach(self, follower: Any) -> None:
        if follower in self.followers:
            self.followers.discard(follower)
            self.advanced()  # the producer no longer waits for it
            if not self.followers:
                self.idle_since = time.time()
                self.on_idle(self)


class StreamsFull(Exception):
    """No more resumable streams may be kept now (a 503)."""


class ResumableStreams:
    """The server's resumable streams by id, bounded in number (`max_streams`), each kept
    until WINDOW seconds pass with no client following it (`ResumableStream.window`):
    then a run still going is cancelled (``abandon``, given at `open`) and the stream is
    forgotten, with a line kept to tell a late client why (`gone`)."""

    def __init__(self, max_streams: int, max_events: int, max_bytes: int):
        self.max_streams = max_streams
        self.max_events = max_events
        self.max_bytes = max_bytes
        self.streams: dict[str, ResumableStream] = {}
        self.gone: collections.OrderedDict[str, tuple[str, str]] = collections.OrderedDict()  # id -> (endpoint, why)
        self.timers: dict[str, asyncio.TimerHandle] = {}
        self.abandon: dict[str, Callable[[str], None]] = {}

    def open(self, endpoint: str, window: float, abandon: Callable[[str], None]) -> ResumableStream:
        """A new stream of `endpoint`, whose run `abandon(why)` cancels; raises `StreamsFull`
        when `max_streams` are kept and none of them has ended to make room."""
        if len(self.streams) >= self.max_streams:
            ended = sorted((s for s in self.streams.values() if s.ended and not s.followers), key=lambda s: s.idle_since or 0)
            if not ended:
                raise StreamsFull(f"{len(self.streams)} resumable streams are running or kept, the most this server keeps "
                                  "(JupyterStream.resumable_max_streams); retry in a moment")
            self.forget(ended[0], f"it ended and was dropped early to make room for a new stream "
                                  f"({self.max_streams} are kept at most)")
        sid = secrets.token_urlsafe(16)
        stream = ResumableStream(sid, endpoint, window, self.max_events, self.max_bytes, self._idle)
        self.streams[sid] = stream
        self.abandon[sid] = abandon
        return stream

    def get(self, sid: str, endpoint: str) -> ResumableStream | None:
        """The stream `sid` of `endpoint` (None for another endpoint's: its id opens nothing here)."""
        stream = self.streams.get(sid)
        return stream if stream is not None and stream.endpoint == endpoint else None

    def why_gone(self, sid: str, endpoint: str) -> str | None:
        gone = self.gone.get(sid)
        return gone[1] if gone is not None and gone[0] == endpoint else None

    def attach(self, stream: ResumableStream, follower: Any) -> None:
        stream.attach(follower)
        timer = self.timers.pop(stream.id, None)
        if timer is not None:
            timer.cancel()

    def ended(self, stream: ResumableStream) -> None:
        """Its run ended: kept WINDOW seconds more from now (or from its last client's leaving)."""
        stream.end()
        if not stream.followers:
            self._idle(stream)

    def _idle(self, stream: ResumableStream) -> None:
        if stream.id not in self.streams:
            return
        old = self.timers.pop(stream.id, None)
        if old is not None:
            old.cancel()
        loop = asyncio.get_running_loop()
        self.timers[stream.id] = loop.call_later(stream.window, self._expire, stream)

    def _expire(self, stream: ResumableStream) -> None:
        """WINDOW seconds with no client: cancel its run if it still goes, forget it."""
        self.timers.pop(stream.id, None)
        if stream.followers or stream.id not in self.streams:
            return
        try:
            if not stream.ended:
                why = (f"no client followed it for {stream.window:g} s (its resume window), so its run was cancelled "
                       f"after event {stream.last_seq}")
                abandon = self.abandon.pop(stream.id, None)
                self.forget(stream, why)
                if abandon is not None:
                    abandon(why)
            else:
                self.forget(stream, f"it ended at event {stream.last_seq} and was kept {stream.window:g} s after its "
                                    "last client left")
        except Exception as e:  # noqa: BLE001 - the stream is forgotten either way
            supervision.report(f"ending resumable stream {stream.id} of endpoint {stream.endpoint!r}", e)
            self.forget(stream, "it failed while its window ended (see the server log)")

    def forget(self, stream: ResumableStream, why: str) -> None:
        """Drop the stream and its buffer; a late client is told `why`."""
        if self.streams.pop(stream.id, None) is None:
            return
        self.abandon.pop(stream.id, None)
        timer = self.timers.pop(stream.id, None)
        if timer is not None:
            timer.cancel()
        stream.events.clear()
        stream.bytes = 0
        self.gone[stream.id] = (stream.endpoint, why)
        while len(self.gone) > GONE_KEPT:
            self.gone.popitem(last=False)

    def close(self) -> None:
        """The server stops: no window outlives it."""
        for timer in self.timers.values():
            timer.cancel()
        self.timers.clear()
