"""How a map shares its items out over workers: by the measured time per item, with
workers that start during the map given work as they come up, and lanes that run dry
taking queued items back from busy ones (work stealing). Items sleep, so that the
timings hold on a small, busy machine: a sleeping worker needs no CPU."""

import collections
import os
import signal
import tempfile
import threading
import time

import pytest

from jupyter_stream.client.functions import register_function


def nap(x, seconds, log):
    """One item: note who ran it and when it started, sleep, answer the same."""
    import os
    import time

    started = time.time()
    with open(log, "a") as f:  # one short append per item: whole lines, from any worker
        f.write(f"{x} {os.getpid()}\n")
    time.sleep(seconds)
    return x, os.getpid(), started


def ran(log):
    """Item -> the workers that started it, from the items' log."""
    runs = collections.defaultdict(list)
    with open(log) as f:
        for line in f:
            x, pid = line.split()
            runs[int(x)].append(int(pid))
    return runs


def capacity_ideal(work, ready):
    """When `work` seconds of items could be done at best by workers ready at these times."""
    ready = sorted(ready)
    for k in range(len(ready), 0, -1):
        t = (work + sum(ready[:k])) / k
        if t >= ready[k - 1]:
            return t
    return work


class WorkerWatch(threading.Thread):
    """When each worker came up, seen from here (polled, so a little late)."""

    def __init__(self, server):
        super().__init__(daemon=True)
        self.server, self.ready, self.stopping = server, {}, threading.Event()
        self.look()

    def look(self):
        now = time.monotonic()
        for worker in self.server.workers()["workers"]:
            if worker["alive"] and worker["pid"]:
                self.ready.setdefault(worker["pid"], now)

    def run(self):
        while not self.stopping.wait(0.02):
            try:
                self.look()
            except Exception:  # the server is busy: look again
                pass

    def stop(self):
        self.stopping.set()
        self.join(10)
        self.look()


@pytest.fixture(scope="module")
def warm_server(jstream_start_server):
    """Three warm workers and no more."""
    return jstream_start_server(["--JupyterStream.min_workers=3", "--JupyterStream.max_workers=3",
                                 "--JupyterStream.worker_poll_interval=0.2"])


@pytest.fixture()
def log():
    fd, path = tempfile.mkstemp(prefix="jupyter-stream-items-")
    os.close(fd)
    yield path
    os.unlink(path)


def test_workers_started_during_a_map_get_its_items(jstream_start_server, log):
    server = jstream_start_server(["--JupyterStream.min_workers=1", "--JupyterStream.max_workers=3",
                                   "--JupyterStream.worker_poll_interval=0.2"])
    f = register_function(nap, connection=server.connection)
    n, seconds = 30, 0.2
    watch = WorkerWatch(server)
    first = set(watch.ready)
    watch.start()
    t0 = time.monotonic()
    results = list(f.map(range(n), [seconds] * n, [log] * n, progress=False))
    elapsed = time.monotonic() - t0
    watch.stop()
    assert [x for x, _, _ in results] == list(range(n))
    assert all(len(pids) == 1 for pids in ran(log).values()) and len(ran(log)) == n  # each ran once
    per_worker = collections.Counter(pid for _, pid, _ in results)
    # the pool grew to three while the map ran; each worker that was up for a while ran some
    ended = t0 + elapsed
    assert len(watch.ready) == 3, watch.ready
    for pid, ready in watch.ready.items():
        if ready < ended - 3 * seconds:
            assert per_worker[pid] >= 1, (per_worker, watch.ready, t0)
    # ... and the map took about as long as the workers could do it in, once each was up
    # (the old way, the first worker ran nearly all of them: 6 s)
    ideal = capacity_ideal(n * seconds, [0.0 if pid in first else ready - t0 for pid, ready in watch.ready.items()])
    assert elapsed <= 1.25 * ideal + 0.5, (elapsed, ideal, per_worker, {p: r - t0 for p, r in watch.ready.items()})


def test_slow_items_are_spread_evenly_over_warm_workers(warm_server, log):
    f = register_function(nap, connection=warm_server.connection)
    warm_server.wait_for_workers(3)
    n, seconds = 6, 1.0
    t0 = time.monotonic()
    results = list(f.map(range(n), [seconds] * n, [log] * n, progress=False))
    elapsed = time.monotonic() - t0
    assert [x for x, _, _ in results] == list(range(n))
    per_worker = collections.Counter(pid for _, pid, _ in results)
    # 6 items of 1 s on 3 workers: 2 s, two each (batches that doubled made it 3/2/1: 3 s)
    assert sorted(per_worker.values()) == [2, 2, 2], per_worker
    assert elapsed <= 1.15 * n * seconds / 3 + 0.3, (elapsed, per_worker)


def test_a_lane_that_runs_dry_takes_queued_items_from_a_busy_one(warm_server, log):
    """Two long items land together in one lane's batch of short ones (a lane holds many
    short items at once); the lanes that run dry take the second one back (after a few
    steals from the end of that batch), and every item runs exactly once."""
    f = register_function(nap, connection=warm_server.connection)
    warm_server.wait_for_workers(3)
    n, long_ones = 60, (5, 6)
    seconds = [1.5 if x in long_ones else 0.0 for x in range(n)]
    t0 = time.monotonic()
    results = list(f.map(range(n), seconds, [log] * n, progress=False))
    elapsed = time.monotonic() - t0
    assert [x for x, _, _ in results] == list(range(n))
    runs = ran(log)
    assert sorted(runs) == list(range(n)) and all(len(pids) == 1 for pids in runs.values()), runs  # once each
    (_, pid_a, start_a), (_, pid_b, start_b) = results[long_ones[0]], results[long_ones[1]]
    # side by side on two workers, not one after the other on the same one
    assert pid_a != pid_b and abs(start_a - start_b) < 0.75, (results[5], results[6])
    assert elapsed < 2.6, elapsed


def test_stealing_keeps_up_with_a_stream_of_uneven_items(warm_server, log):
    """Items of very different lengths, many steals: each item runs once, nothing is lost."""
    f = register_function(nap, connection=warm_server.connection)
    n = 120
    seconds = [0.3 if x % 17 == 3 else 0.001 * (x % 5) for x in range(n)]
    results = list(f.map(range(n), seconds, [log] * n, progress=False))
    assert [x for x, _, _ in results] == list(range(n))
    runs = ran(log)
    assert sorted(runs) == list(range(n)) and all(len(pids) == 1 for pids in runs.values()), runs
    assert len({pid for _, pid, _ in results}) == 3


def test_a_worker_killed_mid_map_still_gives_every_result_once(warm_server, log):
    f = register_function(nap, connection=warm_server.connection)
    warm_server.wait_for_workers(3)
    replaced = warm_server.workers()["replaced"]
    n = 60
    results, killed = [], None
    for value in f.map(range(n), [0.05] * n, [log] * n, progress=False):
        results.append(value)
        if len(results) == 10:
            killed = value[1]
            os.kill(killed, signal.SIGKILL)
    assert [x for x, _, _ in results] == list(range(n))  # each exactly once, in order
    runs = ran(log)
    # an item runs twice only when its worker died running it
    assert all(len(pids) == 1 or pids[0] == killed for pids in runs.values()), runs
    warm_server.wait_for_workers(3)
    assert warm_server.workers()["replaced"] == replaced + 1
