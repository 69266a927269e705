"""Remote functions: every call form, sync and .aio, against a real server and worker kernels."""

import asyncio
import os
import pickle
import signal
import subprocess
import tempfile
import textwrap
import threading
import time

import httpx
import pytest

import jupyter_stream
from jupyter_stream import FunctionTimeoutError, StreamingResponse
from jupyter_stream.client.functions import MAX_BATCH, MAX_IN_FLIGHT, register_function


class CustomError(Exception):
    pass


@pytest.fixture()
def register(jstream_server):
    return lambda fn, **kw: register_function(fn, connection=jstream_server.connection, **kw)


def test_remote_returns_values_and_streams_generators(register):
    def add(a, b=1):
        return {"sum": a + b}

    def count(n):
        for i in range(n):
            yield i * 10

    add_f, count_f = register(add), register(count)
    assert add_f.remote(2, b=5) == {"sum": 7}
    assert list(count_f.remote(4)) == [0, 10, 20, 30]
    assert list(count_f.remote_gen(2)) == [0, 10]
    assert add_f.local(1) == {"sum": 2}
    call = add_f.spawn(40, 2)
    assert call.get(timeout=30) == {"sum": 42}

    async def aio():
        value = await add_f.remote.aio(1, 1)
        streamed = [x async for x in count_f.remote.aio(3)]
        spawned = await add_f.spawn.aio(5)
        return value, streamed, await spawned.get.aio()

    assert asyncio.run(aio()) == ({"sum": 2}, [0, 10, 20], {"sum": 6})


def test_sync_forms_work_inside_a_running_event_loop(register):
    """A notebook cell runs inside ipykernel's loop: the sync forms must not need .aio."""

    def double(x):
        return 2 * x

    f = register(double)

    async def cell():
        return f.remote(21), list(f.map([1, 2, 3]))

    assert asyncio.run(cell()) == (42, [2, 4, 6])


def test_map_orders_both_ways(register, jstream_server):
    def slow_for_small(x):
        import time

        time.sleep(0.5 if x == 0 else 0.0)
        return x

    f = register(slow_for_small)
    jstream_server.wait_for_workers(2)
    assert list(f.map(range(20))) == list(range(20))
    unordered = list(f.map(range(20), order_outputs=False))
    assert sorted(unordered) == list(range(20)) and unordered[0] != 0  # item 0 is the slow one
    assert list(f.starmap([(3,), (4,)])) == [3, 4]

    def power(x, p, scale=1):
        return scale * x**p

    g = register(power)
    assert list(g.map([1, 2, 3], [2, 2, 3], kwargs={"scale": 10})) == [10, 40, 270]
    assert list(g.starmap([(2, 3), (3, 2)])) == [8, 9]

    async def aio():
        ordered = [x async for x in f.map.aio(range(6))]
        star = [x async for x in g.starmap.aio([(2, 2)])]

        async def agen():
            for i in range(3):
                yield i

        from_async = [x async for x in f.map.aio(agen())]
        await f.for_each.aio(range(3))
        return ordered, star, from_async

    assert asyncio.run(aio()) == (list(range(6)), [4], [0, 1, 2])
    assert f.for_each(range(5)) is None


def test_errors_keep_their_type_and_traceback(register):
    def fails(x):
        if x == 3:
            raise CustomError(f"item {x} is bad")
        return x

    f = register(fails)
    with pytest.raises(CustomError, match="item 3 is bad") as info:
        f.remote(3)
    assert "in fails" in str(info.value.__cause__) and 'raise CustomError(f"item {x} is bad")' in str(info.value.__cause__)
    with pytest.raises(CustomError):
        list(f.map(range(10)))
    results = list(f.map(range(6), return_exceptions=True))
    assert results[:3] == [0, 1, 2] and results[4:] == [4, 5]
    assert isinstance(results[3], CustomError)

    def unpicklable_error():
        import threading

        class Odd(Exception):
            def __init__(self):
                super().__init__("odd")
                self.lock = threading.Lock()

        raise Odd()

    with pytest.raises(jupyter_stream.RemoteError, match="Odd: odd"):
        register(unpicklable_error).remote()


def test_map_of_a_generator_function_is_refused(register):
    def gen():
        yield 1

    with pytest.raises(TypeError, match=r"cannot be mapped: call gen.remote\(...\)"):
        list(register(gen).map(range(3)))


def test_retries_rerun_failed_items(register):
    marks = tempfile.mkdtemp(prefix="jupyter-stream-retries-")

    def flaky(x, marks=marks):
        import os

        mark = os.path.join(marks, str(x))
        if x % 2 and not os.path.exists(mark):
            open(mark, "w").close()
            raise RuntimeError(f"first try of {x} fails")
        return x

    assert list(register(flaky, retries=1).map(range(10))) == list(range(10))
    with pytest.raises(RuntimeError, match="first try of 11 fails"):
        register(flaky, name="flaky_no_retry").remote(11)
    assert register(flaky, name="flaky_retry", retries=2).remote(13) == 13


def test_timeout_limits_one_attempt(register, jstream_server):
    def sleepy(seconds):
        import time

        time.sleep(seconds)
        return seconds

    replaced = jstream_server.workers()["replaced"]
    f = register(sleepy, timeout=1.0)
    start = time.monotonic()
    with pytest.raises(FunctionTimeoutError):
        f.remote(30)
    assert time.monotonic() - start < 5
    assert f.remote(0.1) == 0.1  # the stuck worker was replaced; calls go on
    results = list(f.map([0.0, 30, 0.0], return_exceptions=True))
    assert results[0] == 0.0 and results[2] == 0.0 and isinstance(results[1], FunctionTimeoutError)
    # both sleeps are stuck in C: their kernels are recycled 5 s after their timeouts; the
    # tests after this one count replacements, so they must not see these happen
    deadline = time.monotonic() + 30
    while jstream_server.workers()["replaced"] < replaced + 2:
        assert time.monotonic() < deadline, "the stuck workers were not recycled"
        time.sleep(0.1)
    jstream_server.wait_for_workers(2)


def test_killed_worker_loses_no_map_item(register, jstream_server):
    def tag(x):
        import os
        import time

        time.sleep(0.001)
        return x, os.getpid()

    f = register(tag)
    jstream_server.wait_for_workers(2)
    replaced = jstream_server.workers()["replaced"]
    results = []
    for value in f.map(range(3000)):
        results.append(value)
        if len(results) == 500:
            os.kill(value[1], signal.SIGKILL)
    assert [x for x, _ in results] == list(range(3000))  # each exactly once, in order
    jstream_server.wait_for_workers(2)
    assert jstream_server.workers()["replaced"] == replaced + 1


def test_break_cancels_the_rest_and_frees_workers(register, jstream_server):
    ran = tempfile.mkdtemp(prefix="jupyter-stream-ran-")

    def slow(x, ran=ran):
        import os
        import time

        open(os.path.join(ran, str(x)), "w").close()
        time.sleep(0.1)
        return x

    f = register(slow)
    for value in f.map(range(1000)):
        if value == 2:
            break
    time.sleep(1.0)
    count = len(os.listdir(ran))
    assert count < 100, f"{count} items ran after the consumer stopped"
    assert jstream_server.wait_until_idle(), jstream_server.workers()
    assert len(os.listdir(ran)) == count  # nothing more ran


def test_inputs_are_consumed_lazily(register):
    pulled = []

    def inputs():
        for i in range(10_000_000):
            pulled.append(i)
            yield i

    f = register(lambda x: x, name="identity")
    it = f.map(inputs())
    assert next(it) == 0
    assert len(pulled) <= MAX_IN_FLIGHT + MAX_BATCH
    for value in it:
        if value == 50_000:
            break
    assert len(pulled) <= 50_001 + MAX_IN_FLIGHT + MAX_BATCH  # never the ten million


def test_function_handles_pickle_as_references_and_work_inside_workers(register):
    def big(x):
        return x

    f = register(big)
    assert len(pickle.dumps(f)) < 200

    def caller(fn, x):
        return fn.remote(x), list(fn.map(range(x)))

    # the handle travels to a worker as a reference; the worker calls back through the server
    assert register(caller).remote(f, 4) == (4, [0, 1, 2, 3])


def test_reference_examples_through_curl(jstream_server, register):
    """The reference page's examples with our names, served and read with curl --no-buffer."""

    def fake_video_render():
        import time

        for i in range(5):
            yield f"data: finished processing some data from GPU {i}\n\n".encode()
            time.sleep(0.2)

    render = register(fake_video_render)

    def hook():
        return StreamingResponse(render.remote(), media_type="text/event-stream")

    def map_me(i):
        return f"segment {i}\n"

    map_me_f = register(map_me)

    def mapped():
        return StreamingResponse(map_me_f.map(range(10)), media_type="text/plain")

    def transcribe_segment(segment):
        return segment.upper()

    transcribe = register(transcribe_segment, name="transcribe")

    async def transcribe_video(text: str = "a b c"):
        import asyncio

        segments = await asyncio.to_thread(str.split, text)

        async def wrapper(segments):
            async for partial_result in transcribe.map.aio(segments):
                yield "data: " + partial_result + "\n\n"

        return StreamingResponse(wrapper(segments), media_type="text/event-stream")

    for fn in (hook, mapped, transcribe_video):
        jstream_server.register(fn)

    def curl(path):
        start = time.monotonic()
        proc = subprocess.Popen(
            ["curl", "--no-buffer", "-sS", "-H", f"Authorization: token {jstream_server.token}", jstream_server.url + path],
            stdout=subprocess.PIPE,
        )
        lines = [(time.monotonic() - start, line.decode()) for line in proc.stdout if line.strip()]
        assert proc.wait() == 0
        return lines

    hook_lines = curl("stream/hook")
    assert [line for _, line in hook_lines] == [f"data: finished processing some data from GPU {i}\n" for i in range(5)]
    assert hook_lines[-1][0] - hook_lines[0][0] >= 0.7  # streamed as produced, not at the end
    assert "".join(line for _, line in curl("stream/mapped")) == "".join(f"segment {i}\n" for i in range(10))
    assert [line for _, line in curl("stream/transcribe_video?text=one%20two")] == ["data: ONE\n", "data: TWO\n"]


def test_stream_function_magic(jstream_server, jstream_notebook_kernel):
    jstream_notebook_kernel.execute("%load_ext jupyter_stream")
    outputs, reply = jstream_notebook_kernel.execute(textwrap.dedent(
        '''
        %%stream_function --retries 1 --timeout 30
        OFFSET = 100

        def shifted(x):
            return x + OFFSET
        '''
    ).lstrip())
    assert reply["status"] == "ok", jstream_notebook_kernel.text(outputs)
    confirmation = jstream_notebook_kernel.text(outputs)  # one line, naming the call forms
    assert "<Function 'shifted' (function); call .remote(), .map()" in confirmation and confirmation.count("\n") <= 2
    outputs, reply = jstream_notebook_kernel.execute("print(shifted.remote(1), list(shifted.map(range(3))), type(shifted).__name__)")
    text = jstream_notebook_kernel.text(outputs)
    assert "101 [100, 101, 102] Function" in text
    # the map showed a progress widget whose plain-text fallback is a summary, not a repr
    widgets = [o for o in outputs if o["type"] == "display_data"]
    assert widgets and "application/vnd.jupyter.widget-view+json" in widgets[0]["data"]
    assert "shifted.map: 0/3 done" in widgets[0]["data"]["text/plain"]
    outputs, _ = jstream_notebook_kernel.execute("list(shifted.map(range(3), progress=False))")
    assert not [o for o in outputs if o["type"] == "display_data"]
    outputs, reply = jstream_notebook_kernel.execute("%%stream_function --timeout -1\ndef f(x):\n    return x\n")
    assert reply["status"] == "error" and "timeout must be a positive number" in jstream_notebook_kernel.text(outputs)


def test_unknown_function_is_a_clear_error(jstream_server):
    f = jupyter_stream.Function("never_registered", connection=jstream_server.connection)
    with pytest.raises(LookupError, match="no function named 'never_registered'"):
        f.remote()


def test_concurrent_callers_share_the_pool(register):
    def square(x):
        return x * x

    f = register(square)
    results = {}

    def caller(k):
        results[k] = list(f.map(range(k * 100, k * 100 + 50)))

    threads = [threading.Thread(target=caller, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert all(results[k] == [x * x for x in range(k * 100, k * 100 + 50)] for k in range(4))


def test_calls_from_a_worker_run_on_it_when_the_pool_is_full(jstream_start_server):
    """With one worker, an endpoint that calls functions would wait forever for a second
    worker; its calls run on its own worker instead, in threads of their own."""
    server = jstream_start_server(["--JupyterStream.min_workers=1", "--JupyterStream.max_workers=1"])

    def square(x):
        import os

        return x * x, os.getpid()

    square_f = register_function(square, connection=server.connection)

    def uses_square(n: int = 4):
        value, pid = square_f.remote(n)
        yield f"remote {value} {pid}\n"
        for value, _ in square_f.map(range(n)):
            yield f"map {value}\n"

    async def uses_square_aio(n: int = 3):
        yield f"aio {(await square_f.remote.aio(n))[0]}\n"
        async for value, _ in square_f.map.aio(range(n)):
            yield f"aio map {value}\n"

    sync_endpoint = server.register(uses_square, media_type="text/plain")
    async_endpoint = server.register(uses_square_aio, media_type="text/plain")
    (worker,) = server.wait_for_workers(1)
    r = httpx.get(sync_endpoint.url, headers=server.headers, timeout=30)
    assert r.status_code == 200, r.text
    assert r.text == f"remote 16 {worker['pid']}\n" + "".join(f"map {i * i}\n" for i in range(4))
    r = httpx.get(async_endpoint.url, headers=server.headers, timeout=30)
    assert r.text == "aio 9\n" + "".join(f"aio map {i * i}\n" for i in range(3))
    assert server.wait_until_idle(), server.workers()
    # and from the notebook side, with the worker free again, calls run as usual
    assert square_f.remote(5) == (25, worker["pid"])


def test_an_input_that_kills_its_kernel_fails_instead_of_killing_them_all(register, jstream_server):
    def crash_on_five(x):
        import os

        if x == 5:
            os._exit(1)  # as a segfault or the OOM killer would
        return x

    f = register(crash_on_five)
    replaced = jstream_server.workers()["replaced"]
    results = list(f.map(range(10), return_exceptions=True))
    assert results[:5] == [0, 1, 2, 3, 4] and results[6:] == [6, 7, 8, 9]
    # 3 deaths with the item alone on its kernel, plus any before it was known to be the culprit
    assert isinstance(results[5], jupyter_stream.WorkerDied) and "times running this call" in str(results[5])
    with pytest.raises(jupyter_stream.WorkerDied, match="died 3 times"):
        f.remote(5)
    # three deaths for .remote; for .map three once the culprit ran alone, plus the few
    # it took to find it (a death is only counted against an item that ran alone)
    assert jstream_server.workers()["replaced"] - replaced <= 10
    jstream_server.wait_for_workers(2)


def test_large_arguments_inputs_and_results_travel(register):
    def size(blob):
        return len(blob)

    def blob(x):
        return bytes([x % 256]) * 100_000

    # 20 MB of results: each lane returns far more than the 8 MiB it may run ahead
    results = list(register(blob).map(range(200)))
    assert [r[:1] for r in results] == [bytes([x % 256]) for x in range(200)] and {len(r) for r in results} == {100_000}

    f = register(size)
    if os.environ.get("JUPYTER_STREAM_TEST_WORKER_GATEWAY"):  # a gateway takes 10 MiB WebSocket messages at most
        with pytest.raises(Exception, match=r"11.0 MiB, over the 10.0 MiB the worker gateway at .* accepts"):
            f.remote(b"x" * (11 << 20))
        assert f.remote(b"x" * (9 << 20)) == 9 << 20  # the worker and its channel are unharmed
    else:
        assert f.remote(b"x" * (11 << 20)) == 11 << 20  # above tornado's default 10 MiB message
    # 8 KB inputs: batches of thousands of them are split into messages of a few MiB
    assert list(f.map([b"y" * 8000] * 6000)) == [8000] * 6000


def test_abandoned_calls_free_their_workers_and_the_connection(register, jstream_server):
    def slow(seconds):
        import time

        time.sleep(seconds)
        return seconds

    def ticks():
        import time

        while True:
            yield 1
            time.sleep(0.05)

    slow_f, ticks_f = register(slow), register(ticks)

    async def give_up():
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(slow_f.remote.aio(1.0), 0.2)

    asyncio.run(give_up())  # its loop is closed when the result arrives
    time.sleep(1.2)
    assert slow_f.remote(0) == 0  # the process's connection still works
    unstarted = ticks_f.remote()  # never iterated: it must not hold a worker
    del unstarted
    assert jstream_server.wait_until_idle(), jstream_server.workers()


def test_the_pool_never_grows_past_max_workers(jstream_start_server):
    server = jstream_start_server(["--JupyterStream.min_workers=0", "--JupyterStream.max_workers=2"])

    def nap(x):
        import time

        time.sleep(0.5)
        return x

    f = register_function(nap, connection=server.connection)
    calls = [f.spawn(i) for i in range(6)]  # all arrive while no kernel is up yet
    finished, sizes = threading.Event(), []

    def watch():
        while not finished.is_set():
            info = server.workers()
            sizes.append((len(info["workers"]) + info["starting"], info))
            time.sleep(0.05)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        assert [c.get(timeout=30) for c in calls] == list(range(6))
    finally:
        finished.set()
        watcher.join()
    assert sizes and max(size for size, _ in sizes) <= 2, max(sizes, key=lambda s: s[0])


def test_a_function_that_failed_to_load_loads_once_its_module_is_there(jstream_start_server, tmp_path, monkeypatch):
    """A module the notebook has and the worker lacks: a clear error, and the same worker
    loads the function once the module is installed there, without re-registering."""
    server = jstream_start_server(["--JupyterStream.min_workers=1", "--JupyterStream.max_workers=1"])
    module = "jupyter_stream_test_helper_" + os.urandom(4).hex()
    source = "def bump(x):\n    return x + 1\n"
    (tmp_path / f"{module}.py").write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    helper = __import__(module)

    def uses_helper(x, bump=helper.bump):  # pickled by reference to the module
        return bump(x)

    f = register_function(uses_helper, connection=server.connection)
    with pytest.raises(ModuleNotFoundError, match=module):
        f.remote(1)
    workers_cwd = server.gateway.data_dir if server.gateway is not None else server.root_dir  # a gateway's kernels: its own
    with open(os.path.join(workers_cwd, f"{module}.py"), "w") as out:
        out.write(source)
    assert f.remote(1) == 2
    assert f.remote(2) == 3


def test_workers_freeze_their_start_up_objects_unless_told_not_to(register, jstream_start_server):
    """`JupyterStream.freeze_gc` (on by default): a worker's start-up objects leave the garbage
    collector's generations, so a full collection (which holds the GIL, pausing every call)
    walks only what calls make; `freeze_gc=False` leaves the kernel's collector as it was."""

    def frozen():
        import gc

        return gc.get_freeze_count()

    assert register(frozen).remote() > 10_000  # IPython, ipykernel and the worker's own modules
    server = jstream_start_server(["--JupyterStream.freeze_gc=False"])
    assert register_function(frozen, connection=server.connection).remote() == 0
