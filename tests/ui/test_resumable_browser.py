"""A browser's own ``EventSource`` across a killed connection, in headless Chromium: the
page reaches the server through a small TCP proxy, which the test cuts mid-stream; the
EventSource reconnects by itself with ``Last-Event-ID`` and gets every event exactly once,
in order, from the same run of the function; once the stream is over, its next reconnect
is answered 204 and it closes."""

import os
import socket
import sys
import tempfile
import threading
import time

import pytest

from . import ARTIFACTS, launch_chromium, needs_chromium

pytestmark = needs_chromium


def ticks(path: str, n: int = 40, pace: float = 0.05):
    """`n` events, after asking the browser to reconnect within 200 ms; counts its runs in `path`."""
    import time

    with open(path, "a") as f:
        f.write("run\n")
    yield "retry: 200\n\n"
    for i in range(n):
        yield {"i": i}
        time.sleep(pace)


class CuttingProxy:
    """Forwards TCP connections from a port of its own to `target`; `cut()` kills the
    connections open now (both ends), as a network that drops them would."""

    def __init__(self, target_port: int):
        self.target = ("127.0.0.1", target_port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.pairs: list[tuple[socket.socket, socket.socket]] = []
        self.lock = threading.Lock()
        self.closed = False
        threading.Thread(target=self.accept, daemon=True).start()

    def accept(self) -> None:
        while not self.closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            with self.lock:
                self.pairs.append((client, upstream))
            threading.Thread(target=self.pipe, args=(client, upstream), daemon=True).start()
            threading.Thread(target=self.pipe, args=(upstream, client), daemon=True).start()

    @staticmethod
    def pipe(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        for s in (source, sink):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def cut(self) -> int:
        with self.lock:
            pairs, self.pairs = self.pairs, []
        for pair in pairs:
            for s in pair:
                try:
                    s.shutdown(socket.SHUT_RDWR)
                    s.close()
                except OSError:
                    pass
        return len(pairs)

    def close(self) -> None:
        self.closed = True
        self.listener.close()
        self.cut()


@pytest.fixture(scope="module")
def server(jstream_start_server):
    import cloudpickle

    from jupyter_stream.client.endpoints import register_endpoint

    server = jstream_start_server(["--JupyterStream.min_workers=1", "--JupyterStream.max_workers=2"])
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    try:
        register_endpoint(ticks, "ticks", connection=server.connection, resumable=True)
    finally:
        cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
    return server


def test_an_eventsource_across_a_killed_connection_gets_every_event_once(server):
    from playwright.sync_api import sync_playwright

    fd, runs = tempfile.mkstemp(prefix="resumable-browser-")
    os.close(fd)
    proxy = CuttingProxy(server.port)
    base = f"http://127.0.0.1:{proxy.port}/"
    try:
        with sync_playwright() as p:
            browser = launch_chromium(p)
            page = browser.new_page(bypass_csp=True)  # the test's own script runs beside the page's
            try:
                page.goto(f"{base}stream/?token={server.token}")  # a page of the proxy's origin: EventSource stays same-origin
                page.evaluate("""url => {
                    window.got = []; window.drops = 0;
                    const source = window.source = new EventSource(url);
                    source.onmessage = e => window.got.push([e.lastEventId, JSON.parse(e.data).i]);
                    source.onerror = () => { window.drops += 1; };
                }""", f"{base}stream/ticks?token={server.token}&path={runs}")
                page.wait_for_function("window.got.length >= 8", timeout=20_000)
                assert proxy.cut() >= 1  # mid-stream: the browser's connection dies
                cut_at = page.evaluate("window.got.length")
                assert cut_at < 40
                page.wait_for_function("window.got.length >= 40", timeout=20_000)
                # the stream is over: the EventSource's next reconnect gets 204 and it closes
                page.wait_for_function("window.source.readyState === EventSource.CLOSED", timeout=20_000)
                got = page.evaluate("window.got")
                drops = page.evaluate("window.drops")
            except Exception:
                page.screenshot(path=str(ARTIFACTS / "resumable-browser-failure.png"))
                raise
            finally:
                browser.close()
    finally:
        proxy.close()
    assert [i for _, i in got] == list(range(40)), got  # every event exactly once, in order
    sid = got[0][0].split(":")[0]
    assert [event_id for event_id, _ in got] == [f"{sid}:{n}" for n in range(2, 42)]  # event 1 was `retry:`
    assert drops >= 2  # the cut, and the end of the stream (then 204)
    time.sleep(0.3)
    with open(runs) as f:
        assert f.read().split() == ["run"]  # the function ran once
