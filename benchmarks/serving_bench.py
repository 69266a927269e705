#!/usr/bin/env python
"""Model-serving benchmark: many token streams from one worker, next to FastAPI and tornado.

The endpoint is an "LLM" stand-in: a sync generator that sleeps ``--gap``
(0.05 s) and then yields one SSE event, ``--tokens`` (20) times, so a stream
lasts about 1 s. Each event carries the sender's wall clock at the yield
(``data: <time.time()> tokN``), which lets the client measure how long the
token took to reach it (client and servers share this machine's clock).

Servers:

* ``ours c=100`` - a ``jupyter_server`` with the ``jupyter_stream`` extension;
  the generator is an endpoint method of a class registered with
  ``register_class(LLM, concurrency=100, max_workers=1)``: one worker kernel
  runs up to 100 calls at once (a thread each), as a model server would.
* ``ours async c=100`` - the same with an async generator (``await
  asyncio.sleep``), registered like ``ours c=100``: its calls run on the
  worker's event loop, as FastAPI's async generator runs on uvicorn's.
* ``ours c=1``   - the same class body under another name, registered with
  ``concurrency=1, max_workers=1``: one worker, one call at a time.
* ``fastapi async`` - uvicorn + ``StreamingResponse`` of an async generator
  with ``await asyncio.sleep(gap)`` (the idiomatic FastAPI way).
* ``fastapi sync``  - the same with the sync ``time.sleep`` generator, which
  Starlette steps in its threadpool (40 threads by default).
* ``tornado``    - a plain ``RequestHandler``: ``await asyncio.sleep(gap)``,
  ``write`` and ``await flush()`` per token (latency reference).

Measurements:

1. ``burst`` - ``--clients`` (100) clients started at once (one
   ``asyncio.gather``), each reading one whole stream. Per client: time to
   first token (request start to the first ``data:`` event) and time to the
   end of the stream; reported p50 / p99 of both, and "last done" = when the
   last client finished, from the start of the burst. The ``ours c=1`` line
   uses ``--serial-clients`` (10) clients, since 100 one-at-a-time streams
   take ~100 s; its projection to the full client count is printed too.
   Target (issue 12): ``ours c=100``, one worker, last client done within
   1.5 s.
2. ``latency`` - per-token latency added by the path: for every token of
   ``--latency-streams`` (10) concurrent streams, the client's receive time
   (``time.time()`` right after the read that completed the event) minus the
   sender's timestamp taken just before the yield (ours: on the worker
   kernel; tornado/FastAPI: in the handler). p50 / p99 / max over all tokens.

Clients are plain asyncio raw sockets (TCP_NODELAY, chunked decoding) in this
process. The machine this was written on has 2 cores shared by the clients,
the server, its worker kernels and the references, so the client's own
event-loop lag is printed next to each burst: it is part of every figure.

This is a script, not a test. Examples::

    python benchmarks/serving_bench.py
    python benchmarks/serving_bench.py --clients 50 --serial-clients 5
    python benchmarks/serving_bench.py --only latency --latency-streams 20 --json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import signal
import socket
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Tuple
from urllib.parse import urlencode, urlsplit

BENCH_DIR = Path(__file__).resolve().parent
if str(BENCH_DIR) not in sys.path:
    sys.path.insert(0, str(BENCH_DIR))
if str(BENCH_DIR.parent) not in sys.path:
    sys.path.insert(0, str(BENCH_DIR.parent))

from endpoint_bench import (  # noqa: E402
    Processes,
    _percentile,
    _raise_on_sigterm,
    log_tail,
    parse_only,
    print_table,
    run_tornado,
    run_uvicorn,
    start_announced,
    start_jupyter_stream,
    uvicorn_flavour,
)
from load_bench import ChunkedDecoder, read_head  # noqa: E402

import jupyter_stream  # noqa: E402

MEASUREMENTS = ("burst", "latency")
TARGET_LAST_DONE_S = 1.5  # issue 12: 100 clients on one worker at concurrency 100
OURS = "ours c=100"
OURS_SERIAL = "ours c=1"
OURS_ASYNC = "ours async c=100"


# --------------------------------------------------------------------------
# The token generators. Module level on purpose: cloudpickle sends classes and
# functions defined in __main__ by value; the reference servers re-run this
# file with --serve.
# --------------------------------------------------------------------------

def token_event(i: int) -> str:
    """One SSE event stamped with the sender's wall clock."""
    return f"data: {time.time():.6f} tok{i}\n\n"


def sync_tokens(n: int = 20, gap: float = 0.05):
    for i in range(n):
        time.sleep(gap)
        yield token_event(i)


async def async_tokens(n: int = 20, gap: float = 0.05):
    for i in range(n):
        await asyncio.sleep(gap)
        yield token_event(i)


def stamped_tokens(vocab: list, n: int, gap: float):
    """The tokens both served classes stream: one every `gap` seconds, stamped."""
    for i in range(n):
        time.sleep(gap)
        yield f"data: {time.time():.6f} {vocab[i % len(vocab)]}\n\n"


class LLM:
    """Served with concurrency=100 on one worker."""

    @jupyter_stream.enter
    def load(self):
        self.vocab = [f"tok{i}" for i in range(1000)]

    @jupyter_stream.endpoint(media_type="text/event-stream")
    def tokens(self, n: int = 20, gap: float = 0.05):
        yield from stamped_tokens(self.vocab, n, gap)


async def stamped_tokens_async(vocab: list, n: int, gap: float):
    """The same tokens from an async generator (``await asyncio.sleep``), as FastAPI's."""
    for i in range(n):
        await asyncio.sleep(gap)
        yield f"data: {time.time():.6f} {vocab[i % len(vocab)]}\n\n"


class LLMAsync(LLM):
    """The same model with an async generator: its calls run on the worker's event loop,
    one thread for all of them (FastAPI's async row does the same)."""

    @jupyter_stream.endpoint(media_type="text/event-stream")
    async def tokens(self, n: int = 20, gap: float = 0.05):
        async for token in stamped_tokens_async(self.vocab, n, gap):
            yield token


class LLMSerial(LLM):
    """The same, served with concurrency=1 on one worker (a class of its own: its own
    endpoint name and pool)."""

    @jupyter_stream.endpoint(media_type="text/event-stream")
    def tokens(self, n: int = 20, gap: float = 0.05):
        yield from stamped_tokens(self.vocab, n, gap)


# --------------------------------------------------------------------------
# Reference servers (child processes: ``serving_bench.py --serve X``)
# --------------------------------------------------------------------------

def serve_tornado() -> None:
    """Plain tornado: asyncio.sleep, write + await flush() per token."""
    import tornado.web

    class TokensHandler(tornado.web.RequestHandler):
        async def get(self) -> None:
            n = int(self.get_query_argument("n", "20"))
            gap = float(self.get_query_argument("gap", "0.05"))
            self.set_header("Content-Type", "text/event-stream")
            self.set_header("Cache-Control", "no-cache")
            for i in range(n):
                await asyncio.sleep(gap)
                self.write(token_event(i))
                await self.flush()

    run_tornado([(r"/stream/tokens", TokensHandler)])


def serve_fastapi() -> None:
    """uvicorn + FastAPI: async generator, and sync generator (threadpool)."""
    from fastapi import FastAPI
    from fastapi.responses import StreamingResponse

    app = FastAPI()

    @app.get("/stream/async_tokens")
    async def _async(n: int = 20, gap: float = 0.05):
        return StreamingResponse(async_tokens(n, gap), media_type="text/event-stream")

    @app.get("/stream/sync_tokens")
    async def _sync(n: int = 20, gap: float = 0.05):
        return StreamingResponse(sync_tokens(n, gap), media_type="text/event-stream")

    run_uvicorn(app)


REFERENCE_SERVERS = {"tornado": serve_tornado, "fastapi": serve_fastapi}


def start_reference(kind: str, procs: Processes, tmp: Path, timeout: float = 30.0) -> str:
    """Start a reference server; returns its base URL (``http://host:port/stream/``)."""
    port, _ = start_announced(kind, Path(__file__).resolve(), procs, tmp, timeout)
    return f"http://127.0.0.1:{port}/stream/"


# --------------------------------------------------------------------------
# Targets: one streaming URL each
# --------------------------------------------------------------------------

@dataclass
class Target:
    name: str
    url: str  # no query
    headers: Dict[str, str] = field(default_factory=dict)
    note: str = ""

    @property
    def host(self) -> str:
        return urlsplit(self.url).hostname

    @property
    def port(self) -> int:
        return urlsplit(self.url).port

    def path(self, **query) -> str:
        return urlsplit(self.url).path + ("?" + urlencode(query) if query else "")


def start_ours(procs: Processes, tmp: Path, clients: int, startup_timeout: float) -> Tuple[List[Target], dict]:
    """jupyter_server + jupyter_stream, no warm default pool; the two classes registered."""
    from jupyter_stream.client.classes import register_class
    from jupyter_stream.client.connection import ServerConnection

    options = ["--JupyterStream.min_workers=0", "--JupyterStream.max_workers=3"]
    _, base, token, log = start_jupyter_stream(procs, tmp, options, workers=0, startup_timeout=startup_timeout)
    conn = ServerConnection(base, token)
    conn.check()
    fast = register_class(LLM, connection=conn, concurrency=clients, max_workers=1)
    serial = register_class(LLMSerial, connection=conn, concurrency=1, max_workers=1)
    async_ = register_class(LLMAsync, connection=conn, concurrency=clients, max_workers=1)
    headers = {"Authorization": f"token {token}"}
    targets = [
        Target(OURS, fast.default.tokens.url, headers, f"1 worker, concurrency {clients}"),
        Target(OURS_SERIAL, serial.default.tokens.url, headers, "1 worker, concurrency 1"),
        Target(OURS_ASYNC, async_.default.tokens.url, headers, f"async generator, 1 worker, concurrency {clients}"),
    ]
    return targets, {"base": base, "headers": headers, "log": log}


def pools_snapshot(ours: dict) -> List[dict]:
    """Our server's pools that have kernels: which class, calls per worker, kernels alive."""
    req = urllib.request.Request(ours["base"] + "api/stream/workers", headers=ours["headers"])
    with urllib.request.urlopen(req, timeout=5) as resp:
        pools = json.loads(resp.read()).get("pools", [])
    # a pool lists its env's names only (values may be secrets): it is told apart by its name
    return [{"class": p.get("name", "(default)"),
             "calls_per_worker": p.get("calls_per_worker"), "max_workers": p.get("max_workers"),
             "alive": sum(1 for w in p.get("workers", []) if w.get("alive"))}
            for p in pools if p.get("workers")]


# --------------------------------------------------------------------------
# Client
# --------------------------------------------------------------------------

@dataclass
class StreamResult:
    t_start: float = 0.0  # perf_counter
    t_first: float | None = None  # first data event complete
    t_end: float | None = None
    status: int | None = None
    tokens: int = 0
    complete: bool = False
    error: str | None = None
    latencies: List[float] = field(default_factory=list)  # seconds, client wall - sender wall


async def read_stream(target: Target, query: dict, timeout: float) -> StreamResult:
    """GET one token stream on a fresh connection and read it to its end."""
    res = StreamResult(t_start=time.perf_counter())
    deadline = res.t_start + timeout
    writer = None

    def left() -> float:
        return max(0.001, deadline - time.perf_counter())

    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(target.host, target.port), left())
        sock = writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        extra = "".join(f"{k}: {v}\r\n" for k, v in target.headers.items())
        writer.write(f"GET {target.path(**query)} HTTP/1.1\r\nHost: {target.host}:{target.port}\r\n"
                     f"Accept: text/event-stream\r\n{extra}Connection: close\r\n\r\n".encode("latin-1"))
        res.status, headers = await read_head(reader, left())
        if res.status != 200:
            body = await asyncio.wait_for(reader.read(2000), left())
            res.error = f"HTTP {res.status}: {body[:200]!r}"
            return res
        decoder = ChunkedDecoder() if "chunked" in headers.get("transfer-encoding", "") else None
        buf = b""
        while True:
            data = await asyncio.wait_for(reader.read(65536), left())
            wall, perf = time.time(), time.perf_counter()
            if not data:
                res.complete = decoder is None
                break
            buf += decoder.feed(data) if decoder else data
            while True:
                end = buf.find(b"\n\n")
                if end < 0:
                    break
                block, buf = buf[:end], buf[end + 2:]
                if block.startswith(b"data: "):
                    sent = float(block[6:].split(b" ", 1)[0])
                    res.latencies.append(wall - sent)
                    res.tokens += 1
                    if res.t_first is None:
                        res.t_first = perf
                elif block.startswith(b"event: error") or b"\nevent: error" in block:
                    res.error = f"SSE error event: {block[:200]!r}"
            if decoder is not None and decoder.done:
                res.complete = True
                break
    except asyncio.TimeoutError:
        res.error = "timeout"
    except (OSError, ValueError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as exc:
        res.error = f"{type(exc).__name__}: {exc}"
    finally:
        res.t_end = time.perf_counter()
        if writer is not None:
            writer.close()
    return res


async def read_status(url: str, headers: Dict[str, str], timeout: float) -> float:
    """GET `url` on a fresh connection and read the whole response: seconds it took."""
    start = time.perf_counter()
    parts = urlsplit(url)
    reader, writer = await asyncio.wait_for(asyncio.open_connection(parts.hostname, parts.port), timeout)
    try:
        sock = writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        extra = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        writer.write(f"GET {parts.path} HTTP/1.1\r\nHost: {parts.netloc}\r\n{extra}Connection: close\r\n\r\n".encode("latin-1"))
        status, _ = await read_head(reader, timeout)
        await asyncio.wait_for(reader.read(), timeout)  # to the end (Connection: close)
        if status != 200:
            raise RuntimeError(f"GET {parts.path}: HTTP {status}")
        return time.perf_counter() - start
    finally:
        writer.close()


def measure_floor_burst(url: str, headers: Dict[str, str], clients: int, timeout: float, runs: int = 3) -> dict:
    """The burst's floor on our server: `clients` requests at once to jupyter-server's own
    ``/api/status`` (authenticated the same way), each read to its end. What any request
    to a jupyter-server costs before its handler does anything of ours; the median of
    `runs` bursts (a warm-up burst first)."""
    async def burst() -> List[float]:
        return list(await asyncio.gather(*(read_status(url, headers, timeout) for _ in range(clients))))

    asyncio.run(burst())
    p50s, p99s = [], []
    for _ in range(runs):
        times = [t * 1e3 for t in asyncio.run(burst())]
        p50s.append(_percentile(times, 50))
        p99s.append(_percentile(times, 99))
        time.sleep(0.2)
    return {"clients": clients, "p50_ms": sorted(p50s)[len(p50s) // 2], "p99_ms": sorted(p99s)[len(p99s) // 2]}


async def loop_lag(lags: List[float], period: float = 0.05) -> None:
    """How late this event loop wakes up: client-side delay in every timestamp."""
    while True:
        t = time.perf_counter()
        await asyncio.sleep(period)
        lags.append(time.perf_counter() - t - period)


async def run_clients(target: Target, clients: int, query: dict, timeout: float) -> Tuple[float, List[StreamResult], List[float]]:
    """`clients` streams started at once; returns (burst start, results, loop lags)."""
    lags: List[float] = []
    lag_task = asyncio.create_task(loop_lag(lags))
    await asyncio.sleep(0.06)
    lags.clear()
    t0 = time.perf_counter()
    results = await asyncio.gather(*(read_stream(target, query, timeout) for _ in range(clients)))
    lag_task.cancel()
    return t0, list(results), lags


def check_one(target: Target, tokens: int = 2, timeout: float = 120.0) -> None:
    """One short stream (also warms the endpoint: starts its worker, runs its enter)."""
    _, results, _ = asyncio.run(run_clients(target, 1, {"n": tokens, "gap": 0.0}, timeout))
    res = results[0]
    if res.error or not res.complete or res.tokens != tokens:
        raise RuntimeError(f"{target.name}: warm-up failed: status {res.status}, error {res.error}, "
                           f"{res.tokens}/{tokens} tokens, complete={res.complete}")


# --------------------------------------------------------------------------
# Measurements
# --------------------------------------------------------------------------

def _ms(values: List[float], q: float) -> float | None:
    return _percentile(values, q) * 1e3 if values else None


def measure_burst(target: Target, clients: int, args) -> dict:
    query = {"n": args.tokens, "gap": args.gap}
    t0, results, lags = asyncio.run(run_clients(target, clients, query, args.timeout))
    ok = [r for r in results if r.complete and not r.error and r.tokens == args.tokens]
    ttft = [r.t_first - r.t_start for r in results if r.t_first is not None]
    done = [r.t_end - r.t_start for r in ok]
    errors: Dict[str, int] = {}
    for r in results:
        if r not in ok:
            key = r.error or f"{r.tokens} tokens, complete={r.complete}"
            errors[key] = errors.get(key, 0) + 1
    lat = [x for r in ok for x in r.latencies]
    return {
        "clients": clients,
        "ok": len(ok),
        "errors": errors,
        "ttft_p50_ms": _ms(ttft, 50),
        "ttft_p99_ms": _ms(ttft, 99),
        "done_p50_s": _percentile(done, 50) if done else None,
        "done_p99_s": _percentile(done, 99) if done else None,
        # all clients done (or given up) from the start of the burst
        "last_done_s": max(r.t_end for r in results) - t0,
        "token_latency_p50_ms": _ms(lat, 50),
        "token_latency_p99_ms": _ms(lat, 99),
        "client_loop_lag_p99_ms": _ms(lags, 99),
        "client_loop_lag_max_ms": max(lags) * 1e3 if lags else None,
    }


def measure_latency(target: Target, args) -> dict:
    query = {"n": args.tokens, "gap": args.gap}
    _, results, lags = asyncio.run(run_clients(target, args.latency_streams, query, args.timeout))
    bad = [r for r in results if r.error or not r.complete or r.tokens != args.tokens]
    if bad:
        raise RuntimeError(f"{target.name}: latency streams failed: {bad[0].error or bad[0].tokens}")
    lat = [x for r in results for x in r.latencies]
    return {
        "streams": len(results),
        "tokens": len(lat),
        "p50_ms": _ms(lat, 50),
        "p99_ms": _ms(lat, 99),
        "max_ms": max(lat) * 1e3,
        "min_ms": min(lat) * 1e3,
        "client_loop_lag_p99_ms": _ms(lags, 99),
    }


# --------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------

def _f(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def _ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}x" if a is not None and b else "-"


def report(results: dict, targets: List[Target], args) -> None:
    notes = {t.name: t.note for t in targets}

    if "burst" in results:
        r = results["burst"]
        ref = r.get(OURS, {})
        rows = []
        for name, m in r.items():
            rows.append([f"{name} ({notes[name]})", str(m["clients"]), str(m["ok"]),
                         _f(m["ttft_p50_ms"], ".1f"), _f(m["ttft_p99_ms"], ".1f"),
                         _f(m["done_p50_s"], ".3f"), _f(m["done_p99_s"], ".3f"), f"{m['last_done_s']:.3f}",
                         f"{m['ok'] / m['last_done_s']:.1f}",
                         _ratio(m["ttft_p50_ms"], ref.get("ttft_p50_ms")),
                         _ratio(m["last_done_s"], ref.get("last_done_s")),
                         _f(m["token_latency_p50_ms"], ".2f"), _f(m["token_latency_p99_ms"], ".2f"),
                         _f(m["client_loop_lag_p99_ms"], ".1f")])
        print_table(
            f"Burst: N clients at once, each one stream of {args.tokens} tokens {args.gap * 1e3:g} ms apart "
            f"(~{args.tokens * args.gap:g} s); TTFT and done from each client's request start (TTFT floor: one gap, "
            f"{args.gap * 1e3:g} ms), 'last' = all done, from the burst start; ratio = row / {OURS}",
            rows, ["server", "N", "ok", "TTFT p50 ms", "TTFT p99 ms", "done p50 s", "done p99 s", "last s",
                   "streams/s", "TTFT p50 /ours", "last /ours", "tok lat p50 ms", "tok lat p99 ms",
                   "client lag p99 ms"])
        for name, m in r.items():
            if m["errors"]:
                print(f"  {name}: failed streams: {m['errors']}")
        floor = results.get("burst_floor")
        if floor:
            print(f"  floor: {floor['clients']} clients at once on our jupyter-server's own /api/status (same token), "
                  f"whole response p50 / p99 {floor['p50_ms']:.1f} / {floor['p99_ms']:.1f} ms (median of 3 bursts); "
                  f"plus one gap, the TTFT of an endpoint whose request cost what /api/status costs: {floor['p50_ms'] + args.gap * 1e3:.1f} / "
                  f"{floor['p99_ms'] + args.gap * 1e3:.1f} ms")
        if OURS_SERIAL in r:
            m = r[OURS_SERIAL]
            projected = m["last_done_s"] * args.clients / m["clients"]
            print(f"  {OURS_SERIAL} ran {m['clients']} clients, not {args.clients}: one at a time they take "
                  f"~{projected:.0f} s for {args.clients} ({_ratio(projected, ref.get('last_done_s'))} "
                  f"{OURS}'s last-done time).")
        if ref:
            ok = ref["ok"] == ref["clients"] and ref["last_done_s"] <= TARGET_LAST_DONE_S
            print(f"  target: {ref['clients']} clients on one worker at concurrency {args.clients}, last client "
                  f"done within {TARGET_LAST_DONE_S:g} s: {'PASS' if ok else 'FAIL'} "
                  f"({ref['ok']}/{ref['clients']} complete, last done at {ref['last_done_s']:.3f} s)")
        for pool in results.get("pools", []):
            print(f"  our pool {pool['class']}: {pool['alive']} worker kernel(s) alive after the bursts "
                  f"(max_workers {pool['max_workers']}, calls_per_worker {pool['calls_per_worker']})")

    if "latency" in results:
        r = results["latency"]
        ref = r.get("tornado", {})
        rows = []
        for name, m in r.items():
            rows.append([f"{name} ({notes[name]})" if notes.get(name) else name, str(m["streams"]),
                         str(m["tokens"]), _f(m["p50_ms"], ".3f"), _f(m["p99_ms"], ".3f"),
                         _f(m["max_ms"], ".3f"), _ratio(m["p50_ms"], ref.get("p50_ms")),
                         _ratio(m["p99_ms"], ref.get("p99_ms")), _f(m["client_loop_lag_p99_ms"], ".1f")])
        print_table(
            f"Per-token latency: client receive time - sender's time.time() at the yield, every token of "
            f"{args.latency_streams} concurrent streams (lower is better; ratio = row / tornado)",
            rows, ["server", "streams", "tokens", "p50 ms", "p99 ms", "max ms", "p50 /tornado",
                   "p99 /tornado", "client lag p99 ms"])


# --------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------

def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", action="append", default=[],
                   help="burst and/or latency; repeatable or comma-separated (default: both)")
    p.add_argument("--clients", type=int, default=100,
                   help="clients at once in the burst, and our endpoint's concurrency (default 100)")
    p.add_argument("--serial-clients", type=int, default=10,
                   help="clients for the one-call-at-a-time line (default 10; 0 skips it)")
    p.add_argument("--tokens", type=int, default=20, help="tokens per stream (default 20)")
    p.add_argument("--gap", type=float, default=0.05, help="seconds between tokens (default 0.05)")
    p.add_argument("--latency-streams", type=int, default=10,
                   help="concurrent streams whose tokens the latency figure is taken over (default 10)")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds a client waits for its stream (default 60)")
    p.add_argument("--skip-ours", action="store_true", help="benchmark the reference servers only")
    p.add_argument("--json", action="store_true", help="also print the results as JSON")
    p.add_argument("--serve", choices=sorted(REFERENCE_SERVERS), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.only = parse_only(p, args.only, MEASUREMENTS)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.serve:
        REFERENCE_SERVERS[args.serve]()
        return 0

    signal.signal(signal.SIGTERM, _raise_on_sigterm)
    tmp = Path(tempfile.mkdtemp(prefix="jupyter-stream-serving-"))
    procs = Processes()
    results: Dict[str, dict] = {}
    ours: dict = {}
    ok = False
    try:
        print(f"[bench] python {platform.python_version()}, {os.cpu_count()} CPUs, logs in {tmp}", file=sys.stderr)
        tornado_base = start_reference("tornado", procs, tmp)
        fastapi_base = start_reference("fastapi", procs, tmp)
        flavour = uvicorn_flavour()
        tornado = Target("tornado", tornado_base + "tokens", note="asyncio.sleep, flush per token")
        fastapi_async = Target("fastapi async", fastapi_base + "async_tokens", note=f"asyncio.sleep; {flavour}")
        fastapi_sync = Target("fastapi sync", fastapi_base + "sync_tokens",
                              note=f"time.sleep, threadpool; {flavour}")
        ours_targets: List[Target] = []
        if not args.skip_ours:
            t = time.monotonic()
            ours_targets, ours = start_ours(procs, tmp, args.clients, startup_timeout=90.0)
            print(f"[bench] ours up in {time.monotonic() - t:.1f}s; starting its three workers", file=sys.stderr)
        targets = ours_targets + [fastapi_async, fastapi_sync, tornado]
        for target in targets:
            if target.name == OURS_SERIAL and (args.serial_clients <= 0 or "burst" not in args.only):
                continue
            t = time.monotonic()
            check_one(target)
            check_one(target)
            print(f"[bench] warm-up {target.name}: {time.monotonic() - t:.1f}s", file=sys.stderr)

        if "burst" in args.only:
            results["burst"] = {}
            for target in targets:
                if target.name == "tornado":
                    continue
                clients = args.clients
                if target.name == OURS_SERIAL:
                    if args.serial_clients <= 0:
                        continue
                    clients = args.serial_clients
                t = time.monotonic()
                results["burst"][target.name] = measure_burst(target, clients, args)
                print(f"[bench] burst   {target.name:14s} {clients} clients, done in {time.monotonic() - t:.1f}s",
                      file=sys.stderr)
            if ours:
                results["pools"] = pools_snapshot(ours)
                results["burst_floor"] = measure_floor_burst(ours["base"] + "api/status", ours["headers"],
                                                             args.clients, args.timeout)
                print("[bench] burst   floor (/api/status) done", file=sys.stderr)

        if "latency" in args.only:
            results["latency"] = {}
            for target in targets:
                if target.name in (OURS_SERIAL, "fastapi sync"):
                    continue
                results["latency"][target.name] = measure_latency(target, args)
                print(f"[bench] latency {target.name:14s} done", file=sys.stderr)

        report(results, targets, args)
        if args.json:
            print(json.dumps({
                "results": results,
                "targets": {t.name: {"url": t.url, "note": t.note} for t in targets},
                "config": {k: getattr(args, k) for k in ("only", "clients", "serial_clients", "tokens", "gap",
                                                         "latency_streams", "timeout", "skip_ours")},
                "machine": {"python": platform.python_version(), "cpus": os.cpu_count(),
                            "platform": platform.platform()},
            }, indent=2))
        ok = True
        return 0
    except KeyboardInterrupt:
        print("\n[bench] interrupted", file=sys.stderr)
        return 130
    except (RuntimeError, OSError, PermissionError, LookupError) as exc:
        print(f"[bench] error: {exc}", file=sys.stderr)
        if ours:
            print(log_tail(ours["log"]), file=sys.stderr)
        return 1
    finally:
        procs.stop_all()
        if ok:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            print(f"[bench] server logs kept in {tmp}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
