"""Streaming endpoints end to end: a real jupyter-server, real worker kernels, real clients."""

import asyncio
import json
import os
import re
import signal
import subprocess
import tempfile
import threading
import time

import httpx
import pytest
from tornado.httpclient import HTTPRequest
from tornado.websocket import websocket_connect

from jupyter_stream import StreamingResponse, sse
from jupyter_stream.client.functions import register_function


def read_events(response):
    """(arrival time, event text) for each SSE event of a streaming httpx response."""
    events, buf = [], ""
    for text in response.iter_text():
        buf += text
        while "\n\n" in buf:
            event, buf = buf.split("\n\n", 1)
            if not event.startswith(":"):  # skip heartbeat comments
                events.append((time.monotonic(), event))
    return events


def seconds_until_finally(server, endpoint, marker):
    """Read the first chunk of `endpoint`, hang up, and time how long until the generator's
    `finally` writes `marker` (None if it has not within 5 s)."""
    with httpx.stream("GET", endpoint.url, params={"marker": marker}, headers=server.headers, timeout=30) as r:
        for _ in r.iter_bytes():
            break
    closed_at = time.monotonic()
    while time.monotonic() - closed_at < 5:
        if os.path.exists(marker):
            return time.monotonic() - closed_at
        time.sleep(0.02)
    return None


def test_reference_example_streams_with_curl(jstream_start_server):
    """Modal's first example through `curl --no-buffer`, on a server whose worker starts cold."""
    server = jstream_start_server(["--JupyterStream.min_workers=0"])

    def fake_event_streamer():
        for i in range(10):
            yield f"data: some data {i}\n\n".encode()
            time.sleep(0.5)

    def stream_me():
        return StreamingResponse(fake_event_streamer(), media_type="text/event-stream")

    endpoint = server.register(stream_me)
    assert server.workers()["workers"] == []  # nothing warm: the first request starts a kernel
    start = time.monotonic()
    curl = subprocess.Popen(
        ["curl", "--no-buffer", "-sS", "-H", f"Authorization: token {server.token}", endpoint.url],
        stdout=subprocess.PIPE,
    )
    arrivals = []
    for line in curl.stdout:
        if line.startswith(b"data: "):
            arrivals.append((time.monotonic() - start, line.decode().strip()))
    assert curl.wait() == 0
    assert [text for _, text in arrivals] == [f"data: some data {i}" for i in range(10)]
    assert arrivals[0][0] <= 1.5, f"first event after {arrivals[0][0]:.2f} s"
    assert arrivals[-1][0] - arrivals[0][0] >= 4.0


def test_generator_forms_and_chunk_encoding(jstream_server):
    def gen(n: int = 3):
        for i in range(n):
            yield f"data: {i}\n\n"

    async def agen(n: int = 2):
        import asyncio

        for i in range(n):
            await asyncio.sleep(0.01)
            yield {"i": i}

    def returns_list():
        return ["a\n", b"b\n"]

    def returns_response():
        return StreamingResponse(iter([b"x", "y"]), media_type="text/plain", headers={"X-Demo": "1"}, status_code=202)

    def objects():
        yield {"k": "v"}
        yield [1, 2]

    def named():
        yield sse("two\nlines", event="note", id=7)

    s = jstream_server
    assert s.get(s.register(gen).url.removeprefix(s.url) + "?n=2").text == "data: 0\n\ndata: 1\n\n"
    assert s.get("stream/agen").status_code == 404  # not registered yet
    s.register(agen)
    assert s.get("stream/agen").text == 'data: {"i":0}\n\ndata: {"i":1}\n\n'
    s.register(returns_list, media_type="text/plain")
    assert s.get("stream/returns_list").text == "a\nb\n"
    s.register(returns_response)
    r = s.get("stream/returns_response")
    assert (r.status_code, r.text, r.headers["x-demo"], r.headers["content-type"]) == (202, "xy", "1", "text/plain")
    s.register(objects, media_type="application/x-ndjson")
    r = s.get("stream/objects")
    assert r.headers["content-type"] == "application/x-ndjson"
    assert [json.loads(line) for line in r.text.splitlines()] == [{"k": "v"}, [1, 2]]
    s.register(named)
    r = s.get("stream/named")
    assert r.text == "event: note\nid: 7\ndata: two\ndata: lines\n\n"
    assert r.headers["cache-control"] == "no-cache, no-transform"
    assert r.headers["x-accel-buffering"] == "no"


def test_each_chunk_reaches_the_client_at_once(jstream_server):
    def slow_second():
        yield "data: first\n\n"
        time.sleep(1.5)
        yield "data: second\n\n"

    endpoint = jstream_server.register(slow_second)
    start = time.monotonic()
    with httpx.stream("GET", endpoint.url, headers=jstream_server.headers, timeout=30) as r:
        events = read_events(r)
    assert [e for _, e in events] == ["data: first", "data: second"]
    assert events[0][0] - start < 0.5
    assert events[1][0] - events[0][0] >= 1.4


def test_parameters_from_query_and_json_body(jstream_server):
    def typed(n: int, scale: float = 1.0, loud: bool = False, tags: list[str] = []):
        for i in range(n):
            yield {"v": i * scale, "loud": loud, "tags": tags}

    endpoint = jstream_server.register(typed, media_type="application/x-ndjson")
    r = jstream_server.get("stream/typed?n=2&scale=0.5&loud=yes&tags=a&tags=b")
    assert [json.loads(x) for x in r.text.splitlines()] == [
        {"v": 0.0, "loud": True, "tags": ["a", "b"]},
        {"v": 0.5, "loud": True, "tags": ["a", "b"]},
    ]
    r = httpx.post(endpoint.url, headers=jstream_server.headers, json={"n": 1, "scale": 2}, timeout=30)
    assert r.status_code == 200 and json.loads(r.text) == {"v": 0.0, "loud": False, "tags": []}

    bad = jstream_server.get("stream/typed?n=two")
    assert bad.status_code == 400 and "parameter 'n' must be int, got 'two'" in bad.json()["message"]
    bad = jstream_server.get("stream/typed?n=1&colour=red")
    assert bad.status_code == 400 and "unknown parameter 'colour'" in bad.json()["message"]
    bad = jstream_server.get("stream/typed")
    assert bad.status_code == 400 and "missing required parameter 'n'" in bad.json()["message"]
    bad = httpx.post(endpoint.url, headers=jstream_server.headers, content=b"[1]", timeout=30)
    assert bad.status_code == 400 and "JSON object" in bad.json()["message"]


def test_http_errors_unknown_auth_and_size(jstream_server):
    def small():
        yield "ok"

    endpoint = jstream_server.register(small, media_type="text/plain")
    missing = jstream_server.get("stream/no_such_endpoint")
    assert missing.status_code == 404 and "no endpoint named 'no_such_endpoint'" in missing.json()["message"]
    assert httpx.get(endpoint.url, timeout=10).status_code in (401, 403)
    assert httpx.get(endpoint.url, headers={"Authorization": "token wrong"}, timeout=10).status_code in (401, 403)
    assert httpx.get(jstream_server.url + "api/stream/endpoints", timeout=10).status_code in (401, 403)
    assert httpx.post(jstream_server.url + "api/stream/endpoints", json={}, timeout=10).status_code in (401, 403)
    assert httpx.get(endpoint.url + f"?token={jstream_server.token}", timeout=10).text == "ok"
    big = httpx.post(endpoint.url, headers=jstream_server.headers, content=b"x" * 70000, timeout=10)
    assert big.status_code == 413 and "limit" in big.json()["message"]
    chunked = httpx.post(endpoint.url, headers=jstream_server.headers, content=iter([b"x" * 50000] * 2), timeout=10)
    assert chunked.status_code == 413 and "100000 bytes" in chunked.json()["message"]  # no length sent: counted
    # with allow_unauthenticated_access=False, jupyter-server lists handlers lacking auth
    # decorators (other extensions' may be there); none of ours may be among them
    undecorated = re.findall(r"^- \w+ of \w+ registered for (\S+)", jstream_server.log(), re.M)
    assert not [route for route in undecorated if "stream" in route], undecorated


READ_ONLY_AUTHORIZER = """
from jupyter_server.auth.authorizer import Authorizer


class ReadOnly(Authorizer):
    def is_authorized(self, handler, user, action, resource):
        return action == "read"
"""


def test_a_read_only_user_can_look_but_not_run_code(jstream_start_server, tmp_path):
    """Jupyter's authorizer decides, as for kernels: listing is "read", registering and
    calling are "execute"; a user who may not start kernels may not run code here either."""
    (tmp_path / "read_only_authorizer.py").write_text(READ_ONLY_AUTHORIZER)
    server = jstream_start_server(
        ["--JupyterStream.min_workers=0", "--ServerApp.authorizer_class=read_only_authorizer.ReadOnly"],
        env={"PYTHONPATH": str(tmp_path)},
    )
    assert httpx.post(server.url + "api/kernels", headers=server.headers, json={}, timeout=10).status_code == 403
    assert server.get("api/stream/endpoints").status_code == 200
    assert server.get("api/stream/functions").status_code == 200
    assert server.get("api/stream/workers").status_code == 200

    def hello():
        yield "hello"

    with pytest.raises(PermissionError, match="not authorized to execute"):
        server.register(hello)
    with pytest.raises(PermissionError, match="not authorized to execute"):
        register_function(lambda x: x, name="identity", connection=server.connection)
    assert server.get("stream/anything").status_code == 403

    async def open_calls_socket():
        await websocket_connect(HTTPRequest("ws" + server.url[4:] + "api/stream/calls", headers=server.headers))

    with pytest.raises(Exception, match="403"):
        asyncio.run(open_calls_socket())


def test_error_before_first_chunk_is_a_500_with_the_worker_traceback(jstream_server):
    def broken(n: int = 1):
        raise ValueError(f"bad input {n}")
        yield "never"

    jstream_server.register(broken)
    r = jstream_server.get("stream/broken?n=3")
    assert r.status_code == 500
    error = r.json()["error"]
    assert error["type"] == "ValueError" and error["message"] == "bad input 3"
    assert "in broken" in error["traceback"] and 'raise ValueError(f"bad input {n}")' in error["traceback"]


def test_error_after_streaming_began(jstream_server):
    def fails_later():
        yield "data: one\n\n"
        raise KeyError("later")

    def fails_later_ndjson():
        yield {"one": 1}
        raise KeyError("later")

    jstream_server.register(fails_later)
    with httpx.stream("GET", jstream_server.url + "stream/fails_later", headers=jstream_server.headers, timeout=30) as r:
        events = [e for _, e in read_events(r)]
    assert events[0] == "data: one"
    assert events[1].startswith("event: error\ndata: ")
    error = json.loads(events[1].split("data: ", 1)[1])["error"]  # the same object as a 500's body
    assert error["type"] == "KeyError" and "later" in error["message"] and "in fails_later" in error["traceback"]

    jstream_server.register(fails_later_ndjson, media_type="application/x-ndjson")
    received = b""
    with pytest.raises(httpx.RemoteProtocolError):
        with httpx.stream("GET", jstream_server.url + "stream/fails_later_ndjson", headers=jstream_server.headers, timeout=30) as r:
            for chunk in r.iter_bytes():
                received += chunk
    assert received == b'{"one":1}\n'  # the client saw a truncated body, not a clean end


def test_client_disconnect_closes_the_generator(jstream_server):
    marker = tempfile.mktemp(prefix="jupyter-stream-finally-")

    def endless(marker: str):
        try:
            i = 0
            while True:
                yield f"data: {i}\n\n"
                i += 1
                time.sleep(0.05)
        finally:
            with open(marker, "w") as f:
                f.write("closed")

    closed_after = seconds_until_finally(jstream_server, jstream_server.register(endless), marker)
    assert closed_after is not None, "the generator's finally did not run"
    assert closed_after <= 1.0
    # every worker is free again
    jstream_server.wait_for_workers(2)
    assert jstream_server.wait_until_idle(), jstream_server.workers()


def test_async_generator_is_cancelled_on_disconnect(jstream_server):
    marker = tempfile.mktemp(prefix="jupyter-stream-afinally-")

    async def waits(marker: str):
        import asyncio

        try:
            yield "data: hello\n\n"
            await asyncio.sleep(3600)
        finally:
            with open(marker, "w") as f:
                f.write("closed")

    closed_after = seconds_until_finally(jstream_server, jstream_server.register(waits), marker)
    assert closed_after is not None and closed_after <= 1.0


def test_backpressure_pauses_the_generator(jstream_server):
    counter = tempfile.mktemp(prefix="jupyter-stream-count-")

    def firehose(path: str):
        chunk = b"x" * (1 << 20)
        import os

        for i in range(10_000):
            with open(path + ".tmp", "w") as f:
                f.write(str(i))
            os.replace(path + ".tmp", path)  # readers never see a half-written count
            yield chunk

    endpoint = jstream_server.register(firehose, media_type="application/octet-stream")
    with httpx.stream("GET", endpoint.url, params={"path": counter}, headers=jstream_server.headers, timeout=30) as r:
        stream = r.iter_raw(1 << 16)
        next(stream)  # read one piece, then stall
        time.sleep(2.0)
        produced = int(open(counter).read())
        assert produced < 200, f"the generator ran {produced} MiB ahead of a stalled client"
        got = 0
        for piece in stream:  # drain: the generator resumes
            got += len(piece)
            if got > 300 << 20:
                break
    assert int(open(counter).read()) > 300


def test_paced_small_chunks_to_a_slow_reader_arrive_whole_and_in_order(jstream_server):
    """Paced chunks (each 1 ms or more after the last) are sent by the worker's call thread
    and written by the server's reader as they come; a client that stalls, then reads,
    still gets every byte in order, and a stream that keeps flowing gets no heartbeat
    (the shared server's is 1 s) even though its relay was never woken."""

    def paced(n: int = 1500):
        for i in range(n):
            if i % 2 == 0:
                time.sleep(0.0015)
            yield f"data: {i:06d} {'x' * 8000}\n\n"

    endpoint = jstream_server.register(paced, media_type="text/event-stream")
    with httpx.stream("GET", endpoint.url, headers=jstream_server.headers, timeout=60) as r:
        pieces = r.iter_raw(4096)
        body = bytearray(next(pieces))
        time.sleep(1.5)  # the server's writes back up meanwhile
        for piece in pieces:
            body += piece
    text = body.decode()
    assert ": keep-alive" not in text
    numbers = [int(event.split()[1]) for event in text.split("\n\n") if event]
    assert numbers == list(range(1500))

    # and one that stops flowing for longer than the heartbeat still gets one
    def pause():
        for i in range(3):
            yield f"data: {i}\n\n"
            time.sleep(0.003)
        time.sleep(1.6)
        yield "data: end\n\n"

    jstream_server.register(pause, media_type="text/event-stream")
    text = jstream_server.get("stream/pause").text
    assert text == "data: 0\n\ndata: 1\n\ndata: 2\n\n: keep-alive\n\ndata: end\n\n"


def test_killed_worker_ends_the_stream_and_is_replaced(jstream_server):
    def forever():
        import os

        yield f"data: {os.getpid()}\n\n"
        while True:
            time.sleep(0.1)
            yield "data: tick\n\n"

    def quick():
        yield "data: ok\n\n"

    jstream_server.register(forever)
    jstream_server.register(quick)
    jstream_server.wait_for_workers(2)
    with httpx.stream("GET", jstream_server.url + "stream/forever", headers=jstream_server.headers, timeout=30) as r:
        lines = r.iter_lines()
        pid = int(next(lines).split("data: ")[1])
        os.kill(pid, signal.SIGKILL)
        killed_at = time.monotonic()
        rest = list(lines)
    assert time.monotonic() - killed_at <= 2.0
    assert "event: error" in rest
    error = json.loads(rest[rest.index("event: error") + 1].split("data: ", 1)[1])["error"]
    assert error["type"] == "WorkerDied" and "retry" in error["message"]
    assert jstream_server.get("stream/quick").text == "data: ok\n\n"
    workers = jstream_server.wait_for_workers(2)
    assert pid not in [w["pid"] for w in workers]
    assert jstream_server.workers()["replaced"] >= 1


def test_reregistering_replaces_without_breaking_streams_in_flight(jstream_server):
    def versioned():
        for i in range(6):
            yield f"data: v1 {i}\n\n"
            time.sleep(0.1)

    jstream_server.register(versioned)
    results = {}

    def consume():
        results["old"] = jstream_server.get("stream/versioned").text

    t = threading.Thread(target=consume)
    t.start()
    time.sleep(0.2)

    def versioned():  # noqa: F811 - the notebook re-runs the cell with new code
        yield "data: v2\n\n"

    reply = jstream_server.register(versioned)
    assert jstream_server.get("stream/versioned").text == "data: v2\n\n"
    t.join(10)
    assert results["old"] == "".join(f"data: v1 {i}\n\n" for i in range(6))
    listed = jstream_server.get("api/stream/endpoints").json()["endpoints"]
    assert reply.url in [e["url"] for e in listed]


def test_idle_sse_stream_gets_a_heartbeat(jstream_server):
    def quiet():
        yield "data: start\n\n"
        time.sleep(2.5)
        yield "data: end\n\n"

    jstream_server.register(quiet)
    text = jstream_server.get("stream/quiet").text
    assert text.startswith("data: start\n\n: keep-alive\n\n") and text.endswith("data: end\n\n")


def test_a_slow_first_chunk_keeps_the_response_own_headers(jstream_server):
    """The heartbeat (1 s here) follows the media type the function returned, not the
    endpoint's default: a plain-text response waits quietly, with its own status and headers."""

    def report():
        def body():
            time.sleep(1.5)
            yield "ready\n"

        return StreamingResponse(body(), media_type="text/plain", status_code=202, headers={"X-Report": "42"})

    def waits_then_fails():
        time.sleep(1.5)
        raise RuntimeError("no data today")
        yield "never"

    jstream_server.register(report)  # registered as SSE, the default
    r = jstream_server.get("stream/report")
    assert r.status_code == 202 and r.headers["content-type"].startswith("text/plain"), r.headers
    assert r.headers["x-report"] == "42" and r.text == "ready\n"
    # an SSE stream that fails after heartbeats have begun ends with an error event
    jstream_server.register(waits_then_fails)
    r = jstream_server.get("stream/waits_then_fails")
    assert r.status_code == 200 and r.text.startswith(": keep-alive")
    assert "event: error" in r.text and "no data today" in r.text


def test_unpicklable_functions_get_a_clear_error(jstream_server):
    import pickle

    lock = threading.Lock()

    def uses_lock():
        with lock:
            yield "x"

    with pytest.raises(pickle.PicklingError, match="cannot send endpoint 'uses_lock' to the worker kernels") as raised:
        jstream_server.register(uses_lock)
    # the message names what cannot be sent, without cloudpickle's frames in front of it
    assert "it uses `lock` (a _thread.lock), which cannot be sent" in str(raised.value)
    assert raised.value.__cause__ is None and raised.value.__suppress_context__
    with pytest.raises(ValueError, match="invalid endpoint name"):
        jstream_server.register(lambda: iter(()), name="not a name")
