"""The worker's end of the direct channel: the server's messages and the worker's, without
ipykernel's messaging in between.

Through the comm, every message is a Jupyter message: JSON headers, an HMAC signature, a
hop through ipykernel's control thread in and its IOPub thread out. For a kernel on the
same machine the worker offers two unix sockets instead, in a directory only its user may
enter, named (with a secret) in its ``ready`` message:

- ``in``, a ROUTER socket: the server's messages. Nothing is taken from a peer until it
  has presented the secret (``[b"hello", secret]``), and then only from that peer: another
  process cannot talk to the worker through it.
- ``out``, a PUSH socket: the worker's messages, once the server has said hello.

A frame holds one `wire` message as JSON, and its binary buffers follow as frames of their
own, uncopied. The comm stays open as the control path, and as the fallback where the
channel cannot be opened (the directory cannot be made, say): nothing changes then, but
for one log line.
"""

from __future__ import annotations

import hmac
import json
import os
import secrets
import shutil
import tempfile
import threading
from collections.abc import Callable
from typing import Any

import zmq

#: what the server sends first on ``in``, with the secret
HELLO = b"hello"

OnMessage = Callable[[dict[str, Any], list], None]


def runtime_dir() -> str:
    from jupyter_core.paths import jupyter_runtime_dir

    return jupyter_runtime_dir()


class DirectChannel:
    """Two unix sockets, bound in a private directory; `read_forever` runs in a thread of
    its own and hands each message the server sends to `on_message`."""

    def __init__(self, on_message: OnMessage, on_connected: Callable[[], None]):
        self.on_message = on_message
        self.on_connected = on_connected
        parent = runtime_dir()
        os.makedirs(parent, exist_ok=True)
        self.dir = tempfile.mkdtemp(prefix="jupyter-stream-direct-", dir=parent)
        os.chmod(self.dir, 0o700)  # only this user may reach the sockets (mkdtemp says so too)
        self.secret = secrets.token_hex(32)
        self.context = zmq.Context()
        self.inbound = self.context.socket(zmq.ROUTER)
        self.outbound = self.context.socket(zmq.PUSH)
        for sock in (self.inbound, self.outbound):
            sock.setsockopt(zmq.LINGER, 1000)
        self.outbound.setsockopt(zmq.SNDHWM, 0)  # the sender's own window bounds what is queued
        self.inbound.bind(f"ipc://{self.dir}/in")
        self.outbound.bind(f"ipc://{self.dir}/out")
        self.server: bytes | None = None  # the routing id of the peer that said hello
        self.connected = False
        self.lock = threading.Lock()  # sends come from several threads (sender, calls, watchdog)

    def offer(self) -> dict[str, Any]:
        """What the ``ready`` message says of the channel."""
        return {"dir": self.dir, "secret": self.secret}

    def send(self, data: dict[str, Any], buffers: list | None = None) -> None:
        header = json.dumps(data, separators=(",", ":")).encode()  # ASCII: a lone surrogate travels escaped
        with self.lock:
            self.outbound.send_multipart([header, *(buffers or ())], copy=False)

    def read_forever(self) -> None:
        """Hand on the server's messages: [routing id, JSON, buffers...]. A peer that has
        not presented the secret is ignored, whatever it sends."""
        while True:
            frames = self.inbound.recv_multipart(copy=False)
            peer = frames[0].bytes
            if self.server is None:
                if len(frames) == 3 and frames[1].bytes == HELLO and hmac.compare_digest(frames[2].bytes, self.secret.encode()):
                    self.server = peer
                    self.connected = True
                    self.on_connected()
                continue
            if peer != self.server or len(frames) < 2:
                continue  # another process: the channel is the server's
            self.on_message(json.loads(frames[1].bytes), [frame.buffer for frame in frames[2:]])

    def remove(self) -> None:
        """At exit: the sockets' directory goes (the sockets go with the process)."""
        shutil.rmtree(self.dir, ignore_errors=True)
