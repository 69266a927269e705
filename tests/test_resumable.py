"""Resumable streams (``--resumable``): a real server, real workers and real HTTP clients
whose connections are cut in the middle of a stream. Every event arrives exactly once and
in order across the cut, the function runs once, a second client may follow the same run,
and the window, the buffer's bounds and the auth rules say what they refuse."""

import json
import os
import sys
import tempfile
import time

import cloudpickle
import httpx
import openai
import pytest

from jupyter_stream.client.endpoints import register_endpoint

BUFFER_EVENTS = 20  # the server's resumable_buffer_events, small enough to overflow


@pytest.fixture(scope="module")
def server(jstream_start_server):
    return jstream_start_server(["--JupyterStream.min_workers=2", "--JupyterStream.max_workers=3",
                                 "--JupyterStream.worker_poll_interval=0.2", "--JupyterStream.sse_heartbeat_interval=0.5",
                                 "--JupyterStream.commit_headers_after=0.3",
                                 f"--JupyterStream.resumable_buffer_events={BUFFER_EVENTS}",
                                 "--ServerApp.allow_unauthenticated_access=False"])


@pytest.fixture(scope="module")
def endpoints(server):
    """The endpoints, registered once for the module (its functions sent by value: the
    workers cannot import this module)."""
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    try:
        register_endpoint(counted, "counted", connection=server.connection, resumable=True)
        register_endpoint(counted, "short_window", connection=server.connection, resumable=1.0)
        register_endpoint(counted, "plain", connection=server.connection)
        register_endpoint(chat, "chat", connection=server.connection, openai=True, resumable=True)
        register_endpoint(counted, "other", connection=server.connection, resumable=True)
        register_endpoint(big, "big", connection=server.connection, resumable=True)
    finally:
        cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
    return server


# ---- the endpoints' functions (sent to the workers by value) ----

def counted(path: str, n: int = 10, pace: float = 0.05, own_ids: bool = False):
    """`n` events; each run leaves a line in `path`.runs and says how it ended in `path`.end."""
    import time

    with open(path + ".runs", "a") as f:
        f.write("run\n")
    done = False
    try:
        for i in range(n):
            own = f"id: mine-{i}\n" if own_ids and i % 3 == 0 else ""
            yield f"{own}data: {i}\n\n"
            time.sleep(pace)
        done = True
    finally:
        with open(path + ".end", "a") as f:
            f.write("completed\n" if done else "cancelled\n")


def big(path: str, n: int = 200, size: int = 100_000, pace: float = 0.02):
    """`n` events of `size` bytes, one every `pace` seconds."""
    import time

    with open(path + ".runs", "a") as f:
        f.write("run\n")
    for i in range(n):
        yield f"data: {i} {'x' * size}\n\n"
        time.sleep(pace)
    with open(path + ".end", "a") as f:
        f.write("completed\n")


def chat(messages: list, max_tokens: int = 64):
    """Echo the last message a word at a time, counting runs in the file it names."""
    import time

    words = str(messages[-1]["content"]).split()
    with open(words[0] + ".runs", "a") as f:
        f.write("run\n")
    for i, word in enumerate(words[1:max_tokens + 1]):
        time.sleep(0.05)
        yield ("" if i == 0 else " ") + word


# ---- helpers ----

def scratch() -> str:
    """A path prefix of the run's files (`counted` appends .runs and .end)."""
    fd, path = tempfile.mkstemp(prefix="resumable-")
    os.close(fd)
    return path


def lines_of(path: str, suffix: str) -> list[str]:
    try:
        with open(path + suffix) as f:
            return f.read().split()
    except FileNotFoundError:
        return []


def wait_for(condition, timeout: float = 10.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def events(response, limit: int | None = None):
    """SSE events of a streamed httpx response as dicts (``event``, ``id``, ``data``),
    stopping after `limit` of them (comments are skipped)."""
    got, current = [], {}
    if not hasattr(response, "sse_lines"):  # one iterator per response: read on where the last call stopped
        response.sse_lines = response.iter_lines()
    for line in response.sse_lines:
        if line == "":
            if current:
                got.append(current)
                current = {}
                if limit is not None and len(got) >= limit:
                    break
            continue
        if line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        current[name] = current[name] + "\n" + value if name == "data" and name in current else value
    else:
        if current:
            got.append(current)
    return got


def cut_after(server, path: str, count: int, url: str = "stream/counted", **params) -> tuple[str, list[dict]]:
    """Read `count` events from a new stream, then drop the connection mid-stream:
    returns the stream id (X-Stream-Id) and the events read."""
    with httpx.Client(headers=server.headers, timeout=30) as client:
        with client.stream("GET", server.url + url, params={"path": path, **params}) as r:
            assert r.status_code == 200, r.read()
            sid = r.headers["x-stream-id"]
            got = events(r, count)
    return sid, got


def resume(server, url: str = "stream/counted", headers: dict | None = None, **params) -> httpx.Response:
    return httpx.get(server.url + url, headers={**server.headers, **(headers or {})}, params=params, timeout=30)


def read(response: httpx.Response) -> list[dict]:
    return events(_Lines(response.text))


class _Lines:
    def __init__(self, text: str):
        self.text = text

    def iter_lines(self):
        yield from self.text.replace("\r\n", "\n").split("\n")


def data(evs: list[dict]) -> list[int]:
    return [int(e["data"]) for e in evs if e.get("event") is None]


# ---- the tests ----

def test_a_cut_connection_resumes_with_last_event_id_every_event_once(endpoints):
    server, path = endpoints, scratch()
    sid, first = cut_after(server, path, 5, n=40, pace=0.03, own_ids=True)
    assert len(sid) == 22 and data(first) == [0, 1, 2, 3, 4]
    assert [e["id"] for e in first] == [f"{sid}:1:mine-0", f"{sid}:2", f"{sid}:3", f"{sid}:4:mine-3", f"{sid}:5"]
    time.sleep(0.3)  # the run goes on meanwhile (a few events, fewer than the buffer holds)
    assert lines_of(path, ".end") == [], "the run was cancelled when its client left"
    r = resume(server, headers={"Last-Event-ID": first[-1]["id"]})
    assert r.status_code == 200 and r.headers["x-stream-id"] == sid
    rest = read(r)
    assert data(first) + data(rest) == list(range(40))  # every event exactly once, in order
    assert [e["id"].split(":")[1] for e in rest] == [str(i) for i in range(6, 41)]
    assert lines_of(path, ".runs") == ["run"] and lines_of(path, ".end") == ["completed"]
    # the stream is over and this client has all of it: 204 (an EventSource stops reconnecting)
    assert resume(server, headers={"Last-Event-ID": rest[-1]["id"]}).status_code == 204
    assert lines_of(path, ".runs") == ["run"]


def test_last_event_id_in_the_query_and_a_second_client_following(endpoints):
    server, path = endpoints, scratch()
    with httpx.Client(headers=server.headers, timeout=30) as client:
        with client.stream("GET", server.url + "stream/counted", params={"path": path, "n": 15, "pace": 0.05}) as r:
            sid = r.headers["x-stream-id"]
            head = events(r, 3)
            # a second client follows the same run from its start (the buffer still holds it all)
            with httpx.stream("GET", server.url + "stream/counted", params={"stream": sid}, headers=server.headers,
                              timeout=30) as follower:
                assert follower.status_code == 200 and follower.headers["x-stream-id"] == sid
                followed = events(follower)
            mine = head + events(r)
    assert data(mine) == data(followed) == list(range(15))
    assert [e["id"] for e in mine] == [e["id"] for e in followed]
    assert lines_of(path, ".runs") == ["run"]

    path = scratch()
    sid, first = cut_after(server, path, 4, n=12)
    r = resume(server, last_event_id=first[-1]["id"], token=server.token)  # ?last_event_id=, and ?token= (as EventSource sends it)
    assert data(first) + data(read(r)) == list(range(12))
    r = resume(server, stream=sid, last_event_id="10")  # ?stream= with a bare number
    assert data(read(r)) == [10, 11]
    assert lines_of(path, ".runs") == ["run"]


def test_a_follower_that_does_not_read_pauses_the_run_and_loses_nothing(endpoints):
    import socket
    import threading

    server, path = endpoints, scratch()
    first: list[dict] = []
    with httpx.Client(headers=server.headers, timeout=60) as client:
        with client.stream("GET", server.url + "stream/big", params={"path": path}) as r:
            sid = r.headers["x-stream-id"]
            first += events(r, 1)
            # a follower with a small receive buffer that reads nothing for a while
            follower = socket.socket()
            follower.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8192)
            follower.connect(("127.0.0.1", server.port))
            follower.sendall(f"GET /stream/big?stream={sid} HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\n"
                             f"Authorization: token {server.token}\r\nConnection: close\r\n\r\n".encode())
            reader = threading.Thread(target=lambda: first.extend(events(r)))
            reader.start()
            # 20 MB in 4 s, unless something waits: the follower reads nothing, and the run waits
            # for it once what the sockets, the buffer and the worker's flow window hold is full
            time.sleep(6)
            assert lines_of(path, ".end") == [] and len(first) < 200
            raw = bytearray()
            while chunk := follower.recv(1 << 20):
                raw += chunk
            follower.close()
            reader.join(30)
    head, _, body = bytes(raw).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and b"Transfer-Encoding: chunked" in head
    text = bytearray()
    while True:  # the chunked body
        size, _, body = body.partition(b"\r\n")
        if int(size, 16) == 0:
            break
        text += body[:int(size, 16)]
        body = body[int(size, 16) + 2:]
    followed = read(httpx.Response(200, content=bytes(text)))
    assert [int(e["data"].split()[0]) for e in followed] == list(range(200))  # no EventsLost: all of it
    assert [int(e["data"].split()[0]) for e in first] == list(range(200))
    assert lines_of(path, ".runs") == ["run"] and lines_of(path, ".end") == ["completed"]


def test_past_the_window_the_run_is_cancelled_and_a_late_client_is_told(endpoints):
    server, path = endpoints, scratch()
    sid, first = cut_after(server, path, 2, url="stream/short_window", n=200, pace=0.05)  # a 1 s window
    wait_for(lambda: lines_of(path, ".end") == ["cancelled"], 10, "the run to be cancelled")  # its finally ran
    r = resume(server, url="stream/short_window", headers={"Last-Event-ID": first[-1]["id"]})
    assert r.status_code == 200
    (gone,) = read(r)
    body = json.loads(gone["data"])
    assert gone["event"] == "error" and gone["id"] == f"{sid}:gone" and body["error"]["type"] == "StreamGone"
    assert "no longer kept" in body["error"]["message"] and "cancelled" in body["error"]["message"]
    assert "run the endpoint anew" in body["error"]["message"]
    # an EventSource reconnects with that id: told to stop (204), nothing runs again
    assert resume(server, url="stream/short_window", headers={"Last-Event-ID": gone["id"]}).status_code == 204
    assert lines_of(path, ".runs") == ["run"]


def test_a_buffer_overflow_says_how_many_events_were_lost(endpoints):
    server, path = endpoints, scratch()
    sid, first = cut_after(server, path, 3, n=60, pace=0.005)
    wait_for(lambda: lines_of(path, ".end") == ["completed"], 20, "the run to end")  # it ran on with nobody following
    rest = read(resume(server, headers={"Last-Event-ID": first[-1]["id"]}))
    lost, kept = rest[0], rest[1:]
    info = json.loads(lost["data"])
    assert lost["event"] == "error" and info["error"]["type"] == "EventsLost" and "id" not in lost
    assert (info["lost"], info["first_lost"], info["last_lost"]) == (60 - BUFFER_EVENTS - 3, 4, 60 - BUFFER_EVENTS)
    assert f"{info['lost']} event(s)" in info["error"]["message"] and "resumable_buffer_events" in info["error"]["message"]
    assert data(kept) == list(range(60 - BUFFER_EVENTS, 60))
    assert lines_of(path, ".runs") == ["run"]


def test_the_openai_route_resumes_a_streamed_completion(endpoints):
    server, path = endpoints, scratch()
    words = [f"w{i}" for i in range(20)]
    request = {"model": "chat", "stream": True, "messages": [{"role": "user", "content": " ".join([path, *words])}]}
    url = server.url + "stream/chat/v1/chat/completions"
    with httpx.Client(headers=server.headers, timeout=30) as client:
        with client.stream("POST", url, json=request) as r:
            assert r.status_code == 200
            sid = r.headers["x-stream-id"]
            first = events(r, 4)  # the role chunk and three words
    r = httpx.post(url, json=request, headers={**server.headers, "Last-Event-ID": first[-1]["id"]}, timeout=30)
    rest = read(r)
    assert r.headers["x-stream-id"] == sid and rest[-1]["data"] == "[DONE]"
    assert [e["id"].split(":")[1] for e in first + rest] == [str(i) for i in range(1, len(first + rest) + 1)]
    chunks = [json.loads(e["data"]) for e in first + rest if e["data"] != "[DONE]"]
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == " ".join(words) and chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert lines_of(path, ".runs") == ["run"]
    # a GET resumes too (nothing is left to send: 204); a GET that resumes nothing is still a 405
    assert httpx.get(url, headers={**server.headers, "Last-Event-ID": rest[-1]["id"]}).status_code == 204
    assert httpx.get(url, headers=server.headers).status_code == 405
    # and the openai client reads a resumable endpoint as any other
    client = openai.OpenAI(base_url=server.url + "stream/chat/v1", api_key=server.token, max_retries=0)
    pieces = client.chat.completions.create(model="chat", stream=True, messages=[{"role": "user", "content": f"{path} a b c"}])
    assert "".join(p.choices[0].delta.content or "" for p in pieces if p.choices) == "a b c"
    whole = client.chat.completions.create(model="chat", messages=[{"role": "user", "content": f"{path} x y"}])
    assert whole.choices[0].message.content == "x y"


def test_a_stream_that_is_not_resumable_is_cancelled_when_its_client_leaves(endpoints):
    server, path = endpoints, scratch()
    with httpx.Client(headers=server.headers, timeout=30) as client:
        with client.stream("GET", server.url + "stream/plain", params={"path": path, "n": 200}) as r:
            assert "x-stream-id" not in r.headers
            first = events(r, 2)
    assert [set(e) for e in first] == [{"data"}, {"data"}]  # no ids added
    wait_for(lambda: lines_of(path, ".end") == ["cancelled"], 10, "the run to be cancelled")
    # a Last-Event-ID that looks like ours runs it again: the function may read it itself
    r = resume(server, url="stream/plain", headers={"Last-Event-ID": "A" * 22 + ":3"}, path=path, n=2)
    assert data(read(r)) == [0, 1] and lines_of(path, ".runs") == ["run", "run"]


def test_streams_are_behind_the_endpoints_auth(endpoints):
    server, path = endpoints, scratch()
    with httpx.Client(headers=server.headers, timeout=30) as client:
        with client.stream("GET", server.url + "stream/counted", params={"path": path, "n": 30, "pace": 0.1}) as r:
            sid = r.headers["x-stream-id"]
            events(r, 1)
            plain = httpx.get(server.url + "stream/counted", params={"stream": sid}, timeout=10)
            assert plain.status_code == 403 and sid not in plain.text
            shares = {}
            for name in ("counted", "other"):
                reply = server.connection.request("POST", "api/stream/shares", json={"endpoint": name, "expires": 600})
                shares[name] = reply.json()["token"]
            # a share of another endpoint opens nothing of this one
            assert httpx.get(server.url + "stream/counted", params={"stream": sid, "share": shares["other"]},
                             timeout=10).status_code == 403
            # nor is this stream found through that endpoint
            (gone,) = read(httpx.get(server.url + "stream/other", params={"stream": sid, "share": shares["other"]}, timeout=10))
            assert json.loads(gone["data"])["error"]["type"] == "StreamGone"
            # a share of this endpoint follows it
            with httpx.stream("GET", server.url + "stream/counted", params={"stream": sid, "share": shares["counted"]},
                              timeout=30) as follower:
                assert follower.status_code == 200
                assert data(events(follower, 3)) == [0, 1, 2]
    assert resume(server, stream="not-an-id").status_code == 400


def test_what_a_registration_may_ask(endpoints):
    from IPython.core.magic_arguments import parse_argstring

    from jupyter_stream.client.magics import StreamMagics

    server = endpoints
    def text_only():
        yield "x"

    def takes_stream(stream: bool = False):
        yield "x"

    with pytest.raises(ValueError, match="streams Server-Sent Events"):
        register_endpoint(text_only, "text_only", "text/plain", connection=server.connection, resumable=True)
    with pytest.raises(ValueError, match="rename its parameter 'stream'"):
        register_endpoint(takes_stream, "takes_stream", connection=server.connection, resumable=True)
    with pytest.raises(ValueError, match="'resumable' must be"):
        register_endpoint(text_only, "text_only", connection=server.connection, resumable=-1)
    ep = register_endpoint(text_only, "windowed", connection=server.connection, resumable=5)
    assert ep.resumable == 5.0
    assert server.connection.request("GET", "api/stream/endpoints/windowed").json()["resumable"] == 5.0
    assert server.connection.request("GET", "api/stream/endpoints/counted").json()["resumable"] == 30.0  # True: 30 s
    assert server.connection.request("GET", "api/stream/endpoints/plain").json()["resumable"] is None
    magic = StreamMagics.stream_endpoint  # --resumable alone is True (30 s); a number is the window
    assert [parse_argstring(magic, line).resumable for line in ("", "--resumable", "--resumable 12", "--resumable --name x")] \
        == [False, True, 12.0, True]


def test_a_resumable_endpoint_that_returns_a_plain_value_answers_as_usual(endpoints):
    def value(n: int = 1):
        return {"n": n}

    register_endpoint(value, "value", connection=endpoints.connection, resumable=True)
    r = httpx.get(endpoints.url + "stream/value?n=3", headers=endpoints.headers, timeout=30)
    assert r.status_code == 200 and r.json() == {"n": 3} and "x-stream-id" not in r.headers


# ---- the buffer on its own (no server) ----

def test_events_are_cut_numbered_and_bounded():
    import asyncio

    from jupyter_stream.server.resumable import ResumableStreams, SSESplitter, StreamsFull, parse_resume

    splitter = SSESplitter()  # blocks across chunk boundaries and line ends of all three kinds
    assert splitter.feed(b"data: a\r") == [] and splitter.feed(b"\n\r\ndata: b\n\n: c\r\rid") == [b"data: a", b"data: b", b": c"]
    assert splitter.feed(b": 7\ndata: d") == [] and splitter.flush() == [b"id: 7\ndata: d"]

    async def scenario():
        streams = ResumableStreams(max_streams=2, max_events=3, max_bytes=1 << 20)
        cancelled = []
        one = streams.open("ep", 0.05, cancelled.append)
        new = one.feed(b"data: 1\n\nid: x\ndata: 2\n\ndata: 3\n\ndata: 4\n\n")
        assert [e.data for e in new[:2]] == [f"data: 1\nid: {one.id}:1\n\n".encode(), f"data: 2\nid: {one.id}:2:x\n\n".encode()]
        assert one.first_seq == 2 and one.since(0)[0] == (1, 1) and [e.seq for e in one.since(2)[1]] == [3, 4]
        assert streams.get(one.id, "another endpoint") is None and streams.get(one.id, "ep") is one
        two = streams.open("ep", 0.05, cancelled.append)
        try:
            streams.open("ep", 0.05, cancelled.append)
        except StreamsFull as e:
            assert "resumable_max_streams" in str(e)
        else:
            raise AssertionError("a third stream was kept")
        streams.ended(two)  # an ended stream makes room for a new one
        streams.open("ep", 0.05, cancelled.append)
        assert "dropped early" in streams.why_gone(two.id, "ep")
        client = object()
        one.attach(client)
        one.detach(client)  # its last client left: the window runs
        await asyncio.sleep(0.2)
        assert one.id not in streams.streams and cancelled and "cancelled after event 4" in cancelled[0]
        assert streams.why_gone(one.id, "ep") == cancelled[0] and streams.why_gone(one.id, "other") is None

    asyncio.run(scenario())
    sid = "A" * 22
    assert parse_resume(None, f"{sid}:5:mine").after == 5 and parse_resume(sid, "5").after == 5
    assert parse_resume(None, "5") is None and parse_resume(None, f"{sid}:gone").gone
