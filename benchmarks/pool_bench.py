#!/usr/bin/env python
"""Cold start of a new worker pool next to a warm call, and the floor they sit on.

One server (jupyter_stream, ``min_workers=1``, a simulated inventory of two H100s so the
GPU placement path runs as on real hardware) and, in the same run:

* ``warm call``         - ``.remote()`` round trip of a function whose pool has an idle
  worker: p50 over ``--calls`` calls;
* ``new pool, cold``    - a function registered with requirements no pool has yet
  (``--gpu H100`` and its own ``--env``), timed from ``.remote()`` to its result: the
  pool is made, a seat and GPU are chosen, a kernel starts and loads the worker code;
  median over ``--rounds`` fresh functions (each a new pool, scaled down after);
* ``plain kernel start`` - the reference floor: jupyter_client's ``start_new_kernel``
  until ``kernel_info`` answers, then an ``execute`` of ``1`` (what any design that runs
  code in a fresh Jupyter kernel pays).

This is a script, not a test::

    python benchmarks/pool_bench.py
    python benchmarks/pool_bench.py --rounds 5 --calls 300
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from endpoint_bench import REPO_ROOT, Processes, _percentile, print_table, start_jupyter_stream  # noqa: E402

sys.path.insert(0, str(REPO_ROOT))


def where():
    import os

    return os.environ.get("CUDA_VISIBLE_DEVICES")


def plain_kernel_start(tmp: str) -> float:
    """A kernel over unix sockets, as our local workers are, to its first execute_reply."""
    from jupyter_client.manager import KernelManager

    started = time.perf_counter()
    km = KernelManager(kernel_name="python3", transport="ipc", ip=f"{tmp}/plain-kernel")
    km.start_kernel()
    kc = km.client()
    kc.start_channels()
    try:
        kc.wait_for_ready(timeout=60)
        msg_id = kc.execute("1", silent=True)
        while kc.get_shell_msg(timeout=60)["parent_header"].get("msg_id") != msg_id:
            pass
        return time.perf_counter() - started
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3, help="fresh pools to start (median)")
    parser.add_argument("--calls", type=int, default=200, help="warm calls (p50)")
    args = parser.parse_args()

    from jupyter_stream.client.connection import ServerConnection
    from jupyter_stream.client.functions import register_function

    procs = Processes()
    with tempfile.TemporaryDirectory() as tmp:
        options = ["--JupyterStream.min_workers=1", "--JupyterStream.max_workers=3",
                   "--JupyterStream.simulated_gpus=NVIDIA H100 80GB HBM3", "--JupyterStream.simulated_gpus=NVIDIA H100 80GB HBM3"]
        _, base, token, _ = start_jupyter_stream(procs, Path(tmp), options, workers=1)
        conn = ServerConnection(base, token)
        warm_fn = register_function(where, "warm", connection=conn)
        warm_fn.remote()
        warm = []
        for _ in range(args.calls):
            t = time.perf_counter()
            warm_fn.remote()
            warm.append(time.perf_counter() - t)

        cold = []
        for i in range(args.rounds):
            fn = register_function(where, f"cold{i}", connection=conn, gpu="H100", env={"ROUND": str(i)},
                                   scaledown_window=0.5, max_workers=1)
            t = time.perf_counter()
            assert fn.remote() in ("0", "1")
            cold.append(time.perf_counter() - t)
            fn.delete()
            time.sleep(1.5)  # its worker is scaled down: the next round gets a GPU back
        procs.stop_all()
        floor = [plain_kernel_start(tmp) for _ in range(args.rounds)]
    warm_p50 = _percentile(warm, 50)
    rows = [
        ["warm call (.remote p50)", f"{warm_p50 * 1e3:.2f} ms", "1.0x"],
        ["new pool, cold (call to result, median)", f"{statistics.median(cold) * 1e3:.0f} ms",
         f"{statistics.median(cold) / warm_p50:.0f}x"],
        ["plain kernel start + execute (reference)", f"{statistics.median(floor) * 1e3:.0f} ms",
         f"{statistics.median(floor) / warm_p50:.0f}x"],
    ]
    print_table("Worker pools: a call on a warm pool vs the first call of a new pool", rows, ["measurement", "time", "vs warm"])
    print(f"\nnew pool / plain kernel start: {statistics.median(cold) / statistics.median(floor):.2f}x")


if __name__ == "__main__":
    main()
