#!/usr/bin/env python
"""Side-by-side benchmark of jupyter-stream ``Function.map`` / ``.remote()`` against references.

Every system runs the same trivial function (identity, ``triv`` below) on exactly
two local worker processes:

* ``ours``            - a ``jupyter_server`` with the ``jupyter_stream`` extension and
  ``--JupyterStream.min_workers=2 --JupyterStream.max_workers=2``; the function is
  registered with ``jupyter_stream.function(triv)`` and called over the server;
* ``multiprocessing`` - ``multiprocessing.Pool(2)``: ``imap(fn, range(n), chunksize=1)``
  and ``apply``;
* ``ipyparallel``     - ``ipp.Cluster(n=2)``: ``LoadBalancedView.map(..., ordered=True)``
  and ``apply_sync``;
* ``dask``            - ``distributed.LocalCluster(n_workers=2, threads_per_worker=1,
  processes=True)``: ``client.map`` + ``as_completed`` / ``gather``, and
  ``client.submit(fn, 1).result()``;
* ``jupyter kernel``  - (``remote`` only) a plain ipykernel driven by jupyter_client's
  ``BlockingKernelClient``: ``execute("1", silent=False)`` until its ``execute_reply``.
  It is the floor of any design that forwards a call to a Jupyter kernel.

Measurements:

1. ``map``    - items/s of ``map(triv, range(N))`` fully consumed (and checked), best
   of ``--repeats``; ipyparallel and dask do a few hundred items/s, so they get
   ``--slow-items``. Plus the time to the FIRST result after the call: median over
   ``--first-rounds`` fresh small maps (each fully consumed, 0.2 s apart).
2. ``remote`` - one warm call's round trip: p50 / p90 over ``--calls`` sequential
   calls after ``--warmup`` warm-up calls.
3. ``slow``   - (ours only) maps of slow items (``nap``: sleeps, returns its pid) on a
   server of its own with ``min_workers=1, max_workers=4``: 60 items of 0.15 s on the
   cold pool (one warm worker, three started on demand by the map), then, warm, 8
   items of 1 s and 60 of 0.15 s. Each is compared with the ideal, items x time /
   workers plus the time the map waited for workers to start (measured: the last
   worker's ready time, polled from ``/api/stream/workers``); target ratio <= 1.15.

Systems are measured one at a time (start, measure, tear down), so on a small
machine no idle cluster's heartbeats run under another's figures.

This is a script, not a test. Examples::

    python benchmarks/map_bench.py
    python benchmarks/map_bench.py --skip-refs --only map --items 500000
    python benchmarks/map_bench.py --only remote --json
    python benchmarks/map_bench.py --skip-refs --only slow
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List

sys.path.insert(0, str(Path(__file__).resolve().parent))
from endpoint_bench import (  # noqa: E402  (same folder; shared plumbing)
    REPO_ROOT,
    Processes,
    _percentile,
    _raise_on_sigterm,
    parse_only,
    print_table,
    start_jupyter_stream,
)

MEASUREMENTS = ("map", "remote", "slow")

# Design targets for our server (see the project brief).
TARGET_MAP_ITEMS_PER_S = 500_000  # issue 20: from a script and a notebook kernel alike
TARGET_FIRST_RESULT_MS = 5.0
TARGET_REMOTE_P50_MS = 0.5  # from a script (0.8 from a notebook kernel)
TARGET_SLOW_RATIO = 1.15  # slow items: time / (items x time / workers + worker start)

FIRST_PAUSE_S = 0.2  # between the small first-result maps


# --------------------------------------------------------------------------
# The function under test. Module level on purpose: jupyter_stream, dask and
# ipyparallel pickle it by value from __main__; multiprocessing workers find
# it by name.
# --------------------------------------------------------------------------

def triv(x):
    return x


def nap(seconds):
    """A slow item: sleeps, and says which worker ran it."""
    import os
    import time

    time.sleep(seconds)
    return os.getpid()


def _pickle_triv_by_value() -> None:
    """When this file is imported rather than run, have cloudpickle send triv's code
    too: workers cannot import a ``map_bench`` module."""
    if __name__ != "__main__":
        try:
            import cloudpickle
        except ImportError:
            return
        cloudpickle.register_pickle_by_value(sys.modules[__name__])


# --------------------------------------------------------------------------
# Systems under test
# --------------------------------------------------------------------------

class NotInstalled(Exception):
    """The reference's package cannot be imported: its row says so instead of failing."""


@dataclass
class System:
    """One system: how to start it, map over it, call it once, and stop it.

    ``map(n, first=False)`` returns an iterator of the n results (in input order
    when ``ordered``); with ``first=True`` it is the form used for the
    first-result latency (the same unless the system has a faster bulk form).
    """

    name: str
    map_note: str = ""  # what "map" means for it, shown in the table
    remote_note: str = ""  # what "remote" means for it
    slow: bool = False  # gets --slow-items / --slow-first-items
    ordered: bool = True
    has_map: bool = True
    has_remote: bool = True

    def start(self) -> None:
        pass

    def map(self, n: int, first: bool = False) -> Iterator[Any]:
        raise NotImplementedError

    def remote(self, x: int) -> Any:
        raise NotImplementedError

    def stop(self) -> None:
        pass


# -- ours ------------------------------------------------------------------

class Ours(System):
    def __init__(self, procs: Processes, tmp: Path, workers: int = 2):
        super().__init__("ours", map_note=f"{workers} worker kernels, f.map ordered",
                         remote_note=f"{workers} worker kernels, f.remote")
        self.procs, self.tmp, self.workers = procs, tmp, workers
        self.fn = None

    def start(self, startup_timeout: float = 90.0) -> None:
        # exactly `workers` kernels: min = max, and all of them alive before measuring
        options = [f"--JupyterStream.min_workers={self.workers}", f"--JupyterStream.max_workers={self.workers}"]
        _, base, token, self.log = start_jupyter_stream(self.procs, self.tmp, options, self.workers, startup_timeout)

        os.environ["JUPYTER_STREAM_URL"] = base
        os.environ["JUPYTER_STREAM_TOKEN"] = token
        if str(REPO_ROOT) not in sys.path:
            sys.path.insert(0, str(REPO_ROOT))
        import jupyter_stream

        self.conn = jupyter_stream.connect(base, token)
        self.fn = jupyter_stream.function(triv)
        if self.fn.remote(3) != 3:
            raise RuntimeError("ours: triv.remote(3) != 3")

    def map(self, n: int, first: bool = False) -> Iterator[Any]:
        return self.fn.map(range(n), order_outputs=self.ordered)

    def remote(self, x: int) -> Any:
        return self.fn.remote(x)

    def stop(self) -> None:
        conn = getattr(self, "conn", None)
        if conn is not None:
            client = getattr(conn, "_calls_socket", None)
            if client is not None:
                with contextlib.suppress(Exception):
                    client.close()
            with contextlib.suppress(Exception):
                conn.http.close()
        # The server itself is stopped by Processes.stop_all (SIGTERM, then SIGKILL).
        self.procs.stop_all()


class OursUnordered(System):
    """The same server and function handle, ``order_outputs=False`` (map only)."""

    def __init__(self, ours: Ours):
        super().__init__("ours unordered", map_note="f.map(order_outputs=False)", ordered=False, has_remote=False)
        self.ours = ours

    def map(self, n: int, first: bool = False) -> Iterator[Any]:
        return self.ours.fn.map(range(n), order_outputs=False)


# -- multiprocessing -------------------------------------------------------

class MP(System):
    def __init__(self):
        import multiprocessing

        method = multiprocessing.get_start_method()
        super().__init__("multiprocessing", map_note=f"Pool(2) {method}, imap chunksize=1",
                         remote_note=f"Pool(2) {method}, apply")

    def start(self) -> None:
        import multiprocessing

        self.pool = multiprocessing.Pool(2)
        self.pool.apply(triv, (1,))

    def map(self, n: int, first: bool = False) -> Iterator[Any]:
        return self.pool.imap(triv, range(n), chunksize=1)

    def remote(self, x: int) -> Any:
        return self.pool.apply(triv, (x,))

    def stop(self) -> None:
        pool = getattr(self, "pool", None)
        if pool is not None:
            pool.terminate()
            pool.join()


# -- ipyparallel -----------------------------------------------------------

class IPP(System):
    def __init__(self, tmp: Path):
        try:
            import ipyparallel  # noqa: F401
        except ImportError as exc:
            raise NotInstalled(str(exc)) from None
        super().__init__("ipyparallel", map_note="Cluster(n=2), LoadBalancedView.map ordered",
                         remote_note="Cluster(n=2), LoadBalancedView.apply_sync", slow=True)
        self.tmp = tmp

    def start(self) -> None:
        import ipyparallel as ipp

        profile_dir = self.tmp / "ipython" / "profile_bench"
        profile_dir.mkdir(parents=True, exist_ok=True)
        # Its own profile dir, so nothing lands in ~/.ipython; quiet logs.
        self.cluster = ipp.Cluster(n=2, profile_dir=str(profile_dir), log_level=40)
        self.rc = self.cluster.start_and_connect_sync()
        self.rc.wait_for_engines(2, timeout=60)
        self.view = self.rc.load_balanced_view()
        self.view.apply_sync(triv, 1)

    def map(self, n: int, first: bool = False) -> Iterator[Any]:
        return iter(self.view.map(triv, range(n), ordered=True, block=False))

    def remote(self, x: int) -> Any:
        return self.view.apply_sync(triv, x)

    def stop(self) -> None:
        cluster = getattr(self, "cluster", None)
        if cluster is None:
            return
        with contextlib.suppress(Exception):
            self.rc.close()
        with contextlib.suppress(Exception):
            cluster.stop_cluster_sync()


# -- dask ------------------------------------------------------------------

class Dask(System):
    def __init__(self):
        try:
            import distributed  # noqa: F401 - only checks that dask.distributed is installed
        except ImportError as exc:
            raise NotInstalled(str(exc)) from None
        super().__init__("dask", map_note="LocalCluster 2x1, map+gather; first: as_completed",
                         remote_note="LocalCluster 2x1, submit().result()", slow=True)

    def start(self) -> None:
        import logging

        from distributed import Client, LocalCluster

        self.cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                    dashboard_address=None, silence_logs=logging.ERROR)
        self.client = Client(self.cluster)
        self.client.submit(triv, 1, pure=False).result()

    def map(self, n: int, first: bool = False) -> Iterator[Any]:
        from distributed import as_completed

        # pure=False: fresh keys each time, so no result is served from a previous map.
        futures = self.client.map(triv, range(n), pure=False)
        if first:
            # Streamed as they complete (unordered), like a caller that wants results early.
            return (value for _, value in as_completed(futures, with_results=True))
        # Bulk: gather is dask's fastest way to get them all (in order).
        return iter(self.client.gather(futures))

    def remote(self, x: int) -> Any:
        return self.client.submit(triv, x, pure=False).result()

    def stop(self) -> None:
        for obj in (getattr(self, "client", None), getattr(self, "cluster", None)):
            if obj is not None:
                with contextlib.suppress(Exception):
                    obj.close()


# -- a plain Jupyter kernel --------------------------------------------------

class Kernel(System):
    def __init__(self, tmp: Path):
        super().__init__("jupyter kernel", remote_note="execute_request '1' -> execute_reply, tcp", has_map=False)
        self.tmp = tmp

    def start(self) -> None:
        from jupyter_client import KernelManager

        self.km = KernelManager(kernel_name="python3",
                                connection_file=str(self.tmp / "bench-kernel.json"))
        self.km.start_kernel(stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.kc = self.km.client()
        self.kc.start_channels()
        self.kc.wait_for_ready(timeout=60)

    def remote(self, x: int) -> Any:
        msg_id = self.kc.execute("1", silent=False)
        while True:
            reply = self.kc.get_shell_msg(timeout=30)
            if reply["parent_header"].get("msg_id") == msg_id:
                if reply["content"].get("status") != "ok":
                    raise RuntimeError(f"jupyter kernel: execute_reply {reply['content']}")
                return x

    def kernel_info(self) -> None:
        msg_id = self.kc.kernel_info()
        while self.kc.get_shell_msg(timeout=30)["parent_header"].get("msg_id") != msg_id:
            pass

    def drain(self) -> None:
        """Read the iopub messages (busy, execute_input, execute_result, idle) between calls."""
        while True:
            try:
                self.kc.get_iopub_msg(timeout=0)
            except Exception:  # queue.Empty
                return

    def stop(self) -> None:
        kc = getattr(self, "kc", None)
        if kc is not None:
            with contextlib.suppress(Exception):
                kc.stop_channels()
        km = getattr(self, "km", None)
        if km is not None:
            with contextlib.suppress(Exception):
                km.shutdown_kernel(now=True)


class KernelInfo(System):
    """The same kernel, ``kernel_info_request`` -> reply: the client + ZMQ + kernel
    dispatch floor without IPython's cell execution (remote only)."""

    def __init__(self, kernel: Kernel):
        super().__init__("kernel_info", remote_note="kernel_info_request -> reply, same kernel", has_map=False)
        self.kernel = kernel
        self.drain = kernel.drain

    def remote(self, x: int) -> Any:
        self.kernel.kernel_info()
        return x


# -- the floors: what one round trip between two processes costs at all ------

ECHO_PIPE = "import os\nwhile True:\n    d = os.read(0, 65536)\n    if not d:\n        break\n    os.write(1, d)\n"
ECHO_ZMQ = ("import sys, zmq\ns = zmq.Context().socket(zmq.REP)\ns.bind(sys.argv[1])\nprint('ready', flush=True)\n"
            "while True:\n    s.send(s.recv())\n")
FLOOR_BYTES = b"x" * 100


class PipeFloor(System):
    """100 bytes to a child process and back over two pipes: the operating system's floor
    for a round trip between two processes."""

    def __init__(self):
        super().__init__("pipe floor", remote_note="100 bytes to an echo process and back, os pipes", has_map=False)

    def start(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", ECHO_PIPE], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     bufsize=0)

    def remote(self, x: int) -> Any:
        os.write(self.proc.stdin.fileno(), FLOOR_BYTES)
        got = 0
        while got < len(FLOOR_BYTES):
            got += len(os.read(self.proc.stdout.fileno(), 65536))
        return x

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()


class ZmqFloor(System):
    """100 bytes to a child process and back through pyzmq REQ/REP over a unix socket:
    the floor of the direct channel's carrier."""

    def __init__(self, tmp: Path):
        super().__init__("pyzmq floor", remote_note="100 bytes to an echo process and back, zmq REQ/REP over ipc",
                         has_map=False)
        self.address = f"ipc://{tmp}/floor.sock"

    def start(self) -> None:
        import zmq

        self.proc = subprocess.Popen([sys.executable, "-c", ECHO_ZMQ, self.address], stdout=subprocess.PIPE, text=True)
        self.proc.stdout.readline()
        self.sock = zmq.Context.instance().socket(zmq.REQ)
        self.sock.connect(self.address)

    def remote(self, x: int) -> Any:
        self.sock.send(FLOOR_BYTES)
        self.sock.recv()
        return x

    def stop(self) -> None:
        self.sock.close(0)
        self.proc.kill()
        self.proc.wait()


# --------------------------------------------------------------------------
# Measurements
# --------------------------------------------------------------------------

def _consume(it: Iterator[Any], n: int, ordered: bool, who: str) -> None:
    """Read all n results and check them (in order, or as a set via their sum)."""
    count = total = 0
    if ordered:
        for count, value in enumerate(it, 1):
            if value != count - 1:
                raise RuntimeError(f"{who}: result #{count - 1} is {value!r}")
    else:
        for value in it:
            count += 1
            total += value
        if total != n * (n - 1) // 2:
            raise RuntimeError(f"{who}: unordered results sum to {total}, expected {n * (n - 1) // 2}")
    if count != n:
        raise RuntimeError(f"{who}: got {count} results, expected {n}")


def measure_map(system: System, n: int, repeats: int, budget_s: float) -> dict:
    """items/s of a whole map, best of `repeats` (no new run once `budget_s` is spent)."""
    runs = []
    started = time.monotonic()
    for _ in range(repeats):
        if runs and time.monotonic() - started > budget_s:
            break
        t0 = time.perf_counter()
        _consume(system.map(n), n, system.ordered, system.name)
        runs.append(time.perf_counter() - t0)
    best = min(runs)
    return {"items_per_s": n / best, "items": n, "best_s": best, "runs_s": runs}


def measure_first(system: System, n: int, rounds: int, pause: float = FIRST_PAUSE_S) -> dict:
    """Time from the map call to its first result, over fresh maps of n items (each fully read)."""
    samples = []
    for i in range(rounds):
        if i:
            time.sleep(pause)
        t0 = time.perf_counter()
        it = system.map(n, first=True)
        first = next(it)
        t_first = time.perf_counter()
        samples.append((t_first - t0) * 1e3)
        got = [first] + list(it)
        # Checked as a set: dask's streamed form (as_completed) is unordered.
        if sorted(got) != list(range(n)):
            raise RuntimeError(f"{system.name}: first-result map returned wrong results")
    return {"median_ms": statistics.median(samples), "min_ms": min(samples), "max_ms": max(samples),
            "items": n, "rounds": rounds, "samples_ms": samples}


def measure_remote(system: System, calls: int, warmup: int) -> dict:
    """Round trip of one warm call, sequential."""
    drain: Callable[[], None] | None = getattr(system, "drain", None)
    samples = []
    for i in range(warmup + calls):
        x = i % 1000
        t0 = time.perf_counter()
        value = system.remote(x)
        dt = time.perf_counter() - t0
        if value != x:
            raise RuntimeError(f"{system.name}: remote({x}) returned {value!r}")
        if drain is not None:
            drain()
        if i >= warmup:
            samples.append(dt * 1e3)
    return {"p50_ms": _percentile(samples, 50), "p90_ms": _percentile(samples, 90),
            "mean_ms": statistics.fmean(samples), "min_ms": min(samples), "calls": calls}


# --------------------------------------------------------------------------
# Slow items (ours only): does a map use every worker, also while they start?
# --------------------------------------------------------------------------

SLOW_WORKERS = 4
SLOW_CASES = (  # (name, items, seconds per item)
    ("cold pool", 60, 0.15),
    ("warm", 8, 1.0),
    ("warm", 60, 0.15),
)


class WorkerWatch:
    """Polls the server's worker list in a thread: when each worker became ready."""

    def __init__(self, base: str, token: str):
        import threading

        import httpx

        self.http = httpx.Client(base_url=base, headers={"Authorization": f"token {token}"}, timeout=10)
        self.ready: Dict[int, float] = {}  # pid -> time.perf_counter() when first seen alive
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self.poll, daemon=True)
        self.poll_once()
        self.thread.start()

    def poll_once(self) -> None:
        now = time.perf_counter()
        for worker in self.http.get("api/stream/workers").json()["workers"]:
            if worker.get("alive") and worker.get("pid"):
                self.ready.setdefault(worker["pid"], now)

    def poll(self) -> None:
        while not self.stopping.wait(0.02):
            with contextlib.suppress(Exception):
                self.poll_once()

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join(5)
        self.http.close()


def capacity_ideal(n: int, seconds: float, ready: List[float]) -> float:
    """When n items of `seconds` could be done at best by workers ready at these times
    (each from then on busy): the T where sum(T - ready_i, ready_i < T) = n x seconds."""
    work = n * seconds
    ready = sorted(ready)
    for k in range(len(ready), 0, -1):  # the k earliest workers take part
        t = (work + sum(ready[:k])) / k
        if t >= ready[k - 1]:
            return t
    return work


def measure_slow(procs: Processes, tmp: Path, startup_timeout: float = 90.0) -> Dict[str, dict]:
    options = ["--JupyterStream.min_workers=1", f"--JupyterStream.max_workers={SLOW_WORKERS}"]
    _, base, token, _ = start_jupyter_stream(procs, tmp, options, 1, startup_timeout)
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))
    from jupyter_stream.client.connection import ServerConnection
    from jupyter_stream.client.functions import register_function

    conn = ServerConnection(base, token)
    watch = WorkerWatch(base, token)
    results: Dict[str, dict] = {}
    try:
        fn = register_function(nap, connection=conn)
        for name, n, seconds in SLOW_CASES:
            before = set(watch.ready)
            t0 = time.perf_counter()
            pids = list(fn.map([seconds] * n, progress=False))
            elapsed = time.perf_counter() - t0
            watch.poll_once()
            # the workers the map had to wait for: those that came up while it ran
            started = [watch.ready[p] - t0 for p in watch.ready if p not in before]
            start_s = max(started, default=0.0)
            workers = len(watch.ready)
            ideal = n * seconds / workers + start_s
            ready = [0.0] * len(before) + started
            per_worker = sorted((pids.count(p) for p in set(pids)), reverse=True)
            key = f"{name}: {n} x {seconds:g} s"
            results[key] = {"items": n, "seconds": seconds, "workers": workers, "elapsed_s": elapsed,
                            "worker_start_s": start_s, "ideal_s": ideal, "ratio": elapsed / ideal,
                            "capacity_ideal_s": capacity_ideal(n, seconds, ready[:workers]),
                            "items_per_worker": per_worker}
            _log(f"slow items, {key}: {elapsed:.2f} s, ideal {ideal:.2f} s "
                 f"(workers started in {start_s:.2f} s), ratio {elapsed / ideal:.2f}, per worker {per_worker}")
    finally:
        watch.stop()
        with contextlib.suppress(Exception):
            conn.http.close()
        procs.stop_all()
    return results


# --------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------

def _better(ours: float | None, other: float | None, higher_is_better: bool) -> str:
    """How many times better ours is than the row (>1x: ours better)."""
    if not ours or not other:
        return "-"
    return f"{(ours / other) if higher_is_better else (other / ours):.2f}x"


def _pass(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def report(results: dict, skipped: Dict[str, str], labels: Dict[str, Dict[str, str]], args) -> None:
    order = ["ours", "ours unordered", "jupyter kernel", "kernel_info", "multiprocessing", "ipyparallel", "dask",
             "pyzmq floor", "pipe floor"]

    def label(name: str, measurement: str) -> str:
        note = labels.get(measurement, {}).get(name)
        return f"{name} ({note})" if note else name

    if "map" in results:
        r = results["map"]
        ours = r.get("ours", {})
        rows = []
        for name in order:
            if name in skipped:
                rows.append([f"{name}: {skipped[name]}", "", "", "", "", "", "", "", ""])
                continue
            if name not in r:
                continue
            m = r[name]
            tp, fr = m.get("throughput"), m.get("first")
            target = ""
            if name.startswith("ours"):
                parts = []
                if tp:
                    parts.append(f">= {TARGET_MAP_ITEMS_PER_S:,}/s: {_pass(tp['items_per_s'] >= TARGET_MAP_ITEMS_PER_S)}")
                if fr:
                    parts.append(f"first <= {TARGET_FIRST_RESULT_MS:g} ms: {_pass(fr['median_ms'] <= TARGET_FIRST_RESULT_MS)}")
                target = "; ".join(parts)
            ours_tp = ours.get("throughput", {}).get("items_per_s")
            ours_fr = ours.get("first", {}).get("median_ms")
            rows.append([
                label(name, "map"),
                f"{tp['items']:,}" if tp else "-",
                f"{tp['items_per_s']:,.0f}" if tp else "-",
                str(len(tp["runs_s"])) if tp else "-",
                "-" if name == "ours" or not tp else _better(ours_tp, tp["items_per_s"], True),
                f"{fr['items']:,}" if fr else "-",
                f"{fr['median_ms']:.2f}" if fr else "-",
                "-" if name == "ours" or not fr else _better(ours_fr, fr["median_ms"], False),
                target,
            ])
        print_table(
            f"map(identity) over 2 workers: items/s best of <= {args.repeats} runs (budget {args.budget:g} s); "
            f"first result = median over {args.first_rounds} fresh maps, {FIRST_PAUSE_S:g} s apart "
            f"(ours vs row: >1x = ours better)",
            rows, ["system", "N", "items/s", "runs", "ours vs row", "first N", "first ms", "ours vs row", "target"])

    if "remote" in results:
        r = results["remote"]
        ours_p50 = r.get("ours", {}).get("p50_ms")
        rows = []
        for name in order:
            if name == "ours unordered":
                continue
            if name in skipped:
                rows.append([f"{name}: {skipped[name]}", "", "", "", "", ""])
                continue
            if name not in r:
                continue
            m = r[name]
            target = ""
            if name == "ours":
                target = f"p50 <= {TARGET_REMOTE_P50_MS:g} ms: {_pass(m['p50_ms'] <= TARGET_REMOTE_P50_MS)}"
            rows.append([label(name, "remote"), f"{m['p50_ms']:.3f}", f"{m['p90_ms']:.3f}", f"{m['mean_ms']:.3f}",
                         "-" if name == "ours" else _better(ours_p50, m["p50_ms"], False), target])
        print_table(
            f"remote(1) round trip, warm: {args.calls} sequential calls after {args.warmup} warm-up "
            f"(lower is better; ours vs row = row p50 / ours p50, >1x = ours faster)",
            rows, ["system", "p50 ms", "p90 ms", "mean ms", "ours vs row", "target"])

    if "slow" in results:
        rows = []
        for key, m in results["slow"].items():
            rows.append([key, str(m["workers"]), f"{m['elapsed_s']:.2f}", f"{m['worker_start_s']:.2f}",
                         f"{m['ideal_s']:.2f}", f"{m['ratio']:.2f}", f"{m['capacity_ideal_s']:.2f}",
                         "/".join(map(str, m["items_per_worker"])),
                         f"<= {TARGET_SLOW_RATIO:g}: {_pass(m['ratio'] <= TARGET_SLOW_RATIO)}"])
        print_table(
            f"slow items (ours, min_workers=1, max_workers={SLOW_WORKERS}): time vs ideal = items x time / workers "
            "+ worker start (capacity: best possible with the measured ready times)",
            rows, ["map", "workers", "time s", "start s", "ideal s", "ratio", "capacity s", "items per worker",
                   "target"])


# --------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------

def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", action="append", default=[],
                   help="map, remote and/or slow; repeatable or comma-separated (default: all)")
    p.add_argument("--items", type=int, default=200_000,
                   help="items per throughput map for ours and multiprocessing (default 200000)")
    p.add_argument("--slow-items", type=int, default=2_000,
                   help="items per throughput map for ipyparallel and dask (default 2000)")
    p.add_argument("--repeats", type=int, default=3, help="throughput runs, best kept (default 3)")
    p.add_argument("--budget", type=float, default=20.0,
                   help="seconds per system and throughput figure after which no further repeat "
                        "is started (default 20; the first run always completes)")
    p.add_argument("--first-items", type=int, default=1_000,
                   help="items per first-result map (default 1000)")
    p.add_argument("--slow-first-items", type=int, default=200,
                   help="items per first-result map for ipyparallel and dask (default 200; "
                        "each map is read to the end, and they do a few hundred items/s)")
    p.add_argument("--first-rounds", type=int, default=10, help="first-result maps per system (default 10)")
    p.add_argument("--calls", type=int, default=300, help="remote calls measured (default 300)")
    p.add_argument("--warmup", type=int, default=30, help="remote warm-up calls (default 30)")
    p.add_argument("--no-unordered", action="store_true",
                   help="skip the extra order_outputs=False throughput row for ours")
    p.add_argument("--skip-refs", action="store_true", help="benchmark ours only")
    p.add_argument("--json", action="store_true", help="also print the results as JSON")
    args = p.parse_args(argv)
    args.only = parse_only(p, args.only, MEASUREMENTS)
    for name in ("items", "slow_items", "repeats", "first_items", "slow_first_items", "first_rounds", "calls"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    return args


def versions() -> Dict[str, str]:
    """Versions of what is measured (installed distributions only)."""
    from importlib import metadata

    out = {"python": platform.python_version()}
    for dist in ("jupyter-stream", "jupyter_server", "jupyter_client", "ipykernel", "pyzmq", "tornado",
                 "cloudpickle", "ipyparallel", "distributed"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return out


def _log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def run_system(system: System, args, results: dict, labels: Dict[str, Dict[str, str]]) -> None:
    """Start one system, take its figures, stop it (always)."""
    t = time.monotonic()
    try:
        system.start()
        _log(f"{system.name}: up in {time.monotonic() - t:.1f}s")
        extra: List[System] = []
        if isinstance(system, Ours) and not args.no_unordered and "map" in args.only:
            extra.append(OursUnordered(system))
        if isinstance(system, Kernel):
            extra.append(KernelInfo(system))
        for each in [system] + extra:
            labels.setdefault("map", {})[each.name] = each.map_note
            labels.setdefault("remote", {})[each.name] = each.remote_note
            run_measurements(each, args, results)
    finally:
        t_stop = time.monotonic()
        system.stop()
        _log(f"{system.name}: stopped in {time.monotonic() - t_stop:.1f}s (total {time.monotonic() - t:.1f}s)")


def run_measurements(system: System, args, results: dict) -> None:
    if "map" in args.only and system.has_map:
        n = args.slow_items if system.slow else args.items
        first_n = min(args.first_items, args.slow_first_items) if system.slow else args.first_items
        t = time.monotonic()
        entry = results.setdefault("map", {}).setdefault(system.name, {})
        entry["throughput"] = measure_map(system, n, args.repeats, args.budget)
        _log(f"{system.name}: map {entry['throughput']['items_per_s']:,.0f} items/s "
             f"({time.monotonic() - t:.1f}s)")
        t = time.monotonic()
        entry["first"] = measure_first(system, first_n, args.first_rounds)
        _log(f"{system.name}: first result {entry['first']['median_ms']:.2f} ms "
             f"({time.monotonic() - t:.1f}s)")
    if "remote" in args.only and system.has_remote:
        t = time.monotonic()
        res = results.setdefault("remote", {})[system.name] = measure_remote(system, args.calls, args.warmup)
        _log(f"{system.name}: remote p50 {res['p50_ms']:.3f} ms ({time.monotonic() - t:.1f}s)")


def main(argv=None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _raise_on_sigterm)
    _pickle_triv_by_value()
    tmp = Path(tempfile.mkdtemp(prefix="jupyter-stream-map-bench-"))
    # Connection files of the reference kernel / ipyparallel stay out of the user's dirs.
    os.environ["JUPYTER_RUNTIME_DIR"] = str(tmp / "runtime-local")
    procs = Processes()
    results: Dict[str, Dict[str, dict]] = {}
    skipped: Dict[str, str] = {}
    labels: Dict[str, Dict[str, str]] = {}
    ok = False
    started = time.monotonic()
    try:
        _log(f"{os.cpu_count()} CPUs, " + ", ".join(f"{k} {v}" for k, v in versions().items())
             + f"; logs in {tmp}")
        factories: List[tuple] = []
        if not args.skip_refs:
            # multiprocessing first: with the fork start method its pool is forked
            # before any other system has started threads in this process.
            factories.append(("multiprocessing", MP))
            if "remote" in args.only:
                factories.append(("jupyter kernel", lambda: Kernel(tmp)))
        if "remote" in args.only:  # the floors, with or without the references
            factories.append(("pipe floor", PipeFloor))
            factories.append(("pyzmq floor", lambda: ZmqFloor(tmp)))
        factories.append(("ours", lambda: Ours(procs, tmp)))
        if not args.skip_refs:
            factories.append(("dask", Dask))
            factories.append(("ipyparallel", lambda: IPP(tmp)))

        if not set(args.only) & {"map", "remote"}:
            factories = []

        for name, factory in factories:
            try:
                system = factory()
            except NotInstalled as exc:
                skipped[name] = "skipped (not installed)"
                _log(f"{name}: skipped (not installed: {exc})")
                continue
            run_system(system, args, results, labels)
        if "slow" in args.only:  # last: it starts threads here (multiprocessing forks first)
            t = time.monotonic()
            results["slow"] = measure_slow(procs, tmp)
            _log(f"slow items: {time.monotonic() - t:.1f}s")

        report(results, skipped, labels, args)
        print(f"\n(total {time.monotonic() - started:.0f} s)")
        if args.json:
            print(json.dumps({
                "results": results,
                "skipped": skipped,
                "notes": labels,
                "targets": {"map_items_per_s_min": TARGET_MAP_ITEMS_PER_S,
                            "first_result_ms_max": TARGET_FIRST_RESULT_MS,
                            "remote_p50_ms_max": TARGET_REMOTE_P50_MS, "slow_ratio_max": TARGET_SLOW_RATIO},
                "config": {k: getattr(args, k) for k in
                           ("only", "items", "slow_items", "repeats", "budget", "first_items",
                            "slow_first_items", "first_rounds", "calls", "warmup", "no_unordered", "skip_refs")},
                "versions": versions(),
                "machine": {"python": platform.python_version(), "cpus": os.cpu_count(),
                            "platform": platform.platform()},
            }, indent=2))
        ok = True
        return 0
    except KeyboardInterrupt:
        _log("interrupted")
        return 130
    except RuntimeError as exc:
        _log(f"error: {exc}")
        return 1
    finally:
        procs.stop_all()
        if ok:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            _log(f"logs kept in {tmp}")


if __name__ == "__main__":
    sys.exit(main())
