"""`%%stream_class` and `@jupyter_stream.cls`: enter once per worker, methods with every
call form, endpoint methods, constructor parameters, the notebook dev loop, exit on
scale-down, a failing enter, and many concurrent streams on one worker."""

import concurrent.futures
import time

import httpx
import pytest

import jupyter_stream
from jupyter_stream.client.classes import register_class


@pytest.fixture
def server(jstream_start_server):
    return jstream_start_server(["--JupyterStream.min_workers=0", "--JupyterStream.max_workers=4",
                                 "--JupyterStream.worker_poll_interval=0.2"])


def make_model(log_dir, tag="v1", load_code="base"):
    """A class as a notebook would define it; `log_dir` collects enter/exit lines per pid."""

    class Model:
        def __init__(self, size: str = "small"):
            self.size = size

        @jupyter_stream.enter
        def load(self):
            import os

            with open(f"{log_dir}/enter-{os.getpid()}", "a") as f:
                f.write(f"{load_code} {self.size}\n")
            self.weights = {"small": 2, "large": 10}[self.size]

        @jupyter_stream.method
        def predict(self, x: int) -> dict:
            import os

            return {"y": x * self.weights, "pid": os.getpid(), "tag": tag}

        @jupyter_stream.method
        def tokens(self, n: int = 3):
            for i in range(n):
                yield f"{tag}-{i}"

        @jupyter_stream.endpoint(media_type="text/event-stream")
        def chat(self, prompt: str, n: int = 2):
            """Stream n words about the prompt."""
            import time

            for i in range(n):
                yield f"data: {prompt} {i} x{self.weights} {tag}\n\n"
                time.sleep(0.01)

        @jupyter_stream.exit
        def unload(self):
            import os

            with open(f"{log_dir}/exit-{os.getpid()}", "a") as f:
                f.write("bye\n")

    return Model


def enters(log_dir):
    return {p.name: p.read_text().splitlines() for p in log_dir.glob("enter-*")}


def test_enter_runs_once_per_worker_across_calls_and_call_forms(server, tmp_path):
    served = register_class(make_model(tmp_path), connection=server.connection, scaledown_window=60)
    model = served()
    assert [model.predict.remote(i)["y"] for i in range(5)] == [0, 2, 4, 6, 8]
    assert list(model.tokens.remote(n=2)) == ["v1-0", "v1-1"]
    assert list(model.predict.map(range(4))) == [{"y": i * 2, "pid": model.predict.remote(0)["pid"], "tag": "v1"} for i in range(4)]
    r = server.get("stream/Model.chat?prompt=hi&n=2")
    assert r.text == "data: hi 0 x2 v1\n\ndata: hi 1 x2 v1\n\n"
    assert model.chat.url == server.url + "stream/Model.chat"
    assert enters(tmp_path) == {f"enter-{model.predict.remote(0)['pid']}": ["base small"]}  # once, on the one worker
    info = server.get("api/stream/endpoints/Model.chat").json()
    assert [p["name"] for p in info["parameters"]] == ["prompt", "n"] and info["doc"] == "Stream n words about the prompt."
    assert "Model.predict" in repr(served) or ".predict" in repr(served)


def test_constructor_parameters_select_their_own_warm_workers(server, tmp_path):
    served = register_class(make_model(tmp_path), connection=server.connection)
    small, large = served(), served(size="large")
    assert small.predict.remote(3)["y"] == 6 and large.predict.remote(3)["y"] == 30
    assert small.predict.remote(0)["pid"] != large.predict.remote(0)["pid"]
    assert sorted(line for lines in enters(tmp_path).values() for line in lines) == ["base large", "base small"]
    assert large.chat.url.startswith(server.url + "stream/Model-") and large.chat.url.endswith(".chat")
    assert served(size="large") is large  # the same parameters, the same handles


def test_rerunning_an_unchanged_enter_keeps_the_model_and_runs_the_new_code(server, tmp_path):
    first = register_class(make_model(tmp_path, tag="v1"), connection=server.connection)()
    pid = first.predict.remote(1)["pid"]
    again = register_class(make_model(tmp_path, tag="v2"), connection=server.connection)()  # the cell ran again, new methods
    got = again.predict.remote(1)
    assert got["tag"] == "v2" and got["pid"] == pid
    assert server.get("stream/Model.chat?prompt=a&n=1").text == "data: a 0 x2 v2\n\n"
    assert enters(tmp_path) == {f"enter-{pid}": ["base small"]}  # enter did not run again
    changed = register_class(make_model(tmp_path, tag="v3", load_code="new"), connection=server.connection)()
    fresh = changed.predict.remote(1)
    assert fresh["tag"] == "v3" and fresh["pid"] != pid  # a changed enter: fresh workers
    assert enters(tmp_path)[f"enter-{fresh['pid']}"] == ["new small"]


def test_exit_runs_when_the_worker_is_scaled_down(server, tmp_path):
    model = register_class(make_model(tmp_path), connection=server.connection, scaledown_window=1.0)()
    pid = model.predict.remote(1)["pid"]
    deadline = time.monotonic() + 30
    while not (tmp_path / f"exit-{pid}").exists():
        assert time.monotonic() < deadline, server.workers()
        time.sleep(0.2)
    assert (tmp_path / f"exit-{pid}").read_text() == "bye\n"


def test_a_failing_enter_fails_its_calls_once_without_retrying(server, tmp_path):
    class Broken:
        @jupyter_stream.enter
        def load(self):
            with open(f"{tmp_path}/attempts", "a") as f:
                f.write("x")
            raise RuntimeError("weights file missing")

        @jupyter_stream.method
        def predict(self, x):
            return x

    broken = register_class(Broken, connection=server.connection)()
    for _ in range(3):
        with pytest.raises(RuntimeError, match="weights file missing") as raised:
            broken.predict.remote(1)
    assert "load" in "".join(__import__("traceback").format_exception(raised.value.__cause__ or raised.value))
    assert (tmp_path / "attempts").read_text() == "x"  # enter ran once


def test_many_concurrent_streams_share_one_worker(server, tmp_path):
    class Slow:
        @jupyter_stream.enter
        def load(self):
            import os

            self.pid = os.getpid()

        @jupyter_stream.endpoint(media_type="text/event-stream")
        def words(self, n: int = 10):
            import time

            for i in range(n):
                time.sleep(0.1)
                yield f"data: {self.pid} {i}\n\n"

    register_class(Slow, connection=server.connection, concurrency=50, max_workers=1)
    url = server.url + "stream/Slow.words"
    httpx.get(url + "?n=1", headers=server.headers, timeout=60)  # the worker is up
    started = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(50) as pool:
        bodies = list(pool.map(lambda _: httpx.get(url, headers=server.headers, timeout=60).text, range(50)))
    took = time.monotonic() - started
    pids = {line.split()[1] for body in bodies for line in body.splitlines() if line}
    assert all(body.count("data: ") == 10 for body in bodies) and len(pids) == 1
    assert took < 5, took  # one stream takes 1 s; one at a time, 50 would take 50 s


def test_the_magic(jstream_server, jstream_notebook_kernel):
    kernel = jstream_notebook_kernel
    kernel.execute("%load_ext jupyter_stream\nimport jupyter_stream")
    cell = ("%%stream_class --concurrency 4\nclass Echo:\n    @jupyter_stream.enter\n    def load(self):\n        self.prefix = '>'\n\n"
            "    @jupyter_stream.method\n    def say(self, text: str):\n        return self.prefix + text\n")
    outputs, reply = kernel.execute(cell)
    assert reply["status"] == "ok" and ".say" in kernel.text(outputs), kernel.text(outputs)
    outputs, reply = kernel.execute("print(Echo().say.remote('hi'))")
    assert kernel.text(outputs).strip() == ">hi"
    outputs, reply = kernel.execute("%%stream_class\nx = 1\n")
    assert reply["status"] == "error" and "defines no class" in kernel.text(outputs)
    outputs, reply = kernel.execute("%%stream_class\nclass Nothing:\n    def f(self):\n        pass\n")
    assert reply["status"] == "error" and "no @jupyter_stream.method" in kernel.text(outputs)
