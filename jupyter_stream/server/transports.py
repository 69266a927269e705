"""How the server exchanges comm messages with one worker kernel: the transport seam.

`WorkerKernel` speaks the protocol (`wire`); a transport only carries its messages, so
that where a kernel comes from decides how it is reached, not what is said:

- `DirectTransport` (local kernels, the default): once the comm is open, the worker's
  direct channel carries every message both ways (one unix socket in a private
  directory, see `worker.direct`): no Jupyter envelope, no signature, no hop through
  ipykernel's threads or a messaging library's. IOPub is still read for the kernel's own prints; a worker that
  cannot open the channel stays on the `ZmqTransport` path, with one log line.
- `ZmqTransport` reads the kernel's IOPub ZMQ socket directly, subscribed to this comm
  and the kernel's prints only (zmq drops the two status messages a kernel publishes
  for every request before they reach this process), and unpacks only what it routes.
  For kernels whose client has ZMQ sockets (local kernels, provisioners).
- `ChannelTransport` goes through the kernel client's channel API (``get_iopub_msg``,
  ``channel.send``) and nothing else, so any jupyter_client kernel client works,
  including a Kernel/Enterprise Gateway's, whose channels are a WebSocket.

Both send through the client's channels: the comm is opened on the shell channel, later
messages go on the control channel once the worker says it takes them there (ipykernel
handles control messages without a hop to the kernel's main thread).

Every transport is supervised: its reader routes each message inside a ``try``, and if it
ends for any reason but `close` (a socket that fails, a message that does not decode, a
failure while routing), ``on_broken`` hears why, once, and the worker is replaced. A
transport never leaves a worker that looks alive while nothing reaches it.

Usage, as `WorkerKernel.start` does it::

    transport = transport_class(kc, "auto")(kc, comm_id, on_comm_msg, on_stream, on_broken)
    transport.start()                 # begin routing IOPub
    transport.open_comm(target, data) # the worker answers with a "ready" comm message
    transport.use_control()           # if it said it takes control messages
    transport.send({"op": ...}, [buffer, ...])
    transport.close()
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Callable
from typing import Any

import zmq

from .. import wire
from ..errors import WorkerError

log = logging.getLogger("jupyter_stream")

#: a comm message's ``data`` and its binary buffers
OnCommMessage = Callable[[dict[str, Any], list], None]
#: a print from the kernel: stream name ("stdout", "stderr") and text
OnStream = Callable[[str, str], None]
#: the transport stopped working: why
OnBroken = Callable[[str], None]

MODES = ("auto", "direct", "zmq", "channels")

#: bytes a direct channel's reader takes at a time, and reads per event loop turn
READ_SIZE = 1 << 18
READS_PER_TURN = 16


class WorkerTransport:
    """Carries one comm's messages between the server and a worker kernel."""

    #: whether it asks the worker for a direct channel (see `DirectTransport`)
    offers_direct = False
    #: what `/api/stream/workers` shows as the worker's transport (`MODES`' names)
    name = "channels"

    @property
    def kind(self) -> str:
        return self.name

    def __init__(self, kc: Any, comm_id: str, on_comm_msg: OnCommMessage, on_stream: OnStream,
                 on_broken: OnBroken | None = None):
        self.kc = kc
        self.comm_id = comm_id
        self.on_comm_msg = on_comm_msg
        self.on_stream = on_stream
        self.on_broken = on_broken
        self.closed = False  # by `close`: on purpose
        self.broken = False  # its reader stopped by itself
        self._channel = kc.shell_channel
        self._reader: asyncio.Task | None = None

    def start(self) -> None:
        """Begin reading the kernel's IOPub; called once the worker code is loaded."""
        self._reader = asyncio.create_task(self._read())
        self._reader.add_done_callback(self._reader_ended)

    async def _read(self) -> None:
        """Read and `route` messages until `close`; raise (or return) only when no more
        can be read: the transport is then broken."""
        raise NotImplementedError

    def _reader_ended(self, task: asyncio.Task) -> None:
        if self.closed or task.cancelled():
            return
        self.broken = True
        exc = task.exception()
        reason = f"its message reader stopped: {type(exc).__name__}: {exc}" if exc else "its message reader stopped"
        if self.on_broken is not None:
            self.on_broken(reason)
        else:
            log.error("jupyter_stream: worker comm %s: %s", self.comm_id, reason)

    def open_comm(self, target_name: str, data: dict[str, Any] | None = None) -> None:
        self.kc.shell_channel.send(
            self.kc.session.msg("comm_open", {"comm_id": self.comm_id, "target_name": target_name, "data": data or {}})
        )

    def use_control(self) -> None:
        """Send from now on on the control channel (the worker said it takes them there)."""
        self._channel = self.kc.control_channel

    def send(self, data: dict[str, Any], buffers: list | None = None) -> None:
        if self.broken:
            raise WorkerError("its transport is broken")
        msg = self.kc.session.msg("comm_msg", {"comm_id": self.comm_id, "data": data})
        if buffers:
            msg["buffers"] = buffers
        self._channel.send(msg)

    def route(self, msg_type: str, content: dict[str, Any], buffers: list) -> None:
        """Hand one IOPub message on. Whatever goes wrong in here propagates: the reader
        then stops and the worker is replaced, since a message was lost."""
        if msg_type == "comm_msg":
            if content.get("comm_id") == self.comm_id:
                self.on_comm_msg(content.get("data"), buffers)
        elif msg_type == "stream":
            self.on_stream(str(content.get("name", "")), str(content.get("text", "")))

    def close(self) -> None:
        self.closed = True
        if self._reader is not None:
            self._reader.cancel()


class ZmqTransport(WorkerTransport):
    """Reads the IOPub socket directly: only this comm's messages and prints arrive."""

    name = "zmq"

    def start(self) -> None:
        iopub = self.kc.iopub_channel.socket
        iopub.setsockopt(zmq.UNSUBSCRIBE, b"")
        for topic in (f"comm-{self.comm_id}".encode(), b"stream."):
            iopub.setsockopt(zmq.SUBSCRIBE, topic)
        super().start()

    async def _read(self) -> None:
        socket = self.kc.iopub_channel.socket
        session = self.kc.session
        while not self.closed:
            frames = await socket.recv_multipart(copy=False)
            _, frames = session.feed_identities(frames, copy=False)
            msg = session.deserialize(frames, content=False, copy=False)  # a bad signature raises
            self.route(msg["header"]["msg_type"], session.unpack(msg["content"]), msg["buffers"])


class ChannelTransport(WorkerTransport):
    """Reads through the kernel client's channel API: works with any kernel client."""

    async def _read(self) -> None:
        while not self.closed:
            msg = await self.kc.get_iopub_msg()
            self.route(msg["header"]["msg_type"], msg["content"], msg.get("buffers") or [])


class DirectTransport(ZmqTransport):
    """A local kernel's messages through its direct channel (see `worker.direct`): the
    comm opens it, then every message goes as framed parts on one unix socket, JSON and
    buffers, uncopied, one system call each way. Until the worker has said it is there (or
    if it could not open the channel) the `ZmqTransport` path carries them; IOPub stays
    read for the kernel's own prints."""

    offers_direct = True

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.direct = False  # the server's messages go through the channel
        self.confirmed = False  # the worker's first message came through it
        self._sock: socket.socket | None = None
        self._unsent: list[memoryview] = []  # what the socket did not take yet (see `_flush`)
        self._watched: tuple[asyncio.AbstractEventLoop, int] | None = None  # the socket's descriptor, while read
        self._direct_reader: asyncio.Task | None = None

    @property
    def kind(self) -> str:
        return "direct" if self.confirmed else "zmq"

    def use_direct(self, offer: dict[str, Any]) -> None:
        """Connect to the worker's channel (``offer``: its directory and secret), present
        the secret, and send everything there from now on. Raises OSError or WorkerError
        when it cannot: the comm then goes on carrying everything."""
        directory, secret = offer.get("dir"), offer.get("secret")
        if not isinstance(directory, str) or not isinstance(secret, str):
            raise WorkerError("the worker's direct channel offer is malformed")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(os.path.join(directory, "socket"))  # a local socket that listens: at once
        except OSError:
            sock.close()
            raise
        sock.setblocking(False)
        wire.widen_socket(sock)
        self._sock = sock
        self.direct = True
        self._write(wire.direct_parts({"op": "hello", "secret": secret}))
        self._direct_reader = asyncio.create_task(self._read_direct())
        self._direct_reader.add_done_callback(self._reader_ended)

    def send(self, data: dict[str, Any], buffers: list | None = None) -> None:
        if not self.direct:
            return super().send(data, buffers)
        if self.broken:
            raise WorkerError("its transport is broken")
        self._write(wire.direct_parts(data, buffers))

    def _write(self, parts: list) -> None:
        """Write now what the socket takes; the rest waits for it in order (`_flush`)."""
        if self._unsent:
            self._unsent += parts
            return
        try:
            rest = wire.send_parts_nowait(self._sock, parts)
        except OSError as exc:
            raise WorkerError(f"its direct channel is closed: {exc}") from None
        if rest:
            self._unsent = rest
            asyncio.get_running_loop().add_writer(self._sock.fileno(), self._flush)

    def _flush(self) -> None:
        try:
            self._unsent = wire.send_parts_nowait(self._sock, self._unsent)
        except OSError as exc:  # the worker is gone: its reader says so too, this ends the wait
            self._unsent = []
            self._sock_writer_done()
            if not self.broken and not self.closed:
                self.broken = True
                if self.on_broken is not None:
                    self.on_broken(f"its direct channel is closed: {exc}")
            return
        if not self._unsent:
            self._sock_writer_done()

    def _sock_writer_done(self) -> None:
        if self._sock is not None and self._sock.fileno() >= 0:
            asyncio.get_running_loop().remove_writer(self._sock.fileno())

    async def _read_direct(self) -> None:
        """The event loop calls `readable` whenever the socket holds bytes (no future, no
        task step per message). This task only stands for the reader, supervised as the
        other readers are: it ends with the error that stopped it."""
        loop = asyncio.get_running_loop()
        stopped = loop.create_future()
        sock, reader = self._sock, wire.DirectReader()
        on_comm_msg = self.on_comm_msg

        def readable() -> None:
            try:
                for _ in range(READS_PER_TURN):  # then let the loop's other callbacks run
                    if self.closed:
                        return
                    target = reader.target()
                    try:
                        if target is not None:
                            wanted = target.nbytes
                            count = sock.recv_into(target)
                            messages = reader.received(count) if count else None
                        else:
                            wanted = READ_SIZE
                            chunk = sock.recv(READ_SIZE)
                            count = len(chunk)
                            messages = reader.feed(chunk) if chunk else None
                    except (BlockingIOError, InterruptedError):
                        return
                    if messages is None:
                        raise ConnectionError("the worker closed its direct channel")
                    for data, buffers in messages:
                        if not self.confirmed:
                            self.confirmed = True
                            if isinstance(data, dict) and data.get("op") == "direct":
                                continue
                        on_comm_msg(data, buffers)
                    if count < wanted:  # the socket is empty: no second read only to hear so
                        return
            except BaseException as exc:  # noqa: BLE001 - the reader stops, and says why
                loop.remove_reader(fd)
                if not stopped.done():
                    stopped.set_exception(exc)

        fd = sock.fileno()
        loop.add_reader(fd, readable)
        self._watched = (loop, fd)
        try:
            await stopped
        finally:
            self._stop_watching()

    def _stop_watching(self) -> None:
        watched, self._watched = self._watched, None
        if watched is not None:
            loop, fd = watched
            loop.remove_reader(fd)
            if self._unsent:
                loop.remove_writer(fd)

    def close(self) -> None:
        super().close()
        if self._direct_reader is not None:
            self._direct_reader.cancel()
        self._stop_watching()  # before its socket closes (and the descriptor's number is reused)
        if self._sock is not None:
            self._sock.close()


def transport_class(kc: Any, mode: str) -> type[WorkerTransport]:
    """The transport for kernel client `kc`: `mode` is "direct", "zmq", "channels" or
    "auto" (the direct channel where the client has ZMQ sockets, i.e. a local kernel; the
    channel API otherwise)."""
    has_zmq = isinstance(getattr(kc.iopub_channel, "socket", None), zmq.Socket)
    if mode == "channels" or (mode == "auto" and not has_zmq):
        return ChannelTransport
    if mode in ("direct", "auto") and has_zmq:
        return DirectTransport
    if mode == "zmq" and has_zmq:
        return ZmqTransport
    if mode in ("zmq", "direct"):
        raise WorkerError(f"JupyterStream.worker_messages is {mode!r} but {type(kc).__name__} has no ZMQ sockets; use 'auto'")
    raise WorkerError(f"JupyterStream.worker_messages must be one of {', '.join(MODES)}, not {mode!r}")
