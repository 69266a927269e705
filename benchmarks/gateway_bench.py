#!/usr/bin/env python
"""Local worker kernels next to Kernel Gateway worker kernels, side by side in one run.

One ``jupyter kernelgateway`` (``KernelGateway`` from ``jupyter_stream.pytest_plugin``, on
127.0.0.1 with its own token and ``--ZMQChannelsWebsocketConnection.limit_rate=False``)
and two ``jupyter_server``s with the extension, configured alike
(``--JupyterStream.max_workers=W+1``, W = ``--workers``, 2):

* ``local``   - worker kernels started by the server on this machine, reached over
  their direct channel (two unix sockets, ``transport: direct``);
* ``gateway`` - the same server with ``--JupyterStream.worker_gateway_url=<gateway>``:
  its worker kernels are the gateway's, reached through the gateway's kernel-channels
  WebSocket (``transport: channels``: Jupyter messages, JSON or jupyter-server's
  binary framing, one WebSocket hop and the gateway's ZMQ relay per message).

The function and endpoints run in a pool of W warm workers (``min_workers=max_workers=W``
in their registrations), the burst's class in a pool of one: together they fill the
server's cap, so neither ever stops the other's idle kernel to grow. Measurements, each
on both servers with the same client:

1. ``remote`` - ``.remote()`` round trip of a trivial function (``register_function``
   on each server's connection): p50 / p90 over ``--calls`` sequential calls after
   ``--warmup``; plus the CPU the server and the gateway spent per call (/proc).
2. ``map``    - items/s of ``f.map(range(--items))`` of the same function, read in order
   (``measure_map`` of ``map_bench.py``, best of 2), and CPU per 1,000 items.
3. ``ttfb``   - time to first byte of a warm trivial SSE endpoint, sequential keep-alive
   GETs on a raw socket (``measure_ttfb`` of ``endpoint_bench.py``).
4. ``events`` - events/s of a tight SSE generator (``--events`` ``data: x`` events), read
   on a raw socket (``measure_events`` of ``endpoint_bench.py``, best of ``--repeats``);
   plus the CPU the server, the gateway and the kernels spent per million events, over
   one longer stream (``--cpu-events``).
5. ``burst``  - ``--clients`` (100) clients at once, each reading one stream of
   ``--tokens`` (20) tokens ``--gap`` (10 ms) apart from a class endpoint registered with
   ``concurrency=--clients, min_workers=1, max_workers=1`` (``measure_burst`` of
   ``serving_bench.py``): TTFT p50 / p99, last client done, per-token latency, and the
   CPU each process spent per stream.
6. ``idle``   - CPU of the server, the gateway and the W+1 warm kernels over ``--idle``
   seconds of nothing (the pools' pings, the gateway's liveness checks), and their RSS;
   ``--workers 16 --only idle`` shows what many warm workers cost.

Every measurement runs ``--rounds`` times (default 2), local first in odd rounds and
gateway first in even ones. The table shows the better round of each side and the
ratio gateway / local of those; the ratios of the single rounds are shown beside it.

``--nodelay gateway`` starts the gateway with a config file that turns Nagle's
algorithm off on all its sockets (``--nodelay both``: on the gateway-side server's too).
As shipped, tornado leaves it on for a WebSocket after its handshake, and a kernel
WebSocket that sends two small frames in a row waits for the peer's delayed ACK (up to
40 ms on Linux) before the second: the difference between the two runs is that wait.

This is a script, not a test. Examples::

    python benchmarks/gateway_bench.py
    python benchmarks/gateway_bench.py --only remote,events --rounds 3 --json
    python benchmarks/gateway_bench.py --clients 50 --calls 200
    python benchmarks/gateway_bench.py --nodelay gateway
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import shutil
import signal
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Dict, List

BENCH_DIR = Path(__file__).resolve().parent
for path in (str(BENCH_DIR), str(BENCH_DIR.parent)):
    if path not in sys.path:
        sys.path.insert(0, path)

from endpoint_bench import (  # noqa: E402  (same folder; shared plumbing and client)
    EventCounter,
    Processes,
    Server,
    _raise_on_sigterm,
    log_tail,
    measure_events,
    measure_ttfb,
    parse_only,
    print_table,
    start_jupyter_stream,
    wait_until_streams,
)
from load_bench import CLK_TCK, cpu_ticks, descendants, status_kib  # noqa: E402
from map_bench import measure_map, measure_remote  # noqa: E402
from serving_bench import Target, check_one, measure_burst  # noqa: E402

import jupyter_stream  # noqa: E402
from jupyter_stream.client.classes import register_class  # noqa: E402
from jupyter_stream.client.connection import ServerConnection  # noqa: E402
from jupyter_stream.client.endpoints import register_endpoint  # noqa: E402
from jupyter_stream.client.functions import register_function  # noqa: E402
from jupyter_stream.pytest_plugin import KernelGateway  # noqa: E402

MEASUREMENTS = ("remote", "map", "ttfb", "events", "burst", "idle")
GATEWAY_OPTIONS = ["--ZMQChannelsWebsocketConnection.limit_rate=False"]
SIDES = ("local", "gateway")


# --------------------------------------------------------------------------
# What runs on the workers. Module level in __main__ on purpose: cloudpickle
# sends it by value, so the worker kernels need not import this file.
# --------------------------------------------------------------------------

def triv(x):
    return x


def trivial():
    yield "data: hi\n\n"


def tight(n: int = 200000):
    for _ in range(n):
        yield "data: x\n\n"


class Tokens:
    """An "LLM": one worker, many streams at once (a thread each)."""

    @jupyter_stream.enter
    def load(self):
        self.vocab = [f"tok{i}" for i in range(1000)]

    @jupyter_stream.endpoint(media_type="text/event-stream")
    def tokens(self, n: int = 20, gap: float = 0.01):
        for i in range(n):
            time.sleep(gap)
            yield f"data: {time.time():.6f} {self.vocab[i % len(self.vocab)]}\n\n"


# --------------------------------------------------------------------------
# The two servers
# --------------------------------------------------------------------------

class Side:
    """One jupyter-server with the extension and what is registered on it."""

    def __init__(self, name: str, procs: Processes, tmp: Path, workers: int, extra: List[str],
                 gateway: KernelGateway | None, args) -> None:
        self.name = name
        self.gateway = gateway
        tmp.mkdir(parents=True, exist_ok=True)
        # Two pools whose maxima fill the server's cap, so that neither stops the other's idle
        # kernel to grow (the default pool's maximum is the server's cap: a map over it would
        # take the class's seat, and the burst would then start a kernel): the function and
        # the two endpoints in a pool of W workers (set apart from the default pool by an
        # env), the class in one of its own.
        options = ["--JupyterStream.min_workers=0", f"--JupyterStream.max_workers={workers + 1}", *extra]
        self.proc, self.base, self.token, self.log = start_jupyter_stream(procs, tmp, options, workers=0,
                                                                          startup_timeout=args.startup_timeout)
        self.headers = {"Authorization": f"token {self.token}"}
        self.connection = ServerConnection(self.base, self.token)
        self.connection.check()
        pool = {"min_workers": workers, "max_workers": workers, "env": {"GATEWAY_BENCH": "1"}}
        self.fn = register_function(triv, connection=self.connection, **pool)
        urls = {}
        for fn in (trivial, tight):
            urls[fn.__name__] = register_endpoint(fn, media_type="text/event-stream", connection=self.connection,
                                                  **pool).url
        self.server = Server(name, urls, self.headers)  # endpoint_bench's raw-socket client
        served = register_class(Tokens, connection=self.connection, concurrency=args.clients,
                                min_workers=1, max_workers=1)
        self.target = Target(name, served.default.tokens.url, self.headers)
        deadline = time.monotonic() + args.startup_timeout
        while len([w for w in self.workers() if w["alive"]]) < workers + 1:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name}: fewer than {workers + 1} workers alive after {args.startup_timeout:g} s")
            time.sleep(0.2)

    ordered = True  # what map_bench's measure_map checks

    def remote(self, x: int) -> Any:
        return self.fn.remote(x)

    def map(self, n: int) -> Any:
        return self.fn.map(range(n))

    def workers(self) -> List[dict]:
        return self.connection.request("GET", "api/stream/workers").json()["workers"]

    def ticks(self) -> Dict[str, Any]:
        """CPU ticks so far of this server, of each worker kernel and (gateway side) of the gateway."""
        out: Dict[str, Any] = {"server": cpu_ticks(self.proc.pid) or 0}
        if self.gateway is None:
            kernels = descendants(self.proc.pid)
        else:
            out["gateway"] = cpu_ticks(self.gateway.process.pid) or 0
            kernels = descendants(self.gateway.process.pid)
        out["kernels"] = {pid: cpu_ticks(pid) for pid in kernels}
        return out

    def close(self) -> None:
        with contextlib.suppress(Exception):
            socket = getattr(self.connection, "_calls_socket", None)
            if socket is not None:
                socket.close()
        with contextlib.suppress(Exception):
            self.connection.http.close()


def cpu_ms(before: Dict[str, Any], after: Dict[str, Any], per: float) -> Dict[str, float]:
    """CPU milliseconds per `per` units of work, by process kind (kernels: those alive
    before and after; a kernel started or stopped in between is reported)."""
    out = {k: (after[k] - before[k]) * 1e3 / CLK_TCK / per for k in after if k != "kernels"}
    kept = [pid for pid in after["kernels"] if before["kernels"].get(pid) is not None and after["kernels"][pid] is not None]
    out["kernels"] = sum(after["kernels"][pid] - before["kernels"][pid] for pid in kept) * 1e3 / CLK_TCK / per
    if set(kept) != set(before["kernels"]) or set(kept) != set(after["kernels"]):
        _log(f"worker kernels changed during a measurement: {sorted(before['kernels'])} -> {sorted(after['kernels'])}")
    return out


# --------------------------------------------------------------------------
# Measurements: one side at a time, with the other benchmarks' own functions
# --------------------------------------------------------------------------

def run_remote(side: Side, args) -> dict:
    before = side.ticks()
    res = measure_remote(side, args.calls, args.warmup)
    res["cpu_ms_per_call"] = cpu_ms(before, side.ticks(), args.calls + args.warmup)
    return res


def run_map(side: Side, args) -> dict:
    before = side.ticks()
    res = measure_map(side, args.items, repeats=2, budget_s=20.0)
    res["cpu_ms_per_1k_items"] = cpu_ms(before, side.ticks(), args.items * len(res["runs_s"]) / 1000)
    return res


def run_ttfb(side: Side, args) -> dict:
    return measure_ttfb(side.server, args.requests, warmup=20)


def run_events(side: Side, args) -> dict:
    res = measure_events(side.server, args.events, args.repeats, budget_s=30.0)
    # CPU over one longer stream: /proc counts in 10 ms ticks, and 200k local events take ~0.1 s
    counter = EventCounter()
    before = side.ticks()
    status, *_ = side.server.fetch("tight", counter, n=args.cpu_events)
    if status != 200 or counter.count != args.cpu_events:
        raise RuntimeError(f"{side.name}: the CPU stream got HTTP {status}, {counter.count}/{args.cpu_events} events")
    res["cpu_ms_per_1m_events"] = cpu_ms(before, side.ticks(), args.cpu_events / 1e6)
    return res


def run_burst(side: Side, args) -> dict:
    before = side.ticks()
    res = measure_burst(side.target, args.clients, args)
    res["cpu_ms_per_stream"] = cpu_ms(before, side.ticks(), args.clients)
    return res


def run_idle(side: Side, args) -> dict:
    """What the warm workers cost while nothing runs (pings, liveness checks), and their memory."""
    before = side.ticks()
    time.sleep(args.idle)
    after = side.ticks()
    pct = {k: v / 10 for k, v in cpu_ms(before, after, args.idle).items()}  # ms per s -> % of a core
    rss = [status_kib(pid) for pid in after["kernels"]]
    rss = [kib / 1024 for kib in rss if kib]
    return {"cpu_percent": pct, "kernels": len(after["kernels"]),
            "kernel_rss_mib": sum(rss) / len(rss) if rss else None, "server_rss_mib": (status_kib(side.proc.pid) or 0) / 1024}


RUNNERS: Dict[str, Callable[[Side, Any], dict]] = {
    "remote": run_remote, "map": run_map, "ttfb": run_ttfb, "events": run_events, "burst": run_burst,
    "idle": run_idle}


def warm(side: Side, args) -> None:
    """Every function loaded in the workers that will run it, the class entered."""
    for _ in range(args.warmup):
        side.remote(1)
    wait_until_streams(side.server, deadline=time.monotonic() + 60, log=side.log)
    for _ in range(3):
        side.server.fetch("tight", None, n=1000)
    check_one(side.target)
    check_one(side.target)


# --------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------

# (measurement, key, label, format, higher is better)
ROWS = [
    ("remote", "p50_ms", ".remote() round trip p50, ms", ".3f", False),
    ("remote", "p90_ms", ".remote() round trip p90, ms", ".3f", False),
    ("remote", "cpu.server", "  server CPU per call, ms", ".3f", False),
    ("remote", "cpu.gateway", "  gateway CPU per call, ms", ".3f", False),
    ("remote", "cpu.kernels", "  worker kernels' CPU per call, ms", ".3f", False),
    ("map", "items_per_s", ".map() of a trivial function, items/s", ",.0f", True),
    ("map", "cpu.server", "  server CPU per 1k items, ms", ".1f", False),
    ("map", "cpu.gateway", "  gateway CPU per 1k items, ms", ".1f", False),
    ("map", "cpu.kernels", "  worker kernels' CPU per 1k items, ms", ".1f", False),
    ("ttfb", "p50_ms", "TTFB trivial SSE endpoint p50, ms", ".3f", False),
    ("ttfb", "p90_ms", "TTFB trivial SSE endpoint p90, ms", ".3f", False),
    ("events", "events_per_s", "events/s, tight SSE generator", ",.0f", True),
    ("events", "cpu.server", "  server CPU per 1M events, ms", ".0f", False),
    ("events", "cpu.gateway", "  gateway CPU per 1M events, ms", ".0f", False),
    ("events", "cpu.kernels", "  worker kernel CPU per 1M events, ms", ".0f", False),
    ("burst", "ok", "burst: streams complete", "d", True),
    ("burst", "ttft_p50_ms", "burst: TTFT p50, ms", ".1f", False),
    ("burst", "ttft_p99_ms", "burst: TTFT p99, ms", ".1f", False),
    ("burst", "last_done_s", "burst: last client done, s", ".3f", False),
    ("burst", "token_latency_p50_ms", "burst: per-token latency p50, ms", ".2f", False),
    ("burst", "token_latency_p99_ms", "burst: per-token latency p99, ms", ".2f", False),
    ("burst", "cpu.server", "  server CPU per stream, ms", ".2f", False),
    ("burst", "cpu.gateway", "  gateway CPU per stream, ms", ".2f", False),
    ("burst", "cpu.kernels", "  worker kernels' CPU per stream, ms", ".2f", False),
    ("burst", "client_loop_lag_p99_ms", "burst: client loop lag p99, ms", ".1f", False),
    ("idle", "kernels", "idle: worker kernels", "d", False),
    ("idle", "cpu.server", "  server CPU, % of a core", ".2f", False),
    ("idle", "cpu.gateway", "  gateway CPU, % of a core", ".2f", False),
    ("idle", "cpu.kernels", "  worker kernels' CPU, % of a core (all)", ".2f", False),
    ("idle", "kernel_rss_mib", "  RSS per worker kernel, MiB", ".0f", False),
    ("idle", "server_rss_mib", "  server RSS, MiB", ".0f", False),
]


def value_of(result: dict, key: str) -> float | None:
    if key.startswith("cpu."):
        cpu = next((v for k, v in result.items() if k.startswith("cpu_ms_per_") or k == "cpu_percent"), {})
        return cpu.get(key[4:])
    return result.get(key)


def best(values: List[float | None], higher: bool) -> float | None:
    values = [v for v in values if v is not None]
    if not values:
        return None
    return max(values) if higher else min(values)


def summarize(results: Dict[str, List[Dict[str, dict]]]) -> List[dict]:
    """One row per figure: the best round of each side, and the per-round ratios."""
    rows = []
    for measurement, key, label, fmt, higher in ROWS:
        rounds = results.get(measurement)
        if not rounds:
            continue
        per_side = {s: [value_of(r[s], key) for r in rounds] for s in SIDES}
        if all(v is None for v in per_side["local"] + per_side["gateway"]):
            continue
        local, gateway = best(per_side["local"], higher), best(per_side["gateway"], higher)
        ratios = [g / v if g is not None and v else None for v, g in zip(per_side["local"], per_side["gateway"])]
        rows.append({"measurement": measurement, "key": key, "label": label, "format": fmt,
                     "higher_is_better": higher, "local": local, "gateway": gateway,
                     "ratio": gateway / local if gateway is not None and local else None,
                     "round_ratios": ratios, "rounds": per_side})
    return rows


def _fmt(value: float | None, fmt: str) -> str:
    if value is None:
        return "-"
    return format(int(value), fmt) if fmt == "d" else format(value, fmt)


def report(rows: List[dict], args) -> None:
    table = []
    for row in rows:
        table.append([row["label"], _fmt(row["local"], row["format"]), _fmt(row["gateway"], row["format"]),
                      "-" if row["ratio"] is None else f"{row['ratio']:.2f}x",
                      " ".join("-" if r is None else f"{r:.2f}" for r in row["round_ratios"])])
    forced = {"off": "", "gateway": "; TCP_NODELAY forced on the gateway",
              "both": "; TCP_NODELAY forced on the gateway and the gateway-side server"}[args.nodelay]
    print_table(f"Local workers (direct channel) vs Kernel Gateway workers (channels over its WebSocket): "
                f"{args.workers} warm workers each, best of {args.rounds} round(s){forced}; ratio = gateway / local",
                table, ["figure", "local", "gateway", "gateway/local", "per round"])
    print(f"\n  remote: {args.calls} sequential calls after {args.warmup} warm-up; map: {args.items:,} items over "
          f"{args.workers} workers, best of 2; ttfb: {args.requests} keep-alive GETs; "
          f"events: {args.events:,} 'data: x' events, best of {args.repeats} (CPU: one stream of {args.cpu_events:,}); burst: {args.clients} clients at once, "
          f"{args.tokens} tokens {args.gap * 1e3:g} ms apart, one worker at concurrency {args.clients}")
    print("  CPU figures: /proc utime+stime of the server process, the gateway process and the worker kernels "
          f"over the measurement ({1000 // CLK_TCK} ms ticks), divided by the calls, items, events or streams "
          "(idle: per second, as % of one core).")


def versions() -> Dict[str, str]:
    out = {"python": platform.python_version()}
    for dist in ("jupyter-stream", "jupyter_server", "jupyter-kernel-gateway", "jupyter_client", "ipykernel",
                 "pyzmq", "tornado", "cloudpickle"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[dist] = metadata.version(dist)
    return out


def _log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------

def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", action="append", default=[],
                   help="remote, map, ttfb, events, burst and/or idle; repeatable or comma-separated (default: all)")
    p.add_argument("--workers", type=int, default=2, help="warm worker kernels per server (default 2)")
    p.add_argument("--rounds", type=int, default=2, help="rounds of every measurement, sides alternating (default 2)")
    p.add_argument("--calls", type=int, default=500, help="remote: calls measured (default 500)")
    p.add_argument("--warmup", type=int, default=50, help="remote: warm-up calls (default 50)")
    p.add_argument("--items", type=int, default=100000, help="map: items per map, best of 2 (default 100000)")
    p.add_argument("--requests", type=int, default=300, help="ttfb: requests measured (default 300)")
    p.add_argument("--events", type=int, default=200000, help="events: events per run (default 200000)")
    p.add_argument("--repeats", type=int, default=3, help="events: runs per round, best kept (default 3)")
    p.add_argument("--cpu-events", type=int, default=2000000,
                   help="events: events of the one stream whose CPU cost is measured (default 2000000)")
    p.add_argument("--clients", type=int, default=100,
                   help="burst: clients at once, and the class endpoint's concurrency (default 100)")
    p.add_argument("--tokens", type=int, default=20, help="burst: tokens per stream (default 20)")
    p.add_argument("--gap", type=float, default=0.01, help="burst: seconds between tokens (default 0.01)")
    p.add_argument("--timeout", type=float, default=60.0, help="burst: seconds a client waits (default 60)")
    p.add_argument("--idle", type=float, default=5.0, help="idle: seconds the warm workers are watched doing nothing (default 5)")
    p.add_argument("--startup-timeout", type=float, default=120.0, help="limit for a server's start (s)")
    p.add_argument("--nodelay", choices=("off", "gateway", "both"), default="off",
                   help="TCP_NODELAY on the gateway's sockets ('gateway': a jupyter_kernel_gateway_config.py that "
                        "forces it), and also on the gateway-side server's ('both'); default off: as shipped")
    p.add_argument("--json", action="store_true", help="also print the results as JSON")
    args = p.parse_args(argv)
    args.only = parse_only(p, args.only, MEASUREMENTS)
    for name in ("workers", "rounds", "calls", "items", "requests", "events", "repeats", "cpu_events", "clients", "tokens"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be at least 1")
    return args


# Config file (Python, run by the app at startup) for --nodelay: tornado turns Nagle's
# algorithm back on after each HTTP response, a WebSocket's handshake included, and
# neither jupyter-server's kernel WebSocket nor the gateway turns it off again.
NODELAY_CONFIG = """\
import sys

import tornado.iostream

print("gateway_bench: TCP_NODELAY forced on every connection of this process", file=sys.stderr, flush=True)

_set_nodelay = tornado.iostream.IOStream.set_nodelay
tornado.iostream.IOStream.set_nodelay = lambda stream, value: _set_nodelay(stream, True)
"""


def start_gateway(args, tmp: Path) -> KernelGateway:
    """The gateway ignores the terminal's Ctrl-C (it shares our process group): we stop
    it ourselves, after the servers, so that it shuts its kernels down in order."""
    options = list(GATEWAY_OPTIONS)
    if args.nodelay != "off":
        path = tmp / "gateway_nodelay_config.py"
        path.write_text(NODELAY_CONFIG)
        options.append(f"--KernelGatewayApp.config_file={path}")
    gateway = KernelGateway(options)
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # inherited by the child across exec
    try:
        return gateway.start()
    finally:
        signal.signal(signal.SIGINT, previous)


def server_options(args, tmp: Path) -> List[str]:
    if args.nodelay != "both":
        return []
    path = tmp / "nodelay_config.py"
    path.write_text(NODELAY_CONFIG)
    return [f"--ServerApp.config_file={path}"]


def main(argv=None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _raise_on_sigterm)
    tmp = Path(tempfile.mkdtemp(prefix="jupyter-stream-gateway-bench-"))
    procs = Processes()  # the servers, each in its own session (endpoint_bench.py)
    gateway: KernelGateway | None = None
    sides: Dict[str, Side] = {}
    ok = False
    started = time.monotonic()
    try:
        machine = {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()}
        _log(f"{machine['cpus']} CPUs, {machine['platform']}; " + ", ".join(f"{k} {v}" for k, v in versions().items()))
        _log(f"logs in {tmp}")
        gateway = start_gateway(args, tmp)
        _log(f"gateway up at {gateway.url} (pid {gateway.process.pid}, log {gateway.log_path}); "
             f"TCP_NODELAY forced: {args.nodelay}")
        t = time.monotonic()
        sides["local"] = Side("local", procs, tmp / "local", args.workers, [], None, args)
        _log(f"local server up, {args.workers + 1} workers alive, in {time.monotonic() - t:.1f}s")
        t = time.monotonic()
        sides["gateway"] = Side("gateway", procs, tmp / "gateway", args.workers,
                                [*gateway.options_for_server, *server_options(args, tmp)], gateway, args)
        _log(f"gateway server up, {args.workers + 1} workers alive, in {time.monotonic() - t:.1f}s")
        for side in sides.values():
            t = time.monotonic()
            warm(side, args)
            workers = side.workers()
            _log(f"{side.name}: warm in {time.monotonic() - t:.1f}s; workers "
                 + ", ".join(f"{w.get('source', 'local')}/{w['transport']}" for w in workers if w["alive"]))

        results: Dict[str, List[Dict[str, dict]]] = {}
        for measurement in args.only:
            for n in range(args.rounds):
                order = SIDES if n % 2 == 0 else SIDES[::-1]
                this_round: Dict[str, dict] = {}
                for name in order:
                    t = time.monotonic()
                    this_round[name] = RUNNERS[measurement](sides[name], args)
                    _log(f"{measurement} round {n + 1} {name}: {time.monotonic() - t:.1f}s")
                results.setdefault(measurement, []).append(this_round)
        for n, r in enumerate(results.get("burst", [])):
            for name in SIDES:
                if r[name]["errors"]:
                    _log(f"burst round {n + 1} {name}: failed streams: {r[name]['errors']}")

        rows = summarize(results)
        print(f"\nmachine: {machine['cpus']} CPUs, {machine['platform']}")
        print("versions: " + ", ".join(f"{k} {v}" for k, v in versions().items()))
        report(rows, args)
        print(f"\n(total {time.monotonic() - started:.0f} s)")
        if args.json:
            print(json.dumps({
                "rows": [{k: v for k, v in row.items() if k != "format"} for row in rows],
                "results": results,
                "config": {k: getattr(args, k) for k in ("only", "workers", "rounds", "calls", "warmup", "items", "requests",
                                                         "events", "repeats", "clients", "tokens", "gap")},
                "gateway_options": GATEWAY_OPTIONS,
                "nodelay": args.nodelay,
                "versions": versions(),
                "machine": machine,
            }, indent=2, default=str))
        ok = True
        return 0
    except KeyboardInterrupt:
        _log("interrupted")
        return 130
    except (RuntimeError, OSError, LookupError, ValueError, asyncio.TimeoutError) as exc:
        _log(f"error: {type(exc).__name__}: {exc}")
        for side in sides.values():
            print(f"--- {side.name} server log:\n{log_tail(side.log)}", file=sys.stderr)
        return 1
    finally:
        for side in sides.values():
            side.close()
        procs.stop_all()  # the servers first: the gateway server shuts its kernels down on the gateway
        if gateway is not None:
            gateway.stop()
        if ok:
            shutil.rmtree(tmp, ignore_errors=True)
            if gateway is not None:
                shutil.rmtree(gateway.data_dir, ignore_errors=True)
        else:
            _log(f"logs kept in {tmp}" + (f" and {gateway.data_dir}" if gateway is not None else ""))


if __name__ == "__main__":
    sys.exit(main())
