"""The server's event stream (`GET /api/stream/events`), the running calls (`/api/stream/calls/`)
and the worker shut-down route: what the JupyterLab panel reads and does, read here with a
real HTTP client from a real server."""

import json
import threading
import time

import httpx
import pytest

from jupyter_stream import WorkerError
from jupyter_stream.client.endpoints import register_endpoint
from jupyter_stream.client.functions import register_function


class EventReader:
    """Reads an event stream in a thread; `wait_for` waits for an event that matches."""

    def __init__(self, server, headers=None):
        self.server = server
        self.events: list[tuple[str, dict]] = []
        self.cond = threading.Condition()
        self.response = None
        self.stopped = False
        self.thread = threading.Thread(target=self.read, args=(headers or server.headers,), daemon=True)
        self.thread.start()

    def read(self, headers):
        with httpx.stream("GET", self.server.url + "api/stream/events", headers=headers, timeout=httpx.Timeout(None)) as r:
            self.response = r
            kind = None
            for line in r.iter_lines():
                if self.stopped:
                    return
                if line.startswith("event: "):
                    kind = line[len("event: "):]
                elif line.startswith("data: "):
                    with self.cond:
                        self.events.append((kind, json.loads(line[len("data: "):])))
                        self.cond.notify_all()

    def wait_for(self, kind, test=lambda data: True, timeout=10.0):
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                for k, data in self.events:
                    if k == kind and test(data):
                        return data
                left = deadline - time.monotonic()
                assert left > 0, f"no {kind} event that matches in {timeout} s; got {[k for k, _ in self.events]}"
                self.cond.wait(left)

    def close(self):
        self.stopped = True


@pytest.fixture(scope="module")
def server(jstream_start_server):
    return jstream_start_server(["--JupyterStream.min_workers=1", "--JupyterStream.max_workers=3",
                                 "--JupyterStream.worker_poll_interval=0.2"])


def slow(n: int = 5):
    import time

    for i in range(n):
        yield f"data: {i}\n\n"
        time.sleep(0.3)


def test_the_event_stream_needs_jupyters_auth_and_a_share_does_not_open_it(server):
    register_endpoint(slow, connection=server.connection)
    share = server.connection.request("POST", "api/stream/shares", json={"endpoint": "slow"}).json()
    for headers, params in (({}, {}), ({"Authorization": "token wrong"}, {}), ({}, {"share": share["token"]}),
                            ({"Authorization": f"token {share['token']}"}, {}), ({}, {"token": share["token"]})):
        r = httpx.get(server.url + "api/stream/events", headers=headers, params=params, timeout=10)
        assert r.status_code == 403, (headers, params, r.status_code)


def test_a_snapshot_first_then_what_changes(server):
    reader = EventReader(server)
    try:
        snapshot = reader.wait_for("snapshot")
        assert set(snapshot) == {"server", "endpoints", "functions", "workers", "shares", "calls"}
        assert snapshot["server"]["id"] and snapshot["workers"]["pools"]

        def watched(n: int = 3):
            import time

            for i in range(n):
                yield f"data: {i}\n\n"
                time.sleep(0.4)

        start = time.monotonic()
        register_endpoint(watched, connection=server.connection, env={"KEY": "not shown"})
        event = reader.wait_for("endpoint", lambda d: d["action"] == "registered" and d["endpoint"]["name"] == "watched")
        assert time.monotonic() - start < 1.0
        info = event["endpoint"]
        assert info["path"] == "stream/watched" and info["requirements"] == {"env": ["KEY"]}
        assert "not shown" not in json.dumps(reader.events)

        streaming = threading.Thread(target=lambda: server.get("stream/watched"))
        streaming.start()
        call = reader.wait_for("call", lambda d: d["action"] == "started" and d["call"]["function"] == "watched")["call"]
        assert call["kind"] == "request" and call["id"].startswith("c")
        reader.wait_for("endpoint", lambda d: d["action"] == "stats" and d["endpoint"]["name"] == "watched"
                        and d["endpoint"]["stats"]["open_streams"] == 1)
        streaming.join(30)
        reader.wait_for("endpoint", lambda d: d["action"] == "stats" and d["endpoint"]["name"] == "watched"
                        and d["endpoint"]["stats"]["open_streams"] == 0 and d["endpoint"]["stats"]["requests"] == 1)
        ended = reader.wait_for("call", lambda d: d["action"] == "ended" and d["call"]["id"] == call["id"])
        assert ended["error"] is None and ended["call"]["done"] == len("data: 0\n\n") * 3
        stats = server.get("api/stream/endpoints/watched").json()["stats"]
        assert 0 < stats["latency_p50"] <= stats["latency_p99"] < 5

        share = server.connection.request("POST", "api/stream/shares", json={"endpoint": "watched"}).json()
        reader.wait_for("share", lambda d: d["action"] == "created" and d["share"]["id"] == share["id"])
        server.connection.request("DELETE", f"api/stream/shares/{share['id']}")
        reader.wait_for("share", lambda d: d["action"] == "revoked" and d["share"]["id"] == share["id"])
        server.connection.request("DELETE", "api/stream/endpoints/watched")
        reader.wait_for("endpoint", lambda d: d["action"] == "removed" and d["endpoint"] == {"name": "watched"})
        reader.wait_for("workers", lambda d: any("watched" in p["endpoints"] for p in d["pools"]) is False)
    finally:
        reader.close()


def test_a_running_map_is_listed_with_its_progress_and_can_be_stopped(server):
    reader = EventReader(server)
    try:
        def step(x):
            import time

            time.sleep(0.1)
            return x

        f = register_function(step, connection=server.connection)
        failure = []

        def run():
            try:
                list(f.map(range(200)))
            except WorkerError as e:
                failure.append(e)

        mapping = threading.Thread(target=run)
        mapping.start()
        progress = reader.wait_for("call", lambda d: d["call"]["kind"] == "map" and d["call"]["done"] >= 5)["call"]
        assert progress["function"] == "step" and progress["total"] == 200 and progress["lanes"] >= 1
        listed = server.get("api/stream/calls/").json()["calls"]
        assert any(c["id"] == progress["id"] for c in listed)
        assert httpx.delete(server.url + f"api/stream/calls/{progress['id']}", headers=server.headers, timeout=10).status_code == 204
        mapping.join(30)
        assert failure and "the map was stopped from JupyterLab" in str(failure[0]), failure
        ended = reader.wait_for("call", lambda d: d["action"] == "ended" and d["call"]["id"] == progress["id"])
        assert ended["call"]["done"] < 200 and ended["error"]["type"] == "WorkerError"  # a stopped map did not end well
        assert httpx.delete(server.url + "api/stream/calls/c999999", headers=server.headers, timeout=10).status_code == 404
        server.wait_until_idle(10)
    finally:
        reader.close()


def test_a_worker_can_be_shut_down_by_name(server):
    [worker] = [w for w in server.wait_for_workers(1)][:1]
    r = httpx.delete(server.url + f"api/stream/workers/{worker['name']}", headers=server.headers, timeout=10)
    assert r.status_code == 204
    deadline = time.monotonic() + 30
    while worker["pid"] in [w["pid"] for w in server.workers()["workers"]] or not server.workers()["workers"]:
        assert time.monotonic() < deadline
        time.sleep(0.2)
    assert httpx.delete(server.url + "api/stream/workers/worker-999", headers=server.headers, timeout=10).status_code == 404
