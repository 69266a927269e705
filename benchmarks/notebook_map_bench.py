#!/usr/bin/env python
"""``.map`` and ``.remote()`` from a script and from a notebook kernel, side by side.

One server (``min_workers = max_workers = 2``), one trivial function (identity); the
same measuring code runs in two clients of that server, alternately, round after round:

* ``script``   - this process: ``jupyter_stream.connect()`` and ``jupyter_stream.function``;
* ``notebook`` - a kernel the server started (as JupyterLab starts one), driven over
  ZMQ (`jupyter_stream.pytest_plugin.NotebookKernel`); the function registered with
  ``%%stream_function``, the calls made in cells, so the client runs under ipykernel
  (its threads, its IOPub, the progress widget).

Figures, each the best (items/s) or the median of the rounds' p50s (``.remote()``):

1. ``map``    - items/s of ``for x in triv.map(range(N))`` (each checked), default progress display
   (a widget in the notebook; the summary line on a script's stderr), and in the
   notebook once more with ``progress=False``, to tell the widget's cost apart;
2. ``remote`` - ``triv.remote(i)`` p50 / p90 over ``--calls`` sequential calls after
   ``--warmup`` warm-up calls; and a fresh map's first result (``--first-items`` items,
   the median of ``--first-maps`` maps);
3. CPU - for each map, the CPU time each process spent during it (the client, the
   server, the two workers) per item and as a share of a core: on a small machine it
   says which process is the bottleneck, and it drifts less than items/s.

Printed: the table, notebook / script ratios, and the issue's targets (items/s >= 500k
from both; ``.remote()`` p50 <= 0.5 ms from a script, <= 0.8 ms from a notebook; first
result <= 5 ms).

This is a script, not a test::

    python benchmarks/notebook_map_bench.py
    python benchmarks/notebook_map_bench.py --items 500000 --rounds 5 --json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from endpoint_bench import print_table  # noqa: E402  (same folder; shared plumbing)

TARGET_MAP_ITEMS_PER_S = 500_000
TARGET_REMOTE_P50_MS = {"script": 0.5, "notebook": 0.8}
TARGET_FIRST_MS = 5.0

#: The measuring code, run as it is in this process and in the notebook kernel.
MEASURE = textwrap.dedent(
    """
    import json as _json
    import time as _time

    def _cpu(pids):
        import psutil

        out = {}
        for name, pid in pids.items():
            try:
                t = psutil.Process(pid).cpu_times()
                out[name] = t.user + t.system
            except Exception:
                pass
        return out

    def _bench_map(fn, items, progress, pids):
        before, t0 = _cpu(pids), _time.perf_counter()
        count = 0
        for count, value in enumerate(fn.map(range(items), progress=progress), 1):
            if value != count - 1:
                raise RuntimeError(f"result #{count - 1} is {value!r}")
        wall = _time.perf_counter() - t0
        after = _cpu(pids)
        if count != items:
            raise RuntimeError(f"{count} results of {items}")
        cpu = {k: (after[k] - before[k]) / wall for k in after if k in before}
        return {"items": items, "seconds": wall, "items_per_s": items / wall, "cpu": cpu}

    def _bench_first(fn, items, maps):
        firsts = []
        for _ in range(maps):
            _time.sleep(0.1)
            t0 = _time.perf_counter()
            it = iter(fn.map(range(items), progress=False))
            next(it)
            firsts.append(_time.perf_counter() - t0)
            for _ in it:
                pass
        firsts.sort()
        return {"first_ms": firsts[len(firsts) // 2] * 1e3}

    def _bench_remote(fn, calls, warmup):
        for i in range(warmup):
            fn.remote(i)
        times = []
        for i in range(calls):
            t0 = _time.perf_counter()
            if fn.remote(i) != i:
                raise RuntimeError("wrong result")
            times.append(_time.perf_counter() - t0)
        times.sort()
        return {"p50_ms": times[len(times) // 2] * 1e3, "p90_ms": times[int(len(times) * 0.9)] * 1e3,
                "mean_ms": sum(times) / len(times) * 1e3}
    """
)

MARK = "@@bench@@"


def triv(x):
    return x


if __name__ != "__main__":  # imported: workers cannot import this module, so send triv's code
    import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])


class ScriptClient:
    name = "script"

    def __init__(self, server: Any):
        import jupyter_stream

        self.conn = jupyter_stream.connect(server.url, server.token)
        self.ns: dict[str, Any] = {}
        exec(MEASURE, self.ns)
        self.fn = jupyter_stream.function(triv, name="triv_script")
        self.pid = os.getpid()

    def map(self, items: int, progress: bool, pids: dict) -> dict:
        return self.ns["_bench_map"](self.fn, items, progress, pids)

    def remote(self, calls: int, warmup: int) -> dict:
        return self.ns["_bench_remote"](self.fn, calls, warmup)

    def first(self, items: int, maps: int) -> dict:
        return self.ns["_bench_first"](self.fn, items, maps)

    def close(self) -> None:
        client = getattr(self.conn, "_calls_socket", None)
        if client is not None and hasattr(client, "close"):
            client.close()
        elif client is not None and client.ws is not None:  # the calls socket before it had close()
            client.loop.call_soon_threadsafe(client.ws.close)
        self.conn.http.close()


class NotebookClient:
    name = "notebook"

    def __init__(self, server: Any):
        self.kernel = server.start_kernel()
        self.run("%load_ext jupyter_stream")
        self.run("%%stream_function --name triv_notebook\ndef triv(x):\n    return x\n")
        self.run(MEASURE)
        self.pid = int(self.value("import os; print('" + MARK + "' + str(os.getpid()))"))

    def run(self, code: str, timeout: float = 600) -> list:
        outputs, reply = self.kernel.execute(code, timeout=timeout)
        if reply["status"] != "ok":
            raise RuntimeError(f"notebook kernel: {self.kernel.text(outputs)}")
        return outputs

    def value(self, code: str) -> str:
        text = self.kernel.text([o for o in self.run(code) if o["type"] == "stream"])
        return text.split(MARK, 1)[1].split("\n", 1)[0]

    def map(self, items: int, progress: bool, pids: dict) -> dict:
        return json.loads(self.value(f"print('{MARK}' + _json.dumps(_bench_map(triv, {items}, {progress}, {pids!r})))"))

    def remote(self, calls: int, warmup: int) -> dict:
        return json.loads(self.value(f"print('{MARK}' + _json.dumps(_bench_remote(triv, {calls}, {warmup})))"))

    def first(self, items: int, maps: int) -> dict:
        return json.loads(self.value(f"print('{MARK}' + _json.dumps(_bench_first(triv, {items}, {maps})))"))

    def close(self) -> None:
        self.kernel.shutdown()


def _log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--items", type=int, default=300_000, help="items per map (default 300000)")
    p.add_argument("--rounds", type=int, default=3, help="rounds, alternating the clients (default 3)")
    p.add_argument("--calls", type=int, default=500, help=".remote() calls measured per round (default 500)")
    p.add_argument("--warmup", type=int, default=50, help=".remote() warm-up calls per round (default 50)")
    p.add_argument("--first-items", type=int, default=1000, help="items per first-result map (default 1000)")
    p.add_argument("--first-maps", type=int, default=10, help="first-result maps per round, median kept (default 10)")
    p.add_argument("--server-option", action="append", default=[],
                   help="extra --JupyterStream.x=y option for the server (repeatable)")
    p.add_argument("--json", action="store_true", help="also print the results as JSON")
    args = p.parse_args(argv)
    for name in ("items", "rounds", "calls", "first_items", "first_maps"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be at least 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    from jupyter_stream.pytest_plugin import StreamServer

    t_start = time.monotonic()
    server = StreamServer(["--JupyterStream.min_workers=2", "--JupyterStream.max_workers=2", *args.server_option])
    server.start()
    clients: list[Any] = []
    try:
        workers = server.wait_for_workers(2)
        transports = sorted({str(w.get("transport")) for w in workers})
        _log(f"{os.cpu_count()} CPUs, python {platform.python_version()}; workers {[w['pid'] for w in workers]} "
             f"over {', '.join(transports)}")
        clients = [ScriptClient(server), NotebookClient(server)]
        base_pids = {"server": server.process.pid, **{f"worker{i + 1}": w["pid"] for i, w in enumerate(workers)}}
        # (client, progress shown?) -> list of runs; remote: client -> list of runs
        maps: dict[tuple[str, bool], list[dict]] = {}
        remotes: dict[str, list[dict]] = {}
        for rnd in range(args.rounds):
            order = clients if rnd % 2 == 0 else clients[::-1]  # alternate who goes first
            for client in order:
                pids = {"client": client.pid, **base_pids}
                variants = (True, False) if client.name == "notebook" else (True,)
                for progress in variants:
                    r = client.map(args.items, progress, pids)
                    maps.setdefault((client.name, progress), []).append(r)
                    cpu = ", ".join(f"{k} {v * 100:.0f}%" for k, v in r["cpu"].items())
                    _log(f"round {rnd + 1}: {client.name} map{'' if progress else ' progress=False'} "
                         f"{r['items_per_s']:,.0f} items/s (cpu: {cpu})")
                r = client.remote(args.calls, args.warmup)
                r.update(client.first(args.first_items, args.first_maps))
                remotes.setdefault(client.name, []).append(r)
                _log(f"round {rnd + 1}: {client.name} remote p50 {r['p50_ms']:.3f} ms p90 {r['p90_ms']:.3f} ms; "
                     f"map's first result {r['first_ms']:.2f} ms")

        report(args, maps, remotes, transports)
        print(f"\n(total {time.monotonic() - t_start:.0f} s)")
        if args.json:
            print(json.dumps({"maps": {f"{k[0]}{'' if k[1] else ' progress=False'}": v for k, v in maps.items()},
                              "remote": remotes, "transports": transports,
                              "config": {k: getattr(args, k) for k in ("items", "rounds", "calls", "warmup", "first_items",
                                                                     "first_maps", "server_option")},
                              "machine": {"python": platform.python_version(), "cpus": os.cpu_count(),
                                          "platform": platform.platform()}}, indent=2))
        return 0
    finally:
        for client in clients:
            try:
                client.close()
            except Exception as e:  # noqa: BLE001 - teardown goes on
                _log(f"closing {client.name}: {e}")
        server.stop()


def report(args, maps: dict, remotes: dict, transports: list[str]) -> None:
    def best(runs: list[dict]) -> dict:
        return max(runs, key=lambda r: r["items_per_s"])

    script_rate = best(maps[("script", True)])["items_per_s"]
    rows = []
    for (name, progress), runs in maps.items():
        b = best(runs)
        per_item = {k: v * b["seconds"] / b["items"] * 1e6 for k, v in b["cpu"].items()}  # CPU µs per item
        workers = sum(v for k, v in per_item.items() if k.startswith("worker"))
        cpu = (f"{per_item.get('client', 0):.2f} / {per_item.get('server', 0):.2f} / {workers:.2f}  "
               f"({' '.join(f'{v * 100:.0f}%' for v in b['cpu'].values())})")
        label = f"{name}, progress {'on' if progress else 'off'}"
        ok = b["items_per_s"] >= TARGET_MAP_ITEMS_PER_S
        rows.append([label, f"{b['items_per_s']:,.0f}", " / ".join(f"{r['items_per_s'] / 1e3:,.0f}k" for r in runs),
                     f"{b['items_per_s'] / script_rate:.2f}", cpu,
                     f">= {TARGET_MAP_ITEMS_PER_S // 1000}k: {'PASS' if ok else 'FAIL'}"])
    print_table(f"map(identity, range({args.items:,})) over 2 workers ({', '.join(transports)}), best of "
                f"{args.rounds} alternating rounds; CPU µs per item of the client / the server / both workers during the "
                "best map (and each process's share of a core: client, server, worker 1, worker 2)",
                rows, ["client", "items/s", "rounds", "/ script", "CPU µs/item", "target"])

    rows = []
    p50 = {name: statistics.median(r["p50_ms"] for r in runs) for name, runs in remotes.items()}
    first = {name: statistics.median(r["first_ms"] for r in runs) for name, runs in remotes.items()}
    for name, runs in remotes.items():
        target = TARGET_REMOTE_P50_MS[name]
        rows.append([name, f"{p50[name]:.3f}", " / ".join(f"{r['p50_ms']:.3f}" for r in runs),
                     f"{statistics.median(r['p90_ms'] for r in runs):.3f}", f"{p50[name] / p50['script']:.2f}",
                     f"p50 <= {target} ms: {'PASS' if p50[name] <= target else 'FAIL'}",
                     f"{first[name]:.2f}", f"<= {TARGET_FIRST_MS:g} ms: {'PASS' if first[name] <= TARGET_FIRST_MS else 'FAIL'}"])
    print_table(f"remote(i) round trip, {args.calls} sequential calls after {args.warmup} warm-up, median of the "
                f"rounds' p50 and p90; first = a fresh map of {args.first_items:,} items to its first result, median "
                f"of {args.first_maps} a round, median of the rounds",
                rows, ["client", "p50 ms", "rounds' p50", "p90 ms", "/ script", "target", "first ms", "target"])


if __name__ == "__main__":
    sys.exit(main())
