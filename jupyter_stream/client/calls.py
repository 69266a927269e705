"""The calls socket: the client end of `%%stream_function` calls, one WebSocket to the
server per process (`CallsSocket`).

A caller writes its frames to the socket itself, from its own thread; one reader thread
hands each frame that comes back to its call's `CallStream`. That is what lets
synchronous calls (``f.remote()``, ``for x in f.map(...)``) work inside a notebook cell,
where ipykernel's own loop is already running: the caller's thread only ever waits on a
`CallStream`, never on an event loop. ``.aio`` forms wait on the same stream from the
caller's loop.

The WebSocket is a small blocking one (`WebSocket`, RFC 6455 as a client needs it), not
tornado's client on an event-loop thread: a call no longer waits for that thread to wake
up and write it (about 40 us of a ``.remote()``, and a map's inputs no longer queue
behind its results), and the reader is a plain loop over the socket.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import hashlib
import logging
import os
import signal
import socket
import ssl
import struct
import threading
import urllib.parse
import uuid
from typing import Any

from tornado.util import _websocket_mask  # tornado's C speedup when built (a dependency anyway)

from .. import wire
from ..errors import error_info
from .connection import ServerConnection, ServerNotFound

log = logging.getLogger("jupyter_stream")

#: The largest message the server may send (tornado's client allowed as much).
MAX_MESSAGE = 1 << 31


class WebSocketError(Exception):
    """The WebSocket handshake failed, or the peer broke the protocol."""


class WebSocket:
    """A client WebSocket on a blocking socket: binary messages, `send` from any thread
    (one frame at a time, under a lock), `receive` from one reader thread. Pings are
    answered; a close frame ends `receive` (with `close_code` and `close_reason`)."""

    GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

    def __init__(self, url: str, headers: dict[str, str], timeout: float = 30.0):
        parts = urllib.parse.urlsplit(url)
        secure = parts.scheme in ("https", "wss")
        host = parts.hostname or "127.0.0.1"
        sock = socket.create_connection((host, parts.port or (443 if secure else 80)), timeout)
        try:
            if secure:
                sock = ssl.create_default_context().wrap_socket(sock, server_hostname=host)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # a .remote() frame must not wait for Nagle
            key = base64.b64encode(os.urandom(16)).decode()
            lines = [f"GET {parts.path or '/'}{'?' + parts.query if parts.query else ''} HTTP/1.1",
                     f"Host: {parts.netloc.rpartition('@')[2]}", "Upgrade: websocket", "Connection: Upgrade",
                     f"Sec-WebSocket-Key: {key}", "Sec-WebSocket-Version: 13",
                     *(f"{name}: {value}" for name, value in headers.items())]
            sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
            self.sock, self._buffer, self._pos = sock, bytearray(), 0
            status, fields = self._response_head()
            if status[1] != "101":
                raise WebSocketError(f"HTTP {status[1]}: {status[2] if len(status) > 2 else ''}".strip())
            accept = base64.b64encode(hashlib.sha1((key + self.GUID).encode()).digest()).decode()
            if fields.get("sec-websocket-accept") != accept:
                raise WebSocketError("the server did not accept the WebSocket handshake")
            sock.settimeout(None)
        except BaseException:
            sock.close()
            raise
        self._send_lock = threading.Lock()
        self.close_code: int | None = None
        self.close_reason: str | None = None
        self.closed = False

    def _response_head(self) -> tuple[list[str], dict[str, str]]:
        while b"\r\n\r\n" not in self._buffer:
            if len(self._buffer) > 65536:
                raise WebSocketError("the server's answer has no end of headers")
            chunk = self.sock.recv(65536)
            if not chunk:
                raise WebSocketError("the server closed the connection during the handshake")
            self._buffer += chunk
        head, _, rest = bytes(self._buffer).partition(b"\r\n\r\n")
        self._buffer = bytearray(rest)  # frames the server sent at once, if any
        status, *lines = head.decode("latin-1").split("\r\n")
        fields = {}
        for line in lines:
            name, _, value = line.partition(":")
            fields[name.strip().lower()] = value.strip()
        return status.split(" ", 2), fields

    # -- writing (any thread) ---------------------------------------------------------

    def send(self, data: bytes | bytearray | memoryview, opcode: int = 0x2) -> None:
        """Send one message as one masked frame. Called in the main thread, SIGINT is held
        back while the frame is written (a Ctrl-C that cut a frame short would leave the
        stream unreadable); it is delivered as soon as the frame is out."""
        length = len(data)
        if length < 126:
            head = struct.pack("!BB", 0x80 | opcode, 0x80 | length)
        elif length < 65536:
            head = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, length)
        else:
            head = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, length)
        mask = os.urandom(4)
        head += mask
        body = _websocket_mask(mask, bytes(data) if not isinstance(data, bytes) else data)
        if length < 65536:  # one write; a large body is not copied once more to join them
            head, body = head + body, b""
        held = _SIGMASK and threading.current_thread() is threading.main_thread()
        with self._send_lock:
            if held:
                signal.pthread_sigmask(signal.SIG_BLOCK, _HELD_SIGNALS)
            try:
                self.sock.sendall(head)
                if body:
                    self.sock.sendall(body)
            except BaseException:
                self._shutdown()  # part of a frame may be out: nothing can follow it
                raise
            finally:
                if held:
                    signal.pthread_sigmask(signal.SIG_UNBLOCK, _HELD_SIGNALS)

    def close(self, code: int = 1000, reason: str = "") -> None:
        """Send a close frame (once) and shut the socket: `receive` then returns None."""
        if self.closed:
            return
        self.closed = True
        try:
            self.send(struct.pack("!H", code) + reason.encode()[:120], 0x8)
        except (OSError, ValueError):
            pass
        self._shutdown()

    def _shutdown(self) -> None:
        self.closed = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    # -- reading (the reader thread) --------------------------------------------------

    def receive(self) -> bytes | bytearray | str | None:
        """The next message (a text one as `str`), or None once the connection is closed."""
        try:
            return self._receive()
        except (OSError, EOFError):  # reset, or shut: the connection is over
            return None

    def _receive(self) -> bytes | bytearray | str | None:
        fragments: list[bytes | bytearray] = []
        opcode = 0
        while True:
            first, second = self._read(2)
            length = second & 0x7F
            if length == 126:
                (length,) = struct.unpack("!H", self._read(2))
            elif length == 127:
                (length,) = struct.unpack("!Q", self._read(8))
            mask = self._read(4) if second & 0x80 else None
            if length > MAX_MESSAGE or sum(map(len, fragments)) + length > MAX_MESSAGE:
                raise WebSocketError(f"a message of over {MAX_MESSAGE} bytes")
            data = self._read(length)
            if mask is not None:
                data = _websocket_mask(mask, bytes(data))
            op = first & 0x0F
            if op == 0x8:  # close: answer it, and the connection is over
                if len(data) >= 2:
                    (self.close_code,) = struct.unpack("!H", data[:2])
                    self.close_reason = bytes(data[2:]).decode(errors="replace")
                self.close(self.close_code or 1000)
                return None
            if op == 0x9:  # ping
                self.send(data, 0xA)
                continue
            if op == 0xA:  # pong
                continue
            if op:
                opcode = op
            fragments.append(data)
            if first & 0x80:  # the message's last frame
                message = fragments[0] if len(fragments) == 1 else b"".join(fragments)
                return bytes(message).decode() if opcode == 0x1 else message

    def _read(self, count: int) -> bytes | bytearray:
        buffer = self._buffer
        if len(buffer) - self._pos >= count:  # the usual case: already here
            start = self._pos
            self._pos = start + count
            return bytes(buffer[start:start + count])
        if self._pos:
            del buffer[:self._pos]
            self._pos = 0
        if count > 65536:  # a large message: read it into its own buffer, no copy after
            out = bytearray(count)
            have = len(buffer)
            out[:have] = buffer
            buffer.clear()
            view = memoryview(out)[have:]
            while view.nbytes:
                got = self.sock.recv_into(view)
                if not got:
                    raise EOFError
                view = view[got:]
            return out
        while len(buffer) < count:
            chunk = self.sock.recv(262144)
            if not chunk:
                raise EOFError
            buffer += chunk
        self._pos = count
        return bytes(buffer[:count])

    def close_socket(self) -> None:
        """Release the socket (the reader, at its end); a send still under way fails first."""
        self._shutdown()
        with self._send_lock:
            self.sock.close()


#: Signals held back while the main thread writes a frame (ipykernel interrupts with SIGINT).
_HELD_SIGNALS = {signal.SIGINT}
_SIGMASK = hasattr(signal, "pthread_sigmask")


class CallStream:
    """Frames of one call as they arrive (from the loop thread), read from any thread or loop."""

    def __init__(self, client: CallsSocket, call_id: str):
        self.client = client
        self.id = call_id
        self.frames: collections.deque = collections.deque()
        self.ended = False
        self.cond = threading.Condition()
        self._waiter: tuple[asyncio.AbstractEventLoop, asyncio.Future] | None = None

    def feed(self, header: dict[str, Any], payload: memoryview) -> None:
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

    def send(self, header: dict[str, Any], *payload: bytes | memoryview) -> None:
        self.client.send({**header, "id": self.id}, *payload)

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
        self.ws: WebSocket | None = None
        self._lock = threading.Lock()

    def _ensure_connected(self) -> None:
        with self._lock:
            if self.ws is None:
                ws = self.ws = self._connect()
                threading.Thread(target=self._read, args=(ws,), name="jupyter-stream-client", daemon=True).start()

    def _connect(self) -> WebSocket:
        url = self.connection.url + "api/stream/calls"
        headers = {"Authorization": f"token {self.connection.token}"} if self.connection.token else {}
        if os.environ.get("JUPYTER_STREAM_WORKER"):  # a function calling another: say from which worker
            headers["X-Jupyter-Stream-Worker"] = os.environ["JUPYTER_STREAM_WORKER"]
        try:
            return WebSocket(url, headers)
        except Exception as e:
            raise ServerNotFound(f"cannot open {'ws' + url[len('http'):]}: {e}") from None

    def _read(self, ws: WebSocket) -> None:
        """Hand each frame to its call (the reader thread). Supervised: whatever ends this
        loop (the server hanging up, a frame that is not of our protocol, a bug), every call
        in flight ends with a `ConnectionError` saying why, and the next call connects again."""
        why = "the server closed the connection"
        try:
            while True:
                message = ws.receive()
                if message is None:
                    if ws.close_code is not None:
                        why += f" ({ws.close_code}{': ' + ws.close_reason if ws.close_reason else ''})"
                    break
                header, payload = wire.decode_frame(message)  # type: ignore[arg-type] - a text frame raises here
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
            ws.close(1002 if isinstance(e, (wire.FrameError, WebSocketError)) else 1011,
                     why.encode()[:120].decode(errors="ignore"))
        finally:
            if self.ws is ws:
                self.ws = None
            ws.close_socket()
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

    def send(self, header: dict[str, Any], *payload: bytes | memoryview) -> None:
        """Write a frame now, from the caller's thread (the payload's parts joined)."""
        ws = self.ws
        if ws is not None and not ws.closed:
            try:
                ws.send(wire.encode_frame(header, *payload))
            except OSError:
                pass  # the socket is shut: its reader is ending, and ends the call with it
            return
        # the connection was lost after this call started: end it now rather than never
        stream = self.calls.pop(header.get("id"), None)  # type: ignore[arg-type]
        if stream is not None:
            stream.feed({"op": "out", "id": stream.id, "end": True, "error": self._lost("it was closed")}, memoryview(b""))

    def close(self) -> None:
        """Close the connection (calls in flight end with a `ConnectionError`)."""
        ws = self.ws
        if ws is not None:
            ws.close()


def calls_socket(connection: ServerConnection) -> CallsSocket:
    """The shared `CallsSocket` of `connection`, made on first use."""
    client = getattr(connection, "_calls_socket", None)
    if client is None:
        client = connection._calls_socket = CallsSocket(connection)
    return client
