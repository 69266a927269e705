"""Fault injection: at each boundary (the worker's sender, the transport's reader, the
relay to the client, kernel starts, a kernel dying mid-call), inject an exception or
garbage and check that the client gets a defined answer within a bound and that the next
request on the same pool streams. No fault may leave a worker that looks idle while every
call on it hangs.

The faults are injected for real: the code of an endpoint or function runs inside the
worker kernel, so it can reach the worker's own objects (`jupyter_stream.worker.runtime`)
and break them there, send malformed messages through its real IOPub socket, or hold its
sender; kernel starts fail through real kernelspecs that exit. CI runs this file on both
transports (``JUPYTER_STREAM_TEST_WORKER_MESSAGES=channels``).
"""

import json
import os
import sys
import tempfile
import time

import cloudpickle
import httpx
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from jupyter_stream import WorkerError
from jupyter_stream.client.endpoints import register_endpoint
from jupyter_stream.client.functions import register_function

#: seconds within which a fault must have a defined answer, the worker replaced if need be
BOUND = 15.0


@pytest.fixture(scope="module")
def server(jstream_start_server):
    """Fast death detection: polls every 0.2 s, a silent worker is replaced after 3 s."""
    server = jstream_start_server([
        "--JupyterStream.min_workers=2", "--JupyterStream.max_workers=4",
        "--JupyterStream.worker_poll_interval=0.2", "--JupyterStream.worker_ping_timeout=3",
        "--JupyterStream.cancel_grace_period=1", "--JupyterStream.sse_heartbeat_interval=1",
    ])
    server.wait_for_workers(2)
    return server


def trivial():
    yield "data: ok\n\n"


def streams_again(server, bound=BOUND):
    """The next request on the default pool streams, within `bound` seconds."""
    register_endpoint(trivial, connection=server.connection)
    deadline = time.monotonic() + bound
    while True:
        try:
            r = httpx.get(server.url + "stream/trivial", headers=server.headers, timeout=bound)
            if r.status_code == 200 and r.text == "data: ok\n\n":
                return
            problem = f"{r.status_code} {r.text[:300]}"
        except httpx.HTTPError as e:
            problem = repr(e)
        assert time.monotonic() < deadline, f"the pool does not stream again: {problem}\n{server.log()[-3000:]}"
        time.sleep(0.2)


def timed_get(server, path, bound=BOUND, **kw):
    start = time.monotonic()
    r = httpx.get(server.url + path, headers=server.headers, timeout=bound, **kw)
    return r, time.monotonic() - start


def pids(server):
    return {w["pid"] for w in server.workers()["workers"] if w["alive"]}


# -- the worker's sender ---------------------------------------------------------------


def test_a_printed_lone_surrogate_neither_stops_the_worker_nor_its_stream(server):
    """Defect 1: half an emoji (as half-decoded LLM tokens have) printed or yielded used
    to kill the worker's sender thread; every later call on that worker hung."""

    def half_emoji(n: int = 3):
        for i in range(n):
            print("token \ud83d", i)
            yield f"data: {i} \ud83d\n\n"

    def half_emoji_value(x):
        print("value \ud83d")
        return "\ud83d" + x

    # one worker in a pool of its own: every call lands on the same kernel
    register_endpoint(half_emoji, connection=server.connection, max_workers=1, env={"FAULT": "surrogate"})
    f = register_function(half_emoji_value, connection=server.connection, max_workers=1, env={"FAULT": "surrogate"})
    for _ in range(3):
        r, took = timed_get(server, "stream/half_emoji")
        assert r.status_code == 200 and took < BOUND, (r.status_code, r.text)
        assert r.text == "".join(f"data: {i} \ufffd\n\n" for i in range(3))
        assert f.remote("!") == "\ud83d!"  # a value is pickled: it comes back as it was
    info = server.get("api/stream/endpoints/half_emoji").json()
    assert any("token \ufffd 2" in o["line"] for o in info["output"]), info["output"]
    pool = next(p for p in server.workers()["pools"] if p["endpoints"] == ["half_emoji"])
    assert pool["replaced"] == 0 and len(pool["workers"]) == 1, pool


def carrier(worker):
    """What the worker's messages leave through now: its direct channel once the server is
    connected to it, else the kernel's session onto IOPub (both have a `send`)."""
    return worker.direct if worker.direct is not None and worker.direct.connected else worker.session


def break_sender_once():
    """Makes the worker's next message fail to send, once (the sender's boundary)."""
    import jupyter_stream.worker.runtime as runtime

    worker = runtime._worker
    out = carrier(worker)
    real = out.send
    state = {"left": 1}

    def op(args, kwargs):
        """The worker message's op: `data` itself on the direct channel, a comm message's
        content's data on IOPub (the session's send(stream, msg_type, content, ...))."""
        for value in [*args, *kwargs.values()]:
            if isinstance(value, dict):
                data = value.get("data") if "comm_id" in value else value
                if isinstance(data, dict) and "op" in data:
                    return data["op"]
        return None

    def send(*args, **kwargs):
        import threading

        # a call's output only: a pong going out first (pings come every poll) has no call to end
        if threading.current_thread().name == "jupyter-stream-sender" and state["left"] and op(args, kwargs) == "out":
            state["left"] -= 1
            raise RuntimeError("injected: the socket refused this message")
        return real(*args, **kwargs)

    out.send = send
    return worker


def test_a_message_the_sender_cannot_send_ends_its_call_not_the_worker(server):
    def unlucky():
        import os

        break_sender_once()
        yield f"data: first from {os.getpid()}\n\n"  # sent directly by this thread
        yield "data: second\n\n"  # by the sender: this message fails

    register_endpoint(unlucky, connection=server.connection, max_workers=1, env={"FAULT": "sender-once"})
    r, took = timed_get(server, "stream/unlucky")
    assert took < BOUND
    assert r.status_code == 200 and "event: error" in r.text and "could not send this call's output" in r.text, r.text
    assert "injected: the socket refused this message" in r.text
    pid = int(r.text.split("first from ")[1].split()[0])
    # the same worker serves the next call: the sender went on
    r, took = timed_get(server, "stream/unlucky")
    assert f"first from {pid}" in r.text, r.text


def test_a_sender_that_cannot_send_at_all_gets_its_worker_replaced(server):
    def doomed():
        import jupyter_stream.worker.runtime as runtime

        worker = runtime._worker

        def refuse(*args, **kwargs):
            raise OSError("injected: IOPub is gone")

        yield "data: started\n\n"
        carrier(worker).send = refuse
        yield "data: never arrives\n\n"

    register_endpoint(doomed, connection=server.connection, max_workers=1, env={"FAULT": "sender-dead"})
    r, took = timed_get(server, "stream/doomed")
    assert took < BOUND
    assert r.text.startswith("data: started\n\n") and "event: error" in r.text and "WorkerDied" in r.text, r.text
    assert "injected: IOPub is gone" in server.log()  # the worker said why, in one line, before it exited
    r, took = timed_get(server, "stream/doomed")  # its pool starts another worker
    assert r.text.startswith("data: started"), r.text
    streams_again(server)


def test_a_sender_that_hangs_is_found_by_its_pings(server):
    """A worker whose sender is stuck gets no new calls once it is silent (it is not
    reported idle), and is replaced after the ping timeout (3 s here)."""

    def hangs():
        import threading
        import time

        import jupyter_stream.worker.runtime as runtime

        worker = runtime._worker
        out = carrier(worker)
        real = out.send

        def send(*args, **kwargs):
            if threading.current_thread().name == "jupyter-stream-sender":
                time.sleep(10**6)
            return real(*args, **kwargs)

        yield "data: started\n\n"
        out.send = send
        yield "data: stuck behind the sender\n\n"

    register_endpoint(hangs, connection=server.connection, max_workers=1, env={"FAULT": "sender-hangs"})
    start = time.monotonic()
    with httpx.stream("GET", server.url + "stream/hangs", headers=server.headers, timeout=BOUND) as r:
        body = b""
        states = set()
        for chunk in r.iter_bytes():
            body += chunk
            pool = next(p for p in server.workers()["pools"] if p["endpoints"] == ["hangs"])
            states |= {w["state"] for w in pool["workers"]} | {"unresponsive" for w in pool["workers"] if w["unresponsive"]}
    took = time.monotonic() - start
    assert b"event: error" in body and b"stopped answering" in body, body
    assert 2.5 < took < BOUND, took
    assert "idle" not in states
    streams_again(server)


# -- the transport's reader ------------------------------------------------------------

MALFORMED = {
    "no id": {"op": "out", "end": True},
    "seq not a number": {"op": "out", "id": "x", "seq": "7"},
    "items without their buffers": {"op": "out", "id": "x", "items": 1},
    "items of the old format": {"op": "out", "id": "x", "items": [[0, True]], "sizes": [0]},
    "sizes past the buffer": {"op": "out", "id": "x", "sizes": [10**6]},
    "unknown op": {"op": "explode"},
    "not an object": [1, 2, 3],
    "error without a message": {"op": "out", "id": "x", "end": True, "error": {"type": "X"}},
}


@pytest.mark.parametrize("kind", list(MALFORMED))
def test_a_malformed_message_gets_its_worker_replaced(server, kind):
    """Defect 3: one malformed message used to end the transport's reader, unlogged; the
    worker was never replaced and every call on it hung."""

    def garbage(message: str):
        import json
        import os

        import jupyter_stream.worker.runtime as runtime

        yield f"data: {os.getpid()}\n\n"
        runtime._worker.send(json.loads(message))
        yield "data: not after garbage\n\n"

    register_endpoint(garbage, connection=server.connection)
    r, took = timed_get(server, "stream/garbage", params={"message": json.dumps(MALFORMED[kind])})
    assert took < BOUND
    assert "event: error" in r.text and "malformed message" in r.text, r.text
    pid = int(r.text.split("data: ")[1].split()[0])
    deadline = time.monotonic() + BOUND
    while pid in pids(server):
        assert time.monotonic() < deadline, "the worker that sent garbage was not replaced"
        time.sleep(0.1)
    assert "sent a malformed message" in server.log()
    streams_again(server)


@pytest.mark.parametrize("where", ["iopub", "direct"])
def test_a_message_that_does_not_decode_gets_its_worker_replaced(server, where):
    """Raw frames that do not decode, on the worker's IOPub socket (a bad signature) or on
    its direct channel (not JSON): the reader that gets them cannot read them, stops, and
    says so; the worker is replaced within a second or two, well before its pings would."""

    def forged(where: str):
        import os
        import time

        import jupyter_stream.worker.runtime as runtime

        worker = runtime._worker
        yield f"data: {os.getpid()}\n\n"
        time.sleep(0.3)  # the chunk leaves through the sender thread: let it go first
        if where == "iopub":
            worker.kernel.iopub_socket.send_multipart(
                [worker.topic, b"<IDS|MSG>", b"0" * 64, b"{}", b"{}", b"{}", b"{}"])
        else:
            with worker.direct.lock:  # one part, of 8 bytes, that is not JSON
                worker.direct.sock.sendall((1).to_bytes(4, "little") + (8).to_bytes(8, "little") + b"not json")
        yield "data: later\n\n"

    if where == "direct" and os.environ.get("JUPYTER_STREAM_TEST_WORKER_MESSAGES") in ("zmq", "channels"):
        pytest.skip("this run's workers have no direct channel")
    register_endpoint(forged, connection=server.connection)
    r, took = timed_get(server, "stream/forged", params={"where": where})
    pid = int(r.text.split("data: ")[1].split()[0])
    deadline = time.monotonic() + 2.5  # before the 3 s ping timeout: the reader said so
    while pid in pids(server):
        assert time.monotonic() < deadline, "the worker that sent garbage was not replaced"
        time.sleep(0.05)
    assert "cannot be reached: its message reader stopped" in server.log()
    streams_again(server)


@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@example([{"op": "out", "end": True}])
@example([{"op": "out", "id": "OWN", "seq": "7"}])
@example([{"op": "out", "id": "OWN", "items": 1, "buffers": [b"x", b"\0" * 8, b"\1" + b"\0" * 7, b"\1"]}])
@example([{"op": "out", "id": "OWN", "items": 1, "buffers": [b"x", b"\0" * 8, b"\7" + b"\0" * 7, b"\3"]}])
@given(st.lists(st.fixed_dictionaries({
    "op": st.sampled_from(["out", "ready", "pong", "stuck", "broken", "zap"]),
}, optional={
    "id": st.one_of(st.text(max_size=8), st.integers(), st.none(), st.just("OWN")),
    "seq": st.one_of(st.integers(-3, 10**6), st.text(max_size=3), st.none()),
    "end": st.booleans(),
    "sizes": st.one_of(st.lists(st.integers(-1, 40), max_size=4), st.text(max_size=3)),
    "items": st.one_of(st.integers(-1, 3), st.lists(st.lists(st.one_of(st.integers(-1, 5), st.booleans()), max_size=3), max_size=4),
                       st.none()),
    "print": st.one_of(st.lists(st.lists(st.text(max_size=5), max_size=3), max_size=2), st.integers()),
    "error": st.one_of(st.none(), st.dictionaries(st.sampled_from(["type", "message"]), st.text(max_size=5))),
    "start": st.one_of(st.none(), st.integers(), st.dictionaries(st.text(max_size=4), st.integers(), max_size=2)),
    "pid": st.integers(-1, 5), "n": st.integers(-1, 5), "reason": st.one_of(st.text(max_size=5), st.integers()),
    "buffers": st.lists(st.binary(max_size=40), max_size=4),
}), min_size=1, max_size=4))
def test_fuzzed_worker_messages_never_leave_a_worker_wedged(fuzz_server, messages):
    """Random messages from inside a worker (ops, ids, seqs, buffers; sometimes aimed at
    the call that sends them): whatever they do, that call ends within the bound, and the
    next call on the same one-worker pool streams (on that worker, or its replacement:
    never on a worker that looks idle while nothing reaches it)."""

    messages = [{**m, "buffers": [b.decode("latin-1") for b in m.get("buffers", [])]} for m in messages]
    r, took = timed_get(fuzz_server, "stream/fuzz", params={"messages": json.dumps(messages)})
    assert took < BOUND, took
    assert r.text.startswith("data: sending\n\n") or r.status_code == 500 and "WorkerDied" in r.text, r.text
    r, took = timed_get(fuzz_server, "stream/fuzz_next")
    assert r.text == "data: ok\n\n" and took < BOUND, (r.status_code, r.text)


def fuzz(messages: str):
    import json

    import jupyter_stream.worker.runtime as runtime

    worker = runtime._worker
    own = runtime._current_run.get().id
    yield "data: sending\n\n"
    for message in json.loads(messages):
        buffers = [m.encode("latin-1") for m in message.pop("buffers", [])]
        if message.get("id") == "OWN":
            message["id"] = own
        worker.send(message, buffers)
    yield "data: sent\n\n"


def fuzz_next():
    yield "data: ok\n\n"


@pytest.fixture(scope="module")
def fuzz_server(server):
    """`fuzz` and `fuzz_next` share a pool of one worker."""
    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the conftest's does so per test, not here
    try:
        for fn in (fuzz, fuzz_next):
            register_endpoint(fn, connection=server.connection, max_workers=1, env={"FAULT": "fuzz"})
    finally:
        cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
    return server


# -- the relay to the client -----------------------------------------------------------


@pytest.mark.parametrize("change, complaint", [
    ('response.headers = {"X-Note": "a\\nb"}', "line break"),
    ('response.headers = {"X-Note": None}', "must be a str or a number"),
    ("response.status_code = 304", "allows a body"),
    ("response.status_code = 101", "from 200 to 599"),
])
def test_a_response_tornado_refuses_is_a_500_and_frees_its_worker(server, change, complaint):
    """Defect 2: a header or status tornado refuses used to become a 500 that never
    cancelled the call; the worker stayed busy for good. (StreamingResponse checks them
    when it is made; these change them afterwards, as a buggy library could.)"""
    code = (
        "def bad_response():\n"
        "    import time\n"
        "    from jupyter_stream import StreamingResponse\n"
        "    def forever():\n"
        "        while True:\n"
        "            yield 'data: x\\n\\n'\n"
        "            time.sleep(0.05)\n"
        "    response = StreamingResponse(forever(), media_type='text/event-stream')\n"
        f"    {change}\n"
        "    return response\n"
    )
    scope = {}
    exec(compile(code, "<bad_response>", "exec"), scope)
    register_endpoint(scope["bad_response"], connection=server.connection, max_workers=1, env={"FAULT": "relay"})
    r, took = timed_get(server, "stream/bad_response")
    assert r.status_code == 500 and took < BOUND, r.text
    assert complaint in r.json()["error"]["message"], r.text
    pool = next(p for p in server.workers()["pools"] if p["endpoints"] == ["bad_response"])
    deadline = time.monotonic() + 5
    while any(w["busy"] for w in pool["workers"]):
        assert time.monotonic() < deadline, pool
        time.sleep(0.1)
        pool = next(p for p in server.workers()["pools"] if p["endpoints"] == ["bad_response"])


def test_streaming_response_checks_status_and_headers_where_it_is_made():
    from jupyter_stream import StreamingResponse

    with pytest.raises(ValueError, match="line break"):
        StreamingResponse(iter(()), headers={"X-Note": "a\r\nSet-Cookie: x=1"})
    with pytest.raises(ValueError, match="header name"):
        StreamingResponse(iter(()), headers={"Bad Name": "1"})
    with pytest.raises(ValueError, match="not 204 or 304"):
        StreamingResponse(iter(()), status_code=204)
    assert StreamingResponse(iter(()), headers={"X-Count": 3}).headers == {"X-Count": "3"}


# -- kernel starts and deaths ----------------------------------------------------------


def kernelspec(root, name, argv):
    path = os.path.join(root, "kernels", name)
    os.makedirs(path)
    with open(os.path.join(path, "kernel.json"), "w") as f:
        json.dump({"argv": argv, "display_name": name, "language": "python"}, f)


@pytest.fixture(scope="module")
def kernels_server(jstream_start_server):
    """Kernelspecs that fail to start: one that always exits, one whose first start
    exits and later ones work, one that takes 3 s to start."""
    root = tempfile.mkdtemp(prefix="jupyter-stream-kernels-")
    launch = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    kernelspec(root, "broken", [sys.executable, "-c", "import sys; sys.exit('broken kernel')", "{connection_file}"])
    mark = os.path.join(root, "first-start-failed")
    # exactly one start fails (the first to make the mark: two that started together both saw
    # no mark once, and both failed), after 1 s, when every call of the test has asked for its
    # start even on a loaded machine; the others take 3 s (still starting when that one fails)
    kernelspec(root, "flaky", [sys.executable, "-c",
                               f"import os, sys, time\ntry:\n    os.close(os.open({mark!r}, os.O_CREAT | os.O_EXCL))\n"
                               "except FileExistsError:\n    pass\nelse:\n    time.sleep(1); sys.exit(3)\n"
                               f"time.sleep(3)\nos.execv(sys.executable, {launch[:-1]!r} + [sys.argv[1]])", "{connection_file}"])
    kernelspec(root, "slow", [sys.executable, "-c", f"import os, sys, time\ntime.sleep(3)\n"
                              f"os.execv(sys.executable, {launch[:-1]!r} + [sys.argv[1]])", "{connection_file}"])
    server = jstream_start_server([
        "--JupyterStream.min_workers=1", "--JupyterStream.max_workers=4", "--JupyterStream.worker_poll_interval=0.2",
        "--JupyterStream.worker_startup_timeout=20",
    ], env={"JUPYTER_PATH": root})
    server.wait_for_workers(1)
    server.kernels_root = root
    return server


def test_a_kernel_that_cannot_start_fails_its_calls_at_once_and_backs_off(kernels_server):
    server = kernels_server

    def on_broken():
        return 1

    f = register_function(on_broken, connection=server.connection, kernel="broken")
    start = time.monotonic()
    with pytest.raises(WorkerError, match="could not start a worker kernel"):
        f.remote()
    assert time.monotonic() - start < BOUND
    # within the backoff, the next call hears why at once, without another start
    start = time.monotonic()
    with pytest.raises(WorkerError, match="the next try is in"):
        f.remote()
    assert time.monotonic() - start < 1.0
    log = server.log()
    assert log.count("could not start worker-") == 1, log[-3000:]
    assert "Traceback" not in log.split("could not start worker-")[1][:400]
    streams_again(server)


def test_one_failed_start_does_not_fail_calls_that_another_start_serves(kernels_server):
    """Defect 14: one failed kernel start used to fail every queued call while other
    starts were still pending."""
    server = kernels_server

    def on_flaky(x):
        import time

        time.sleep(0.5)
        return x

    f = register_function(on_flaky, connection=server.connection, kernel="flaky", max_workers=2)
    calls = [f.spawn(i) for i in range(2)]
    assert sorted(c.get(timeout=60) for c in calls) == [0, 1]
    assert "could not start worker-" in server.log()


def test_a_persisted_registration_is_restored_in_its_own_pool_and_never_over_a_newer_one(jstream_start_server):
    """Defect 7: a --persist registration with its own --env/--kernel was loaded on a
    default-pool worker at restart (and dropped if that failed); a registration made
    while the restore waited could be overwritten by the restored one."""
    persist_dir = tempfile.mkdtemp(prefix="jupyter-stream-persist-")
    root = tempfile.mkdtemp(prefix="jupyter-stream-kernels-")
    kernelspec(root, "slow", [sys.executable, "-c", "import os, sys, time\ntime.sleep(4)\n"
                              "os.execv(sys.executable, [sys.executable, '-m', 'ipykernel_launcher', '-f', sys.argv[1]])",
                              "{connection_file}"])
    options = [f"--JupyterStream.persist_dir={persist_dir}", "--JupyterStream.min_workers=1"]

    def env_value():
        import os

        return os.environ.get("ONLY_HERE", "missing")

    def slow_pool():
        return "restored"

    first = jstream_start_server(options, env={"JUPYTER_PATH": root})
    register_endpoint(env_value, connection=first.connection, persist=True, env={"ONLY_HERE": "from its pool"})
    register_endpoint(slow_pool, connection=first.connection, persist=True, kernel="slow")
    assert first.get("stream/env_value").text == "from its pool"
    first.stop()

    second = jstream_start_server(options, env={"JUPYTER_PATH": root})
    deadline = time.monotonic() + 60
    while "restored endpoint env_value" not in second.log():  # then slow_pool's restore begins: 4 s of kernel start
        assert time.monotonic() < deadline, second.log()[-4000:]
        time.sleep(0.05)

    def newer():
        return "newer"

    register_endpoint(newer, "slow_pool", connection=second.connection, persist=True)
    while "kept the newer one" not in second.log():
        assert time.monotonic() < deadline, second.log()[-4000:]
        time.sleep(0.2)
    assert second.get("stream/env_value").text == "from its pool"
    assert second.get("stream/slow_pool").text == "newer"
    assert "restored endpoint slow_pool" not in second.log()


def test_persisted_files_others_could_have_written_are_not_loaded(jstream_start_server):
    persist_dir = tempfile.mkdtemp(prefix="jupyter-stream-persist-")
    options = [f"--JupyterStream.persist_dir={persist_dir}", "--JupyterStream.min_workers=1"]

    def kept():
        return "kept"

    def tampered():
        return "should not load"

    first = jstream_start_server(options)
    register_endpoint(kept, connection=first.connection, persist=True)
    register_endpoint(tampered, connection=first.connection, persist=True)
    first.stop()
    os.chmod(os.path.join(persist_dir, "endpoint-tampered.json"), 0o666)
    os.symlink(os.path.join(persist_dir, "endpoint-kept.json"), os.path.join(persist_dir, "endpoint-linked.json"))
    with open(os.path.join(persist_dir, "endpoint-junk.json"), "w") as f:
        f.write("{not json")
    os.chmod(os.path.join(persist_dir, "endpoint-junk.json"), 0o600)

    second = jstream_start_server(options)
    deadline = time.monotonic() + 60
    while "restored endpoint kept" not in second.log() or "endpoint-tampered.json" not in second.log():
        assert time.monotonic() < deadline, second.log()[-4000:]  # (files are read in order, one after another)
        time.sleep(0.2)
    log = second.log()
    assert "endpoint-tampered.json: the file is writable by others (mode 666)" in log
    assert "endpoint-linked.json: it cannot be opened" in log
    assert "endpoint-junk.json: the file is not a stored registration" in log
    names = [e["name"] for e in second.get("api/stream/endpoints").json()["endpoints"]]
    assert names == ["kept"]
    second.stop()
    os.chmod(persist_dir, 0o777)
    third = jstream_start_server(options)
    deadline = time.monotonic() + 30
    while "the directory is writable by others" not in third.log():
        assert time.monotonic() < deadline, third.log()[-4000:]
        time.sleep(0.2)
    assert third.get("api/stream/endpoints").json()["endpoints"] == []


def test_a_kernel_dying_mid_stream_ends_it_and_the_pool_heals(server):
    def dies():
        import os
        import time

        yield "data: one\n\n"
        time.sleep(0.3)  # the kernel's IOPub thread sends it before the process goes
        os._exit(1)

    register_endpoint(dies, connection=server.connection)
    r, took = timed_get(server, "stream/dies")
    assert took < BOUND and r.text.startswith("data: one") and "WorkerDied" in r.text, r.text
    streams_again(server)

