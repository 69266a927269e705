#!/usr/bin/env python
"""Side-by-side benchmark of jupyter-stream endpoints against two references.

The same three generators are served by

* ``tornado``  - a plain ``tornado.web.RequestHandler`` that writes and
  ``await self.flush()``-es every chunk (for ``tight`` that means one flush per
  event: the "tornado flush per event" reference figure);
* ``fastapi``  - ``StreamingResponse(gen(), media_type=...)`` with a sync
  generator, under uvicorn;
* ``ours``     - a ``jupyter_server`` with the ``jupyter_stream`` extension,
  the generators registered through ``jupyter_stream.endpoint`` and run on a
  worker kernel.

and measured with the same client:

1. ``ttfb``   - time to first response byte of a warm trivial endpoint,
   sequential GETs over one keep-alive connection (p50 / p90).
2. ``events`` - events/s streamed from a tight generator (best of N runs).
3. ``bulk``   - MB/s (10^6 bytes/s) of 1 MiB ``bytes`` chunks (best of N runs).

The client is a tiny blocking HTTP/1.1 client on a raw socket (TCP_NODELAY,
keep-alive, chunked decoding). httpx or urllib would add a few hundred
microseconds of Python per request, which would swamp a ~1 ms TTFB and make
the three servers look more alike than they are.

This is a script, not a test. Examples::

    python benchmarks/endpoint_bench.py
    python benchmarks/endpoint_bench.py --skip-ours --only ttfb,events
    python benchmarks/endpoint_bench.py --events 50000 --bulk-chunks 64 --json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import selectors
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Tuple
from urllib.parse import urlencode, urlsplit

REPO_ROOT = Path(__file__).resolve().parent.parent
MEASUREMENTS = ("ttfb", "events", "bulk")
MiB = 1 << 20
RECV_SIZE = 256 * 1024

# Design targets for our server (see the project brief).
TARGET_TTFB_P50_MS = 3.0  # without the floor row
TARGET_TTFB_OVER_FLOOR_MS = 0.3  # at most this much over jupyter-server's own /api/status (issue 20)
TARGET_EVENTS_PER_S = 1_100_000  # no regression from the direct channel's first figures
TARGET_BULK_VS_TORNADO = 1.5


# --------------------------------------------------------------------------
# The generators. Module level on purpose: jupyter_stream pickles them by
# value (cloudpickle) from __main__, and the reference servers import them by
# re-running this file with --serve.
# --------------------------------------------------------------------------

def trivial():
    yield "data: hi\n\n"


def tight(n: int = 200000):
    for i in range(n):
        yield f"data: {i}\n\n"


def bulk(count: int = 256):
    chunk = b"x" * (1 << 20)
    for _ in range(count):
        yield chunk


ENDPOINTS = {
    # name: (generator, media type)
    "trivial": (trivial, "text/event-stream"),
    "tight": (tight, "text/event-stream"),
    "bulk": (bulk, "application/octet-stream"),
}


# --------------------------------------------------------------------------
# Reference servers (run in a child process: ``endpoint_bench.py --serve X``)
# --------------------------------------------------------------------------

def _listen_socket() -> socket.socket:
    """Bind 127.0.0.1:0 in the child, so there is no free-port race.

    proto=IPPROTO_TCP matters: asyncio only sets TCP_NODELAY on accepted
    sockets whose proto is TCP (as getaddrinfo gives when uvicorn binds
    host/port itself). With proto 0, Nagle + delayed ACK add ~40 ms per
    response to uvicorn, which is not what a normal deployment sees.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    sock.setblocking(False)
    return sock


def _announce(sock: socket.socket) -> None:
    """Tell the parent which port we got (the only thing on stdout)."""
    print(f"LISTENING {sock.getsockname()[1]}", flush=True)


def run_tornado(routes: list) -> None:
    """Serve a tornado application of `routes` on an announced port, until killed."""
    import asyncio

    import tornado.httpserver
    import tornado.web

    async def main() -> None:
        sock = _listen_socket()
        server = tornado.httpserver.HTTPServer(tornado.web.Application(routes))
        server.add_sockets([sock])
        _announce(sock)
        await asyncio.Event().wait()

    asyncio.run(main())


def run_uvicorn(app) -> None:
    """Serve an ASGI app under uvicorn on an announced port, until killed."""
    import uvicorn

    sock = _listen_socket()
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
    _announce(sock)
    server.run(sockets=[sock])


def start_announced(kind: str, script: Path, procs: Processes, tmp: Path, timeout: float = 30.0) -> Tuple[int, Path]:
    """Run ``script --serve kind`` and wait for the port it announces; returns (port, log)."""
    log = tmp / f"{kind}.log"
    proc = procs.start(kind, [sys.executable, str(script), "--serve", kind], log, stdout=subprocess.PIPE)
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    line = b""
    deadline = time.monotonic() + timeout
    while not line.endswith(b"\n"):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{kind} reference server did not start:\n{log_tail(log)}")
        if sel.select(timeout=0.5):
            chunk = os.read(proc.stdout.fileno(), 100)
            if not chunk and proc.poll() is not None:
                continue
            line += chunk
    sel.close()
    return int(line.split()[1]), log


def serve_tornado() -> None:
    """Plain tornado: write + await flush() per chunk, i.e. per event."""

    import tornado.httpserver
    import tornado.web

    class StreamHandler(tornado.web.RequestHandler):
        async def get(self, name: str) -> None:
            if name not in ENDPOINTS:
                raise tornado.web.HTTPError(404)
            gen_fn, media_type = ENDPOINTS[name]
            kwargs = {k: int(v[-1]) for k, v in self.request.query_arguments.items()}
            self.set_header("Content-Type", media_type)
            self.set_header("Cache-Control", "no-cache")
            for chunk in gen_fn(**kwargs):
                self.write(chunk)
                await self.flush()

    run_tornado([(r"/stream/(\w+)", StreamHandler)])


def serve_fastapi() -> None:
    """FastAPI StreamingResponse over a sync generator, under uvicorn."""
    from fastapi import FastAPI
    from fastapi.responses import StreamingResponse

    app = FastAPI()

    @app.get("/stream/trivial")
    async def _trivial():
        return StreamingResponse(trivial(), media_type="text/event-stream")

    @app.get("/stream/tight")
    async def _tight(n: int = 200000):
        return StreamingResponse(tight(n), media_type="text/event-stream")

    @app.get("/stream/bulk")
    async def _bulk(count: int = 256):
        return StreamingResponse(bulk(count), media_type="application/octet-stream")

    run_uvicorn(app)


REFERENCE_SERVERS = {"tornado": serve_tornado, "fastapi": serve_fastapi}


# --------------------------------------------------------------------------
# Minimal HTTP/1.1 client
# --------------------------------------------------------------------------

class RawHTTP:
    """Blocking HTTP/1.1 GET client over one persistent keep-alive socket.

    Why raw: it keeps the client's own per-request overhead to a few tens of
    microseconds and lets us timestamp the first byte off the wire exactly.
    Handles chunked, Content-Length and read-until-close bodies; reconnects
    (and counts it) if the server closes the connection.
    """

    def __init__(self, host: str, port: int, headers: Dict[str, str], timeout: float = 120.0):
        self.host, self.port, self.timeout = host, port, timeout
        self.extra_headers = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        self.sock: socket.socket | None = None
        self.rest = b""
        self.reconnects = -1  # the first connect is not a reconnect

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def _connect(self) -> None:
        self.close()
        self.sock = socket.create_connection((self.host, self.port), timeout=self.timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.rest = b""
        self.reconnects += 1

    def _recv(self) -> bytes:
        data = self.sock.recv(RECV_SIZE)
        if not data:
            raise ConnectionError("server closed the connection mid-response")
        return data

    def get(self, path: str, sink: Callable[[bytes], None] | None = None
            ) -> Tuple[int, float, float, int]:
        """GET path; feed body bytes to sink. Returns (status, t_first, t_end, body_len).

        t_first / t_end are time.perf_counter() values of the first response
        byte and of the end of the body; the caller takes t0 right before.
        """
        if self.sock is None:
            self._connect()
        request = (f"GET {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
                   f"{self.extra_headers}\r\n").encode("latin-1")
        try:
            self.sock.sendall(request)
            buf = self.rest or self._recv()
        except (ConnectionError, OSError):
            # Stale keep-alive connection: retry once on a fresh one.
            self._connect()
            self.sock.sendall(request)
            buf = self._recv()
        t_first = time.perf_counter()

        end = buf.find(b"\r\n\r\n")
        while end < 0:
            buf += self._recv()
            end = buf.find(b"\r\n\r\n")
        head = buf[:end].decode("latin-1").split("\r\n")
        status = int(head[0].split(" ", 2)[1])
        hdrs = {}
        for line in head[1:]:
            k, _, v = line.partition(":")
            hdrs[k.strip().lower()] = v.strip().lower()
        self.rest = buf[end + 4:]
        sink = sink or (lambda data: None)

        if "chunked" in hdrs.get("transfer-encoding", ""):
            nbytes = self._read_chunked(sink)
        elif "content-length" in hdrs:
            nbytes = self._read_length(int(hdrs["content-length"]), sink)
        else:
            nbytes = self._read_until_close(sink)
            hdrs["connection"] = "close"
        t_end = time.perf_counter()
        if hdrs.get("connection") == "close":
            self.close()
        return status, t_first, t_end, nbytes

    def _read_length(self, length: int, sink) -> int:
        buf, self.rest = self.rest, b""
        total = 0
        while True:
            take = min(len(buf), length - total)
            if take:
                sink(buf[:take] if take < len(buf) else buf)
                total += take
            if total >= length:
                self.rest = buf[take:]
                return total
            buf = self._recv()

    def _read_until_close(self, sink) -> int:
        buf, self.rest = self.rest, b""
        total = 0
        while True:
            if buf:
                sink(buf)
                total += len(buf)
            buf = self.sock.recv(RECV_SIZE)
            if not buf:
                return total

    def _read_chunked(self, sink) -> int:
        """Decode Transfer-Encoding: chunked.

        Payload slices found in one recv buffer are handed to sink joined, so
        a stream of tiny chunks (one SSE event each) costs one sink call per
        recv rather than one per event.
        """
        buf, pos, total = self.rest, 0, 0
        pending: List = []

        def flush_pending() -> None:
            if pending:
                sink(pending[0] if len(pending) == 1 else b"".join(pending))
                pending.clear()

        def refill(keep_from: int) -> None:
            nonlocal buf, pos
            flush_pending()
            buf = buf[keep_from:] + self._recv()
            pos = 0

        while True:
            eol = buf.find(b"\r\n", pos)
            while eol < 0:
                refill(pos)
                eol = buf.find(b"\r\n", pos)
            size = int(buf[pos:eol].split(b";", 1)[0], 16)
            pos = eol + 2
            if size == 0:  # last chunk, then optional trailers, then CRLF
                while True:
                    eol = buf.find(b"\r\n", pos)
                    while eol < 0:
                        refill(pos)
                        eol = buf.find(b"\r\n", pos)
                    if eol == pos:
                        flush_pending()
                        self.rest = buf[pos + 2:]
                        return total
                    pos = eol + 2
            while size:
                avail = len(buf) - pos
                if avail <= 0:
                    refill(len(buf))
                    avail = len(buf)
                take = min(avail, size)
                pending.append(memoryview(buf)[pos:pos + take])
                pos += take
                size -= take
                total += take
            while len(buf) - pos < 2:
                refill(pos)
            pos += 2


class EventCounter:
    """Counts SSE events (b"\\n\\n") in a byte stream split at arbitrary points."""

    def __init__(self) -> None:
        self.count = 0
        self.last = b""
        self.head = b""

    def __call__(self, data) -> None:
        data = bytes(data)
        if not data:
            return
        if len(self.head) < 64:
            self.head = (self.head + data)[:64]
        self.count += data.count(b"\n\n")
        if self.last == b"\n" and data[:1] == b"\n":
            self.count += 1
        self.last = data[-1:]


class ByteCounter:
    """Counts body bytes without copying them."""

    def __init__(self) -> None:
        self.count = 0

    def __call__(self, data) -> None:
        self.count += len(data)


# --------------------------------------------------------------------------
# Servers under test
# --------------------------------------------------------------------------

@dataclass
class Server:
    """A server under test: where each endpoint lives and what to send."""

    name: str
    urls: Dict[str, str]  # endpoint name -> full URL, no query
    headers: Dict[str, str] = field(default_factory=dict)
    note: str = ""

    def url_for(self, endpoint: str, **query) -> str:
        url = self.urls[endpoint]
        if query:
            url += ("&" if "?" in url else "?") + urlencode(query)
        return url

    def client(self, endpoint: str = "trivial") -> RawHTTP:
        parts = urlsplit(self.urls[endpoint])
        return RawHTTP(parts.hostname, parts.port or 80, self.headers)

    def path_for(self, endpoint: str, **query) -> str:
        parts = urlsplit(self.url_for(endpoint, **query))
        return parts.path + (f"?{parts.query}" if parts.query else "")

    def fetch(self, endpoint: str, sink=None, **query) -> Tuple[int, float, float, int]:
        """One GET on a fresh connection; returns (status, t0, t_end, nbytes)."""
        client = self.client(endpoint)
        try:
            t0 = time.perf_counter()
            status, _, t_end, nbytes = client.get(self.path_for(endpoint, **query), sink)
            return status, t0, t_end, nbytes
        finally:
            client.close()


class Processes:
    """Child processes we started; torn down (TERM, then KILL) on exit."""

    def __init__(self) -> None:
        self.procs: List[Tuple[str, subprocess.Popen, Path]] = []

    def start(self, name: str, cmd: List[str], log: Path, env=None, stdout=None) -> subprocess.Popen:
        with log.open("ab") as log_file:
            proc = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=stdout or log_file,
                stderr=log_file, env=env, cwd=str(REPO_ROOT),
                # Own session: a Ctrl-C in the terminal reaches only us, and we
                # shut the children down in order (jupyter_server asks "y/n" on
                # SIGINT when it owns a tty, and must stop its kernels).
                start_new_session=True,
            )
        self.procs.append((name, proc, log))
        return proc

    def stop_all(self, grace: float = 15.0) -> None:
        for _, proc, _ in self.procs:
            if proc.poll() is None:
                proc.terminate()
        deadline = time.monotonic() + grace
        for name, proc, _ in self.procs:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                print(f"[bench] {name} (pid {proc.pid}) ignored SIGTERM; killing", file=sys.stderr)
                try:
                    os.killpg(proc.pid, signal.SIGKILL)  # its own process group
                except ProcessLookupError:
                    pass
                proc.wait()
        self.procs.clear()


def log_tail(log: Path, lines: int = 40) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def start_reference(kind: str, procs: Processes, tmp: Path, timeout: float = 30.0) -> Server:
    """Start a reference server in a child process and wait until it answers."""
    port, log = start_announced(kind, Path(__file__).resolve(), procs, tmp, timeout)
    base = f"http://127.0.0.1:{port}/stream/"
    server = Server(kind, {name: base + name for name in ENDPOINTS})
    if kind == "fastapi":
        server.note = uvicorn_flavour()
    wait_until_streams(server, deadline=time.monotonic() + timeout, log=log)
    return server


def uvicorn_flavour() -> str:
    """Which loop / HTTP parser uvicorn's "auto" picks here (affects its figures)."""
    loop = "uvloop" if _importable("uvloop") else "asyncio"
    http = "httptools" if _importable("httptools") else "h11"
    return f"uvicorn {loop}+{http}"


def _importable(mod: str) -> bool:
    try:
        __import__(mod)
        return True
    except ImportError:
        return False


def wait_until_streams(server: Server, deadline: float, log: Path | None = None) -> None:
    """Retry the trivial endpoint until it returns 200 with the expected body."""
    last_err = "no attempt"
    while time.monotonic() < deadline:
        body = EventCounter()
        try:
            status, _, _, _ = server.fetch("trivial", body)
            if status == 200 and body.head == b"data: hi\n\n":
                return
            last_err = f"HTTP {status}, body {body.head!r}"
        except OSError as exc:
            last_err = repr(exc)
        time.sleep(0.25)
    tail = f"\n{log_tail(log)}" if log else ""
    raise RuntimeError(f"{server.name}: trivial endpoint never answered ({last_err}){tail}")


def start_jupyter_stream(procs: Processes, tmp: Path, options: List[str] = (), workers: int = 1,
                         startup_timeout: float = 90.0) -> Tuple[subprocess.Popen, str, str, Path]:
    """Start jupyter_server with jupyter_stream and wait until `workers` worker kernels
    are alive. Returns (process, base URL, token, log path)."""
    import secrets

    port = _free_port()
    token = secrets.token_hex(16)
    root = tmp / "root"
    root.mkdir(exist_ok=True)
    env = dict(os.environ)
    # Make the package importable by the server (and its kernels) even when it
    # is not pip-installed, and keep runtime files out of the user's dirs.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    env["JUPYTER_RUNTIME_DIR"] = str(tmp / "runtime")
    cmd = [
        sys.executable, "-m", "jupyter_server",
        f"--ServerApp.port={port}",
        "--ServerApp.port_retries=0",  # fail loudly rather than move to another port
        "--ServerApp.ip=127.0.0.1",
        f"--IdentityProvider.token={token}",
        "--ServerApp.open_browser=False",
        f"--ServerApp.root_dir={root}",
        "--ServerApp.jpserver_extensions={'jupyter_stream': True}",
        # JUPYTER_STREAM_WORKER_MESSAGES=direct|zmq|channels measures one transport (default: auto)
        f"--JupyterStream.worker_messages={os.environ.get('JUPYTER_STREAM_WORKER_MESSAGES', 'auto')}",
        *options,
    ]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        cmd.append("--ServerApp.allow_root=True")  # containers/CI; it refuses otherwise
    log = tmp / "ours.log"
    proc = procs.start("ours", cmd, log, env=env)
    base = f"http://127.0.0.1:{port}/"
    headers = {"Authorization": f"token {token}"}

    deadline = time.monotonic() + startup_timeout
    last = "no answer"
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"jupyter_server exited with {proc.returncode}:\n{log_tail(log)}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"worker pool not ready after {startup_timeout:g}s ({last}):\n{log_tail(log)}")
        try:
            req = urllib.request.Request(base + "api/stream/workers", headers=headers)
            with urllib.request.urlopen(req, timeout=2) as resp:
                listed = json.loads(resp.read()).get("workers", [])
            alive = [w for w in listed if w.get("alive")]
            last = f"{len(alive)}/{len(listed)} workers alive"
            if len(alive) >= workers:
                return proc, base, token, log
        except (urllib.error.URLError, OSError, ValueError) as exc:
            last = repr(exc)
        time.sleep(0.25)


def start_ours(procs: Processes, tmp: Path, startup_timeout: float = 60.0) -> Server:
    """Start jupyter_server with jupyter_stream and register the generators."""
    proc, base, token, log = start_jupyter_stream(procs, tmp, startup_timeout=startup_timeout)
    headers = {"Authorization": f"token {token}"}

    # Register the same generators through our public API.
    os.environ["JUPYTER_STREAM_URL"] = base
    os.environ["JUPYTER_STREAM_TOKEN"] = token
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))
    import jupyter_stream

    urls = {}
    for name, (gen_fn, media_type) in ENDPOINTS.items():
        registered = jupyter_stream.endpoint(name=name, media_type=media_type)(gen_fn)
        urls[name] = registered.url
    server = Server("ours", urls, headers, note="jupyter_stream")

    # Warm up: the first requests load the functions into the workers.
    wait_until_streams(server, deadline=time.monotonic() + 60.0, log=log)
    return server


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def warm_up(server: Server, rounds: int = 3) -> None:
    """A few small requests per endpoint (JIT-less, but caches, pools, kernels)."""
    for _ in range(rounds):
        for endpoint, query in (("trivial", {}), ("tight", {"n": 1000}), ("bulk", {"count": 2})):
            status, *_ = server.fetch(endpoint, None, **query)
            if status != 200:
                raise RuntimeError(f"{server.name}: warm-up {endpoint} got HTTP {status}")


# --------------------------------------------------------------------------
# Measurements
# --------------------------------------------------------------------------

def _percentile(values: List[float], q: float) -> float:
    """Nearest-rank percentile (no interpolation: it is a real sample)."""
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, round(q / 100 * len(ordered) + 0.5) - 1))
    return ordered[k]


def measure_ttfb(server: Server, requests: int, warmup: int = 20) -> dict:
    """TTFB of a warm trivial endpoint: sequential GETs on one keep-alive socket.

    Also reports the full request time (first byte of request to end of
    body), since a server could send headers early and the event late.
    """
    client = server.client("trivial")
    path = server.path_for("trivial")
    ttfb, full = [], []
    try:
        for i in range(warmup + requests):
            body = EventCounter()
            t0 = time.perf_counter()
            status, t_first, t_end, _ = client.get(path, body)
            if status != 200 or body.head != b"data: hi\n\n":
                raise RuntimeError(f"{server.name}: trivial got HTTP {status}, body {body.head!r}")
            if i >= warmup:
                ttfb.append((t_first - t0) * 1e3)
                full.append((t_end - t0) * 1e3)
    finally:
        client.close()
    return {
        "p50_ms": _percentile(ttfb, 50),
        "p90_ms": _percentile(ttfb, 90),
        "full_p50_ms": _percentile(full, 50),
        "mean_ms": statistics.fmean(ttfb),
        "requests": requests,
        "reconnects": client.reconnects,
    }


def measure_status_ttfb(server: Server, requests: int, warmup: int = 20) -> dict:
    """The floor: jupyter-server's own authenticated ``GET /api/status`` on the same
    server (a handler that answers from memory), timed exactly as `measure_ttfb` times."""
    parts = urlsplit(server.urls["trivial"])
    client = RawHTTP(parts.hostname, parts.port or 80, server.headers)
    path = parts.path.split("stream/")[0] + "api/status"
    ttfb, full = [], []
    try:
        for i in range(warmup + requests):
            t0 = time.perf_counter()
            status, t_first, t_end, _ = client.get(path)
            if status != 200:
                raise RuntimeError(f"/api/status got HTTP {status}")
            if i >= warmup:
                ttfb.append((t_first - t0) * 1e3)
                full.append((t_end - t0) * 1e3)
    finally:
        client.close()
    return {"p50_ms": _percentile(ttfb, 50), "p90_ms": _percentile(ttfb, 90), "full_p50_ms": _percentile(full, 50),
            "mean_ms": statistics.fmean(ttfb), "requests": requests, "reconnects": client.reconnects}


def measure_events(server: Server, n: int, repeats: int, budget_s: float) -> dict:
    """Events/s from the tight generator; the whole response is read and checked.

    Best of `repeats` runs, but no new run starts once `budget_s` is spent
    (a slow reference would otherwise take minutes for a best-of-3).
    """
    best = None
    runs = []
    started = time.monotonic()
    for _ in range(repeats):
        if runs and time.monotonic() - started > budget_s:
            break
        counter = EventCounter()
        status, t0, t_end, nbytes = server.fetch("tight", counter, n=n)
        if status != 200:
            raise RuntimeError(f"{server.name}: tight got HTTP {status}")
        if counter.count != n:
            raise RuntimeError(f"{server.name}: expected {n} events, counted {counter.count}")
        elapsed = t_end - t0
        runs.append(elapsed)
        best = elapsed if best is None else min(best, elapsed)
    return {"events_per_s": n / best, "best_s": best, "runs_s": runs, "events": n, "bytes": nbytes}


def measure_bulk(server: Server, chunks: int, repeats: int, budget_s: float) -> dict:
    """MB/s (10^6 B/s) of 1 MiB bytes chunks; the whole body is read and counted.

    Best of `repeats` runs, within `budget_s` as for measure_events.
    """
    expected = chunks * MiB
    best = None
    runs = []
    started = time.monotonic()
    for _ in range(repeats):
        if runs and time.monotonic() - started > budget_s:
            break
        counter = ByteCounter()
        status, t0, t_end, _ = server.fetch("bulk", counter, count=chunks)
        if status != 200:
            raise RuntimeError(f"{server.name}: bulk got HTTP {status}")
        if counter.count != expected:
            raise RuntimeError(f"{server.name}: expected {expected} bytes, got {counter.count}")
        elapsed = t_end - t0
        runs.append(elapsed)
        best = elapsed if best is None else min(best, elapsed)
    return {"mb_per_s": expected / best / 1e6, "best_s": best, "runs_s": runs, "bytes": expected}


# --------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------

def _ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}x" if a is not None and b else "-"


def print_table(title: str, rows: List[List[str]], header: List[str]) -> None:
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
    print(f"\n{title}")
    print("  ".join(h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(header, widths))))
    print("  ".join("-" * w for w in widths))
    for r in rows:
        print("  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(r, widths))))


def report(results: dict, servers: List[Server], args) -> None:
    """One table per measurement; ratio columns are "this row / reference"."""
    names = [s.name for s in servers]
    notes = {s.name: s.note for s in servers}

    def label(name: str) -> str:
        return f"{name} ({notes[name]})" if notes.get(name) else name


    if "ttfb" in results:
        r = results["ttfb"]
        rows = []
        notes.setdefault("api/status", "jupyter-server's own handler, same server: the floor")
        for name in names + (["api/status"] if "api/status" in r else []):
            m = r[name]
            target = ""
            if name == "ours":
                floor = r.get("api/status", {}).get("p50_ms")
                ok = m["p50_ms"] <= (floor + TARGET_TTFB_OVER_FLOOR_MS if floor else TARGET_TTFB_P50_MS)
                target = (f"p50 <= /api/status + {TARGET_TTFB_OVER_FLOOR_MS:g} ms: " if floor else
                          f"p50 <= {TARGET_TTFB_P50_MS:g} ms: ") + ("PASS" if ok else "FAIL")
            rows.append([label(name), f"{m['p50_ms']:.3f}", f"{m['p90_ms']:.3f}", f"{m['full_p50_ms']:.3f}",
                         _ratio(m["p50_ms"], r.get("tornado", {}).get("p50_ms")),
                         _ratio(m["p50_ms"], r.get("fastapi", {}).get("p50_ms")),
                         str(m["reconnects"]), target])
        print_table(f"TTFB, trivial endpoint, {args.requests} sequential keep-alive GETs "
                    f"(lower is better; ratio = row p50 / reference p50)",
                    rows, ["server", "p50 ms", "p90 ms", "full p50 ms", "/tornado", "/fastapi",
                           "reconn", "target"])

    if "events" in results:
        r = results["events"]
        rows = []
        for name in names:
            m = r[name]
            target = ""
            if name == "ours":
                ok = m["events_per_s"] >= TARGET_EVENTS_PER_S
                target = f">= {TARGET_EVENTS_PER_S:,} ev/s: {'PASS' if ok else 'FAIL'}"
            rows.append([label(name), f"{m['events_per_s']:,.0f}", f"{m['best_s']:.3f}", str(len(m["runs_s"])),
                         _ratio(m["events_per_s"], r.get("tornado", {}).get("events_per_s")),
                         _ratio(m["events_per_s"], r.get("fastapi", {}).get("events_per_s")),
                         target])
        print_table(f"Events/s, tight generator n={args.events} "
                    f"(higher is better; tornado = flush per event; best of at most "
                    f"{args.repeats} within {args.budget:g} s)",
                    rows, ["server", "events/s", "best s", "runs", "/tornado", "/fastapi", "target"])

    if "bulk" in results:
        r = results["bulk"]
        rows = []
        for name in names:
            m = r[name]
            target = ""
            ref = r.get("tornado", {}).get("mb_per_s")
            if name == "ours" and ref:
                ok = m["mb_per_s"] >= TARGET_BULK_VS_TORNADO * ref
                target = f">= {TARGET_BULK_VS_TORNADO:g} x tornado: {'PASS' if ok else 'FAIL'}"
            rows.append([label(name), f"{m['mb_per_s']:,.1f}", f"{m['best_s']:.3f}", str(len(m["runs_s"])),
                         _ratio(m["mb_per_s"], ref),
                         _ratio(m["mb_per_s"], r.get("fastapi", {}).get("mb_per_s")),
                         target])
        print_table(f"Bulk, {args.bulk_chunks} x 1 MiB chunks (higher is better; MB = 10^6 bytes; "
                    f"best of at most {args.repeats} within {args.budget:g} s)",
                    rows, ["server", "MB/s", "best s", "runs", "/tornado", "/fastapi", "target"])


# --------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------

def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", action="append", default=[],
                   help="ttfb, events and/or bulk; repeatable or comma-separated (default: all)")
    p.add_argument("--requests", type=int, default=200, help="TTFB requests after warm-up (default 200)")
    p.add_argument("--warmup", type=int, default=20, help="TTFB warm-up requests (default 20)")
    p.add_argument("--events", type=int, default=200_000, help="events per tight run (default 200000)")
    p.add_argument("--bulk-chunks", type=int, default=256, help="1 MiB chunks per bulk run (default 256)")
    p.add_argument("--repeats", type=int, default=3, help="runs per throughput figure, best kept (default 3)")
    p.add_argument("--budget", type=float, default=20.0,
                   help="seconds per server and throughput figure after which no further "
                        "repeat is started (default 20; the first run always completes)")
    p.add_argument("--skip-ours", action="store_true", help="benchmark the reference servers only")
    p.add_argument("--json", action="store_true", help="also print the results as JSON")
    p.add_argument("--serve", choices=sorted(REFERENCE_SERVERS), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.only = parse_only(p, args.only, MEASUREMENTS)
    return args


def parse_only(parser: argparse.ArgumentParser, values: List[str], measurements) -> List[str]:
    """The measurements named by ``--only a,b`` (all when none), in their usual order."""
    only = {part.strip() for item in values for part in item.split(",") if part.strip()}
    bad = only - set(measurements)
    if bad:
        parser.error(f"--only: unknown measurement(s) {', '.join(sorted(bad))}; choose from {', '.join(measurements)}")
    return [m for m in measurements if m in only] if only else list(measurements)


def _raise_on_sigterm(signum, frame):
    """Turn SIGTERM into SystemExit so the finally: teardown runs."""
    raise SystemExit(128 + signum)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.serve:
        REFERENCE_SERVERS[args.serve]()
        return 0

    signal.signal(signal.SIGTERM, _raise_on_sigterm)
    tmp = Path(tempfile.mkdtemp(prefix="jupyter-stream-bench-"))
    procs = Processes()
    results: Dict[str, Dict[str, dict]] = {}
    servers: List[Server] = []
    ok = False
    try:
        print(f"[bench] python {platform.python_version()}, {os.cpu_count()} CPUs, "
              f"logs in {tmp}", file=sys.stderr)
        for kind in REFERENCE_SERVERS:
            servers.append(start_reference(kind, procs, tmp))
        if not args.skip_ours:
            servers.append(start_ours(procs, tmp))
        for server in servers:
            warm_up(server)
        print("[bench] servers up: " + ", ".join(
            f"{s.name} {urlsplit(s.urls['trivial']).netloc}" for s in servers), file=sys.stderr)

        for measurement in args.only:
            results[measurement] = {}
            for server in servers:
                t = time.monotonic()
                if measurement == "ttfb":
                    res = measure_ttfb(server, args.requests, args.warmup)
                    if server.name == "ours":  # the floor, on the same server, right after
                        results[measurement]["api/status"] = measure_status_ttfb(server, args.requests, args.warmup)
                elif measurement == "events":
                    res = measure_events(server, args.events, args.repeats, args.budget)
                else:
                    res = measure_bulk(server, args.bulk_chunks, args.repeats, args.budget)
                results[measurement][server.name] = res
                print(f"[bench] {measurement:6s} {server.name:8s} done in {time.monotonic() - t:.1f}s",
                      file=sys.stderr)

        report(results, servers, args)
        if args.json:
            print(json.dumps({
                "results": results,
                "servers": {s.name: {"urls": s.urls, "note": s.note} for s in servers},
                "targets": {"ttfb_p50_ms_max": TARGET_TTFB_P50_MS,
                            "events_per_s_min": TARGET_EVENTS_PER_S,
                            "bulk_vs_tornado_min": TARGET_BULK_VS_TORNADO},
                "config": {k: getattr(args, k) for k in
                           ("only", "requests", "warmup", "events", "bulk_chunks", "repeats", "budget", "skip_ours")},
                "machine": {"python": platform.python_version(), "cpus": os.cpu_count(),
                            "platform": platform.platform()},
            }, indent=2))
        ok = True
        return 0
    except KeyboardInterrupt:
        print("\n[bench] interrupted", file=sys.stderr)
        return 130
    except RuntimeError as exc:  # a server failed to start or answered wrongly
        print(f"[bench] error: {exc}", file=sys.stderr)
        return 1
    finally:
        procs.stop_all()
        if ok:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            print(f"[bench] server logs kept in {tmp}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
