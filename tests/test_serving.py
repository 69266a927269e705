"""Serving under load: the bounded queue (503 with Retry-After, leaving the queue,
heartbeats while queued) and the OpenAI-compatible API of an ``--openai`` endpoint, read
with the `openai` package's client."""

import threading
import time

import httpx
import openai
import pytest

from jupyter_stream.client.endpoints import register_endpoint


@pytest.fixture
def server(jstream_start_server):
    return jstream_start_server(["--JupyterStream.min_workers=1", "--JupyterStream.max_workers=2",
                                 "--JupyterStream.worker_poll_interval=0.2", "--JupyterStream.commit_headers_after=0.3",
                                 "--JupyterStream.sse_heartbeat_interval=0.3"])


def hold(seconds: float = 3.0):
    import time

    time.sleep(seconds)
    yield "data: done\n\n"


def test_a_full_queue_answers_503_with_retry_after(server):
    register_endpoint(hold, "held", "text/plain", connection=server.connection, max_workers=1, queue_timeout=1.0, env={"P": "held"})
    busy = threading.Thread(target=lambda: server.get("stream/held?seconds=4"))
    busy.start()
    time.sleep(1.5)  # its worker started and is busy
    started = time.monotonic()
    r = httpx.get(server.url + f"stream/held?seconds=0&token={server.token}", timeout=30)  # a token in the URL
    waited = time.monotonic() - started
    assert r.status_code == 503 and 0.9 < waited < 3, (r.status_code, waited)
    assert r.headers["retry-after"] == "1"
    assert "busy" in r.json()["message"] and "--queue-timeout" in r.json()["message"]
    busy.join()
    assert server.get("stream/held?seconds=0").status_code == 200  # free again
    assert "503 GET /stream/held" in server.log() and server.token not in server.log()  # logged without the query


def test_a_queued_sse_client_gets_heartbeats_and_may_leave_the_queue(server):
    register_endpoint(hold, "held_sse", "text/event-stream", connection=server.connection, max_workers=1, queue_timeout=30,
                      env={"P": "held_sse"})
    busy = threading.Thread(target=lambda: server.get("stream/held_sse?seconds=3"))
    busy.start()
    time.sleep(1.5)
    with httpx.stream("GET", server.url + "stream/held_sse?seconds=0", headers=server.headers, timeout=30) as r:
        assert r.status_code == 200
        first = next(r.iter_lines())
        assert first == ": waiting for a worker"
    waiting = [p["waiting_calls"] for p in server.workers()["pools"] if p["endpoints"] == ["held_sse"]]
    deadline = time.monotonic() + 5
    while waiting != [0]:  # the client left: it left the queue too
        assert time.monotonic() < deadline, waiting
        time.sleep(0.1)
        waiting = [p["waiting_calls"] for p in server.workers()["pools"] if p["endpoints"] == ["held_sse"]]
    busy.join()


def chat(messages: list, max_tokens: int = 5, temperature: float = 1.0):
    """Echo the last message, a word at a time (as a model samples them)."""
    import time

    words = str(messages[-1]["content"]).split()[:max_tokens]
    for i, word in enumerate(words):
        time.sleep(0.05)
        yield ("" if i == 0 else " ") + word
    if "fail" in words:
        raise RuntimeError("the model fell over")


def test_the_openai_client_reads_an_openai_endpoint(server):
    register_endpoint(chat, "echo", connection=server.connection, openai=True)
    client = openai.OpenAI(base_url=server.url + "stream/echo/v1", api_key=server.token, max_retries=0)
    assert [m.id for m in client.models.list().data] == ["echo"]
    messages = [{"role": "user", "content": "hello there streaming world café"}]
    pieces = [c.choices[0].delta.content for c in client.chat.completions.create(model="echo", messages=messages, stream=True)]
    assert "".join(p for p in pieces if p) == "hello there streaming world café"
    assert len([p for p in pieces if p]) == 5  # one delta per yielded piece, as they come
    whole = client.chat.completions.create(model="echo", messages=messages, max_tokens=2)
    assert whole.choices[0].message.content == "hello there" and whole.choices[0].finish_reason == "stop"

    with pytest.raises(openai.APIError, match="the model fell over"):
        list(client.chat.completions.create(model="echo", messages=[{"role": "user", "content": "please fail"}], stream=True))
    with pytest.raises(openai.InternalServerError, match="the model fell over"):
        client.chat.completions.create(model="echo", messages=[{"role": "user", "content": "fail"}])
    with pytest.raises(openai.BadRequestError, match="must be int"):
        client.chat.completions.create(model="echo", messages=messages, max_tokens="many")

    # a share link's token is an API key for this endpoint only
    share = server.connection.request("POST", "api/stream/shares", json={"endpoint": "echo", "expires": 600}).json()
    shared = openai.OpenAI(base_url=server.url + "stream/echo/v1", api_key=share["token"], max_retries=0)
    assert shared.chat.completions.create(model="echo", messages=messages, max_tokens=1).choices[0].message.content == "hello"
    # a wrong, missing, revoked or expired key: a 401 in OpenAI's shape, so its clients raise AuthenticationError
    with pytest.raises(openai.AuthenticationError, match="not valid here") as raised:
        openai.OpenAI(base_url=server.url + "stream/echo/v1", api_key="wrong", max_retries=0).models.list()
    assert raised.value.status_code == 401 and raised.value.code == "invalid_api_key"
    assert raised.value.body["type"] == "invalid_request_error"
    missing = httpx.post(server.url + "stream/echo/v1/chat/completions", json={"messages": messages}, timeout=10)
    assert missing.status_code == 401 and missing.json()["error"]["code"] == "invalid_api_key", missing.text
    server.connection.request("DELETE", f"api/stream/shares/{share['id']}")
    with pytest.raises(openai.AuthenticationError, match="no longer works: it was revoked"):
        shared.chat.completions.create(model="echo", messages=messages)
    expiring = server.connection.request("POST", "api/stream/shares", json={"endpoint": "echo", "expires": 1}).json()
    time.sleep(1.2)
    with pytest.raises(openai.AuthenticationError, match="expired at"):
        openai.OpenAI(base_url=server.url + "stream/echo/v1", api_key=expiring["token"], max_retries=0).models.list()

    register_endpoint(lambda messages: iter(["x"]), "plain", connection=server.connection)
    with pytest.raises(openai.NotFoundError, match="register it with --openai"):
        openai.OpenAI(base_url=server.url + "stream/plain/v1", api_key=server.token, max_retries=0).models.list()
    with pytest.raises(RuntimeError, match="takes the chat `messages`"):
        register_endpoint(lambda prompt: iter(["x"]), "wrong", connection=server.connection, openai=True)


def told(messages: list, max_tokens: int = 3):
    """Says why it stopped and what it cost, with a Finish yielded last."""
    import jupyter_stream

    words = str(messages[-1]["content"]).split()
    for word in words[:max_tokens]:
        yield word + " "
    yield jupyter_stream.Finish(reason="length" if len(words) > max_tokens else "stop",
                                usage={"prompt_tokens": len(words), "completion_tokens": min(len(words), max_tokens)})
    yield "never sent: a Finish ends the stream"


def returned(messages: list):
    """A generator that returns its Finish."""
    import jupyter_stream

    yield "one "
    yield "two"
    return jupyter_stream.Finish("length", {"completion_tokens": 2})


async def async_told(messages: list):
    import jupyter_stream

    yield "a"
    yield jupyter_stream.Finish("content_filter", {"prompt_tokens": 1, "completion_tokens": 1})
    yield "never sent"


def plain_finish():
    """A plain SSE endpoint: a Finish ends its stream and is not sent."""
    import jupyter_stream

    yield "data: 1\n\n"
    yield jupyter_stream.Finish("length")
    yield "data: never\n\n"


def test_the_openai_client_sees_finish_reason_and_usage(server):
    register_endpoint(told, "told", connection=server.connection, openai=True)
    client = openai.OpenAI(base_url=server.url + "stream/told/v1", api_key=server.token, max_retries=0)
    messages = [{"role": "user", "content": "a b c d e"}]

    chunks = list(client.chat.completions.create(model="told", messages=messages, stream=True,
                                                 stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "a b c "
    assert chunks[-2].choices[0].finish_reason == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump(exclude_none=True) == {
        "prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}
    assert all(c.usage is None for c in chunks[:-1])
    chunks = list(client.chat.completions.create(model="told", messages=messages, stream=True))
    assert chunks[-1].choices[0].finish_reason == "length" and all(c.choices and c.usage is None for c in chunks)
    whole = client.chat.completions.create(model="told", messages=messages, max_tokens=10)
    assert whole.choices[0].message.content == "a b c d e " and whole.choices[0].finish_reason == "stop"
    assert (whole.usage.prompt_tokens, whole.usage.completion_tokens, whole.usage.total_tokens) == (5, 5, 10)
    whole = client.chat.completions.create(model="told", messages=messages)
    assert whole.choices[0].finish_reason == "length" and whole.usage.completion_tokens == 3

    register_endpoint(returned, "returned", connection=server.connection, openai=True)
    client = openai.OpenAI(base_url=server.url + "stream/returned/v1", api_key=server.token, max_retries=0)
    whole = client.chat.completions.create(model="returned", messages=messages)
    assert whole.choices[0].message.content == "one two" and whole.choices[0].finish_reason == "length"
    assert whole.usage.model_dump(exclude_none=True) == {"completion_tokens": 2}

    register_endpoint(async_told, "async_told", connection=server.connection, openai=True)
    client = openai.OpenAI(base_url=server.url + "stream/async_told/v1", api_key=server.token, max_retries=0)
    chunks = list(client.chat.completions.create(model="async_told", messages=messages, stream=True,
                                                 stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "a"
    assert chunks[-2].choices[0].finish_reason == "content_filter" and chunks[-1].usage.total_tokens == 2

    # on a plain endpoint a Finish ends the stream, and is not sent
    register_endpoint(plain_finish, "plain_finish", connection=server.connection)
    assert server.get("stream/plain_finish").text == "data: 1\n\n"


def test_usage_is_counted_only_when_asked(server):
    register_endpoint(chat, "uncounted", connection=server.connection, openai=True)
    client = openai.OpenAI(base_url=server.url + "stream/uncounted/v1", api_key=server.token, max_retries=0)
    messages = [{"role": "user", "content": "one two three"}]
    whole = client.chat.completions.create(model="uncounted", messages=messages)
    assert whole.choices[0].finish_reason == "stop" and whole.usage is None  # not invented
    chunks = list(client.chat.completions.create(model="uncounted", messages=messages, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[-2].choices[0].finish_reason == "stop" and chunks[-1].choices == [] and chunks[-1].usage is None

    register_endpoint(chat, "counted", connection=server.connection, openai_count_chunks=True)
    assert server.connection.request("GET", "api/stream/endpoints").json()["endpoints"][-1]["openai_count_chunks"] is True
    client = openai.OpenAI(base_url=server.url + "stream/counted/v1", api_key=server.token, max_retries=0)
    whole = client.chat.completions.create(model="counted", messages=messages)
    assert (whole.usage.prompt_tokens, whole.usage.completion_tokens, whole.usage.total_tokens) == (0, 3, 3)
    chunks = list(client.chat.completions.create(model="counted", messages=messages, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[-1].usage.completion_tokens == 3
    r = httpx.post(server.url + "stream/counted/v1/chat/completions", headers=server.headers, timeout=30,
                   json={"messages": messages, "stream_options": {"include_usage": True}})
    assert r.status_code == 400 and "stream_options" in r.json()["error"]["message"]


def test_finish_checks_what_it_is_given():
    from jupyter_stream import Finish

    assert Finish().info() == {"reason": "stop", "usage": None}
    assert Finish("length", {"prompt_tokens": 2, "completion_tokens": 3}).usage["total_tokens"] == 5
    details = {"completion_tokens": 1, "completion_tokens_details": {"reasoning_tokens": 1}}
    assert Finish(usage=details).usage == details
    for bad in ("", "two\nlines", 3):
        with pytest.raises(ValueError, match="short word"):
            Finish(bad)
    with pytest.raises(ValueError, match="whole token counts"):
        Finish(usage={"completion_tokens": -1})
    with pytest.raises(ValueError, match="whole token counts"):
        Finish(usage={"completion_tokens": 1.5})
    with pytest.raises(TypeError, match="dict of token counts"):
        Finish(usage=[1])


def slow_words(n: int = 100):
    import os
    import time

    for i in range(n):
        time.sleep(0.1)
        yield f"data: {os.getpid()} {i}\n\n"


def test_a_worker_killed_under_twenty_streams_ends_each_with_an_error_and_the_pool_heals(server):
    import concurrent.futures
    import os
    import signal

    register_endpoint(slow_words, "crowded", "text/event-stream", connection=server.connection, concurrency=20, max_workers=1,
                      env={"P": "crowded"})
    first = server.get("stream/crowded?n=1").text
    pid = int(next(line for line in first.splitlines() if line.startswith("data: ")).split()[1])

    def read(_):
        with httpx.stream("GET", server.url + "stream/crowded", headers=server.headers, timeout=60) as r:
            return [line for line in r.iter_lines() if line and not line.startswith(":")]

    with concurrent.futures.ThreadPoolExecutor(20) as pool:
        streams = [pool.submit(read, i) for i in range(20)]
        time.sleep(1.5)
        os.kill(pid, signal.SIGKILL)
        results = [s.result(timeout=60) for s in streams]
    for lines in results:
        assert lines[-2] == "event: error" and "WorkerDied" in lines[-1], lines[-3:]
        assert len(lines) < 100
    again = [line for line in server.get("stream/crowded?n=2").text.splitlines() if line.startswith("data: ")]
    assert len(again) == 2 and int(again[0].split()[1]) != pid  # a new worker took over


def test_a_nested_call_runs_beside_its_caller_when_other_pools_fill_the_machine(jstream_start_server):
    """Server cap 2: pool A's function calls another of pool A while pool B's only worker
    is busy. A is under its own maximum, but the machine is full and nothing is idle: the
    inner call runs on its caller's worker instead of waiting for ever."""
    from jupyter_stream.client.functions import register_function

    server = jstream_start_server(["--JupyterStream.min_workers=0", "--JupyterStream.max_workers=2",
                                   "--JupyterStream.worker_poll_interval=0.2"])

    def inner(x):
        return x + 1

    def outer(fn, x):
        return fn.remote(x) * 10

    inner_fn = register_function(inner, "inner", connection=server.connection, env={"POOL": "a"})
    outer_fn = register_function(outer, "outer", connection=server.connection, env={"POOL": "a"})
    register_endpoint(hold, "other_pool", "text/plain", connection=server.connection, env={"POOL": "b"})
    busy = threading.Thread(target=lambda: server.get("stream/other_pool?seconds=8"))
    busy.start()
    time.sleep(2.0)  # pool B's worker is up and busy: one of the two seats
    started = time.monotonic()
    assert outer_fn.remote(inner_fn, 4) == 50
    assert time.monotonic() - started < 6  # well before pool B's stream ends
    busy.join()


async def on_the_loop(n: int = 10, size: int = 0):
    """An async stream: each event names the thread it ran on, and how many there are."""
    import asyncio
    import threading

    for i in range(n):
        if not size:
            await asyncio.sleep(0.1)
        yield f"data: {threading.get_ident()} {threading.active_count()} {i} {'x' * size}\n\n"


def test_async_calls_are_tasks_on_one_event_loop_and_a_stalled_client_stalls_only_itself(server):
    import concurrent.futures

    register_endpoint(on_the_loop, "looped", "text/event-stream", connection=server.connection, concurrency=100,
                      max_workers=1, env={"P": "looped"})
    server.get("stream/looped?n=1")  # the worker is up

    def read(_):
        return [line.split()[1:4] for line in server.get("stream/looped?n=10").text.splitlines() if line.startswith("data: ")]

    started = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(60) as pool:
        streams = list(pool.map(read, range(60)))
    took = time.monotonic() - started
    assert all(len(events) == 10 for events in streams)
    assert len({thread for events in streams for thread, _, _ in events}) == 1  # one event loop thread ran all 60
    assert max(int(count) for events in streams for _, count, _ in events) < 20  # not a thread per call
    assert took < 6, took  # one stream takes 1 s

    # a client that stops reading holds back its own generator only (backpressure), not the loop
    with httpx.stream("GET", server.url + "stream/looped?n=100000&size=65536", headers=server.headers, timeout=60) as stalled:
        next(stalled.iter_bytes())
        time.sleep(1.0)  # its credit window fills up
        started = time.monotonic()
        assert len(read(0)) == 10
        assert time.monotonic() - started < 4
