"""What a server must survive: clients that leave while their code is stuck, clients that
leave while queued, slow first chunks, and registrations that outlive a restart."""

import os
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
            except socket.timeout:
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
def wedge_server(start_stream_server):
    """The default pool's size (4 workers), with a short grace period."""
    server = start_stream_server([
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
