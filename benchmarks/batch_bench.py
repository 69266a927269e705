#!/usr/bin/env python
"""Dynamic batching benchmark: a numpy model served to 100 concurrent callers, batched
(`@jupyter_stream.batched`) and not, next to Ray Serve's ``@serve.batch``, in one run.

The model: ``--layers`` (4) dense layers of ``--dim`` (1024) float32 units with tanh,
weights loaded once per worker (a ``%%stream_class`` ``enter``; Ray: the deployment's
``__init__``). One input is a seed; the model turns it into a vector and returns the
output's sum. One input alone is a matrix-vector product per layer, memory-bound (each
call reads all the weights); a batch of 32 is one matrix-matrix product per layer, about
7x less work per input on this machine (1.34 ms vs 0.19 ms with one BLAS thread), so
batching pays here as it does for a model on a GPU.

Configurations, each on one worker (one replica) with one BLAS thread:

* ``ours .remote``: 100 asyncio tasks in this process, each calling
  ``model.single.remote.aio(seed)`` (or ``model.batched...``) 20 times in a row (a
  closed loop: 2,000 calls); ``single`` runs one call at a time on its worker,
  ``batched`` is ``@jupyter_stream.batched(max_batch_size=32, wait_ms=5)``.
* ``ours HTTP``: the same through the class's endpoints (``GET /stream/Model.http_single?seed=N``),
  100 aiohttp clients on keep-alive connections.
* ``ray serve HTTP``: a Ray Serve deployment (1 replica) through its HTTP proxy, the same
  100 clients: ``single`` computes in an ``async def __call__`` (one request at a time on
  the replica's loop; ``max_ongoing_requests=1`` instead makes Ray's router back off and
  retry, at a few dozen requests a second here), ``batched`` with
  ``@serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005)``. It runs in a child
  process with the Python that has ``ray[serve]`` (``--ray-python``, or this one if it
  imports ray); without one the Ray lines say why they are missing.

Printed: throughput (calls/s), latency p50 and p99 (ms) per call, the mean batch size
where known, and the ratios batched/single and ours/Ray. The clients, the servers and the
workers share this machine's cores, so the figures are ratios from one run, not capacity.
This is a script, not a test::

    python benchmarks/batch_bench.py
    python benchmarks/batch_bench.py --clients 50 --calls 10 --ray-python /tmp/rayvenv/bin/python
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

#: one BLAS thread everywhere (the worker kernels and Ray's replica inherit it), so that
#: the two servers run the same arithmetic on the same share of the machine
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def weights(dim: int, layers: int) -> list:
    import numpy as np

    rng = np.random.default_rng(0)
    return [rng.standard_normal((dim, dim), dtype=np.float32) / np.sqrt(dim) for _ in range(layers)]


def forward(ws: list, seeds: list[int]) -> list[float]:
    """The model on a batch of seeds (one row per seed): the sum of each output row."""
    import numpy as np

    x = np.stack([np.random.default_rng(seed).standard_normal(ws[0].shape[0], dtype=np.float32) for seed in seeds])
    for w in ws:
        x = np.tanh(x @ w)
    return [float(v) for v in x.sum(axis=1)]


# -- measuring ------------------------------------------------------------------------


def summary(latencies: list[float], wall: float) -> dict[str, float]:
    ordered = sorted(latencies)
    return {"calls": len(ordered), "throughput": len(ordered) / wall,
            "p50_ms": 1000 * ordered[len(ordered) // 2], "p99_ms": 1000 * ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]}


async def closed_loop(call: Any, clients: int, calls: int) -> tuple[dict[str, float], dict[int, float]]:
    """`clients` tasks, each making `calls` calls one after another; returns the summary
    and every result by seed (to check that batched and single agree)."""
    latencies: list[float] = []
    results: dict[int, float] = {}

    async def client(c: int) -> None:
        for i in range(calls):
            seed = c * calls + i
            started = time.perf_counter()
            results[seed] = await call(seed)
            latencies.append(time.perf_counter() - started)

    await asyncio.gather(*(client(c) for c in range(min(clients, 10))))  # warm up (not counted)
    latencies.clear()
    started = time.perf_counter()
    await asyncio.gather(*(client(c) for c in range(clients)))
    return summary(latencies, time.perf_counter() - started), results


async def http_loop(url: str, headers: dict[str, str], clients: int, calls: int) -> tuple[dict[str, float], dict[int, float]]:
    """`closed_loop` over HTTP: aiohttp on `clients` keep-alive connections (httpx's async
    client costs this machine's two cores so much that it, not the servers, sets the pace)."""
    import aiohttp

    connector = aiohttp.TCPConnector(limit=clients, force_close=False)
    async with aiohttp.ClientSession(connector=connector, headers=headers, timeout=aiohttp.ClientTimeout(total=300)) as session:
        async def call(seed: int) -> float:
            async with session.get(url, params={"seed": str(seed)}) as r:
                if r.status != 200:
                    raise RuntimeError(f"{url}: {r.status} {(await r.text())[:300]}")
                return (await r.json(content_type=None))["y"]

        return await closed_loop(call, clients, calls)


# -- ours -----------------------------------------------------------------------------


def make_model(dim: int, layers: int, batch: int, wait_ms: float) -> type:
    import jupyter_stream

    class Model:
        @jupyter_stream.enter
        def load(self):
            self.ws = weights(dim, layers)

        @jupyter_stream.method
        def single(self, seed: int) -> float:
            return forward(self.ws, [seed])[0]

        @jupyter_stream.batched(max_batch_size=batch, wait_ms=wait_ms)
        def batched(self, seed: list[int]) -> list[float]:
            return forward(self.ws, seed)

        @jupyter_stream.endpoint(media_type="application/json")
        def http_single(self, seed: int):
            return {"y": forward(self.ws, [seed])[0]}

        @jupyter_stream.endpoint(media_type="application/json")
        @jupyter_stream.batched(max_batch_size=batch, wait_ms=wait_ms)
        def http_batched(self, seed: list[int]):
            return [{"y": y} for y in forward(self.ws, seed)]

    return Model


def run_ours(args: argparse.Namespace) -> dict[str, Any]:
    from jupyter_stream.client.classes import register_class
    from jupyter_stream.pytest_plugin import StreamServer

    server = StreamServer(["--JupyterStream.min_workers=0", "--JupyterStream.max_workers=2",
                           "--JupyterStream.worker_poll_interval=0.5"]).start()
    try:
        served = register_class(make_model(args.dim, args.layers, args.batch, args.wait_ms), connection=server.connection,
                                min_workers=1, max_workers=1, concurrency=1)
        model = served()
        model.single.remote(0)  # the worker is up and the weights loaded
        out: dict[str, Any] = {}

        async def main() -> None:
            for name, fn in (("single", model.single), ("batched", model.batched)):
                out[f"ours .remote, {name}"], out[f"_results .remote {name}"] = await closed_loop(
                    fn.remote.aio, args.clients, args.calls)
            for name in ("single", "batched"):
                out[f"ours HTTP, {name}"], out[f"_results HTTP {name}"] = await http_loop(
                    f"{server.url}stream/Model.http_{name}", server.headers, args.clients, args.calls)

        asyncio.run(main())
        for name, path in (("ours .remote, batched", "functions/Model.batched"), ("ours HTTP, batched", "endpoints/Model.http_batched")):
            batching = server.get(f"api/stream/{path}").json().get("batching") or {}
            out[name]["mean_batch"] = batching.get("mean_batch_size")
        return out
    finally:
        server.stop()


# -- Ray Serve (in a child process with the Python that has it) ----------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ray_child(args: argparse.Namespace) -> None:
    """Runs under the Python that has ray[serve]: serves the model both ways, measures
    with the same clients, prints one JSON line."""
    import ray
    from ray import serve

    dim, layers, batch, wait_ms = args.dim, args.layers, args.batch, args.wait_ms
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port}, logging_config={"log_level": "ERROR"})

    @serve.deployment(num_replicas=1, max_ongoing_requests=max(args.clients, batch))
    class Single:
        def __init__(self):
            self.ws = weights(dim, layers)

        async def __call__(self, request):  # computes on the replica's loop: one at a time, as ours
            return {"y": forward(self.ws, [int(request.query_params["seed"])])[0]}

    @serve.deployment(num_replicas=1, max_ongoing_requests=max(args.clients, batch))
    class Batched:
        def __init__(self):
            self.ws = weights(dim, layers)

        @serve.batch(max_batch_size=batch, batch_wait_timeout_s=wait_ms / 1000)
        async def infer(self, seeds: list[int]) -> list[dict]:
            return [{"y": y} for y in forward(self.ws, seeds)]

        async def __call__(self, request):
            return await self.infer(int(request.query_params["seed"]))

    serve.run(Single.bind(), name="single", route_prefix="/single")
    serve.run(Batched.bind(), name="batched", route_prefix="/batched")
    out: dict[str, Any] = {}

    async def main() -> None:
        for name in ("single", "batched"):
            out[f"ray serve HTTP, {name}"], out[f"_results ray {name}"] = await http_loop(
                f"http://127.0.0.1:{port}/{name}", {}, args.clients, args.calls)

    try:
        asyncio.run(main())
    finally:
        serve.shutdown()
        ray.shutdown()
    print("RAY-RESULTS " + json.dumps(out))


def ray_python(args: argparse.Namespace) -> tuple[str | None, str]:
    """The Python to run the Ray half with, or None and why not."""
    candidates = [args.ray_python] if args.ray_python else [sys.executable, os.environ.get("RAY_PYTHON")]
    for python in filter(None, candidates):
        probe = subprocess.run([python, "-c", "import ray, ray.serve, numpy, aiohttp; print(ray.__version__)"],
                               capture_output=True, text=True)
        if probe.returncode == 0:
            return python, probe.stdout.strip()
    return None, ("no Python here imports ray[serve] (pip install 'ray[serve]' numpy into a venv and pass "
                  "--ray-python, or set RAY_PYTHON)")


def run_ray(args: argparse.Namespace) -> tuple[dict[str, Any], str]:
    python, version = ray_python(args)
    if python is None:
        return {}, version
    command = [python, __file__, "--ray-child", "--dim", str(args.dim), "--layers", str(args.layers), "--batch",
               str(args.batch), "--wait-ms", str(args.wait_ms), "--clients", str(args.clients), "--calls", str(args.calls)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=1800)
    for line in done.stdout.splitlines():
        if line.startswith("RAY-RESULTS "):
            results = json.loads(line.split(" ", 1)[1])
            for key, value in list(results.items()):  # JSON keys are strings
                if key.startswith("_results"):
                    results[key] = {int(k): v for k, v in value.items()}
            return results, f"ray {version} ({python})"
    tail = (done.stderr or done.stdout).strip().splitlines()[-5:]
    return {}, f"ray {version} did not run here (exit {done.returncode}): " + " | ".join(tail)


# -- report ---------------------------------------------------------------------------


def report(results: dict[str, Any], ray_note: str, args: argparse.Namespace) -> None:
    print(f"\n{args.clients} concurrent callers x {args.calls} calls; model {args.layers} x {args.dim} float32, "
          f"batches of up to {args.batch}, wait {args.wait_ms:g} ms; {os.cpu_count()} cores shared by all\n")
    print(f"{'configuration':<28}{'calls/s':>10}{'p50 ms':>10}{'p99 ms':>10}{'mean batch':>12}")
    for name, row in results.items():
        if name.startswith("_"):
            continue
        batch = row.get("mean_batch")
        print(f"{name:<28}{row['throughput']:>10.0f}{row['p50_ms']:>10.1f}{row['p99_ms']:>10.1f}"
              f"{'' if batch is None else f'{batch:.1f}':>12}")
    print(f"\nRay Serve: {ray_note}")
    print("\nratios (throughput, higher is better; p50 latency, lower is better):")
    for prefix in ("ours .remote", "ours HTTP", "ray serve HTTP"):
        single, batched = results.get(f"{prefix}, single"), results.get(f"{prefix}, batched")
        if single and batched:
            print(f"  {prefix}: batched / single  throughput x{batched['throughput'] / single['throughput']:.1f}, "
                  f"p50 x{batched['p50_ms'] / single['p50_ms']:.2f}")
    for kind in ("single", "batched"):
        ours, ray = results.get(f"ours HTTP, {kind}"), results.get(f"ray serve HTTP, {kind}")
        if ours and ray:
            print(f"  HTTP {kind}: ours / Ray Serve  throughput x{ours['throughput'] / ray['throughput']:.2f}, "
                  f"p50 x{ours['p50_ms'] / ray['p50_ms']:.2f}")
    reference = results.get("_results .remote single") or {}
    worst = 0.0
    for key, values in results.items():
        if key.startswith("_results"):
            for seed, value in values.items():
                if seed in reference:
                    worst = max(worst, abs(value - reference[seed]) / max(1.0, abs(reference[seed])))
    print(f"\nresults agree across configurations (batched GEMM vs single GEMV): largest relative difference {worst:.1e}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--calls", type=int, default=20, help="calls per client, one after another")
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=32, help="max_batch_size")
    parser.add_argument("--wait-ms", type=float, default=5.0)
    parser.add_argument("--ray-python", default=None, help="a Python with ray[serve] and numpy (default: this one, or $RAY_PYTHON)")
    parser.add_argument("--no-ray", action="store_true")
    parser.add_argument("--ray-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--json", action="store_true", help="also print the results as JSON")
    args = parser.parse_args(argv)
    if args.ray_child:
        ray_child(args)
        return 0
    try:
        import numpy  # noqa: F401
    except ImportError:
        print("this benchmark needs numpy (pip install numpy), here and in the worker kernels' environment", file=sys.stderr)
        return 2
    results = run_ours(args)
    ray_results, ray_note = ({}, "skipped (--no-ray)") if args.no_ray else run_ray(args)
    results.update(ray_results)
    report(results, ray_note, args)
    if args.json:
        print(json.dumps({k: v for k, v in results.items() if not k.startswith("_")}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
