#!/usr/bin/env python
"""What the live progress display costs a fast `.map`, measured where it is shown: in a
kernel started by the server (a notebook's kernel), progress on vs off in one run.

    python benchmarks/progress_cost.py [--items 200000] [--repeats 3]

Prints the best items/s of each and the cost in percent (target: at most 5 %), and the
time the widget updates themselves took (a figure that does not drift with the load).
"""

from __future__ import annotations

import argparse
import textwrap

from jupyter_stream.pytest_plugin import StreamServer

CODE = textwrap.dedent(
    """
    import time

    from jupyter_stream.client import progress as progress_module

    # the display's own time, summed: a figure that does not drift with the machine's load
    spent = {{"seconds": 0.0, "renders": 0}}
    update = progress_module.WidgetDisplay.update

    def timed_update(self, progress):
        start = time.perf_counter()
        update(self, progress)
        spent["seconds"] += time.perf_counter() - start
        spent["renders"] += 1

    progress_module.WidgetDisplay.update = timed_update

    def rate(progress, items={items}):
        start, n = time.perf_counter(), 0
        for _ in triv.map(range(items), progress=progress):
            n += 1
        return n / (time.perf_counter() - start)

    # alternate off and on, so drift on a shared machine hits both alike; keep the best
    off, on, on_seconds = 0.0, 0.0, 0.0
    for _ in range({repeats}):
        off = max(off, rate(False))
        start = time.perf_counter()
        on = max(on, rate(True))
        on_seconds += time.perf_counter() - start
    print(f"progress off: {{off:,.0f}} items/s")
    print(f"progress on:  {{on:,.0f}} items/s")
    print(f"cost: {{(1 - on / off) * 100:.1f}} % (target <= 5 %)")
    print(f"widget updates: {{spent['renders']}} taking {{spent['seconds'] * 1000:.0f}} ms, "
          f"{{spent['seconds'] / on_seconds * 100:.2f}} % of the maps' time")
    """
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=200_000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    server = StreamServer(["--JupyterStream.min_workers=2", "--JupyterStream.max_workers=2"]).start()
    kernel = server.start_kernel()
    try:
        kernel.execute("%load_ext jupyter_stream")
        kernel.execute("%%stream_function\ndef triv(x):\n    return x\n")
        outputs, reply = kernel.execute(CODE.format(items=args.items, repeats=args.repeats), timeout=1800)
        print(kernel.text([o for o in outputs if o["type"] in ("stream", "error")]))
    finally:
        kernel.shutdown()
        server.stop()


if __name__ == "__main__":
    main()
