"""The notebook side's calls socket is supervised (issue 17): whatever ends its reader (a
frame that is not of our protocol, a text frame, the server hanging up), every call in
flight ends at once with a ConnectionError saying why and a log line, and the next call
connects again. The faults come from a test-local tornado server standing in for the
server's ``api/stream/calls`` at the boundary; the client is the real one."""

import asyncio
import pickle
import struct
import threading
import time

import pytest
import tornado.web
import tornado.websocket

from jupyter_stream import wire
from jupyter_stream.client.connection import ServerConnection
from jupyter_stream.client.functions import Function


class FaultyCalls(tornado.websocket.WebSocketHandler):
    """Answers the first connection's calls with `fault` once `calls_before_fault` calls
    came in; every later connection answers each call properly (with 42)."""

    def open(self):
        self.server = self.settings["faulty"]
        self.server.connections += 1
        self.first = self.server.connections == 1
        self.calls = []

    def on_message(self, message):
        header, _ = wire.decode_frame(message)
        if header.get("op") != "call":
            return
        self.calls.append(header["id"])
        if not self.first:
            answer(self, header["id"])
        elif len(self.calls) == self.server.calls_before_fault:
            self.server.fault(self)


def answer(handler, call_id):
    blob = pickle.dumps(42)
    handler.write_message(wire.encode_frame({"op": "out", "id": call_id, "end": True, "sizes": [len(blob)]}, blob), binary=True)


class FaultyServer:
    def __init__(self, fault, calls_before_fault=1):
        self.fault = fault
        self.calls_before_fault = calls_before_fault
        self.connections = 0
        self.loop = asyncio.new_event_loop()
        started = threading.Event()

        def run():
            asyncio.set_event_loop(self.loop)
            app = tornado.web.Application([(r"/api/stream/calls", FaultyCalls)], faulty=self)
            self.http = app.listen(0, "127.0.0.1")
            self.port = next(iter(self.http._sockets.values())).getsockname()[1]
            started.set()
            self.loop.run_forever()

        threading.Thread(target=run, daemon=True).start()
        started.wait(10)
        self.url = f"http://127.0.0.1:{self.port}/"

    def stop(self):
        self.loop.call_soon_threadsafe(lambda: (self.http.stop(), self.loop.stop()))


def header_of(head: bytes) -> bytes:
    """A frame whose header is `head` as it is, and no payload."""
    return struct.pack("!I", len(head)) + head


FAULTS = {
    "a frame cut short": (lambda h: h.write_message(b"\x00\x00", binary=True), "FrameError"),
    "a header past the frame's end": (lambda h: h.write_message(b"\x00\x00\xff\xffxyz", binary=True), "FrameError"),
    "a header that is not JSON": (lambda h: h.write_message(header_of(b"{nope"), binary=True), "FrameError"),
    "a header that is a list": (lambda h: h.write_message(header_of(b"[1, 2]"), binary=True), "FrameError"),
    "an id that is a list": (lambda h: (h.write_message(header_of(b'{"id": [1], "end": true}'), binary=True),
                                         *(answer(h, call_id) for call_id in h.calls)), None),
    "a text frame": (lambda h: h.write_message("hello"), "TypeError"),
    "the server hanging up": (lambda h: h.close(1011, "going away"), "the server closed the connection (1011: going away)"),
}


@pytest.mark.parametrize("fault", list(FAULTS))
def test_every_call_in_flight_ends_with_a_connection_error_and_the_next_call_reconnects(fault, caplog):
    inject, said = FAULTS[fault]
    server = FaultyServer(inject, calls_before_fault=3)
    try:
        conn = ServerConnection(server.url)
        f = Function("f", connection=conn)
        calls = [f.spawn(i) for i in range(3)]
        results = {}

        def wait(i, call):
            try:
                results[i] = call.get(timeout=10)
            except BaseException as e:  # noqa: BLE001
                results[i] = e

        started = time.monotonic()
        waiters = [threading.Thread(target=wait, args=(i, call)) for i, call in enumerate(calls)]
        for waiter in waiters:
            waiter.start()
        for waiter in waiters:
            waiter.join(10)
        took = time.monotonic() - started
        assert took < 5, f"the calls were left hanging for {took:.1f} s"
        if said is None:  # a frame for no call of ours is dropped, and the reader goes on
            assert results == {0: 42, 1: 42, 2: 42}, results
            assert server.connections == 1
            return
        for i in range(3):
            error = results[i]
            assert isinstance(error, ConnectionError), repr(error)
            assert f"lost the connection to the Jupyter server at {server.url}" in str(error)
            assert said in str(error), str(error)
        lines = [r.getMessage() for r in caplog.records if r.name == "jupyter_stream" and "lost the calls connection" in r.getMessage()]
        assert len(lines) == 1 and said in lines[0] and "3 call(s) in flight" in lines[0], lines
        # the next call connects anew and gets its answer
        assert f.remote(1) == 42
        assert server.connections == 2
    finally:
        server.stop()
