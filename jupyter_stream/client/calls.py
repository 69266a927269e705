"""The calls socket: the client end of `%%stream_function` calls, one WebSocket to the
server per process (`CallsSocket`), driven by a private event-loop thread.

The private loop is what lets synchronous calls (``f.remote()``, ``for x in f.map(...)``)
work inside a notebook cell, where ipykernel's own loop is already running: the caller's
thread only waits on a `CallStream`, never on an event loop. ``.aio`` forms wait on the
same stream from the caller's loop.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import threading
import uuid
from collections.abc import Callable
from typing import Any

from tornado.httpclient import HTTPRequest
from tornado.websocket import WebSocketClosedError, websocket_connect

from .. import wire
from ..errors import error_info
from .connection import ServerConnection, ServerNotFound

log = logging.getLogger("jupyter_stream")


class CallStream:
    """Frames of one call as they arrive (from the loop thread), read from any thread or loop."""

    def __init__(self, client: CallsSocket, call_id: str):
        self.client = client
        self.id = call_id
        self.frames: collections.deque = collections.deque()
        self.ended = False
        self.cond = threading.Condition()
        self._waiter: tuple[asyncio.AbstractEventLoop, asyncio.Future] | None = None
        #: called with each frame's header on the loop thread as it arrives, before it is
        #: queued (a map compacts its results' bookkeeping there); must not raise
        self.prepare: Callable[[dict[str, Any]], None] | None = None

    def feed(self, header: dict[str, Any], payload: memoryview) -> None:
        if self.prepare is not None:
            self.prepare(header)
        with self.cond:
            self.frames.append((header, payload))
            if header.get("end"):
                self.ended = True
            self.cond.notify()
            waiter, self._waiter = self._waiter, None
        if waiter is not None:
            loop, future = waiter
            try:
                loop.call_soon_threadsafe(_resolve, future)
            except RuntimeError:  # that loop is closed: nobody waits any more
                pass

    def take(self, block: bool = True, timeout: float | None = None) -> list:
        """The frames received so far; with `block`, wait for at least one."""
        with self.cond:
            if block and not self.frames:
                self.cond.wait_for(lambda: self.frames, timeout)
            frames = list(self.frames)
            self.frames.clear()
        return frames

    async def atake(self) -> list:
        while True:
            with self.cond:
                if self.frames:
                    frames = list(self.frames)
                    self.frames.clear()
                    return frames
                loop = asyncio.get_running_loop()
                future = loop.create_future()
                self._waiter = (loop, future)
            await future

    def send(self, header: dict[str, Any], payload: bytes = b"") -> None:
        self.client.send({**header, "id": self.id}, payload)

    def cancel(self) -> None:
        if not self.ended:
            self.ended = True
            self.send({"op": "cancel"})
            self.client.calls.pop(self.id, None)


def _resolve(future: asyncio.Future) -> None:
    if not future.done():
        future.set_result(None)


class CallsSocket:
    """This process's WebSocket to the server's ``api/stream/calls``, shared by all calls."""

    def __init__(self, connection: ServerConnection):
        self.connection = connection
        self.calls: dict[str, CallStream] = {}
        self.loop = asyncio.new_event_loop()
        self.ws: Any = None
        self._lock = threading.Lock()
        threading.Thread(target=self.loop.run_forever, name="jupyter-stream-client", daemon=True).start()

    def _ensure_connected(self) -> None:
        with self._lock:
            if self.ws is None:
                asyncio.run_coroutine_threadsafe(self._connect(), self.loop).result(30)

    async def _connect(self) -> None:
        url = "ws" + self.connection.url[len("http"):] + "api/stream/calls"
        headers = {"Authorization": f"token {self.connection.token}"} if self.connection.token else {}
        if os.environ.get("JUPYTER_STREAM_WORKER"):  # a function calling another: say from which worker
            headers["X-Jupyter-Stream-Worker"] = os.environ["JUPYTER_STREAM_WORKER"]
        try:
            self.ws = await websocket_connect(HTTPRequest(url, headers=headers), max_message_size=1 << 31)
        except Exception as e:
            raise ServerNotFound(f"cannot open {url}: {e}") from None
        self.ws.stream.set_nodelay(True)
        self._reader = self.loop.create_task(self._read(self.ws))  # held: the loop keeps only weak references

    async def _read(self, ws: Any) -> None:
        """Hand each frame to its call. Supervised: whatever ends this loop (the server
        hanging up, a frame that is not of our protocol, a bug), every call in flight
        ends with a `ConnectionError` saying why, and the next call connects again."""
        why = "the server closed the connection"
        try:
            while True:
                message = await ws.read_message()
                if message is None:
                    if ws.close_code is not None:
                        why += f" ({ws.close_code}{': ' + ws.close_reason if ws.close_reason else ''})"
                    break
                header, payload = wire.decode_frame(message)
                call_id = header.get("id")
                stream = self.calls.get(call_id) if isinstance(call_id, str) else None
                if stream is not None:
                    if header.get("end"):
                        self.calls.pop(stream.id, None)
                    try:
                        stream.feed(header, payload)
                    except Exception:  # one caller's trouble must not stop this reader: every call uses it
                        log.exception("jupyter_stream: could not deliver output of call %s", stream.id)
        except Exception as e:  # noqa: BLE001 - any cause ends the calls below, and says so
            why = f"reading from it failed: {type(e).__name__}: {e}"
            ws.close(1002 if isinstance(e, wire.FrameError) else 1011, why.encode()[:120].decode(errors="ignore"))
        finally:
            if self.ws is ws:
                self.ws = None
            self._end_calls(why)

    def _end_calls(self, why: str) -> None:
        """End every call in flight with a `ConnectionError`, logging one line if there were any."""
        streams = []
        while self.calls:
            streams.append(self.calls.popitem()[1])
        if streams:
            log.warning("jupyter_stream: lost the calls connection to %s (%s); %d call(s) in flight ended with "
                        "ConnectionError, the next call connects again", self.connection.url, why, len(streams))
        for stream in streams:
            stream.feed({"op": "out", "id": stream.id, "end": True, "error": self._lost(why)}, memoryview(b""))

    def _lost(self, why: str) -> dict[str, Any]:
        return error_info("ConnectionError", f"lost the connection to the Jupyter server at {self.connection.url} ({why}); "
                          "run the call again: it connects anew", "builtins")

    def start(self, header: dict[str, Any], payload: bytes = b"") -> CallStream:
        """Start a call; its output arrives on the returned stream."""
        self._ensure_connected()
        stream = CallStream(self, uuid.uuid4().hex[:16])
        self.calls[stream.id] = stream
        self.send({**header, "op": "call", "id": stream.id}, payload)
        return stream

    def send(self, header: dict[str, Any], payload: bytes | memoryview = b"") -> None:
        self.loop.call_soon_threadsafe(self._write, header.get("id"), wire.encode_frame(header, payload))

    def _write(self, call_id: str | None, frame: bytes) -> None:
        if self.ws is not None:
            try:
                self.ws.write_message(frame, binary=True)
            except WebSocketClosedError:
                pass  # its reader is ending, and ends the call with it
            return
        # the connection was lost after this call started: end it now rather than never
        stream = self.calls.pop(call_id, None)
        if stream is not None:
            stream.feed({"op": "out", "id": stream.id, "end": True, "error": self._lost("it was closed")}, memoryview(b""))


def calls_socket(connection: ServerConnection) -> CallsSocket:
    """The shared `CallsSocket` of `connection`, made on first use."""
    client = getattr(connection, "_calls_socket", None)
    if client is None:
        client = connection._calls_socket = CallsSocket(connection)
    return client
