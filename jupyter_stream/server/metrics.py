"""Prometheus metrics, on jupyter-server's own ``/metrics`` (``prometheus_client``'s default
registry, which jupyter-server serves behind its auth).

Counters and histograms are updated where things happen (the handlers, the scheduler,
the pools); what is a state rather than an event (open streams, queue lengths, workers by
state, GPU memory) is read when Prometheus scrapes, by `StateCollector`. Labels take
bounded values only: registered endpoint and function names (a request for an unknown
one is counted under ``endpoint=""``), pool names, GPU indices; never a token or a
client's address.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from typing import Any

from prometheus_client import REGISTRY, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric

#: seconds: from a few milliseconds (a warm trivial endpoint) to a long generation
BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)

REQUESTS = Counter("jupyter_stream_requests", "HTTP requests to endpoints, by endpoint and final status",
                   ["endpoint", "status"])
STREAM_ERRORS = Counter("jupyter_stream_stream_errors", "Endpoint calls that failed after their response began "
                        "(an SSE error event, or a body cut short)", ["endpoint"])
SENT_BYTES = Counter("jupyter_stream_sent_bytes", "Bytes of endpoint output written to clients", ["endpoint"])
SENT_CHUNKS = Counter("jupyter_stream_sent_chunks", "Batches of endpoint output written to clients (one write each)",
                      ["endpoint"])
REQUEST_SECONDS = Histogram("jupyter_stream_request_duration_seconds", "Endpoint requests, from arrival to the last byte",
                            ["endpoint"], buckets=BUCKETS)
FIRST_BYTE_SECONDS = Histogram("jupyter_stream_time_to_first_byte_seconds",
                               "Endpoint requests, from arrival to the first byte of the response's body", ["endpoint"],
                               buckets=BUCKETS)
QUEUE_TIMEOUTS = Counter("jupyter_stream_queue_timeouts", "Requests answered 503 after waiting their queue timeout "
                         "for a worker", ["endpoint"])
SHARE_REQUESTS = Counter("jupyter_stream_share_requests", "Requests opened by a share link", ["endpoint"])
CALLS = Counter("jupyter_stream_calls", "Remote calls and maps of functions that ended, by outcome (done, failed)",
                ["function", "outcome"])
MAP_ITEMS = Counter("jupyter_stream_map_items", "Map items, by outcome (done, failed, retried)", ["function", "outcome"])
QUEUE_WAIT_SECONDS = Histogram("jupyter_stream_queue_wait_seconds", "Time a call waited for a worker of its pool",
                               ["pool"], buckets=BUCKETS)


class StateCollector:
    """What is read at scrape time from the running extension (held weakly: a server
    that stopped reports nothing)."""

    def __init__(self) -> None:
        self.app: Any = None

    def attach(self, app: Any) -> None:
        self.app = weakref.ref(app)

    def collect(self) -> Iterator[Metric]:
        app = self.app() if self.app is not None else None
        if app is None or not hasattr(app, "placement"):
            return
        streams = GaugeMetricFamily("jupyter_stream_open_streams", "Endpoint responses being streamed now", labels=["endpoint"])
        for spec in app.endpoints.values():
            streams.add_metric([spec.name], spec.stats.get("open_streams", 0))
        yield streams
        queued = GaugeMetricFamily("jupyter_stream_queue_length", "Calls waiting for a worker, by pool", labels=["pool"])
        workers = GaugeMetricFamily("jupyter_stream_workers", "Worker kernels by pool and state (starting, idle, busy, "
                                    "draining, unresponsive)", labels=["pool", "state"])
        for pool in app.placement.pools.values():
            name = pool_label(pool)
            queued.add_metric([name], pool.waiting)
            states = dict.fromkeys(("starting", "idle", "busy", "draining", "unresponsive"), 0)
            states["starting"] = pool.starting
            for worker in pool.workers + pool.draining:
                state = "draining" if worker.draining else "unresponsive" if worker.unresponsive else \
                    "busy" if worker.load > 0 else "idle"
                states[state] += 1
            for state, count in states.items():
                workers.add_metric([name, state], count)
        yield queued
        yield workers
        inventory = app.placement.inventory
        total = GaugeMetricFamily("jupyter_stream_gpu_memory_total_bytes", "GPU memory by device", labels=["gpu", "model"])
        used = GaugeMetricFamily("jupyter_stream_gpu_memory_used_bytes", "GPU memory in use by device (NVML)",
                                 labels=["gpu", "model"])
        for device in inventory.usage([d.index for d in inventory.devices]):
            labels = [str(device["index"]), device["name"]]
            total.add_metric(labels, device.get("memory_total") or 0)
            if device.get("memory_used") is not None:
                used.add_metric(labels, device["memory_used"])
        yield total
        yield used


def pool_label(pool: Any) -> str:
    """A pool as a label value: its requirements (env names only) and a tag that tells apart
    pools whose env differs in values only, stable when a pool is forgotten and made again."""
    return f"{pool.key.describe()} #{pool.placement.pool_tag(pool.key)}"


STATE = StateCollector()
REGISTRY.register(STATE)
