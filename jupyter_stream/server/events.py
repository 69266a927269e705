"""What happens on the server, as a stream of events (``GET /api/stream/events``), and the
calls running now.

The JupyterLab panel reads this stream instead of polling. A new reader first gets a
``snapshot`` (endpoints, functions, workers, shares, calls), then events as things change:

- ``endpoint`` / ``function``: ``{"action": "registered" | "removed" | "stats", ...}``, at
  once for registrations, every `TICK` seconds for counters that moved;
- ``workers``: the whole ``GET /api/stream/workers`` document, every `TICK` when it changed;
- ``share``: ``{"action": "created" | "revoked" | "forgotten", "share": ...}``;
- ``call``: ``{"action": "started" | "progress" | "ended", "call": ...}`` for remote calls,
  maps and endpoint requests (progress every `TICK` while it moves).

`Activity` keeps the calls running now, each with an ``info()`` and a ``stop(why)``, so that
the panel can list them and stop one (``DELETE /api/stream/calls/<id>``). The hub costs
nothing while nobody reads: no subscriber, no events built.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import secrets
from collections.abc import Callable
from typing import Any, Protocol

log = logging.getLogger("jupyter_stream")

#: seconds between two looks at what changed (counters, workers, progress)
TICK = 0.5
#: events a slow reader may have waiting before it is dropped (it reconnects and gets a snapshot)
MAX_QUEUED = 2000


class Call(Protocol):
    """A call the panel can see and stop: a remote call, a map or an endpoint request."""

    def info(self) -> dict[str, Any]: ...

    def stop(self, why: str) -> None: ...


class Activity:
    """The calls running now, by a server-wide id."""

    def __init__(self, hub: EventHub):
        self.hub = hub
        self.calls: dict[str, Call] = {}
        self._ids = itertools.count(1)

    def started(self, call: Call) -> str:
        call_id = f"c{next(self._ids)}"
        self.calls[call_id] = call
        if self.hub.subscribers:
            self.hub.publish("call", {"action": "started", "call": {"id": call_id, **call.info()}})
        return call_id

    def ended(self, call_id: str | None, error: dict[str, Any] | None = None) -> None:
        call = self.calls.pop(call_id, None) if call_id else None
        self.hub._last.pop(f"call:{call_id}", None)
        if call is not None and self.hub.subscribers:
            self.hub.publish("call", {"action": "ended", "call": {"id": call_id, **call.info()},
                                      "error": {k: error.get(k) for k in ("type", "message")} if error else None})

    def list(self) -> list[dict[str, Any]]:
        return [{"id": call_id, **call.info()} for call_id, call in self.calls.items()]

    def stop(self, call_id: str, why: str) -> bool:
        call = self.calls.get(call_id)
        if call is None:
            return False
        call.stop(why)
        return True


class EventHub:
    """Fans the server's events out to the readers of ``GET /api/stream/events``."""

    def __init__(self, snapshot: Callable[[], dict[str, Any]], registrations: Callable[[str], list[dict[str, Any]]],
                 workers: Callable[[], dict[str, Any]]):
        #: build the whole state a new reader starts from, the endpoints' or functions' infos,
        #: and the workers document (built only while someone reads)
        self.snapshot = snapshot
        self.registrations = registrations
        self.workers = workers
        self.subscribers: set[asyncio.Queue] = set()
        self.server_id = secrets.token_hex(8)  # new per server start: a reader knows it restarted
        self.seq = 0
        self.activity = Activity(self)
        #: what was last sent of each thing that is compared every tick
        self._last: dict[str, str] = {}

    def subscribe(self) -> tuple[asyncio.Queue, bytes]:
        """A queue of this reader's events, and its first one (the snapshot). The readers
        already there get what changed since the last tick first: from the snapshot on,
        all of them compare against the same state."""
        self.tick()
        queue: asyncio.Queue = asyncio.Queue(MAX_QUEUED)
        self.subscribers.add(queue)
        state = self.snapshot()
        self._remember(state)
        return queue, self.frame("snapshot", state)

    def unsubscribe(self, queue: asyncio.Queue) -> None:
        self.subscribers.discard(queue)

    def close(self) -> None:
        """The server is stopping: every reader's stream ends (properly: its handler
        returns and its body gets its last chunk)."""
        for queue in list(self.subscribers):
            self.subscribers.discard(queue)
            if not queue.full():
                queue.put_nowait(b"")

    def frame(self, kind: str, data: Any) -> bytes:
        self.seq += 1
        return f"id: {self.seq}\nevent: {kind}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()

    def publish(self, kind: str, data: Any) -> None:
        """Send an event to every reader now; a reader too far behind is dropped (its
        stream ends; it reconnects and starts again from a snapshot)."""
        if not self.subscribers:
            return
        frame = self.frame(kind, data)
        for queue in list(self.subscribers):
            try:
                queue.put_nowait(frame)
            except asyncio.QueueFull:
                log.warning("jupyter_stream: an event stream reader fell %d events behind; dropping it", MAX_QUEUED)
                self.subscribers.discard(queue)  # its handler sees that and ends the stream

    # -- what changed since the last tick ------------------------------------------------

    def _remember(self, state: dict[str, Any]) -> None:
        self._last = {}
        for kind in ("endpoint", "function"):
            for info in state[f"{kind}s"]:
                self._last[f"{kind}:{info['name']}"] = json.dumps(info.get("stats"), sort_keys=True)
        self._last["workers"] = workers_key(state["workers"])
        for call in state["calls"]:
            self._last[f"call:{call['id']}"] = json.dumps(call, sort_keys=True)

    def tick(self) -> None:
        """Publish what moved since the last tick: counters, workers, calls' progress."""
        if not self.subscribers:
            return
        for kind in ("endpoint", "function"):
            for info in self.registrations(kind):
                key, stats = f"{kind}:{info['name']}", json.dumps(info.get("stats"), sort_keys=True)
                if self._last.get(key) != stats:
                    self._last[key] = stats
                    self.publish(kind, {"action": "stats", kind: info})
        document = self.workers()
        key = workers_key(document)
        if self._last.get("workers") != key:
            self._last["workers"] = key
            self.publish("workers", document)
        for call in self.activity.list():
            key, shown = f"call:{call['id']}", json.dumps(call, sort_keys=True)
            if self._last.get(key) != shown:
                self._last[key] = shown
                self.publish("call", {"action": "progress", "call": call})


def workers_key(document: dict[str, Any]) -> str:
    """What of the workers document counts as a change (not its clock, nor a few KB of RSS)."""
    def worker(w: dict[str, Any]) -> tuple:
        rss = w.get("rss") or 0
        return (w.get("name"), w.get("pid"), w.get("state"), w.get("busy"), w.get("unresponsive"), rss >> 22,
                json.dumps(w.get("gpus"), sort_keys=True))

    pools = [(p.get("name"), p.get("waiting_calls"), p.get("starting"), tuple(p.get("functions", [])),
              tuple(p.get("endpoints", [])), tuple(worker(w) for w in p.get("workers", []))) for p in document.get("pools", [])]
    return json.dumps([pools, [g.get("held_by") for g in document.get("gpus", [])]], default=str)
