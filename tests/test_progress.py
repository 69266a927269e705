"""The map progress display's state machine: counts, rate, ETA, throttling, final state."""

from jupyter_stream.client.progress import MIN_INTERVAL, MapProgress


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


class Recorder:
    def __init__(self):
        self.seen = []

    def update(self, progress):
        self.seen.append(progress.snapshot())


def test_counts_rate_and_eta():
    clock = Clock()
    p = MapProgress("f.map", total=100, clock=clock)
    p.on_sent(40)
    p.on_results(20)
    p.on_results(1, failed=1)
    p.on_retry()
    clock.now += 10.5
    snap = p.snapshot()
    # until the server says how many workers run the map, everything in flight counts as running
    assert (snap["done"], snap["running"], snap["queued"], snap["failed"], snap["retried"]) == (21, 19, 0, 1, 1)
    assert snap["rate"] == 2.0 and snap["eta"] == (100 - 21) / 2.0
    assert "f.map: 21/100 done · 19 running · 1 failed · 1 retried · 2.0/s · 10.5s elapsed · ETA 39.5s" == p.summary()
    p.on_lanes(2)  # two workers: two items run, the rest of the batch waits
    assert (p.running, p.queued) == (2, 17)
    assert "21/100 done · 2 running · 17 queued · 1 failed" in p.summary()


def test_unknown_total_shows_count_and_rate_without_eta():
    clock = Clock()
    p = MapProgress("g.map", total=None, clock=clock)
    p.on_sent(5)
    p.on_results(1)
    clock.now += 2
    assert p.eta is None and p.summary().startswith("g.map: 1 done · 4 running")


def test_renders_are_throttled_and_the_final_state_is_always_shown():
    clock = Clock()
    recorder = Recorder()
    p = MapProgress("f.map", total=1000, display=recorder, clock=clock)
    for i in range(1000):
        p.on_sent(1)
        p.on_results(1, failed=int(i % 100 == 0))
        p.render()
        clock.now += 0.001  # a fast map: 1000 results in one second
    assert 1 <= p.renders <= 1 / MIN_INTERVAL + 1
    p.finish("failed")
    assert recorder.seen[-1]["state"] == "failed" and recorder.seen[-1]["done"] == 1000
    assert recorder.seen[-1]["failed"] == 10 and recorder.seen[-1]["eta"] is None
    assert p.summary().endswith("✘ failed")
    frozen = p.elapsed
    clock.now += 60
    assert p.elapsed == frozen  # the final state stays as it was
    p.finish("success")  # a second finish changes nothing
    assert p.state == "failed"


def test_success_and_cancelled_states():
    clock = Clock()
    ok = MapProgress("a.map", total=2, clock=clock)
    ok.on_sent(2)
    ok.on_results(2)
    ok.finish("success")
    assert ok.summary().endswith("✔ done") and "running" not in ok.summary()
    stopped = MapProgress("b.map", total=10, clock=clock)
    stopped.finish("cancelled")
    assert stopped.summary().endswith("■ cancelled")


def test_outside_a_notebook_or_terminal_the_summary_is_printed_once_at_the_end(capsys):
    from jupyter_stream.client.progress import SummaryDisplay, start

    p = start("f.map", 3)  # pytest captures stderr: not a terminal, and no kernel here
    assert isinstance(p.display, SummaryDisplay)
    p.on_sent(3)
    p.on_results(3)
    p.render(force=True)
    assert capsys.readouterr().err == ""  # nothing while it runs
    p.finish("success")
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("f.map: 3/3 done")
    assert start("f.map", 3, enabled=False).display is None


def test_a_map_whose_failed_items_came_back_as_exceptions_is_partly_done():
    from jupyter_stream.client.functions import _MapState

    class Stream:
        def cancel(self):
            raise AssertionError("a finished map has nothing to cancel")

    clock = Clock()
    progress = MapProgress("f.map", total=30, display=Recorder(), clock=clock)
    state = _MapState(Stream(), order_outputs=True, return_exceptions=True, progress=progress)
    progress.on_sent(30)
    progress.on_results(30, failed=4)
    state.finished = True
    state.close(failed=False)
    assert progress.state == "partial" and progress.display.seen[-1]["state"] == "partial"
    assert progress.summary().endswith("◐ 26 of 30 succeeded")
