"""What remote code prints reaches a person: the calling cell for .remote/.map/.spawn, the
server log and the endpoint card for endpoints, and never an HTTP response."""

import re
import time

import pytest

from jupyter_stream.client.functions import register_function


@pytest.fixture()
def register(jstream_server):
    return lambda fn, **kw: register_function(fn, connection=jstream_server.connection, **kw)


def chatty(x):
    import logging
    import sys
    import warnings

    print(f"working on {x}")
    print(f"careful with {x}", file=sys.stderr)
    warnings.warn(f"warned about {x}", stacklevel=1)
    logging.getLogger("user").warning("logged %s", x)
    return x * 2


def test_remote_output_reaches_the_caller(register, capfd):
    f = register(chatty)
    assert f.remote(21) == 42
    out, err = capfd.readouterr()
    assert "working on 21\n" in out
    assert "careful with 21" in err and "warned about 21" in err and "logged 21" in err
    call = f.spawn(5)
    assert call.get(timeout=30) == 10
    assert "working on 5\n" in capfd.readouterr().out


def loud_loop(n):
    for i in range(n):
        print(f"line {i}")
    return n


def test_map_output_is_tagged_with_its_worker_and_batched(register, capfd):
    f = register(loud_loop)
    assert list(f.map([2000, 2000, 2000, 2000], progress=False)) == [2000] * 4
    lines = capfd.readouterr().out.splitlines()
    assert len(lines) == 8000 and all(re.fullmatch(r"\[w[123]\] line \d+", line) for line in lines), lines[:5]


def where(i):
    import os
    import time

    time.sleep(0.3)
    print(f"item {i} on pid {os.getpid()}")
    return i


def test_map_tags_are_short_and_stable_per_map_and_on_every_line(register, capfd):
    """Every line of a map carries its worker's tag, the first ones included; tags are
    w1, w2... by the order the workers first print in that map, one per worker."""
    f = register(where)
    for _ in range(2):
        assert list(f.map(range(8), progress=False)) == list(range(8))
        lines = capfd.readouterr().out.splitlines()
        assert len(lines) == 8, lines
        parsed = [re.fullmatch(r"\[(w\d+)\] item (\d) on pid (\d+)", line) for line in lines]
        assert all(parsed), lines  # the first lines too
        tags = [m.group(1) for m in parsed]
        pids = {m.group(1): m.group(3) for m in parsed}
        assert tags[0] == "w1" and sorted(set(tags)) == [f"w{i + 1}" for i in range(len(set(tags)))], tags
        assert len(set(tags)) >= 2, f"the map ran on one worker only: {lines}"
        assert len(set(pids.values())) == len(pids), f"a tag names one worker for the whole map: {lines}"
        assert all(pids[m.group(1)] == m.group(3) for m in parsed), lines


def test_endpoint_output_goes_to_the_log_and_the_card_not_the_response(jstream_server):
    def noisy(n: int = 2):
        for i in range(n):
            print(f"serving chunk {i}")
            yield f"data: {i}\n\n"

    jstream_server.register(noisy)
    body = jstream_server.get("stream/noisy?n=3").text
    assert body == "data: 0\n\ndata: 1\n\ndata: 2\n\n"  # nothing printed is on the response
    deadline = time.monotonic() + 5
    while "serving chunk 2" not in jstream_server.log():
        assert time.monotonic() < deadline, jstream_server.log()[-2000:]
        time.sleep(0.05)
    assert re.search(r"\[noisy GET /stream/noisy from 127\.0\.0\.1 worker-\d+ stdout\] serving chunk 0", jstream_server.log())
    output = jstream_server.get("api/stream/endpoints/noisy").json()["output"]
    assert [o["line"] for o in output][-3:] == ["serving chunk 0", "serving chunk 1", "serving chunk 2"]


def test_output_in_a_notebook_cell(jstream_server, jstream_notebook_kernel):
    kernel = jstream_notebook_kernel
    outputs, reply = kernel.execute("%load_ext jupyter_stream")
    assert reply["status"] == "ok"
    outputs, reply = kernel.execute('%%stream_function\ndef shout(x):\n    print("hello from", x)\n    return x')
    assert reply["status"] == "ok", outputs
    outputs, reply = kernel.execute("shout.remote(7)")
    assert reply["status"] == "ok"
    streams = [o for o in outputs if o["type"] == "stream"]
    assert any("hello from 7" in o["text"] and o["name"] == "stdout" for o in streams), outputs


def test_a_function_that_prints_a_lot_does_not_outrun_its_caller(register, capfd):
    def flood():
        chunk = "x" * 1000 + "\n"
        for _ in range(5000):  # 5 MB of text
            print(chunk, end="")
        return "done"

    f = register(flood)
    assert f.remote() == "done"
    out = capfd.readouterr().out
    assert len(out) <= 6_000_000 and out.count("\n") >= 1000
