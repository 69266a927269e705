"""The notebook side: magics in a kernel started by the server, `jupyter stream serve`,
and the embedded server for plain scripts."""

import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent


def test_magic_in_a_kernel_started_by_the_server(jstream_server, jstream_notebook_kernel):
    outputs, reply = jstream_notebook_kernel.execute("%load_ext jupyter_stream")
    assert reply["status"] == "ok", jstream_notebook_kernel.text(outputs)
    cell = textwrap.dedent(
        '''
        %%stream_endpoint --name greet --media-type text/event-stream
        GREETING = "hello"

        def shout(text):
            return text.upper()

        def greeter(who: str = "world", times: int = 2):
            for i in range(times):
                yield f"data: {shout(GREETING)} {who} {i}\\n\\n"
        '''
    ).lstrip()
    outputs, reply = jstream_notebook_kernel.execute(cell)
    text = jstream_notebook_kernel.text(outputs)
    assert reply["status"] == "ok", text
    url = jstream_server.url + "stream/greet"
    assert 'href="/stream/greet"' in text and url in text and "curl --no-buffer" in text
    outputs, _ = jstream_notebook_kernel.execute("print(greeter.url); print(type(greeter).__name__)")
    assert jstream_notebook_kernel.text(outputs).split() == [url, "Endpoint"]
    r = jstream_server.get("stream/greet?who=jupyter&times=3")
    assert r.text == "".join(f"data: HELLO jupyter {i}\n\n" for i in range(3))

    # re-running the cell with new code replaces the endpoint
    outputs, reply = jstream_notebook_kernel.execute(cell.replace('"hello"', '"bye"'))
    assert reply["status"] == "ok"
    assert jstream_server.get("stream/greet?times=1").text == "data: BYE world 0\n\n"


def test_magic_errors_are_clear(jstream_server, jstream_notebook_kernel):
    jstream_notebook_kernel.execute("%load_ext jupyter_stream")
    outputs, reply = jstream_notebook_kernel.execute("%%stream_endpoint\nx = 1\n")
    assert reply["status"] == "error" and "the cell defines no function" in jstream_notebook_kernel.text(outputs)

    outputs, reply = jstream_notebook_kernel.execute(
        "%%stream_endpoint\nimport threading\nLOCK = threading.Lock()\ndef locked():\n    with LOCK:\n        yield 'x'\n"
    )
    text = jstream_notebook_kernel.text(outputs)
    assert reply["status"] == "error" and "PicklingError" in text and "cannot send endpoint 'locked'" in text

    outputs, reply = jstream_notebook_kernel.execute("%%stream_endpoint --name 'bad name'\ndef f():\n    yield 'x'\n")
    assert reply["status"] == "error" and "invalid endpoint name" in jstream_notebook_kernel.text(outputs)

    outputs, reply = jstream_notebook_kernel.execute("%%stream_endpoint\ndef broken(:\n    pass\n")
    assert reply["status"] == "error" and "SyntaxError" in jstream_notebook_kernel.text(outputs)


@contextlib.contextmanager
def serve(notebook, tmp_path, token="servetoken"):
    """`jupyter stream serve NOTEBOOK`; yields (printed output, endpoint base URL, headers)."""
    from jupyter_stream.pytest_plugin import free_port

    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "jupyter_stream.server.cli", "serve", str(REPO / "notebooks" / notebook),  # or an absolute path
         "--port", str(port), "--token", token,
         "--ServerApp.open_browser=False"],  # also one of serve's own defaults: the user's wins
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "JUPYTER_RUNTIME_DIR": str(tmp_path), "JUPYTER_DATA_DIR": str(tmp_path / "data")},
    )
    printed = []
    serve.proc = proc
    try:
        for line in proc.stdout:
            printed.append(line)
            if "Press Ctrl-C to stop." in line:
                break
        yield "".join(printed), f"http://127.0.0.1:{port}/stream/", {"Authorization": f"token {token}"}
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)


def test_serve_quickstart_notebook(tmp_path):
    with serve("quickstart.ipynb", tmp_path) as (out, base, headers):
        token = "servetoken"
        assert "open this file in a browser" not in out and "without encryption" not in out, out
        for name in ("stream_me", "squares", "download", "progress", "ticker"):
            assert f"curl --no-buffer -H 'Authorization: token {token}' {base}{name}" in out, out
        r = httpx.get(base + "squares?n=3&scale=2", headers=headers, timeout=30)
        assert r.headers["content-type"] == "application/x-ndjson" and len(r.text.splitlines()) == 3
        r = httpx.get(base + "download?mib=8", headers=headers, timeout=30)
        assert len(r.content) == 8 << 20 and "attachment" in r.headers["content-disposition"]
        events = [e for e in httpx.get(base + "stream_me", headers=headers, timeout=30).text.split("\n\n") if e]
        assert events == [f"data: some data {i}" for i in range(10)]
        resumed = httpx.get(base + "ticker?n=10", headers={**headers, "Last-Event-ID": "7"}, timeout=30).text
        assert resumed == 'id: 8\ndata: {"tick":8}\n\nid: 9\ndata: {"tick":9}\n\n'


def test_serve_remote_functions_notebook(tmp_path):
    with serve("remote_functions.ipynb", tmp_path) as (out, base, headers):
        assert "serving 3 endpoint(s)" in out, out
        with httpx.stream("GET", base + "hook", headers=headers, timeout=30) as r:
            first = next(r.iter_lines())
        assert first == "data: finished processing some data from GPU 0"
        assert httpx.get(base + "mapped", headers=headers, timeout=30).text == "".join(f"segment {i}\n" for i in range(10))
        text = httpx.get(base + "transcribe_video?text=a%20b", headers=headers, timeout=30).text
        assert text == "data: A\n\ndata: B\n\n"


def alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with contextlib.suppress(OSError):  # a zombie (exited, not yet reaped by its parent) counts as gone
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    return True


def test_ctrl_c_while_the_notebook_runs_stops_everything(tmp_path):
    """SIGINT in the middle of a 25 s cell, with a function running on a worker: the
    server exits within 5 s, the worker's `finally` and `atexit` hooks run, no kernel
    is left, and the runtime files of the run are gone."""
    import nbformat

    cells = [
        "%load_ext jupyter_stream",
        "%%stream_function\n"
        "def hold(marker: str):\n"
        "    import atexit, os, time\n"
        "    open(marker + '.pid', 'w').write(str(os.getpid()))\n"
        "    atexit.register(lambda: open(marker + '.atexit', 'w').write('ran'))\n"
        "    try:\n"
        "        for _ in range(600):\n"
        "            time.sleep(0.1)\n"
        "    finally:\n"
        "        open(marker + '.finally', 'w').write('ran')\n",
        f"import os, time\nopen({str(tmp_path / 'notebook.pid')!r}, 'w').write(str(os.getpid()))\n"
        f"call = hold.spawn({str(tmp_path / 'hold')!r})\ntime.sleep(25)",
        "%%stream_endpoint\ndef never():\n    yield 'not reached'\n",
    ]
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(c) for c in cells]
    nbformat.write(nb, tmp_path / "slow.ipynb")
    runtime = tmp_path / "runtime"
    from jupyter_stream.pytest_plugin import free_port

    proc = subprocess.Popen(
        [sys.executable, "-m", "jupyter_stream.server.cli", "serve", str(tmp_path / "slow.ipynb"), "--port", str(free_port())],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "JUPYTER_RUNTIME_DIR": str(runtime), "JUPYTER_DATA_DIR": str(tmp_path / "data")},
    )
    try:
        deadline = time.monotonic() + 60
        while not (tmp_path / "hold.pid").exists() or not (tmp_path / "notebook.pid").exists():
            assert time.monotonic() < deadline and proc.poll() is None, "the notebook did not get to its slow cell"
            time.sleep(0.1)
        pids = [int((tmp_path / name).read_text()) for name in ("hold.pid", "notebook.pid")]
        assert any(runtime.glob("jupyter-stream-*")) and any(runtime.glob("jpserver-*"))
        time.sleep(0.5)
        started = time.monotonic()
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=15)
        took = time.monotonic() - started
    finally:
        proc.kill()
    assert took < 5, f"took {took:.1f} s to stop"
    assert proc.returncode == 0, out
    assert "stopping" in out and "Traceback" not in out and "registered no endpoints" not in out, out
    assert (tmp_path / "hold.finally").read_text() == "ran" and (tmp_path / "hold.atexit").read_text() == "ran"
    assert not [pid for pid in pids if alive(pid)], "a kernel outlived the server"
    left = sorted(p.name for p in runtime.iterdir() if p.name != "jupyter_cookie_secret")  # the secret is meant to last
    assert left == [], left


def test_sigterm_while_serving_stops_everything(tmp_path):
    with serve("quickstart.ipynb", tmp_path) as (out, base, headers):
        pid = int(httpx.get(base.replace("stream/", "api/stream/workers"), headers=headers, timeout=30).json()["workers"][0]["pid"])
        proc = serve.proc
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        proc.wait(15)
        assert time.monotonic() - started < 5
        assert proc.returncode == 0 and not alive(pid)
        left = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(("jpserver-", "jupyter-stream-", "kernel-")))
        assert left == [], left


def test_script_without_a_server_starts_an_embedded_one(tmp_path):
    script = tmp_path / "script.py"
    script.write_text(textwrap.dedent(
        '''
        import httpx
        import jupyter_stream

        @jupyter_stream.endpoint(media_type="text/plain")
        def count(n: int = 3):
            for i in range(n):
                yield f"{i}\\n"

        conn = jupyter_stream.get_connection()
        print("URL", count.url)
        print("BODY", repr(httpx.get(count.url + "?n=4", headers={"Authorization": f"token {conn.token}"}, timeout=60).text))
        print("PID", conn.process.pid)
        '''
    ))
    env = {k: v for k, v in os.environ.items() if not k.startswith("JUPYTER_STREAM_")}
    env["JUPYTER_RUNTIME_DIR"] = str(tmp_path)
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "started an embedded Jupyter server at http://127.0.0.1:" in done.stderr
    lines = dict(line.split(" ", 1) for line in done.stdout.splitlines())
    assert lines["URL"].startswith("http://127.0.0.1:") and lines["URL"].endswith("/stream/count")
    assert lines["BODY"] == repr("0\n1\n2\n3\n")
    pid = int(lines["PID"])
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.2)
    else:
        raise AssertionError("the embedded server outlived its script")


def test_the_command_line(jstream_server):
    run = lambda *args, **kw: subprocess.run(  # noqa: E731
        [sys.executable, "-m", "jupyter_stream.server.cli", *args], capture_output=True, text=True, timeout=60, **kw
    )
    version = run("--version")
    assert version.returncode == 0 and version.stdout.strip() == "jupyter-stream 0.1.0"
    helped = run("serve", "--help")
    assert "--JupyterStream.max_workers=4" in helped.stdout and "--workers N" in helped.stdout
    refused = run("serve", str(REPO / "notebooks" / "quickstart.ipynb"), "--workers", "0")
    assert refused.returncode == 2 and "--workers must be 1 or more" in refused.stderr
    refused = run("serve", str(REPO / "notebooks" / "quickstart.ipynb"), "--JupyterStream.max_workers=0")
    assert refused.returncode == 2 and "max_workers must be 1 or more" in refused.stderr

    def tick():
        yield "data: tick\n\n"

    jstream_server.register(tick)
    listed = run("list", env={**os.environ, "JUPYTER_RUNTIME_DIR": jstream_server.runtime_dir})
    assert listed.returncode == 0, listed.stdout + listed.stderr
    assert f"  tick  {jstream_server.url}stream/tick  (text/event-stream; no parameters)" in listed.stdout


def test_serve_passes_workers_on_and_lets_the_users_options_win():
    import argparse

    from jupyter_stream.server.cli import serve_argv

    args = argparse.Namespace(notebooks=[str(REPO / "notebooks" / "quickstart.ipynb")], ip="127.0.0.1", port=8888, token=None)
    argv = serve_argv(args, ["--ServerApp.open_browser=False", "--ServerApp.port=9999"])
    assert argv.count("--ServerApp.open_browser=False") == 1
    assert [a for a in argv if a.startswith("--ServerApp.port=")] == ["--ServerApp.port=9999"]
    assert len([a for a in argv if a.startswith("--IdentityProvider.token=")]) == 1  # ours: no "open this file" block


def test_the_embedded_servers_token_is_not_on_its_command_line():
    """Any local user can read /proc/<pid>/cmdline: the token travels in the environment,
    and the kernels the embedded server starts do not inherit it."""
    from jupyter_stream.client.connection import start_embedded_server
    from jupyter_stream.client.functions import register_function

    conn = start_embedded_server(quiet=True)
    try:
        cmdline = Path(f"/proc/{conn.process.pid}/cmdline").read_bytes().decode()
        assert "jupyter_server" in cmdline and "--ServerApp.port=" in cmdline, cmdline
        assert conn.token and conn.token not in cmdline, cmdline
        assert not [a for a in cmdline.split("\0") if "token" in a.lower() and "environ" not in a], cmdline
        conn.check()  # our token opens it ...
        assert httpx.get(conn.url + "api/stream/workers", timeout=10).status_code == 403  # ... and nothing else does

        def token_seen():
            import os

            return os.environ.get("JUPYTER_TOKEN")

        assert register_function(token_seen, connection=conn).remote() is None
    finally:
        conn.close()


def test_ctrl_c_ends_open_streams_properly(tmp_path):
    """An SSE client reading when serve stops gets a last event saying so and a properly
    terminated body (it used to get curl's error 18: the body cut short)."""
    with serve("quickstart.ipynb", tmp_path) as (out, base, headers):
        events = []
        with httpx.stream("GET", base + "ticker?n=1000", headers=headers, timeout=30) as r:
            for line in r.iter_lines():  # raises if the chunked body is cut short
                if line:
                    events.append(line)
                    if len(events) == 4:  # once: a second Ctrl-C means "stop at once"
                        serve.proc.send_signal(signal.SIGINT)
        assert events[0] == "id: 0" and events[-2] == "event: error", events
        error = json.loads(events[-1][len("data: "):])["error"]
        assert error["type"] == "ServerStopping" and "the server is stopping" in error["message"], error
        assert serve.proc.wait(15) == 0


def test_ctrl_c_while_serve_starts_says_so_in_one_line(tmp_path):
    from jupyter_stream.pytest_plugin import free_port

    proc = subprocess.Popen(
        [sys.executable, "-m", "jupyter_stream.server.cli", "serve", str(REPO / "notebooks" / "quickstart.ipynb"),
         "--port", str(free_port())],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "JUPYTER_RUNTIME_DIR": str(tmp_path), "JUPYTER_DATA_DIR": str(tmp_path / "data")},
    )
    first = proc.stdout.readline()  # the server is loading its extensions
    proc.send_signal(signal.SIGINT)
    out = first + proc.communicate(timeout=30)[0]
    assert "Traceback" not in out and "KeyboardInterrupt" not in out, out
    assert "interrupted while starting; stopped" in out or "SIGINT: stopping" in out, out
