"""The direct channel to local workers (issue 20): it is the default, it falls back to the
comm when it cannot open, nothing is lost on it when a worker dies, and nobody but the
server can talk to a worker through it."""

import os
import stat
import time

import httpx
import pytest
import zmq

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
    assert sorted(os.listdir(info["dir"])) == ["in", "out"]


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
    """A process without the secret (or with a wrong one) gets nothing run: here, a call that
    carries its own pickled function, which would write a file."""
    import json

    from jupyter_stream import wire

    def marker(path: str):
        open(path, "w").close()
        return "ran"

    info = register_function(channel, connection=server.connection).remote()
    blob = wire.cloudpickle_dumps(marker)
    ctx = zmq.Context()
    try:
        for hello in ([], [b"hello", b"wrong secret"], [b"hello", info["secret"].encode()]):
            intruder = ctx.socket(zmq.DEALER)
            intruder.setsockopt(zmq.LINGER, 0)
            intruder.connect(f"ipc://{info['dir']}/in")
            if hello:
                intruder.send_multipart(hello)
            target = tmp_path / f"intruded-{len(hello)}"
            call = wire.call_message("intruder", wire.content_hash(blob), True, "values", 1 << 20, kwargs={"path": str(target)})
            intruder.send_multipart([json.dumps(call).encode(), blob])
            time.sleep(0.5)
            intruder.close()
            # even the right secret, after the server: the channel takes only the peer that said hello first
            assert not target.exists(), hello
    finally:
        ctx.term()
    assert register_function(channel, connection=server.connection).remote()["connected"]  # it goes on serving


def test_the_channel_takes_messages_only_from_the_peer_that_presented_the_secret(tmp_path, monkeypatch):
    import json
    import threading

    from jupyter_stream.worker import direct

    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path))
    got, connected = [], threading.Event()
    chan = direct.DirectChannel(lambda data, buffers: got.append((data, [bytes(b) for b in buffers])), connected.set)
    threading.Thread(target=chan.read_forever, daemon=True).start()
    ctx = zmq.Context()
    try:
        def peer(*first):
            sock = ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(f"ipc://{chan.dir}/in")
            if first:
                sock.send_multipart(list(first))
            return sock

        stranger = peer()
        stranger.send_multipart([json.dumps({"op": "ping", "n": 1}).encode()])
        wrong = peer(b"hello", b"not the secret")
        wrong.send_multipart([json.dumps({"op": "ping", "n": 2}).encode()])
        time.sleep(0.3)
        assert got == [] and not connected.is_set()
        server = peer(b"hello", chan.secret.encode())
        assert connected.wait(5)
        server.send_multipart([json.dumps({"op": "ping", "n": 3}).encode(), b"buffer"])
        late = peer(b"hello", chan.secret.encode())  # the secret again, from another peer: too late
        late.send_multipart([json.dumps({"op": "ping", "n": 4}).encode()])
        stranger.send_multipart([json.dumps({"op": "ping", "n": 5}).encode()])
        deadline = time.monotonic() + 5
        while not got and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)
        assert got == [({"op": "ping", "n": 3}, [b"buffer"])]
        assert stat.S_IMODE(os.stat(chan.dir).st_mode) == 0o700
    finally:
        chan.remove()
        ctx.destroy(linger=0)


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
