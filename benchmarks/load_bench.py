#!/usr/bin/env python
"""Load test of jupyter-stream: many concurrent SSE streams against one real server.

A ``jupyter_server`` with the ``jupyter_stream`` extension is started in a
subprocess (``start_jupyter_stream`` from ``endpoint_bench.py``) with 4 worker
kernels, the endpoints below are registered through the public API
(``jupyter_stream.endpoint``), and plain asyncio raw-socket clients on
127.0.0.1 hit them. Two measurements, each on a fresh server:

1. ``held``  - ``--streams`` (1000) SSE streams held open at once. The
   endpoint yields one event and then stays silent (it sleeps in a loop), so
   the server has to send ``: keep-alive`` comments; the server runs with
   ``sse_heartbeat_interval=1``. Streams are opened in waves, held for
   ``--hold`` seconds once all are open, then closed by the clients. Reported:
   streams open at once, time to open them, heartbeat punctuality (lateness of
   each gap between consecutive heartbeats on a stream relative to the 1 s
   interval, during the hold), the server's and its worker kernels' CPU and
   RSS, and how long the pool's ``busy`` counts take to fall back to 0 after
   the clients left.

   By default the silent part is ``await asyncio.sleep(step)`` in a loop (an
   async generator), which the worker can cancel the moment the client leaves.
   ``--held-gen sync`` uses ``time.sleep(step)`` in a sync generator instead,
   which can only be stopped at its next ``yield`` (or by the server
   interrupting its thread). Either way the silence lasts ``--hold`` +
   ``--linger`` seconds, so the clients leave while the generators still
   sleep. After the close, three counts are followed until they reach 0: the
   workers' ``busy`` and (when the server reports it) ``abandoned`` calls from
   ``GET /api/stream/workers``, and the endpoint's ``open_streams``.

2. ``burst`` - ``--clients`` (500) clients started at once (one
   ``asyncio.gather``) on a 1 s stream: 10 SSE events 0.1 s apart. Reported:
   how many got all 10 events and the end of the stream, when the first and
   the last finished, client durations (p50 / p99 / max), connect times, and
   the server's CPU and peak RSS during the burst.

The machine this was written on has 2 cores shared by server, kernels and
clients, so the client's own event-loop lag is reported next to the
heartbeat lateness: lateness the client caused itself shows up there too.

This is a script, not a test. Examples::

    python benchmarks/load_bench.py
    python benchmarks/load_bench.py --streams 100 --clients 50 --hold 5
    python benchmarks/load_bench.py --only held --held-gen sync --json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import re
import resource
import shutil
import signal
import socket
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Dict, List, Tuple
from urllib.parse import urlencode, urlsplit

BENCH_DIR = Path(__file__).resolve().parent
if str(BENCH_DIR) not in sys.path:
    sys.path.insert(0, str(BENCH_DIR))

from endpoint_bench import (  # noqa: E402
    REPO_ROOT,
    Processes,
    _percentile,
    log_tail,
    parse_only,
    print_table,
    start_jupyter_stream,
)

MEASUREMENTS = ("held", "burst")
WORKERS = 4
HEARTBEAT_S = 1.0
LATE_GAP_S = 1.5  # a heartbeat gap longer than this counts as "late"
CLK_TCK = os.sysconf("SC_CLK_TCK")


# --------------------------------------------------------------------------
# The endpoints. Module level on purpose: cloudpickle sends functions defined
# in __main__ by value, so the worker kernels need not import this file.
# --------------------------------------------------------------------------

async def held_async(secs: float = 60.0, step: float = 0.5):
    """One event, then silence for `secs` (cancellable: it awaits), then a last event."""
    yield "data: open\n\n"
    end = time.monotonic() + secs
    while time.monotonic() < end:
        await asyncio.sleep(step)
    yield "data: end\n\n"


def held_sync(secs: float = 60.0, step: float = 0.5):
    """One event, then silence for `secs` in time.sleep (stoppable only at a yield)."""
    yield "data: open\n\n"
    end = time.monotonic() + secs
    while time.monotonic() < end:
        time.sleep(step)
    yield "data: end\n\n"


def burst(n: int = 10, interval: float = 0.1):
    """`n` events `interval` seconds apart: a 1 s stream by default."""
    for i in range(n):
        yield f"data: {i}\n\n"
        time.sleep(interval)


# --------------------------------------------------------------------------
# /proc readings (Linux)
# --------------------------------------------------------------------------

def stat_fields(pid: int) -> list[bytes] | None:
    """/proc/<pid>/stat from field 3 (state) on, or None if the process is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    return stat[stat.rfind(b")") + 2:].split()  # after the command name, which may hold spaces


def cpu_ticks(pid: int) -> int | None:
    """utime + stime of `pid` in clock ticks, or None if it is gone."""
    fields = stat_fields(pid)
    return None if fields is None else int(fields[11]) + int(fields[12])  # fields 14 and 15


def ppid_of(pid: int) -> int | None:
    fields = stat_fields(pid)
    return None if fields is None else int(fields[1])


def status_kib(pid: int, key: str = "VmRSS") -> int | None:
    """A `kB` line of /proc/<pid>/status (VmRSS, VmHWM), or None."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def descendants(root: int) -> List[int]:
    """Every process below `root` (the worker kernels, and whatever they started)."""
    children: Dict[int, List[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            parent = ppid_of(int(entry))
            if parent is not None:
                children.setdefault(parent, []).append(int(entry))
    found, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return sorted(found)


class ProcGroup:
    """The server process and its worker kernels: CPU and RSS from /proc."""

    def __init__(self, server_pid: int, kernel_pids: List[int]):
        self.server_pid = server_pid
        self.kernel_pids = kernel_pids

    def ticks(self) -> Tuple[int, int]:
        server = cpu_ticks(self.server_pid) or 0
        kernels = sum(cpu_ticks(p) or 0 for p in self.kernel_pids)
        return server, kernels

    def rss_kib(self) -> Tuple[int, int]:
        server = status_kib(self.server_pid) or 0
        kernels = sum(status_kib(p) or 0 for p in self.kernel_pids)
        return server, kernels


def cpu_percent(before: Tuple[int, int], after: Tuple[int, int], seconds: float) -> Tuple[float, float]:
    """% of one core used by (server, kernels) between two ProcGroup.ticks()."""
    if seconds <= 0:
        return 0.0, 0.0
    return tuple(100.0 * (a - b) / CLK_TCK / seconds for a, b in zip(after, before))


def client_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


# --------------------------------------------------------------------------
# Raw HTTP/1.1 + SSE client pieces
# --------------------------------------------------------------------------

async def read_head(reader: asyncio.StreamReader, timeout: float) -> tuple[int, dict]:
    """An HTTP/1.1 response's status and headers (names and values lower-cased)."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        k, _, v = line.partition(":")
        headers[k.strip().lower()] = v.strip().lower()
    return int(lines[0].split(" ", 2)[1]), headers


class ChunkedDecoder:
    """Incremental Transfer-Encoding: chunked decoder; `done` after the last chunk."""

    def __init__(self) -> None:
        self.buf = bytearray()
        self.remaining = 0
        self.crlf = False
        self.done = False

    def feed(self, data: bytes) -> bytes:
        self.buf += data
        out = bytearray()
        buf = self.buf
        while not self.done:
            if self.remaining:
                take = min(self.remaining, len(buf))
                if not take:
                    break
                out += buf[:take]
                del buf[:take]
                self.remaining -= take
                self.crlf = not self.remaining
            elif self.crlf:
                if len(buf) < 2:
                    break
                del buf[:2]
                self.crlf = False
            else:
                eol = buf.find(b"\r\n")
                if eol < 0:
                    break
                size = int(bytes(buf[:eol]).split(b";", 1)[0], 16)
                del buf[:eol + 2]
                if size == 0:
                    self.done = True  # trailers, if any, are ignored
                else:
                    self.remaining = size
        return bytes(out)


class SSEScanner:
    """Splits an SSE body into blocks; timestamps heartbeats (comments) and data events."""

    def __init__(self) -> None:
        self.buf = b""
        self.events = 0
        self.errors = 0
        self.first_event: float | None = None
        self.heartbeats: List[float] = []

    def feed(self, payload: bytes, t: float) -> None:
        self.buf += payload
        while True:
            end = self.buf.find(b"\n\n")
            if end < 0:
                return
            block, self.buf = self.buf[:end], self.buf[end + 2:]
            if block.startswith(b":"):
                self.heartbeats.append(t)
            elif block.startswith(b"event: error") or b"\nevent: error" in block:
                self.errors += 1
            elif block.startswith(b"data:") or b"\ndata:" in block:
                self.events += 1
                if self.first_event is None:
                    self.first_event = t


class Stream:
    """One client request, read to its end (or until cancelled)."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.t_start = 0.0
        self.t_connected: float | None = None
        self.t_headers: float | None = None
        self.t_end: float | None = None
        self.status: int | None = None
        self.complete = False  # the server ended the body properly
        self.closed_by_server = False
        self.error: str | None = None
        self.sse = SSEScanner()
        self.opened = asyncio.Event()  # first data event, or failure


async def run_stream(stream: Stream, host: str, port: int, path: str, timeout: float | None = None) -> None:
    """GET `path`, feed the body to stream.sse; returns at the end of the body, on an
    error, after `timeout` seconds, or when cancelled (the connection is then closed)."""
    writer = None
    stream.t_start = time.monotonic()
    deadline = None if timeout is None else stream.t_start + timeout

    def left() -> float | None:
        return None if deadline is None else max(0.001, deadline - time.monotonic())

    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), left())
        sock = writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        stream.t_connected = time.monotonic()
        writer.write(f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nAccept: text/event-stream\r\n"
                     f"Connection: close\r\n\r\n".encode("latin-1"))
        stream.status, headers = await read_head(reader, left())
        stream.t_headers = time.monotonic()
        chunked = "chunked" in headers.get("transfer-encoding", "")
        if stream.status != 200:
            body = await asyncio.wait_for(reader.read(2000), left())
            stream.error = f"HTTP {stream.status}: {body[:200]!r}"
            return
        decoder = ChunkedDecoder() if chunked else None
        while True:
            data = await asyncio.wait_for(reader.read(65536), left())
            t = time.monotonic()
            if not data:
                stream.closed_by_server = True
                stream.complete = not chunked  # chunked bodies must end with their last chunk
                break
            payload = decoder.feed(data) if decoder else data
            if payload:
                stream.sse.feed(payload, t)
                if stream.sse.first_event is not None:
                    stream.opened.set()
            if decoder and decoder.done:
                stream.complete = True
                break
        stream.t_end = time.monotonic()
    except asyncio.CancelledError:
        raise
    except asyncio.TimeoutError:
        stream.error = "timeout"
    except (OSError, ValueError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as exc:
        stream.error = f"{type(exc).__name__}: {exc}"
    finally:
        if stream.t_end is None:
            stream.t_end = time.monotonic()
        stream.opened.set()
        if writer is not None:
            writer.close()


async def loop_lag_sampler(lags: List[float], period: float = 0.1) -> None:
    """How late this event loop wakes up (client-side delay seen in every timestamp)."""
    while True:
        t = time.monotonic()
        await asyncio.sleep(period)
        lags.append(time.monotonic() - t - period)


# --------------------------------------------------------------------------
# Server
# --------------------------------------------------------------------------

class OurServer:
    """A jupyter_server + jupyter_stream in a subprocess, with our endpoints registered."""

    def __init__(self, procs: Processes, tmp: Path, calls_per_worker: int, held_gen: str,
                 startup_timeout: float) -> None:
        tmp.mkdir(parents=True, exist_ok=True)
        options = [
            f"--JupyterStream.min_workers={WORKERS}",
            f"--JupyterStream.max_workers={WORKERS}",
            f"--JupyterStream.calls_per_worker={calls_per_worker}",
            f"--JupyterStream.sse_heartbeat_interval={HEARTBEAT_S:g}",
        ]
        self.proc, self.base, self.token, self.log = start_jupyter_stream(
            procs, tmp, options, workers=WORKERS, startup_timeout=startup_timeout)
        parts = urlsplit(self.base)
        self.host, self.port = parts.hostname, parts.port
        self.headers = {"Authorization": f"token {self.token}"}

        os.environ["JUPYTER_STREAM_URL"] = self.base
        os.environ["JUPYTER_STREAM_TOKEN"] = self.token
        if str(REPO_ROOT) not in sys.path:
            sys.path.insert(0, str(REPO_ROOT))
        import jupyter_stream

        jupyter_stream.connect(self.base, self.token)  # not a connection cached from an earlier phase
        held_fn = held_async if held_gen == "async" else held_sync
        self.paths = {}
        for name, fn in (("held", held_fn), ("burst", burst)):
            handle = jupyter_stream.endpoint(name=name, media_type="text/event-stream")(fn)
            self.paths[name] = urlsplit(handle.url).path

        workers = self.workers()
        self.procs = ProcGroup(self.proc.pid, self.kernel_pids(workers))
        self.config = {"workers": WORKERS, "calls_per_worker": calls_per_worker,
                       "sse_heartbeat_interval": HEARTBEAT_S}

    def path(self, endpoint: str, **query) -> str:
        return self.paths[endpoint] + "?" + urlencode({"token": self.token, **query})

    def workers(self) -> List[dict]:
        req = urllib.request.Request(self.base + "api/stream/workers", headers=self.headers)
        with urllib.request.urlopen(req, timeout=5) as resp:
            return json.loads(resp.read()).get("workers", [])

    def endpoint_stats(self, name: str) -> dict:
        req = urllib.request.Request(self.base + "api/stream/endpoints", headers=self.headers)
        with urllib.request.urlopen(req, timeout=5) as resp:
            for info in json.loads(resp.read()).get("endpoints", []):
                if info.get("name") == name:
                    return info.get("stats", {})
        return {}

    def kernel_pids(self, workers: List[dict]) -> List[int]:
        """The worker kernels: our descendants per /proc, checked against the pool's list."""
        below = descendants(self.proc.pid)
        listed = [w["pid"] for w in workers if w.get("pid")]
        return sorted(set(below) | {p for p in listed if cpu_ticks(p) is not None})

    def log_problems(self, limit: int = 8) -> Tuple[int, List[str]]:
        """Warning/error lines and tracebacks in the server log."""
        try:
            lines = self.log.read_text(errors="replace").splitlines()
        except OSError:
            return 0, []
        bad = [ln for ln in lines if re.match(r"\[[WEC] ", ln) or ln.startswith("Traceback")]
        return len(bad), bad[:limit]


def warm(server: OurServer, endpoint: str, query: dict, expect_events: int) -> None:
    """One complete request, so the function is loaded in a worker before we measure."""
    async def once() -> Stream:
        stream = Stream(-1)
        await run_stream(stream, server.host, server.port, server.path(endpoint, **query), timeout=30)
        return stream

    stream = asyncio.run(once())
    if stream.error or not stream.complete or stream.sse.events != expect_events:
        raise RuntimeError(f"warm-up of {endpoint} failed: status {stream.status}, error {stream.error}, "
                           f"{stream.sse.events} events, complete={stream.complete}\n{log_tail(server.log)}")


# --------------------------------------------------------------------------
# Measurements
# --------------------------------------------------------------------------

def _stats(values: List[float]) -> dict:
    if not values:
        return {"n": 0, "p50": None, "p99": None, "max": None}
    return {"n": len(values), "p50": _percentile(values, 50), "p99": _percentile(values, 99), "max": max(values)}


async def measure_held(server: OurServer, args) -> dict:
    n, wave = args.streams, args.wave
    secs = args.hold + args.linger  # the silence outlasts the hold: clients leave first
    path = server.path("held", secs=secs, step=args.step)
    streams = [Stream(i) for i in range(n)]
    tasks: List[asyncio.Task] = []
    lags: List[float] = []
    lag_task = asyncio.create_task(loop_lag_sampler(lags))
    group = server.procs

    rss_before = group.rss_kib()
    ticks_open, t_open = group.ticks(), time.monotonic()
    cpu_client_open = client_cpu_s()
    open_deadline = t_open + args.open_timeout
    for start in range(0, n, wave):
        batch = streams[start:start + wave]
        for s in batch:
            tasks.append(asyncio.create_task(run_stream(s, server.host, server.port, path)))
        left = open_deadline - time.monotonic()
        if left <= 0:
            break
        try:
            await asyncio.wait_for(asyncio.gather(*(s.opened.wait() for s in batch)), left)
        except asyncio.TimeoutError:
            break
    opened = [s for s in streams if s.sse.first_event is not None]
    t_all_open = max((s.sse.first_event for s in opened), default=time.monotonic())
    open_s = t_all_open - t_open
    ticks_hold, t_hold = group.ticks(), time.monotonic()
    cpu_client_hold = client_cpu_s()
    open_cpu = cpu_percent(ticks_open, ticks_hold, t_hold - t_open)
    open_at_once = sum(1 for s in opened if s.error is None and not s.closed_by_server)

    # Hold: every stream open, silent but for heartbeats. Sample RSS once a second.
    rss_samples: List[Tuple[int, int]] = []
    hold_end = t_hold + args.hold
    while time.monotonic() < hold_end:
        rss_samples.append(group.rss_kib())
        await asyncio.sleep(min(1.0, max(0.0, hold_end - time.monotonic())))
    rss_samples.append(group.rss_kib())
    still_open = sum(1 for s in streams if s.sse.first_event is not None and s.error is None
                     and not s.closed_by_server)
    ticks_close, t_close = group.ticks(), time.monotonic()
    cpu_client_close = client_cpu_s()
    hold_cpu = cpu_percent(ticks_hold, ticks_close, t_close - t_hold)
    lag_task.cancel()

    try:
        busy_held = sum(w.get("busy", 0) for w in
                        await asyncio.get_running_loop().run_in_executor(None, server.workers))
        open_held = (await asyncio.get_running_loop().run_in_executor(
            None, server.endpoint_stats, "held")).get("open_streams")
    except (urllib.error.URLError, OSError, ValueError):
        busy_held = open_held = None

    # Close every stream from the client side, then watch the pool let go of them
    # (workers' busy) and the handlers finish (the endpoint's open_streams).
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    t_closed = time.monotonic()
    # busy: calls counted against the workers; abandoned (newer servers): cancelled
    # calls whose code has not stopped yet; open_streams: handlers still running.
    traces: Dict[str, list] = {"busy": [], "abandoned": [], "open_streams": []}
    done_after: Dict[str, float | None] = {k: None for k in traces}
    free_deadline = t_closed + args.free_timeout
    loop = asyncio.get_running_loop()
    while True:
        values: Dict[str, object] = {}
        try:
            workers = await loop.run_in_executor(None, server.workers)
            values["busy"] = sum(w.get("busy", 0) for w in workers)
            if any("abandoned" in w for w in workers):
                values["abandoned"] = sum(w.get("abandoned", 0) for w in workers)
        except (urllib.error.URLError, OSError, ValueError) as exc:
            values["busy"] = f"error: {exc!r}"
        try:
            values["open_streams"] = (await loop.run_in_executor(
                None, server.endpoint_stats, "held")).get("open_streams")
        except (urllib.error.URLError, OSError, ValueError) as exc:
            values["open_streams"] = f"error: {exc!r}"
        now = round(time.monotonic() - t_closed, 2)
        for key, value in values.items():
            trace = traces[key]
            if not trace or trace[-1][1] != value:
                trace.append((now, value))
            if value == 0 and done_after[key] is None:
                done_after[key] = now
        if all(done_after[k] is not None for k in values) or time.monotonic() > free_deadline:
            break
        await asyncio.sleep(0.1)
    if not traces["abandoned"]:
        del traces["abandoned"], done_after["abandoned"]

    # Heartbeat gaps whose both ends fall in the hold window (all streams open).
    gaps, first_gaps, beats = [], [], []
    for s in opened:
        hb = s.sse.heartbeats
        if hb:
            first_gaps.append(hb[0] - s.sse.first_event)
        in_hold = [t for t in hb if t_all_open <= t <= t_close]
        beats.append(len(in_hold))
        gaps.extend(b - a for a, b in zip(in_hold, in_hold[1:]))
    lateness = [g - HEARTBEAT_S for g in gaps]
    errors: Dict[str, int] = {}
    for s in streams:
        if s.error:
            key = s.error if len(s.error) < 80 else s.error[:80] + "..."
            errors[key] = errors.get(key, 0) + 1
    ttfe = [s.sse.first_event - s.t_start for s in opened]
    hold_window = t_close - t_all_open
    return {
        "streams": n,
        "started": len(tasks),
        "opened": len(opened),
        "open_at_once": open_at_once,
        "still_open_at_close": still_open,
        "ended_by_server": sum(1 for s in streams if s.closed_by_server),
        "errors": errors,
        "open_s": open_s,
        "time_to_first_event_s": _stats(ttfe),
        "hold_s": hold_window,
        "heartbeat_gaps": len(gaps),
        "heartbeat_lateness_s": _stats(lateness),
        "heartbeat_late_share": (sum(1 for g in gaps if g > LATE_GAP_S) / len(gaps)) if gaps else None,
        "first_heartbeat_after_event_s": _stats(first_gaps),
        "heartbeats_per_stream_in_hold": _stats([float(b) for b in beats]),
        "expected_heartbeats_per_stream": hold_window / HEARTBEAT_S,
        "streams_without_heartbeat_in_hold": sum(1 for b in beats if b == 0) + (n - len(opened)),
        "client_loop_lag_s": _stats(lags),
        "cpu_open_pct": {"server": open_cpu[0], "kernels": open_cpu[1]},
        "cpu_hold_pct": {"server": hold_cpu[0], "kernels": hold_cpu[1],
                         "client": 100.0 * (cpu_client_close - cpu_client_hold) / max(1e-9, t_close - t_hold)},
        "client_cpu_open_pct": 100.0 * (cpu_client_hold - cpu_client_open) / max(1e-9, t_hold - t_open),
        "rss_before_kib": {"server": rss_before[0], "kernels": rss_before[1]},
        "rss_held_kib": {"server": max(r[0] for r in rss_samples), "kernels": max(r[1] for r in rss_samples)},
        "back_to_zero_after_s": done_after,
        "after_close_traces": traces,
        "busy_at_end_of_hold": busy_held,
        "open_streams_at_end_of_hold": open_held,
        "kernel_pids": group.kernel_pids,
        "silence_s": secs,
        "step_s": args.step,
        "generator": args.held_gen,
    }


async def measure_burst(server: OurServer, args) -> dict:
    n = args.clients
    path = server.path("burst", n=args.events, interval=args.interval)
    streams = [Stream(i) for i in range(n)]
    group = server.procs
    rss_peak = list(group.rss_kib())
    stop = asyncio.Event()

    async def sample_rss() -> None:
        while not stop.is_set():
            server_kib, kernels_kib = group.rss_kib()
            rss_peak[0] = max(rss_peak[0], server_kib)
            rss_peak[1] = max(rss_peak[1], kernels_kib)
            try:
                await asyncio.wait_for(stop.wait(), 0.05)
            except asyncio.TimeoutError:
                pass

    sampler = asyncio.create_task(sample_rss())
    rss_before = group.rss_kib()
    ticks0, cpu_client0 = group.ticks(), client_cpu_s()
    t0 = time.monotonic()
    await asyncio.gather(*(run_stream(s, server.host, server.port, path, timeout=args.client_timeout)
                           for s in streams))
    t1 = time.monotonic()
    ticks1, cpu_client1 = group.ticks(), client_cpu_s()
    stop.set()
    await sampler
    cpu = cpu_percent(ticks0, ticks1, t1 - t0)

    ok = [s for s in streams if s.error is None and s.status == 200 and s.complete
          and s.sse.events == args.events and s.sse.errors == 0]
    errors: Dict[str, int] = {}
    for s in streams:
        if s not in ok:
            key = s.error or f"status {s.status}, {s.sse.events} events, complete={s.complete}"
            key = key if len(key) < 80 else key[:80] + "..."
            errors[key] = errors.get(key, 0) + 1
    finished = [s.t_end - t0 for s in ok]
    return {
        "clients": n,
        "ok": len(ok),
        "errors": errors,
        "start_window_s": max(s.t_start for s in streams) - min(s.t_start for s in streams),
        "first_finished_s": min(finished) if finished else None,
        "last_finished_s": max(finished) if finished else None,
        "wall_s": t1 - t0,
        "duration_s": _stats([s.t_end - s.t_start for s in ok]),
        "connect_s": _stats([s.t_connected - s.t_start for s in streams if s.t_connected]),
        "slow_connects": sum(1 for s in streams if s.t_connected and s.t_connected - s.t_start >= 0.9),
        "headers_s": _stats([s.t_headers - s.t_start for s in streams if s.t_headers]),
        "first_event_s": _stats([s.sse.first_event - s.t_start for s in streams if s.sse.first_event]),
        "cpu_pct": {"server": cpu[0], "kernels": cpu[1],
                    "client": 100.0 * (cpu_client1 - cpu_client0) / max(1e-9, t1 - t0)},
        "rss_before_kib": {"server": rss_before[0], "kernels": rss_before[1]},
        "rss_peak_kib": {"server": rss_peak[0], "kernels": rss_peak[1]},
        "server_vmhwm_kib": status_kib(group.server_pid, "VmHWM"),
        "ideal_s": args.events * args.interval,
        "events": args.events,
    }


# --------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------

def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v * 1e3:,.0f}"


def _s(v: float | None, digits: int = 2) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def _mib(kib: int | None) -> str:
    return "-" if kib is None else f"{kib / 1024:,.1f}"


def report(results: dict, args) -> None:
    if "held" in results:
        r = results["held"]
        lat, ttfe, lag = r["heartbeat_lateness_s"], r["time_to_first_event_s"], r["client_loop_lag_s"]
        per, first = r["heartbeats_per_stream_in_hold"], r["first_heartbeat_after_event_s"]
        def zero(key: str) -> str:
            after = r["back_to_zero_after_s"].get(key)
            return f"after {after:.2f} s" if after is not None else f"NOT within {args.free_timeout:g} s"

        def trace(key: str) -> str:
            points = r["after_close_traces"].get(key, [])
            shown = " ".join(f"{t}:{v}" for t, v in points[:6])
            return shown + (f" ... {points[-1][0]}:{points[-1][1]}" if len(points) > 6 else "")

        rows = [
            ["streams started / got first event", f"{r['started']} / {r['opened']}"],
            ["open at once (first event, not ended)", f"{r['open_at_once']}"],
            ["still open at end of hold", f"{r['still_open_at_close']}"],
            ["ended by server / client errors", f"{r['ended_by_server']} / {sum(r['errors'].values())}"],
            [f"time to open all (waves of {args.wave})", f"{r['open_s']:.2f} s"],
            ["time to first event p50 / p99 / max", f"{_ms(ttfe['p50'])} / {_ms(ttfe['p99'])} / {_ms(ttfe['max'])} ms"],
            ["hold window (all open)", f"{r['hold_s']:.1f} s"],
            ["heartbeat gaps measured", f"{r['heartbeat_gaps']:,}"],
            ["heartbeat lateness p50 / p99 / max", f"{_ms(lat['p50'])} / {_ms(lat['p99'])} / {_ms(lat['max'])} ms"],
            [f"gaps > {LATE_GAP_S:g} s", "-" if r["heartbeat_late_share"] is None
             else f"{100 * r['heartbeat_late_share']:.2f} %"],
            ["first heartbeat after the event p50 / max", f"{_ms(first['p50'])} / {_ms(first['max'])} ms"],
            ["heartbeats per stream in hold p50 / expected",
             f"{_s(per['p50'], 0)} / {r['expected_heartbeats_per_stream']:.1f}"],
            ["streams without a heartbeat in hold", f"{r['streams_without_heartbeat_in_hold']}"],
            ["client loop lag p50 / p99 / max", f"{_ms(lag['p50'])} / {_ms(lag['p99'])} / {_ms(lag['max'])} ms"],
            ["CPU while opening: server / kernels / client",
             f"{r['cpu_open_pct']['server']:.0f} / {r['cpu_open_pct']['kernels']:.0f} / "
             f"{r['client_cpu_open_pct']:.0f} % of a core"],
            ["CPU during hold: server / kernels / client",
             f"{r['cpu_hold_pct']['server']:.1f} / {r['cpu_hold_pct']['kernels']:.1f} / "
             f"{r['cpu_hold_pct']['client']:.1f} % of a core"],
            ["RSS before: server / kernels (sum)",
             f"{_mib(r['rss_before_kib']['server'])} / {_mib(r['rss_before_kib']['kernels'])} MiB"],
            ["RSS while held (max): server / kernels",
             f"{_mib(r['rss_held_kib']['server'])} / {_mib(r['rss_held_kib']['kernels'])} MiB"],
            ["workers busy / endpoint open_streams at end of hold",
             f"{r['busy_at_end_of_hold']} / {r['open_streams_at_end_of_hold']}"],
            ["workers busy back to 0 after close", zero("busy")],
            ["  busy (s after close: value)", trace("busy")],
            ["endpoint open_streams back to 0 after close", zero("open_streams")],
            ["  open_streams (s after close: value)", trace("open_streams")],
            *([["workers abandoned back to 0 after close", zero("abandoned")],
               ["  abandoned (s after close: value)", trace("abandoned")]]
              if "abandoned" in r["back_to_zero_after_s"] else []),
        ]
        for err, count in sorted(r["errors"].items(), key=lambda kv: -kv[1])[:5]:
            rows.append([f"  error x{count}", err])
        print_table(f"held: {r['streams']} SSE streams, {r['generator']} generator silent {r['silence_s']:g} s "
                    f"(step {r['step_s']:g} s), heartbeat every {HEARTBEAT_S:g} s, "
                    f"{WORKERS} workers x {results['servers']['held']['calls_per_worker']} calls",
                    rows, ["measure", "value"])

    if "burst" in results:
        r = results["burst"]
        d, c, h = r["duration_s"], r["connect_s"], r["headers_s"]
        fe = r["first_event_s"]
        rows = [
            [f"complete with {r['events']} events", f"{r['ok']} / {r['clients']}"],
            ["all clients started within", f"{_ms(r['start_window_s'])} ms"],
            ["first / last finished (from start)", f"{_s(r['first_finished_s'])} / {_s(r['last_finished_s'])} s"],
            ["client duration p50 / p99 / max", f"{_s(d['p50'])} / {_s(d['p99'])} / {_s(d['max'])} s "
                                                f"(ideal {r['ideal_s']:g} s)"],
            ["connect p50 / p99 / max", f"{_ms(c['p50'])} / {_ms(c['p99'])} / {_ms(c['max'])} ms"],
            ["connects taking >= 0.9 s (a SYN retry: listen queue full)", f"{r['slow_connects']}"],
            ["response headers p50 / p99 / max", f"{_ms(h['p50'])} / {_ms(h['p99'])} / {_ms(h['max'])} ms"],
            ["first event p50 / p99 / max", f"{_ms(fe['p50'])} / {_ms(fe['p99'])} / {_ms(fe['max'])} ms"],
            ["CPU during burst: server / kernels / client",
             f"{r['cpu_pct']['server']:.0f} / {r['cpu_pct']['kernels']:.0f} / {r['cpu_pct']['client']:.0f} "
             f"% of a core over {r['wall_s']:.2f} s"],
            ["RSS before: server / kernels",
             f"{_mib(r['rss_before_kib']['server'])} / {_mib(r['rss_before_kib']['kernels'])} MiB"],
            ["RSS peak during burst: server / kernels",
             f"{_mib(r['rss_peak_kib']['server'])} / {_mib(r['rss_peak_kib']['kernels'])} MiB"],
        ]
        for err, count in sorted(r["errors"].items(), key=lambda kv: -kv[1])[:5]:
            rows.append([f"  error x{count}", err])
        print_table(f"burst: {r['clients']} clients at once, {r['events']} events {args.interval:g} s apart, "
                    f"{WORKERS} workers x {results['servers']['burst']['calls_per_worker']} calls",
                    rows, ["measure", "value"])

    for phase, info in results.get("server_logs", {}).items():
        print(f"\nserver log ({phase}): {info['problems']} warning/error lines" +
              (f", kept at {info['path']}" if info.get("kept") else ""))
        for line in info["first"]:
            print(f"  {line[:200]}")


# --------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------

def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", action="append", default=[],
                   help="held and/or burst; repeatable or comma-separated (default: both)")
    p.add_argument("--streams", type=int, default=1000, help="held: streams held open at once (default 1000)")
    p.add_argument("--hold", type=float, default=20.0, help="held: seconds to hold them all open (default 20)")
    p.add_argument("--wave", type=int, default=100, help="held: streams opened per wave (default 100)")
    p.add_argument("--step", type=float, default=0.5, help="held: the generator's sleep step (default 0.5 s)")
    p.add_argument("--linger", type=float, default=30.0,
                   help="held: the generator stays silent this much longer than --hold, so the "
                        "clients leave while it still sleeps (default 30 s)")
    p.add_argument("--held-gen", choices=("async", "sync"), default="async",
                   help="held: silence via await asyncio.sleep (async, cancellable) or time.sleep "
                        "(sync, stoppable only at its next yield) (default async)")
    p.add_argument("--open-timeout", type=float, default=60.0, help="held: limit for opening all streams (s)")
    p.add_argument("--free-timeout", type=float, default=10.0,
                   help="held: how long to wait for busy to fall back to 0 after closing (default 10 s)")
    p.add_argument("--clients", type=int, default=500, help="burst: clients at once (default 500)")
    p.add_argument("--events", type=int, default=10, help="burst: events per stream (default 10)")
    p.add_argument("--interval", type=float, default=0.1, help="burst: seconds between events (default 0.1)")
    p.add_argument("--client-timeout", type=float, default=30.0, help="burst: limit per client (default 30 s)")
    p.add_argument("--startup-timeout", type=float, default=90.0, help="limit for the server's start (s)")
    p.add_argument("--deadline", type=float, default=170.0,
                   help="the whole run is stopped (servers too) after this many seconds (default 170)")
    p.add_argument("--keep-logs", action="store_true", help="keep the server logs (kept anyway on failure)")
    p.add_argument("--json", action="store_true", help="also print the results as JSON")
    args = p.parse_args(argv)
    args.only = parse_only(p, args.only, MEASUREMENTS)
    if args.streams < 1 or args.clients < 1 or args.wave < 1:
        p.error("--streams, --clients and --wave must be at least 1")
    return args


def raise_nofile_limit() -> Tuple[int, int]:
    """Soft RLIMIT_NOFILE up to the hard limit (the server child inherits it too)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):
            pass
    return resource.getrlimit(resource.RLIMIT_NOFILE)


class Deadline(Exception):
    pass


def _on_alarm(signum, frame):
    raise Deadline()


def _raise_on_sigterm(signum, frame):
    raise SystemExit(128 + signum)


def main(argv=None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _raise_on_sigterm)
    signal.signal(signal.SIGALRM, _on_alarm)
    signal.alarm(max(1, math.ceil(args.deadline)))
    nofile = raise_nofile_limit()
    need = max(args.streams if "held" in args.only else 0, args.clients if "burst" in args.only else 0) + 100
    if nofile[0] != resource.RLIM_INFINITY and nofile[0] < need:
        print(f"[load] warning: RLIMIT_NOFILE soft limit {nofile[0]} < {need}; connections may fail",
              file=sys.stderr)

    tmp = Path(tempfile.mkdtemp(prefix="jupyter-stream-load-"))
    procs = Processes()
    results: dict = {"servers": {}, "server_logs": {}}
    servers: Dict[str, OurServer] = {}
    ok = False
    t_begin = time.monotonic()
    try:
        print(f"[load] python {platform.python_version()}, {os.cpu_count()} CPUs, "
              f"RLIMIT_NOFILE {nofile[0]}, logs in {tmp}", file=sys.stderr)
        for phase in args.only:
            t = time.monotonic()
            count = args.streams if phase == "held" else args.clients
            cpw = max(1, math.ceil(count / WORKERS))
            server = servers[phase] = OurServer(procs, tmp / phase, cpw, args.held_gen, args.startup_timeout)
            results["servers"][phase] = {**server.config, "kernel_pids": server.procs.kernel_pids,
                                         "server_pid": server.proc.pid}
            print(f"[load] {phase}: server up on port {server.port} (pid {server.proc.pid}, kernels "
                  f"{server.procs.kernel_pids}) in {time.monotonic() - t:.1f}s", file=sys.stderr)
            if phase == "held":
                warm(server, "held", {"secs": 0, "step": 0.01}, expect_events=2)
                results["held"] = asyncio.run(measure_held(server, args))
            else:
                warm(server, "burst", {"n": 2, "interval": 0.01}, expect_events=2)
                results["burst"] = asyncio.run(measure_burst(server, args))
            problems, first = server.log_problems()
            results["server_logs"][phase] = {"path": str(server.log), "problems": problems, "first": first}
            print(f"[load] {phase} done in {time.monotonic() - t:.1f}s; stopping its server", file=sys.stderr)
            procs.stop_all()
        signal.alarm(0)
        keep = args.keep_logs
        for info in results["server_logs"].values():
            info["kept"] = keep
        report(results, args)
        print(f"\n[load] total {time.monotonic() - t_begin:.1f}s", file=sys.stderr)
        if args.json:
            print(json.dumps({
                "results": {k: v for k, v in results.items()},
                "config": {k: getattr(args, k) for k in
                           ("only", "streams", "hold", "wave", "step", "linger", "held_gen", "free_timeout",
                            "clients", "events", "interval", "client_timeout")},
                "machine": {"python": platform.python_version(), "cpus": os.cpu_count(),
                            "platform": platform.platform()},
            }, indent=2, default=str))
        ok = True
        return 0
    except Deadline:
        print(f"\n[load] stopped: the run passed --deadline {args.deadline:g}s", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\n[load] interrupted", file=sys.stderr)
        return 130
    except (RuntimeError, urllib.error.URLError, OSError) as exc:
        print(f"[load] error: {exc}", file=sys.stderr)
        return 1
    finally:
        signal.alarm(0)
        procs.stop_all()
        if ok and not args.keep_logs:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            print(f"[load] server logs kept in {tmp}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
