"""The defects a review reproduced (issue 17), one test each, against real servers and
workers: nested calls that waited for ever, plain values committed as SSE, idle maps that
held workers, timeouts that killed a whole kernel, an unbounded whole completion, workers
that kept every function, cookie-only GETs that ran code, CORS headers lost on errors,
secrets in logs and in workers, shares never forgotten, and loops that died silently.
(Faults injected at boundaries are in `test_faults.py`; bad bodies and queries in
`test_bad_inputs.py`.)"""

import asyncio
import itertools
import logging
import os
import sys
import tempfile
import threading
import time

import httpx
import pytest

from jupyter_stream import FunctionTimeoutError, StreamingResponse
from jupyter_stream.client.endpoints import register_endpoint
from jupyter_stream.client.functions import register_function

ORIGIN = "https://demo.example"


@pytest.fixture(scope="module")
def server(jstream_start_server):
    """At most 2 workers in all, fast polling, a short grace period, headers committed
    after 0.5 s, one allowed CORS origin."""
    server = jstream_start_server([
        "--JupyterStream.min_workers=1", "--JupyterStream.max_workers=2", "--JupyterStream.worker_poll_interval=0.2",
        "--JupyterStream.cancel_grace_period=1", "--JupyterStream.commit_headers_after=0.5",
        f"--JupyterStream.cors_origins={ORIGIN}",
    ])
    server.wait_for_workers(1)
    return server


def trivial():
    yield "data: ok\n\n"


def pool_of(server, name, kind="endpoints"):
    return next(p for p in server.workers()["pools"] if name in p[kind])


# -- 5: nested calls into another pool --------------------------------------------------


def test_nested_calls_into_another_pool_run_when_their_callers_hold_every_seat(server):
    """Two endpoint calls take both of the server's seats (max_workers=2) and each calls a
    function of another pool (its own --env): that call used to wait for a seat for ever."""

    def elsewhere(x):
        import os

        return f"{x} ran in {os.environ['POOL']}"

    other = register_function(elsewhere, connection=server.connection, env={"POOL": "other"})

    def caller(x: int):
        import time

        time.sleep(0.5)  # both requests hold their workers before either calls
        return other.remote(x)

    register_endpoint(caller, connection=server.connection)
    results = {}

    def request(x):
        results[x] = httpx.get(server.url + "stream/caller", params={"x": x}, headers=server.headers, timeout=60)

    threads = [threading.Thread(target=request, args=(x,)) for x in (1, 2)]
    start = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert time.monotonic() - start < 30
    assert {x: r.text for x, r in results.items()} == {1: "1 ran in other", 2: "2 ran in other"}, results
    assert "over max_workers" in server.log()


def test_a_nested_call_that_cannot_get_a_gpu_fails_after_its_queue_timeout(jstream_start_server):
    server = jstream_start_server(["--JupyterStream.min_workers=0", "--JupyterStream.max_workers=4",
                                   "--JupyterStream.simulated_gpus=NVIDIA H100 80GB HBM3"])

    def on_gpu():
        return "never"

    inner = register_function(on_gpu, connection=server.connection, gpu="H100", env={"ROLE": "inner"}, queue_timeout=2)

    def holds_the_gpu():
        return inner.remote()

    register_endpoint(holds_the_gpu, connection=server.connection, gpu="H100")
    start = time.monotonic()
    r = server.get("stream/holds_the_gpu")
    assert time.monotonic() - start < 30
    assert r.status_code == 500, r.text
    error = r.json()["error"]
    assert error["type"] == "TimeoutError" and "no worker of function 'on_gpu' became free in 2 s" in error["message"], error
    assert "gpu H100" in error["message"]


# -- 6: plain values keep their status and type ------------------------------------------


def test_a_slow_plain_value_keeps_its_status_and_type(server):
    """A plain-value endpoint slower than commit_headers_after (0.5 s here) used to be
    committed as SSE (200 text/event-stream, a keep-alive, then the JSON)."""

    def slow_value():
        import time

        time.sleep(1.2)
        return {"y": 2}

    def slow_failure():
        import time

        time.sleep(1.2)
        raise ValueError("no value today")

    register_endpoint(slow_value, connection=server.connection)
    register_endpoint(slow_failure, connection=server.connection)
    r = server.get("stream/slow_value")
    assert (r.status_code, r.headers["content-type"], r.text) == (200, "application/json", '{"y":2}')
    r = server.get("stream/slow_failure")
    assert r.status_code == 500 and r.headers["content-type"] == "application/json", (r.status_code, r.text)
    assert r.json()["error"]["message"] == "no value today"


# -- 8: a map whose caller stops reading ----------------------------------------------


def test_a_held_map_iterator_does_not_hold_its_workers(server):
    """`it = f.map(count()); next(it)` used to keep every lane's worker busy with no work,
    so the pool's endpoints got 503."""

    def echo(x):
        return x

    def probe():
        return "free"

    requirements = {"env": {"POOL": "held-map"}, "max_workers": 2}
    f = register_function(echo, connection=server.connection, **requirements)
    register_endpoint(probe, connection=server.connection, queue_timeout=10, **requirements)
    it = f.map(itertools.count())
    assert next(it) == 0
    deadline = time.monotonic() + 10
    while any(w["busy"] for w in pool_of(server, "probe")["workers"]):
        assert time.monotonic() < deadline, pool_of(server, "probe")
        time.sleep(0.1)
    start = time.monotonic()
    r = server.get("stream/probe")
    assert (r.status_code, r.text) == (200, "free") and time.monotonic() - start < 5
    assert [next(it) for _ in range(3)] == [1, 2, 3]  # reading on opens lanes again
    it.close()


# -- 9: a timeout with --concurrency ---------------------------------------------------


def test_a_timeout_stops_only_its_own_call_on_a_shared_worker(server):
    """With --concurrency, a call past its --timeout used to get the whole kernel replaced:
    the other calls died with WorkerDied and a class's model was unloaded."""

    def share(kind: str):
        import os
        import time

        if kind == "spin":  # pure Python: its thread is interrupted
            while True:
                pass
        if kind == "sleep":  # in C: it cannot be interrupted, the kernel is replaced once the others are done
            time.sleep(60)
        if kind == "ok":
            time.sleep(2)
        return os.getpid()

    async def share_async():
        import asyncio

        await asyncio.sleep(60)

    requirements = {"env": {"POOL": "concurrent"}, "max_workers": 1, "concurrency": 4}
    f = register_function(share, connection=server.connection, timeout=3, **requirements)
    fa = register_function(share_async, connection=server.connection, timeout=3, **requirements)
    pid = f.remote("pid")
    spin, stuck_async = f.spawn("spin"), fa.spawn()
    time.sleep(1.5)
    beside = [f.spawn("ok"), f.spawn("ok")]  # running when the other two time out
    for call in (spin, stuck_async):
        with pytest.raises(FunctionTimeoutError):
            call.get(timeout=30)
    assert [c.get(timeout=30) for c in beside] == [pid, pid]  # they finished on the same kernel
    assert f.remote("pid") == pid and pool_of(server, "share", "functions")["replaced"] == 0
    # code that cannot be interrupted: its kernel is replaced once the calls beside it are done
    stuck = f.spawn("sleep")
    time.sleep(1.5)
    beside = f.spawn("ok")
    with pytest.raises(FunctionTimeoutError):
        stuck.get(timeout=30)
    assert beside.get(timeout=30) == pid
    deadline = time.monotonic() + 30
    while f.remote("pid") == pid:
        assert time.monotonic() < deadline, server.log()[-3000:]
        time.sleep(0.2)
    assert "did not stop within 1 s of being interrupted" in server.log()


# -- 11: whole completions --------------------------------------------------------------


def test_a_whole_completion_is_capped(server):
    def chatty(messages: list):
        for _ in range(24):
            yield "x" * (1 << 20)

    register_endpoint(chatty, connection=server.connection, openai=True)
    r = httpx.post(server.url + "stream/chatty/v1/chat/completions", headers=server.headers, timeout=60,
                   json={"model": "chatty", "messages": [{"role": "user", "content": "hi"}], "stream": False})
    assert r.status_code == 500, r.text[:300]
    assert 'longer than 16 MiB; ask for it with "stream": true' in r.json()["error"]["message"]
    deadline = time.monotonic() + 10
    while any(w["busy"] for w in pool_of(server, "chatty")["workers"]):
        assert time.monotonic() < deadline
        time.sleep(0.1)


# -- 12: workers forget functions nobody uses ------------------------------------------


def test_workers_keep_only_the_functions_registrations_use(server):
    """Each re-run of a cell used to add another unpickled function (and its globals) to
    every warm worker, for good."""
    requirements = {"env": {"POOL": "versions"}, "max_workers": 1}
    for version in range(5):
        code = (f"def cached(v={version}):\n"
                "    import jupyter_stream.worker.runtime as runtime\n"
                "    return v, len(runtime._worker.functions) + len(runtime._worker.pickled)\n")
        scope = {}
        exec(compile(code, f"<version {version}>", "exec"), scope)
        f = register_function(scope["cached"], connection=server.connection, **requirements)
        assert f.remote() == (version, 1)


# -- 13 and "also found": who a request is ---------------------------------------------


def test_a_login_cookie_alone_runs_an_endpoint_only_from_the_servers_own_pages(server):
    register_endpoint(trivial, connection=server.connection)
    with httpx.Client(base_url=server.url, timeout=30) as browser:
        assert browser.get("api/stream/workers", params={"token": server.token}).status_code == 200
        assert any(c.startswith("username-") for c in browser.cookies), browser.cookies  # the login cookie
        for site in (None, "cross-site", "same-site"):
            headers = {"Sec-Fetch-Site": site} if site else {}
            r = browser.get("stream/trivial", headers=headers)
            assert r.status_code == 403 and "from this server's own pages" in r.json()["message"], (site, r.text)
        for site in ("same-origin", "none"):
            assert browser.get("stream/trivial", headers={"Sec-Fetch-Site": site}).text == "data: ok\n\n"
        page = browser.get("stream/trivial/demo").text  # a page of ours: sets the _xsrf cookie
        xsrf = browser.cookies["_xsrf"]
        assert xsrf and page
        assert browser.get("stream/trivial", params={"_xsrf": xsrf}).text == "data: ok\n\n"
        assert browser.get("stream/trivial", headers={"X-XSRFToken": xsrf}).text == "data: ok\n\n"
        assert browser.post("stream/trivial").status_code == 403  # a POST needs _xsrf, as ever


def test_a_server_without_auth_still_answers_scripts(jstream_start_server):
    """With no token (a local demo), a script has no token to send: a GET without the
    login cookie is not held to the cookie's rule."""
    server = jstream_start_server(["--IdentityProvider.token=", "--JupyterStream.min_workers=1",
                                   "--ServerApp.allow_unauthenticated_access=True", "--ServerApp.disable_check_xsrf=True"])
    register_endpoint(trivial, connection=server.connection)
    assert httpx.get(server.url + "stream/trivial", timeout=30).text == "data: ok\n\n"


def test_a_token_is_judged_by_itself_not_by_a_login_cookie_beside_it(server):
    """LangChain's ChatOpenAI keeps one client (and cookie jar) per base URL: after a
    request with the server token set the login cookie, a share token as api_key got
    "'_xsrf' argument missing from POST"."""

    def chat(messages: list):
        yield "hello"

    endpoint = register_endpoint(chat, connection=server.connection, openai=True)
    share = endpoint.share("1h")
    request = {"model": "chat", "messages": [{"role": "user", "content": "hi"}]}
    with httpx.Client(base_url=server.url, timeout=30) as client:
        first = client.post("stream/chat/v1/chat/completions", json=request, headers={"Authorization": f"Bearer {server.token}"})
        assert first.status_code == 200
        assert client.get("api/stream/workers", params={"token": server.token}).status_code == 200  # sets the login cookie
        assert any(c.startswith("username-") for c in client.cookies)
        shared = client.post("stream/chat/v1/chat/completions", json=request, headers={"Authorization": f"Bearer {share.token}"})
        assert shared.status_code == 200 and shared.json()["choices"][0]["message"]["content"] == "hello", shared.text
        # (refused before its body is read, so tornado closes the connection: say so, that it is not reused)
        wrong = client.post("stream/chat/v1/chat/completions", json=request,
                            headers={"Authorization": "Bearer wrong", "Connection": "close"})
        assert wrong.status_code == 401, wrong.text  # not the cookie's user (OpenAI's route answers a wrong key with 401)
        assert client.get("api/stream/workers", headers={"Authorization": "token wrong"}).status_code == 403


def test_a_token_in_the_authorization_header_gets_no_login_cookie(server):
    """A client that sends its token in a header sends it every time: signing it a login
    cookie is work for nothing. A token in the URL (a link opened in a browser) still
    gets one, and the cookie alone then opens what it opened before."""
    register_endpoint(trivial, connection=server.connection)
    for header in (f"token {server.token}", f"Bearer {server.token}"):
        r = httpx.get(server.url + "stream/trivial", headers={"Authorization": header}, timeout=30)
        assert r.text == "data: ok\n\n" and "set-cookie" not in r.headers, (header, r.headers)
    r = httpx.get(server.url + "api/stream/workers", headers={"Authorization": f"token {server.token}"}, timeout=30)
    assert r.status_code == 200 and "set-cookie" not in r.headers, r.headers
    with httpx.Client(base_url=server.url, timeout=30) as browser:
        r = browser.get("stream/trivial", params={"token": server.token}, headers={"Sec-Fetch-Site": "none"})
        assert r.text == "data: ok\n\n" and any(c.startswith("username-") for c in browser.cookies), r.headers
        assert browser.get("api/stream/workers").status_code == 200  # the cookie alone
    with httpx.Client(base_url=server.url, timeout=30) as client:  # a wrong header token gets nothing either
        r = client.get("api/stream/workers", headers={"Authorization": "token wrong"})
        assert r.status_code == 403 and not client.cookies, r.headers


# -- 15: CORS headers on errors --------------------------------------------------------


def test_error_responses_keep_their_cors_headers(server):
    def typed(n: int):
        yield f"data: {n}\n\n"

    def fails():
        raise RuntimeError("broken on purpose")

    endpoint = register_endpoint(typed, connection=server.connection)
    register_endpoint(fails, connection=server.connection)
    share = endpoint.share("1h")
    share.revoke()
    origin = {"Origin": ORIGIN}
    cases = {
        400: httpx.get(server.url + "stream/typed", params={"n": "x"}, headers={**server.headers, **origin}),
        403: httpx.get(server.url + "stream/typed", params={"n": 1, "share": share.token}, headers=origin),
        404: httpx.get(server.url + "stream/nope", headers={**server.headers, **origin}),
        500: httpx.get(server.url + "stream/fails", headers={**server.headers, **origin}),
    }
    for status, r in cases.items():
        assert r.status_code == status, (status, r.text)
        assert r.headers.get("access-control-allow-origin") == ORIGIN, (status, dict(r.headers))


# -- 17: secrets ---------------------------------------------------------------------


def test_env_values_never_reach_the_log_or_the_api(server):
    def secretive():
        import os

        return os.environ["API_KEY"][:3]

    def other():
        return "other"

    f = register_function(secretive, connection=server.connection, env={"API_KEY": "sk-do-not-log-me"})
    assert f.remote() == "sk-"
    # the cap (2) is full: a third pool's call stops the idle secretive worker ("to make room")
    g = register_function(other, connection=server.connection, env={"ROLE": "third"})
    assert g.remote() == "other"
    assert "sk-do-not-log-me" not in server.get("api/stream/workers").text
    assert "env API_KEY" in server.log() or pool_of(server, "secretive", "functions")["env"] == ["API_KEY"]
    assert "sk-do-not-log-me" not in server.log()


def test_workers_hold_a_token_that_opens_only_the_calls_socket(server):
    def credentials():
        import os

        return os.environ.get("JUPYTER_STREAM_TOKEN"), os.environ.get("JUPYTER_TOKEN")

    worker_token, jupyter_token = register_function(credentials, connection=server.connection).remote()
    assert worker_token and worker_token != server.token and jupyter_token is None
    for path in ("api/stream/endpoints", "api/stream/workers", "api/kernels", "stream/trivial"):
        r = httpx.get(server.url + path, headers={"Authorization": f"token {worker_token}"}, timeout=10)
        assert r.status_code == 403, (path, r.status_code)


def test_ended_shares_are_forgotten_after_a_day(monkeypatch):
    from jupyter_stream.server import shares

    store = shares.ShareStore()
    active, _ = store.create("a", None)
    revoked, token = store.create("a", None)
    store.revoke(revoked)
    expired, _ = store.create("a", 60)
    now = time.time()
    assert store.sweep() == 0 and len(store.list()) == 3
    monkeypatch.setattr(shares.time, "time", lambda: now + 2 * 24 * 3600)
    assert store.sweep() == 2 and store.list() == [active]
    with pytest.raises(shares.ShareRefused, match="not valid here"):
        store.check(token, "a")


# -- 14: supervision -------------------------------------------------------------------


def test_a_periodic_loop_outlives_its_failing_turns(caplog):
    from jupyter_stream.server import supervision

    turns = []

    def step():
        turns.append(len(turns))
        if len(turns) in (2, 3):
            raise RuntimeError(f"injected failure {len(turns)}")

    async def main():
        task = supervision.spawn(supervision.every(0.01, step, "the test loop", lambda: len(turns) < 6), "the test loop")
        await asyncio.wait_for(task, 5)

    with caplog.at_level(logging.ERROR, logger="jupyter_stream"):
        asyncio.run(main())
    assert len(turns) == 6
    failures = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert failures == ["jupyter_stream: the test loop (it goes on; 1 failed turn(s) in a row) failed: RuntimeError: injected failure 2"]


def test_a_task_that_fails_is_reported_once_and_its_owner_recovers(caplog):
    from jupyter_stream.server import supervision

    recovered = []

    async def fails():
        raise ValueError("injected")

    async def main():
        task = supervision.spawn(fails(), "a lane opening", on_crash=recovered.append)
        await asyncio.sleep(0.05)
        assert task.done()

    with caplog.at_level(logging.ERROR, logger="jupyter_stream"):
        asyncio.run(main())
    assert [type(e) for e in recovered] == [ValueError]
    assert [r.getMessage() for r in caplog.records] == ["jupyter_stream: a lane opening failed: ValueError: injected"]


FLAKY_MANAGER = '''
import sys
from jupyter_client.manager import AsyncKernelManager


class FlakyKernelManager(AsyncKernelManager):
    """Cannot tell the pool's watcher whether its kernel is alive, one time in two."""

    asked = 0

    async def is_alive(self):
        caller = sys._getframe(1).f_code  # the watcher asks through WorkerKernel.is_alive, jupyter_client directly
        if caller.co_name == "is_alive" and caller.co_filename.endswith("kernels.py"):
            type(self).asked += 1
            if type(self).asked % 2:
                raise RuntimeError("injected: the kernel manager cannot tell")
        return await super().is_alive()
'''


def test_the_watcher_goes_on_when_the_kernel_manager_fails(jstream_start_server):
    """Defect 14: an exception in the pool's watcher used to end it for good: no more
    replacement of dead kernels, scale-down or warm minimum."""
    folder = tempfile.mkdtemp(prefix="jupyter-stream-km-")
    with open(os.path.join(folder, "flaky_manager.py"), "w") as f:
        f.write(FLAKY_MANAGER)
    server = jstream_start_server(
        ["--JupyterStream.min_workers=1", "--JupyterStream.worker_poll_interval=0.2",
         "--JupyterStream.kernel_manager_class=flaky_manager.FlakyKernelManager"],
        env={"PYTHONPATH": os.pathsep.join([folder, *sys.path])})
    [worker] = server.wait_for_workers(1)
    time.sleep(1.0)
    os.kill(worker["pid"], 9)
    deadline = time.monotonic() + 30
    while True:
        alive = [w["pid"] for w in server.workers()["workers"] if w["alive"]]
        if alive and worker["pid"] not in alive:
            break
        assert time.monotonic() < deadline, server.log()[-3000:]
        time.sleep(0.2)
    assert "could not tell whether worker-1" in server.log()
    register_endpoint(trivial, connection=server.connection)
    assert server.get("stream/trivial").text == "data: ok\n\n"


def test_streaming_response_headers_of_numbers_are_sent_as_text(server):
    def counted():
        return StreamingResponse(iter(["data: x\n\n"]), media_type="text/event-stream", headers={"X-Count": 3})

    register_endpoint(counted, connection=server.connection)
    assert server.get("stream/counted").headers["x-count"] == "3"


def test_a_map_whose_function_does_not_load_on_the_workers_fails_with_why(server, tmp_path):
    """A function from a module the workers cannot import: `.remote()` said so, but `.map()`
    opened lane after lane, each failing at once, for ever (found while measuring issue 20)."""
    import sys

    module = tmp_path / "only_here_module.py"
    module.write_text("def twice(x):\n    return 2 * x\n")
    sys.path.insert(0, str(tmp_path))
    try:
        import only_here_module

        f = register_function(only_here_module.twice, connection=server.connection)
        start = time.monotonic()
        with pytest.raises(ModuleNotFoundError, match="only_here_module"):
            list(f.map(range(10), progress=False))
        assert time.monotonic() - start < 15
    finally:
        sys.path.remove(str(tmp_path))
    server.wait_until_idle(5)
