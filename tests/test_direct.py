"""The direct channel to local workers (issue 20): it is the default, it falls back to the
comm when it cannot open, nothing is lost on it when a worker dies, and nobody but the
server can talk to a worker through it."""

import os
import socket
import stat
import time

import httpx
import pytest

from jupyter_stream.client.endpoints import register_endpoint
from jupyter_stream.client.functions import register_function


@pytest.fixture(scope="module")
def server(jstream_start_server):
    server = jstream_start_server(["--JupyterStream.min_workers=2", "--JupyterStream.max_workers=4",
                                   "--JupyterStream.worker_poll_interval=0.2", "--JupyterStream.worker_messages=direct"])
    server.wait_for_workers(2)
    return server


def channel():
    """Where the worker's direct channel is, and whether it is connected (run on a worker)."""
    import jupyter_stream.worker.runtime as runtime

    direct = runtime._worker.direct
    return {"dir": direct.dir, "secret": direct.secret, "connected": direct.connected, "pid": __import__("os").getpid()}


def test_local_workers_talk_through_the_direct_channel(server):
    assert {w["transport"] for w in server.workers()["workers"]} == {"direct"}
    info = register_function(channel, connection=server.connection).remote()
    assert info["connected"]
    mode = os.stat(info["dir"]).st_mode
    assert stat.S_IMODE(mode) == 0o700 and os.stat(info["dir"]).st_uid == os.getuid()
    assert os.listdir(info["dir"]) == []  # its socket went once the server was there: nobody else connects


def test_a_worker_whose_channel_cannot_open_falls_back_to_the_comm(server):
    def where():
        import jupyter_stream.worker.runtime as runtime

        return runtime._worker.direct is None

    # the worker cannot make its directory there: it says why, and the comm carries everything
    f = register_function(where, connection=server.connection, env={"JUPYTER_RUNTIME_DIR": "/proc/no-direct-here"})
    assert f.remote() is True
    pool = next(p for p in server.workers()["pools"] if p["functions"] == ["where"])
    assert [w["transport"] for w in pool["workers"]] == ["zmq"]
    log = server.log()
    assert log.count("has no direct channel") == 1 and "/proc/no-direct-here" in log


def test_nobody_but_the_server_talks_through_a_workers_channel(server, tmp_path):
    """Once the server is connected, the worker's socket is gone: another process (even
    one that knows the secret) cannot connect to it, so it gets nothing run."""
    info = register_function(channel, connection=server.connection).remote()
    for path in (os.path.join(info["dir"], "socket"), info["dir"]):
        intruder = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        with pytest.raises(OSError):
            intruder.connect(path)
        intruder.close()
    assert register_function(channel, connection=server.connection).remote()["connected"]  # it goes on serving


def peer(path, *messages):
    """A process's connection to a channel's socket, having sent `messages` (dicts)."""
    from jupyter_stream import wire

    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(path)
    for message in messages:
        wire.send_parts(sock, wire.direct_parts(message))
    return sock


def test_the_channel_takes_messages_only_from_the_peer_that_presented_the_secret(tmp_path, monkeypatch):
    """Before the server: a peer that says nothing (for HELLO_TIMEOUT), sends something else
    first, a wrong secret, or garbage, is dropped and nothing it sent is taken. The first
    with the secret is the server, and what it sends after (in the same write too) arrives,
    buffers included; after that nobody can connect."""
    import threading

    from jupyter_stream import wire
    from jupyter_stream.worker import direct

    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path))
    monkeypatch.setattr(direct, "HELLO_TIMEOUT", 0.5)
    got, connected = [], threading.Event()
    chan = direct.DirectChannel(lambda data, buffers: got.append((data, [bytes(b) for b in buffers])), connected.set)

    def read_until_closed():
        try:
            chan.read_forever()
        except ConnectionError:  # the test's server socket closed at its end
            pass

    threading.Thread(target=read_until_closed, daemon=True).start()
    try:
        silent = peer(chan.path)
        stranger = peer(chan.path, {"op": "ping", "n": 1})
        wrong = peer(chan.path, {"op": "hello", "secret": "not the secret"}, {"op": "ping", "n": 2})
        garbage = peer(chan.path)
        garbage.sendall(b"\xff" * 64)
        huge = peer(chan.path)
        huge.sendall(wire.direct_parts({"op": "hello", "secret": chan.secret})[0][:4] + (1 << 40).to_bytes(8, "little"))
        time.sleep(1.5)
        assert got == [] and not connected.is_set()
        for sock in (silent, stranger, wrong, garbage, huge):  # each was dropped: it reads the end
            sock.settimeout(5)
            assert sock.recv(10) == b""
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        server.connect(chan.path)
        wire.send_parts(server, wire.direct_parts({"op": "hello", "secret": chan.secret})
                        + wire.direct_parts({"op": "ping", "n": 3}, [b"buffer", b"x" * 100_000]))
        assert connected.wait(5)
        wire.send_parts(server, wire.direct_parts({"op": "ping", "n": 4}))
        with pytest.raises(OSError):  # the secret again, from another peer: too late, the socket is gone
            peer(chan.path, {"op": "hello", "secret": chan.secret})
        deadline = time.monotonic() + 5
        while len(got) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert got == [({"op": "ping", "n": 3}, [b"buffer", b"x" * 100_000]), ({"op": "ping", "n": 4}, [])]
        assert stat.S_IMODE(os.stat(chan.dir).st_mode) == 0o700
        # the worker's messages to the server, large ones in pieces
        sending = threading.Thread(target=chan.send, args=({"op": "pong", "n": 5}, [b"y" * 300_000]))
        sending.start()  # more than the socket holds: it waits for this reader
        reader = wire.DirectReader()
        server.settimeout(5)
        messages = []
        while not messages:
            target = reader.target()
            if target is not None:
                messages = reader.received(server.recv_into(target))
            else:
                messages = reader.feed(server.recv(4096))
        assert messages[0][0] == {"op": "pong", "n": 5} and bytes(messages[0][1][0]) == b"y" * 300_000
        sending.join(5)
    finally:
        chan.remove()


def test_a_worker_killed_mid_stream_and_mid_map_loses_nothing(server):
    def ticks(n: int = 100):
        import os
        import time

        for i in range(n):
            yield f"data: {os.getpid()} {i}\n\n"
            time.sleep(0.05)

    register_endpoint(ticks, connection=server.connection)
    with httpx.stream("GET", server.url + "stream/ticks", headers=server.headers, timeout=30) as r:
        lines = r.iter_lines()
        first = next(line for line in lines if line.startswith("data: "))
        pid = int(first.split()[1])
        os.kill(pid, 9)
        killed = time.monotonic()
        rest = [line for line in lines if line]
    assert "event: error" in rest and any("WorkerDied" in line for line in rest), rest[-3:]
    assert time.monotonic() - killed < 2.0

    def tag(x):
        import os
        import time

        time.sleep(0.0005)
        return x, os.getpid()

    f = register_function(tag, connection=server.connection)
    server.wait_for_workers(2)
    seen, killed_one = [], False
    for x, pid in f.map(range(3000)):
        seen.append(x)
        if len(seen) == 500 and not killed_one:
            os.kill(pid, 9)
            killed_one = True
    assert sorted(seen) == list(range(3000)) and len(seen) == 3000


def test_large_chunks_arrive_whole_and_in_order(server):
    """1 MiB chunks go to the socket as they came from the worker (no framing copy): the
    bytes arrive whole, in order, chunked properly (httpx checks the framing)."""
    import hashlib

    def blobs(n: int = 12):
        import hashlib

        for i in range(n):
            yield hashlib.sha256(str(i).encode()).digest() * (1 << 15)  # 1 MiB, different each time

    register_endpoint(blobs, connection=server.connection, media_type="application/octet-stream")
    body = httpx.get(server.url + "stream/blobs", headers=server.headers, timeout=60).content
    assert body == b"".join(hashlib.sha256(str(i).encode()).digest() * (1 << 15) for i in range(12))


def test_messages_come_out_whole_however_the_stream_is_cut():
    """The channel's framing (`wire.direct_parts` / `wire.DirectReader`): a run of messages,
    small and large (received into their own buffer), cut into pieces at random places,
    comes out as the same messages in the same order; bytes that are not the framing raise."""
    import random

    from jupyter_stream import wire

    rng = random.Random(7)
    sent = []
    for n in range(60):
        buffers = [rng.randbytes(rng.choice([0, 1, 100, 70_000, 300_000])) for _ in range(rng.randint(0, 3))]
        sent.append(({"op": "out", "id": f"c{n}", "n": n}, buffers))
    stream = b"".join(bytes(p) for data, buffers in sent for p in wire.direct_parts(data, buffers))
    for _ in range(5):
        reader, got, pos = wire.DirectReader(), [], 0
        while pos < len(stream):
            target = reader.target()
            if target is not None:  # a large message: straight into its buffer
                count = min(target.nbytes, rng.randint(1, 200_000), len(stream) - pos)
                target[:count] = stream[pos:pos + count]
                got += reader.received(count)
            else:
                count = rng.randint(1, 50_000)
                got += reader.feed(stream[pos:pos + count])
            pos += count
        assert [(data, [bytes(b) for b in buffers]) for data, buffers in got] == sent
        assert reader.target() is None and not reader.pending
    for garbage, why in ((b"\x00\x00\x00\x00", "0 parts"), ((5000).to_bytes(4, "little"), "5000 parts"),
                         ((1).to_bytes(4, "little") + (2).to_bytes(8, "little") + b"{x", "Expecting")):
        with pytest.raises(ValueError, match=why):
            wire.DirectReader().feed(garbage)
    with pytest.raises(ValueError, match="at most 4096"):
        wire.DirectReader(max_bytes=4096).feed(wire.direct_parts({"op": "hello"}, [b"x" * 5000])[0])


def test_a_runtime_directory_too_deep_for_a_socket_path_still_gets_a_channel(tmp_path, monkeypatch):
    """A unix socket's path is at most about 100 bytes: a deeper runtime directory puts the
    channel's private directory in the system's temporary one instead of going without."""
    import tempfile

    from jupyter_stream.worker import direct

    deep = tmp_path / ("d" * 60) / ("e" * 60)
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(deep))
    chan = direct.DirectChannel(lambda data, buffers: None, lambda: None)
    try:
        assert os.path.dirname(chan.dir) == tempfile.gettempdir() and len(chan.path) <= direct.MAX_SOCKET_PATH
        assert stat.S_IMODE(os.stat(chan.dir).st_mode) == 0o700
    finally:
        chan.listener.close()
        chan.remove()
    shallow = tempfile.mkdtemp(prefix="rt")  # (pytest's own directories are too deep already)
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", shallow)
    chan = direct.DirectChannel(lambda data, buffers: None, lambda: None)
    try:
        assert os.path.dirname(chan.dir) == shallow
    finally:
        chan.listener.close()
        chan.remove()
        os.rmdir(shallow)


def test_a_token_sent_directly_never_overtakes_one_the_sender_holds(server):
    """A run sends a token itself when it comes a while after its previous one, and leaves
    tokens that come close together to the sender thread. If the sender has taken a token
    but not yet written it (here: token 1, held up 0.3 s before writing, as a busy sender
    can be), the run's next token waits its turn instead of overtaking it."""

    def ordered(n: int = 12):
        import threading
        import time

        import jupyter_stream.worker.runtime as runtime

        direct = runtime._worker.direct
        send_parts = type(direct).send_parts

        def held_up(parts):
            if threading.current_thread().name == "jupyter-stream-sender" and b"data: 1\n" in b"".join(map(bytes, parts)):
                time.sleep(0.3)
            send_parts(direct, parts)

        direct.send_parts = held_up
        try:
            for i in range(n):
                yield f"data: {i}\n\n"
                time.sleep(0.0002 if i % 2 == 0 else 0.005)  # close together, then spaced
        finally:
            del direct.send_parts  # (the class's again)

    register_endpoint(ordered, connection=server.connection, max_workers=1, env={"POOL": "ordered"})
    body = httpx.get(server.url + "stream/ordered", headers=server.headers, timeout=60).text
    assert body == "".join(f"data: {i}\n\n" for i in range(12)), body
