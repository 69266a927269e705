"""The worker's end of the direct channel: the server's messages and the worker's, without
ipykernel's messaging in between.

Through the comm, every message is a Jupyter message: JSON headers, an HMAC signature, a
hop through ipykernel's control thread in and its IOPub thread out. For a kernel on the
same machine the worker offers a unix socket instead, ``socket`` in a directory only its
user may enter, named (with a secret) in its ``ready`` message. The first peer to connect
and present the secret (a ``hello`` message) is the server; a peer that presents anything
else is dropped, and once the server is there the socket is closed and removed, so that
no other process can connect at all.

Messages go both ways on that one connection, framed by `wire.direct_parts`: the `wire`
message as JSON, and its binary buffers after it, written with scatter-gather writes (no
joining copy) and received large ones straight into their own buffer. Each message is
one system call to the other process, with no messaging library's threads in between.
The comm stays open as the control path, and as the fallback where the channel cannot be
opened (the directory cannot be made, say): nothing changes then, but for one log line.
"""

from __future__ import annotations

import hmac
import os
import secrets
import shutil
import socket
import tempfile
import threading
from collections.abc import Callable
from typing import Any

from .. import wire

#: seconds a peer that connected has to present the secret (so that one that says
#: nothing cannot keep the server out)
HELLO_TIMEOUT = 5.0
#: bytes read at a time
READ_SIZE = 1 << 18

OnMessage = Callable[[dict[str, Any], list], None]


#: the longest unix socket path every platform takes (Linux 108 bytes, macOS 104)
MAX_SOCKET_PATH = 100


def runtime_dir() -> str:
    from jupyter_core.paths import jupyter_runtime_dir

    return jupyter_runtime_dir()


def channel_parent() -> str:
    """Where the channel's private directory goes: Jupyter's runtime directory, or the
    system's temporary one when that is too deep for a unix socket's path."""
    parent = runtime_dir()
    if len(os.path.join(parent, "jupyter-stream-direct-xxxxxxxx", "socket")) > MAX_SOCKET_PATH:
        return tempfile.gettempdir()
    return parent


class DirectChannel:
    """A unix socket, bound in a private directory; `read_forever` runs in a thread of its
    own, waits for the server, and hands each message it sends to `on_message`."""

    def __init__(self, on_message: OnMessage, on_connected: Callable[[], None]):
        self.on_message = on_message
        self.on_connected = on_connected
        parent = channel_parent()
        os.makedirs(parent, exist_ok=True)
        self.dir = tempfile.mkdtemp(prefix="jupyter-stream-direct-", dir=parent)
        try:
            os.chmod(self.dir, 0o700)  # only this user may reach the socket (mkdtemp says so too)
            self.secret = secrets.token_hex(32)
            self.path = os.path.join(self.dir, "socket")
            self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.listener.bind(self.path)
            self.listener.listen(8)
        except BaseException:
            self.remove()  # no channel: nothing of it is left behind
            raise
        self.sock: socket.socket | None = None  # the server's connection, once it said hello
        self.connected = False
        self.lock = threading.Lock()  # sends come from several threads (sender, calls, watchdog)

    def offer(self) -> dict[str, Any]:
        """What the ``ready`` message says of the channel."""
        return {"dir": self.dir, "secret": self.secret}

    def send(self, data: dict[str, Any], buffers: list | None = None) -> None:
        self.send_parts(wire.direct_parts(data, buffers))  # raises before writing if it does not encode

    def send_parts(self, parts: list) -> None:
        """Write whole messages (`wire.direct_parts`), one or several, as one."""
        with self.lock:
            wire.send_parts(self.sock, parts)

    def read_forever(self) -> None:
        """Wait for the server, then hand on its messages until it closes the connection
        (which raises: the worker cannot go on without it)."""
        sock, reader, first = self.accept_server()
        for data, buffers in first:
            self.on_message(data, buffers)
        while True:
            target = reader.target()
            if target is not None:
                count = sock.recv_into(target)
                messages = reader.received(count) if count else None
            else:
                chunk = sock.recv(READ_SIZE)
                messages = reader.feed(chunk) if chunk else None
            if messages is None:
                raise ConnectionError("the server closed the direct channel")
            for data, buffers in messages:
                self.on_message(data, buffers)

    def accept_server(self) -> tuple[socket.socket, wire.DirectReader, list]:
        """The first peer that presents the secret, with what it sent after its hello.
        Others are dropped; then the socket is closed and removed."""
        while True:
            sock, _ = self.listener.accept()
            sock.settimeout(HELLO_TIMEOUT)
            reader = wire.DirectReader(max_bytes=4096)  # a hello is small: a stranger allocates nothing
            messages: list = []
            try:
                while not messages:
                    chunk = sock.recv(READ_SIZE)
                    if not chunk:
                        break
                    messages = reader.feed(chunk, limit=1)
            except (OSError, ValueError):
                messages = []
            hello = messages[0][0] if messages else None
            secret = hello.get("secret") if isinstance(hello, dict) and hello.get("op") == "hello" else None
            if isinstance(secret, str) and hmac.compare_digest(secret.encode(), self.secret.encode()):
                break
            sock.close()
        sock.settimeout(None)
        wire.widen_socket(sock)
        self.listener.close()
        os.unlink(self.path)
        self.sock = sock
        self.connected = True
        self.on_connected()
        reader.max_bytes = wire.MAX_DIRECT_BYTES
        return sock, reader, reader.feed(b"")  # what the server sent right after its hello

    def remove(self) -> None:
        """At exit: the socket's directory goes."""
        shutil.rmtree(self.dir, ignore_errors=True)
