"""What a server must survive: clients that leave while their code is stuck, clients that
leave while queued, slow first chunks, and registrations that outlive a restart."""

import os
import re
import socket
import tempfile
import time

import httpx
import pytest


def blocked(log: str):
    """Says it started, then blocks where no cancel can reach it."""
    import os
    import time

    with open(log, "a") as f:
        f.write(f"{os.getpid()}\n")
    yield "data: started\n\n"
    time.sleep(10**6)


def trivial():
    yield "data: ok\n\n"


class Client:
    """A raw HTTP client holding one stream open until `.leave()` closes its socket."""

    def __init__(self, server, path):
        self.sock = socket.create_connection(("127.0.0.1", server.port))
        request = f"GET /{path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: token {server.token}\r\n\r\n"
        self.sock.sendall(request.encode())
        self.received = b""

    def wait_for(self, text: bytes, timeout: float) -> bool:
        self.sock.settimeout(timeout)
        deadline = time.monotonic() + timeout
        while text not in self.received and time.monotonic() < deadline:
            try:
                chunk = self.sock.recv(65536)
            except TimeoutError:
                break
            if not chunk:
                break
            self.received += chunk
        return text in self.received

    def leave(self):
        self.sock.close()


def hang_up(clients):
    for client in clients:
        client.leave()


def trivial_answers_within(server, seconds):
    start = time.monotonic()
    r = httpx.get(server.url + "stream/trivial", headers=server.headers, timeout=seconds)
    assert r.text == "data: ok\n\n"
    return time.monotonic() - start


@pytest.fixture(scope="module")
def wedge_server(jstream_start_server):
    """The default pool's size (4 workers), with a short grace period."""
    server = jstream_start_server([
        "--JupyterStream.min_workers=4", "--JupyterStream.max_workers=4",
        "--JupyterStream.cancel_grace_period=1.5", "--JupyterStream.worker_poll_interval=0.2",
    ])
    server.wait_for_workers(4)
    return server


def open_streams(server, count, log):
    return [Client(server, f"stream/blocked?log={log}") for _ in range(count)]


def test_clients_leaving_blocked_generators_do_not_wedge_the_server(wedge_server):
    """8 clients on generators blocked in time.sleep(10**6) hang up: a trivial endpoint
    answers within 2 s, queued requests never start, and the stuck kernels are replaced
    in the background while the server keeps serving."""
    server = wedge_server
    server.register(trivial)
    server.register(blocked)
    log = tempfile.mktemp(prefix="jupyter-stream-starts-")
    pids_before = {w["pid"] for w in server.workers()["workers"]}
    running = open_streams(server, 4, log)
    for client in running:
        assert client.wait_for(b"started", 30), f"a stream did not start: {client.received!r}"
    queued = open_streams(server, 4, log)
    time.sleep(1.0)
    assert server.workers()["waiting_calls"] == 4
    hang_up(queued)  # they leave while queued: dropped from the queue
    deadline = time.monotonic() + 5
    while server.workers()["waiting_calls"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.workers()["waiting_calls"] == 0
    hang_up(running)
    assert trivial_answers_within(server, 2.0) <= 2.0
    info = server.workers()
    assert sum(w["busy"] for w in info["workers"]) == 0, info
    assert len(open(log).read().split()) == 4, "a request whose client left while queued was started"
    deadline = time.monotonic() + 1.0  # the handlers are done too, not waiting for the stuck code
    while server.get("api/stream/endpoints/blocked").json()["stats"]["open_streams"]:
        assert time.monotonic() < deadline, server.get("api/stream/endpoints/blocked").json()
        time.sleep(0.05)
    # the stuck calls are interrupted (no effect in a sleep) and then their kernels are
    # replaced, while the server keeps answering
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert trivial_answers_within(server, 10.0) <= 10.0
        workers = server.workers()["workers"]
        pids = {w["pid"] for w in workers if w["alive"]}
        if len(pids) == 4 and not pids & pids_before and not any(w["abandoned"] for w in workers):
            break
        time.sleep(0.2)
    else:
        pytest.fail(f"stuck kernels were not replaced: {server.workers()}")
    assert "replacing worker-" in server.log() and "Traceback" not in server.log()


def spins(marker: str):
    """Never yields again and never sleeps: only an interrupt stops it."""
    import os

    try:
        yield f"data: started {os.getpid()}\n\n"
        x = 0
        while True:
            x += 1
    finally:
        with open(marker, "w") as f:
            f.write("stopped")


def test_a_call_that_ignores_its_cancel_is_interrupted(wedge_server):
    server = wedge_server
    server.register(trivial)
    server.register(spins)
    marker = tempfile.mktemp(prefix="jupyter-stream-spins-")
    client = Client(server, f"stream/spins?marker={marker}")
    assert client.wait_for(b"started", 30), client.received
    pid = int(client.received.split(b"started ")[1].split()[0])
    client.leave()
    assert trivial_answers_within(server, 2.0) <= 2.0
    left = time.monotonic()
    while not os.path.exists(marker) and time.monotonic() - left < 10:
        time.sleep(0.05)
    assert os.path.exists(marker), "the spinning call was never interrupted"
    assert 1.0 <= time.monotonic() - left <= 3.5  # the grace period is 1.5 s
    time.sleep(3.5)  # past twice the grace period: the kernel was not replaced, it is fine
    worker = next(w for w in server.workers()["workers"] if w["pid"] == pid)
    assert worker["alive"] and not worker["draining"] and worker["abandoned"] == 0


def slow_octets():
    import time

    time.sleep(3)
    yield b"\x00" * 10


def slow_to_return():
    """Takes its time before it even returns its response."""
    import time

    from jupyter_stream import StreamingResponse

    time.sleep(3)
    return StreamingResponse(iter([b"late"]), media_type="text/csv", status_code=202)


def fails_after_commit():
    import time

    time.sleep(2.5)
    raise RuntimeError("too late for a 500")
    yield b""


def time_to_status(server, path):
    start = time.monotonic()
    with httpx.stream("GET", server.url + path, headers=server.headers, timeout=30) as r:
        status_after = time.monotonic() - start
        body = b""
        try:
            for chunk in r.iter_bytes():
                body += chunk
        except httpx.RemoteProtocolError:
            body += b"<cut off>"
    return r, status_after, time.monotonic() - start, body


def test_responses_slow_to_start_send_their_status_after_a_second(jstream_server):
    """`commit_headers_after` (1 s): the status and headers go out before the first chunk."""
    jstream_server.register(slow_octets, media_type="application/octet-stream")
    r, status_after, total, body = time_to_status(jstream_server, "stream/slow_octets")
    assert r.status_code == 200 and r.headers["content-type"] == "application/octet-stream"
    assert r.headers["transfer-encoding"] == "chunked"
    assert 0.8 <= status_after <= 2.0, status_after
    assert total >= 2.9 and body == b"\x00" * 10
    # the function itself is slow to return: the status is the registered media type's 200
    jstream_server.register(slow_to_return, media_type="text/plain")
    r, status_after, total, body = time_to_status(jstream_server, "stream/slow_to_return")
    assert (r.status_code, r.headers["content-type"]) == (200, "text/plain") and status_after <= 2.0
    assert body == b"late"
    # a failure after the status went out cuts the body short, as other mid-stream failures
    jstream_server.register(fails_after_commit, media_type="application/octet-stream")
    r, status_after, total, body = time_to_status(jstream_server, "stream/fails_after_commit")
    assert r.status_code == 200 and status_after <= 2.0 and body == b"<cut off>"


def ticks(n: int = 3):
    for i in range(n):
        yield f"data: tick {i}\n\n"


def square(x):
    return x * x


def volatile():
    yield "data: not persisted\n\n"


def gone_module_pickle():
    """A pickle of a function by reference to a module the workers do not have."""
    import pickle
    import sys
    import types

    module = types.ModuleType("gone_module_for_the_test")
    exec("def f():\n    yield 'data: x\\n\\n'\n", module.__dict__)
    sys.modules[module.__name__] = module
    try:
        return pickle.dumps(module.f)
    finally:
        del sys.modules[module.__name__]


def test_persisted_registrations_come_back_after_a_restart(jstream_start_server, tmp_path):
    import base64
    import json

    from jupyter_stream import wire
    from jupyter_stream.client.functions import Function, register_function

    persist_dir = tmp_path / "persisted"
    options = ["--JupyterStream.min_workers=1", f"--JupyterStream.persist_dir={persist_dir}"]
    server = jstream_start_server(options)
    server.register(trivial)  # not persisted
    from jupyter_stream.client.endpoints import register_endpoint

    register_endpoint(ticks, connection=server.connection, persist=True)
    register_function(square, connection=server.connection, persist=True)
    register_endpoint(volatile, connection=server.connection, persist=True)
    register_endpoint(volatile, connection=server.connection)  # the latest registration wins
    assert sorted(p.name for p in persist_dir.iterdir()) == ["endpoint-ticks.json", "function-square.json"]
    assert persist_dir.stat().st_mode & 0o777 == 0o700
    assert all(p.stat().st_mode & 0o777 == 0o600 for p in persist_dir.iterdir())
    # a stored registration whose bytes were damaged, and one whose code needs a module
    # that is gone: both are left out with a clear log line
    record = json.loads((persist_dir / "endpoint-ticks.json").read_text())
    damaged = dict(record, name="damaged")
    blob = bytearray(base64.b64decode(record["registration"]["function"]))
    blob[len(blob) // 2] ^= 0xFF
    damaged["registration"] = dict(record["registration"], name="damaged", function=base64.b64encode(bytes(blob)).decode())
    (persist_dir / "endpoint-damaged.json").write_text(json.dumps(damaged))
    blob = gone_module_pickle()
    missing = dict(record, name="missing", fn_hash=wire.content_hash(blob))
    missing["registration"] = dict(record["registration"], name="missing", function=base64.b64encode(blob).decode())
    (persist_dir / "endpoint-missing.json").write_text(json.dumps(missing))
    (persist_dir / "endpoint-garbage.json").write_text("{not json")
    server.stop()

    restarted = jstream_start_server(options)
    deadline = time.monotonic() + 60
    while "restored function square" not in restarted.log() or "restored endpoint ticks" not in restarted.log():
        assert time.monotonic() < deadline, restarted.log()
        time.sleep(0.1)
    assert restarted.get("stream/ticks?n=2").text == "data: tick 0\n\ndata: tick 1\n\n"
    assert Function("square", connection=restarted.connection).remote(7) == 49
    assert restarted.get("stream/trivial").status_code == 404
    assert restarted.get("stream/volatile").status_code == 404
    deadline = time.monotonic() + 30
    while restarted.log().count("could not restore") < 3:
        assert time.monotonic() < deadline, restarted.log()
        time.sleep(0.1)
    log = restarted.log()
    assert "Traceback" not in log
    assert re.search(r"could not restore endpoint 'damaged' from \S+: its pickle is corrupted", log), log
    assert re.search(r"could not restore endpoint 'missing' from \S+: its pickle no longer loads on a worker "
                     r"\(ModuleNotFoundError: No module named 'gone_module_for_the_test'", log), log
    assert re.search(r"could not restore \S+endpoint-garbage.json: the file is not a stored registration", log), log
    for name in ("damaged", "missing"):
        assert restarted.get(f"stream/{name}").status_code == 404
    # deleting forgets a persisted registration: it does not come back
    Function("square", connection=restarted.connection).delete()
    assert not (persist_dir / "function-square.json").exists()
    assert restarted.get("api/stream/functions/square").status_code == 404
