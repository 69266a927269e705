"""Dynamic batching (`@jupyter_stream.batched`, ``--batch N --batch-wait MS``): many
callers' single inputs run in batches on real worker kernels, and each caller gets its
own result or error, through every call form, HTTP, classes with --concurrency, and a
worker killed mid-batch."""

import asyncio
import concurrent.futures
import logging
import os
import signal
import time

import httpx
import pytest

import jupyter_stream
from jupyter_stream import WorkerDied
from jupyter_stream.client.classes import register_class
from jupyter_stream.client.connection import ServerConnection
from jupyter_stream.client.endpoints import register_endpoint
from jupyter_stream.client.functions import register_function


@pytest.fixture(scope="module")
def server(jstream_start_server):
    """Its own server (workers are killed here): two workers, fast death detection."""
    server = jstream_start_server(["--JupyterStream.min_workers=2", "--JupyterStream.max_workers=3",
                                   "--JupyterStream.worker_poll_interval=0.2", "--JupyterStream.cancel_grace_period=1"])
    server.wait_for_workers(2)
    return server


def at_once(fn, inputs, threads=64):
    """`fn` called with each input from its own thread, all at once; results in input order."""
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        return list(pool.map(fn, inputs))


def test_64_callers_each_get_their_own_result_in_batches_that_respect_max_batch_size(server):
    @jupyter_stream.batched(max_batch_size=8, wait_ms=100)
    def double(xs, offsets=0):
        return [{"y": 2 * x + o, "batch": list(xs)} for x, o in zip(xs, offsets)]

    f = register_function(double, connection=server.connection)
    results = at_once(f.remote, range(64))
    assert [r["y"] for r in results] == [2 * i for i in range(64)]
    sizes = [len(r["batch"]) for r in results]
    assert max(sizes) <= 8 and max(sizes) > 1, sizes  # batches formed, none over the limit
    for i, r in enumerate(results):  # each caller's input was in the batch its result came from
        assert i in r["batch"]
    batches = {tuple(r["batch"]) for r in results}
    assert sum(len(b) for b in batches) == 64  # every input ran once
    info = server.get("api/stream/functions/double").json()
    assert info["batch"] == {"max_batch_size": 8, "wait_ms": 100}

    # every other call form, with keyword arguments (bound per input, defaults applied)
    assert f.remote(5, offsets=1)["y"] == 11
    assert [r["y"] for r in f.map(range(20))] == [2 * i for i in range(20)]
    assert [r["y"] for r in f.map(range(5), kwargs={"offsets": 100})] == [100 + 2 * i for i in range(5)]
    assert [r["y"] for r in f.starmap([(1, 1), (2, 2)])] == [3, 6]
    assert f.for_each(range(10)) is None
    calls = [f.spawn(i) for i in range(8)]
    assert [c.get(timeout=30)["y"] for c in calls] == [2 * i for i in range(8)]
    assert len(calls[0].get()["batch"]) > 1  # eight spawns in a row share batches

    async def aio():
        values = await asyncio.gather(*(f.remote.aio(i) for i in range(16)))
        mapped = [r async for r in f.map.aio(range(4))]
        return values, mapped

    values, mapped = asyncio.run(aio())
    assert [v["y"] for v in values] == [2 * i for i in range(16)] and max(len(v["batch"]) for v in values) > 1
    assert [r["y"] for r in mapped] == [0, 2, 4, 6]


def test_callers_of_different_forms_share_batches(server):
    """A map and single calls of another client go into the same batches: the server
    forms them across callers."""
    @jupyter_stream.batched(max_batch_size=16, wait_ms=400)
    def tag(xs):
        return [list(xs) for _ in xs]

    f = register_function(tag, connection=server.connection)
    other = ServerConnection(server.url, server.token)  # a second client: its own calls socket
    g = jupyter_stream.Function("tag", connection=other)
    with concurrent.futures.ThreadPoolExecutor(9) as pool:
        mapped = pool.submit(lambda: list(f.map(range(100, 104))))
        singles = [pool.submit(g.remote, i) for i in range(8)]
        batches = mapped.result() + [s.result() for s in singles]
    assert any(any(x >= 100 for x in b) and any(x < 100 for x in b) for b in batches), batches


def test_a_lone_call_goes_after_about_wait_ms_and_a_full_batch_at_once(server):
    @jupyter_stream.batched(max_batch_size=4, wait_ms=400)
    def sizes(xs):
        return [len(xs)] * len(xs)

    f = register_function(sizes, connection=server.connection)
    f.remote(0)  # (the function reaches the workers)
    started = time.monotonic()
    assert f.remote(1) == 1
    took = time.monotonic() - started
    assert 0.35 <= took < 3, took  # held for wait_ms, for company that did not come; not for ever

    @jupyter_stream.batched(max_batch_size=4, wait_ms=20_000)
    def patient(xs):
        return [len(xs)] * len(xs)

    g = register_function(patient, connection=server.connection)
    started = time.monotonic()
    assert at_once(g.remote, range(4), threads=4) == [4, 4, 4, 4]
    assert time.monotonic() - started < 10  # full: it went without waiting its 20 s


def test_errors_reach_the_callers_they_belong_to(server):
    @jupyter_stream.batched(max_batch_size=4, wait_ms=500)
    def checked(xs):
        if 13 in xs:
            raise ValueError("13 is unlucky")
        return [ValueError(f"negative: {x}") if x < 0 else x * 10 for x in xs]

    f = register_function(checked, connection=server.connection)

    def call(x):
        try:
            return f.remote(x)
        except ValueError as e:
            return e

    # an exception element fails only its own input; the others of its batch get results
    results = at_once(call, [1, -2, 3, 4], threads=4)
    assert results[0] == 10 and results[2] == 30 and results[3] == 40
    assert isinstance(results[1], ValueError) and str(results[1]) == "negative: -2"
    # the batch raises (Modal's semantics): each of its inputs fails with the error
    results = at_once(call, [13, 5, 6, 7], threads=4)
    assert all(isinstance(r, ValueError) and str(r) == "13 is unlucky" for r in results), results
    assert "13 is unlucky" in str(results[1].__cause__)  # with the worker's traceback
    # arguments that do not fit fail only their own caller
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        good, bad = pool.submit(f.remote, 2), pool.submit(f.remote, 1, 2)
        assert good.result() == 20
        with pytest.raises(TypeError):
            bad.result()
    # through a map: return_exceptions keeps the others
    mapped = list(f.map([1, -1, 2], return_exceptions=True))
    assert mapped[0] == 10 and mapped[2] == 20 and isinstance(mapped[1], ValueError)


def test_a_result_that_is_not_one_per_input_is_a_clear_error_for_each(server):
    @jupyter_stream.batched(max_batch_size=4, wait_ms=300)
    def short(xs):
        return xs[:-1]

    @jupyter_stream.batched(max_batch_size=4, wait_ms=10)
    def scalar(xs):
        return 5

    f, g = register_function(short, connection=server.connection), register_function(scalar, connection=server.connection)

    def call(x):
        try:
            return f.remote(x)
        except ValueError as e:
            return str(e)

    messages = at_once(call, range(3), threads=3)
    for message in messages:
        assert message.startswith("a batched function returns a list with one result per input: this batch had "), message
    with pytest.raises(TypeError, match="returns a list with one result per input; it returns int"):
        g.remote(1)


def test_a_batched_generator_streams_each_caller_its_own_elements(server):
    @jupyter_stream.batched(max_batch_size=8, wait_ms=200)
    def steps(prompts, n=3):
        for i in range(max(n)):
            yield [f"{p}-{i}" for p in prompts]

    f = register_function(steps, connection=server.connection)
    streams = at_once(lambda p: list(f.remote(p)), ["a", "b", "c"], threads=3)
    assert streams == [[f"{p}-{i}" for i in range(3)] for p in "abc"]


def test_a_caller_that_leaves_does_not_stop_the_others_and_the_last_one_stops_the_batch(server, tmp_path):
    folder = str(tmp_path)

    @jupyter_stream.batched(max_batch_size=4, wait_ms=300)
    def slow_steps(prompts):
        import pathlib
        import time

        steps = 0
        try:
            for i in range(40):
                time.sleep(0.05)
                yield [f"{p}{i}" for p in prompts]
                steps += 1
        finally:
            (pathlib.Path(folder) / f"closed-{''.join(prompts)}").write_text(str(steps))

    f = register_function(slow_steps, connection=server.connection)

    def leave_early(p):
        stream = f.remote(p)
        taken = [next(stream), next(stream)]
        stream.close()  # the caller leaves: its input is cancelled
        return taken

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        early, whole = pool.submit(leave_early, "a"), pool.submit(lambda: list(f.remote("b")))
        assert early.result(timeout=60) == ["a0", "a1"]
        assert whole.result(timeout=60) == [f"b{i}" for i in range(40)]  # its batch went on for it
    closed = {p.name: p.read_text() for p in tmp_path.glob("closed-*")}
    assert closed in ({"closed-ab": "40"}, {"closed-ba": "40"}), closed  # one batch, to its end
    for p in tmp_path.glob("closed-*"):
        p.unlink()
    with concurrent.futures.ThreadPoolExecutor(2) as pool:  # both leave: their batch stops early
        assert [r.result(timeout=60) for r in [pool.submit(leave_early, p) for p in "cd"]] == [["c0", "c1"], ["d0", "d1"]]

    def ended() -> dict[str, str]:  # the batches c and d ran in (one, unless the machine is slow), once written
        return {p.name: p.read_text() for p in tmp_path.glob("closed-*")}

    deadline = time.monotonic() + 10
    while (sorted("".join(name[len("closed-"):] for name in ended())) != ["c", "d"] or not all(ended().values())) \
            and time.monotonic() < deadline:
        time.sleep(0.05)
    got = ended()
    assert sorted("".join(name[len("closed-"):] for name in got)) == ["c", "d"], got
    assert all(int(steps) < 20 for steps in got.values()), got  # generators closed (finally ran), not run out


def test_a_worker_killed_mid_batch_reruns_each_input(server, tmp_path):
    """As single calls: inputs in flight on a kernel that dies run again elsewhere, each
    result reaching its caller once (and, having died with others, each runs alone)."""
    folder = str(tmp_path)

    @jupyter_stream.batched(max_batch_size=8, wait_ms=300)
    def fragile(xs):
        import os
        import pathlib
        import time

        here = pathlib.Path(folder)
        (here / f"batch-{time.time_ns()}").write_text(",".join(map(str, xs)))
        if not (here / "killed").exists():
            (here / "pid").write_text(str(os.getpid()))
            time.sleep(60)
        return [x * 10 for x in xs]

    f = register_function(fragile, connection=server.connection)
    calls = [f.spawn(i) for i in range(4)]
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        mapped = pool.submit(lambda: list(f.map(range(4, 8))))
        deadline = time.monotonic() + 30
        while not (tmp_path / "pid").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)  # the map's inputs join the batch too
        (tmp_path / "killed").write_text("")
        os.kill(int((tmp_path / "pid").read_text()), signal.SIGKILL)
        assert [c.get(timeout=60) for c in calls] + mapped.result(timeout=60) == [i * 10 for i in range(8)]
    batches = [p.read_text().split(",") for p in sorted(tmp_path.glob("batch-*"))]
    assert len(batches[0]) > 1  # the first batch died with several inputs in it ...
    rerun = [b for b in batches[1:] if set(b) & set(batches[0])]
    assert sorted(x for b in rerun for x in b) == sorted(batches[0])  # ... each of them ran again ...
    assert all(len(b) == 1 for b in rerun)  # ... alone (so that a death could be blamed on it)


def test_an_input_that_kills_its_kernel_fails_alone(server):
    @jupyter_stream.batched(max_batch_size=4, wait_ms=300)
    def poison(words):
        import os

        if "die" in words:
            os._exit(1)
        return [w.upper() for w in words]

    f = register_function(poison, connection=server.connection)

    def call(word):
        try:
            return f.remote(word)
        except WorkerDied as e:
            return e

    results = at_once(call, ["a", "b", "die", "c"], threads=4)
    assert results[:2] + results[3:] == ["A", "B", "C"]
    assert isinstance(results[2], WorkerDied) and "died 4 times" in str(results[2]), results[2]


def test_a_batched_class_method_with_concurrency(server):
    class Scaler:
        @jupyter_stream.enter
        def load(self):
            self.factor = 3

        @jupyter_stream.batched(max_batch_size=4, wait_ms=100)
        def scale(self, xs):
            import os
            import time

            started = time.time()
            time.sleep(0.5)
            return [{"y": x * self.factor, "size": len(xs), "pid": os.getpid(), "span": (started, time.time())} for x in xs]

        @jupyter_stream.endpoint(media_type="application/json")
        @jupyter_stream.batched(max_batch_size=4, wait_ms=100)
        def http_scale(self, x: list[int]):
            return [{"y": v * self.factor, "size": len(x)} for v in x]

    served = register_class(Scaler, connection=server.connection, concurrency=2, max_workers=1, min_workers=1)
    model = served()
    results = at_once(model.scale.remote, range(16), threads=16)
    assert [r["y"] for r in results] == [3 * i for i in range(16)]
    assert max(r["size"] for r in results) == 4 and len({r["pid"] for r in results}) == 1
    spans = sorted({r["span"] for r in results})
    assert any(a[1] > b[0] for a, b in zip(spans, spans[1:])), spans  # two batches at once on its one worker
    replies = at_once(lambda i: server.get(f"stream/Scaler.http_scale?x={i}").json(), range(8), threads=8)
    assert [r["y"] for r in replies] == [3 * i for i in range(8)] and max(r["size"] for r in replies) > 1


def test_a_batched_endpoint_serves_concurrent_http_clients(server):
    @jupyter_stream.batched(max_batch_size=8, wait_ms=200)
    def embed(text: list[str], times: int = 1):
        return [{"text": t * n, "size": len(text)} for t, n in zip(text, times)]

    @jupyter_stream.batched(max_batch_size=8, wait_ms=200)
    def tokens(prompt: list[str]):
        for i in range(3):
            yield [f"data: {p}-{i}\n\n" for p in prompt]

    register_endpoint(embed, connection=server.connection)
    register_endpoint(tokens, connection=server.connection)
    params = server.get("api/stream/endpoints/embed").json()["parameters"]
    assert [(p["name"], p["type"]) for p in params] == [("text", "str"), ("times", "int")]  # one request's

    def fetch(i):
        with httpx.Client(headers=server.headers, timeout=30) as client:  # each its own connection
            if i % 2:
                return client.post(server.url + "stream/embed", json={"text": f"t{i}", "times": 2}).json()
            return client.get(server.url + f"stream/embed?text=t{i}").json()

    replies = at_once(fetch, range(16), threads=16)
    assert [r["text"] for r in replies] == [f"t{i}" * (2 if i % 2 else 1) for i in range(16)]
    assert max(r["size"] for r in replies) > 1 and max(r["size"] for r in replies) <= 8

    streams = at_once(lambda p: server.get(f"stream/tokens?prompt={p}").text, ["x", "y", "z"], threads=3)
    assert streams == [f"data: {p}-0\n\ndata: {p}-1\n\ndata: {p}-2\n\n" for p in "xyz"]
    bad = server.get("stream/embed?text=a&times=many")
    assert bad.status_code == 400 and "'times' must be int" in bad.json()["message"]


def test_the_magic_flags(jstream_server, jstream_notebook_kernel):
    kernel = jstream_notebook_kernel
    kernel.execute("%load_ext jupyter_stream")
    outputs, reply = kernel.execute(
        "%%stream_function --batch 4 --batch-wait 50\ndef sizes(xs):\n    return [len(xs)] * len(xs)\n")
    assert reply["status"] == "ok", kernel.text(outputs)
    outputs, reply = kernel.execute("print('sizes:', sizes.remote(1), *sizes.map(range(8), progress=False))")
    assert reply["status"] == "ok", kernel.text(outputs)
    line = next(line for line in kernel.text(outputs).splitlines() if line.startswith("sizes:"))
    first, *mapped = line.split()[1:]
    assert first == "1" and all(1 <= int(n) <= 4 for n in mapped)
    assert jstream_server.get("api/stream/functions/sizes").json()["batch"] == {"max_batch_size": 4, "wait_ms": 50}
    outputs, reply = kernel.execute(
        "%%stream_endpoint --batch 2 --media-type application/json\ndef shout(word: list[str]):\n"
        "    return [{'w': w.upper(), 'n': len(word)} for w in word]\n")
    assert reply["status"] == "ok", kernel.text(outputs)
    assert jstream_server.get("stream/shout?word=hi").json() == {"w": "HI", "n": 1}
    assert jstream_server.get("api/stream/endpoints/shout").json()["batch"] == {"max_batch_size": 2, "wait_ms": 10}
    for line, complaint in [("--batch 0", "max_batch_size must be a whole number from 1 to 1000, got 0"),
                            ("--batch 4 --batch-wait -1", "wait_ms must be a number of milliseconds from 0 to 600000"),
                            ("--batch-wait 5", "--batch-wait needs --batch N")]:
        outputs, reply = kernel.execute(f"%%stream_function {line}\ndef f(xs):\n    return xs\n")
        assert reply["status"] == "error" and reply["ename"] == "UsageError" and complaint in reply["evalue"], reply


def test_bad_arguments_to_the_decorator(server):
    for kwargs, complaint in [
        ({"max_batch_size": 0, "wait_ms": 1}, "max_batch_size must be a whole number from 1 to 1000, got 0"),
        ({"max_batch_size": 1001, "wait_ms": 1}, "max_batch_size must be a whole number from 1 to 1000, got 1001"),
        ({"max_batch_size": "8", "wait_ms": 1}, "max_batch_size must be a whole number"),
        ({"max_batch_size": True, "wait_ms": 1}, "max_batch_size must be a whole number"),
        ({"max_batch_size": 8, "wait_ms": -1}, "wait_ms must be a number of milliseconds from 0 to 600000"),
        ({"max_batch_size": 8, "wait_ms": 600_001}, "wait_ms must be a number of milliseconds from 0 to 600000"),
        ({"max_batch_size": 8, "wait_ms": float("nan")}, "wait_ms must be a number of milliseconds"),
    ]:
        with pytest.raises(ValueError, match=complaint):
            jupyter_stream.batched(**kwargs)
    with pytest.raises(TypeError, match="arguments named"):
        @jupyter_stream.batched
        def unnamed(xs):
            return xs
    with pytest.raises(TypeError):
        jupyter_stream.batched(8, 10)
    with pytest.raises(ValueError, match=r"cannot take \*args or \*\*kwargs"):
        @jupyter_stream.batched(max_batch_size=4, wait_ms=1)
        def star(*xs):
            return xs
    with pytest.raises(ValueError, match="takes no parameters"):
        @jupyter_stream.batched(max_batch_size=4, wait_ms=1)
        def nothing():
            return []

    def plain(xs):
        return xs

    handle = register_function(plain, connection=server.connection)
    with pytest.raises(TypeError, match="below @jupyter_stream.function"):
        jupyter_stream.batched(max_batch_size=4, wait_ms=1)(handle)
    with pytest.raises(ValueError, match="max_batch_size must be"):
        register_function(plain, connection=server.connection, batch={"max_batch_size": 5000, "wait_ms": 1})
    # the server checks again, whoever registers
    body = {"name": "raw", "function": "AA==", "batch": {"max_batch_size": 4}}
    r = httpx.post(server.url + "api/stream/functions", json=body, headers=server.headers)
    assert r.status_code == 400 and "'batch' must be null or an object" in r.json()["message"]

    @jupyter_stream.batched(max_batch_size=4, wait_ms=1)
    def chat(messages: list):
        yield ["hi" for _ in messages]

    with pytest.raises(ValueError, match="an --openai endpoint cannot be batched"):
        register_endpoint(chat, connection=server.connection, openai=True)


def test_a_failing_batcher_fails_what_waits_and_says_so_once(caplog):
    """The batcher's loop is supervised: should it fail (a bug of ours, here a pool that
    raises), one log line names the function and why, and every input waiting fails with
    the error instead of hanging; the next input starts a new loop."""
    from jupyter_stream.server.batching import BatchItem, batcher_for
    from jupyter_stream.server.registry import FunctionSpec

    spec = FunctionSpec(name="f", fn_hash="h", fn_blob=b"", batch={"max_batch_size": 4, "wait_ms": 0})

    class BrokenPool:
        def try_acquire(self):
            raise RuntimeError("boom")

    async def main():
        errors = []
        batcher = batcher_for(spec, "function")
        for _ in range(3):
            batcher.submit(BatchItem(lambda data, buffers: None, {"pickled": b""}, refused=errors.append), BrokenPool())
        await asyncio.sleep(0.1)
        assert batcher.task is None and not batcher.pending
        batcher.submit(BatchItem(lambda data, buffers: None, {"pickled": b""}, refused=errors.append), BrokenPool())
        await asyncio.sleep(0.1)
        return errors

    with caplog.at_level(logging.ERROR, logger="jupyter_stream"):
        errors = asyncio.run(main())
    assert len(errors) == 4
    assert all(e["type"] == "WorkerError" and "forming batches of function 'f': RuntimeError: boom" in e["message"]
               for e in errors)
    lines = [r.getMessage() for r in caplog.records if "batcher" in r.getMessage()]
    assert lines == ["jupyter_stream: the batcher of function 'f' failed: RuntimeError: boom"] * 2, lines
