"""The bad-input corpus: every malformed request, registration and WebSocket frame gets a
clear 4xx (or a close frame) that says what to do, the server log gets one line and no
traceback, and a trivial endpoint still streams after each."""

import asyncio
import base64
import json
import re
import struct
import threading
import time

import cloudpickle
import httpx
import pytest
from tornado.httpclient import HTTPRequest
from tornado.websocket import websocket_connect

from jupyter_stream import wire
from jupyter_stream.client.functions import register_function

LIMIT = 1 << 20  # the server's max_request_body in this file

FUNCTION = base64.b64encode(cloudpickle.dumps(lambda: iter(()))).decode()


def endpoint_registration(**fields):
    return {"name": "fine", "function": FUNCTION, **fields}


def function_registration(**fields):
    return {"name": "fine_fn", "function": FUNCTION, **fields}


def nested(depth):
    return "[" * depth + "]" * depth


# (id, method, path, request options, status, what the message must say)
HTTP_CASES = [
    # -- query strings -----------------------------------------------------------------
    ("query-invalid-utf8", "GET", "stream/typed?n=%FF%FE", {}, 400, "percent-encode text as UTF-8"),
    ("query-truncated-utf8", "GET", "stream/typed?n=1&name=%C3", {}, 400, "percent-encode text as UTF-8"),
    ("query-invalid-utf8-name", "GET", "stream/typed?n=1&%FF=1", {}, 400, "percent-encode text as UTF-8"),
    ("query-int-word", "GET", "stream/typed?n=two", {}, 400, "parameter 'n' must be int, got 'two'"),
    ("query-names-signature", "GET", "stream/typed?n=abc", {}, 400, "must be int, got 'abc'; endpoint 'typed' takes n (int, required)"),
    ("query-json-list-bad", "GET", "stream/typed?n=1&tags=[1,", {}, 400, "looks like a JSON array but is not one"),
    ("query-list-nested", "GET", "stream/typed?n=1&tags=" + nested(40), {}, 400, "send a flatter document"),
    ("query-list-nested-deep", "GET", "stream/typed?n=1&tags=" + nested(5000), {}, 400, "send a flatter document"),
    ("query-int-float", "GET", "stream/typed?n=1.5", {}, 400, "parameter 'n' must be int"),
    ("query-int-empty", "GET", "stream/typed?n=", {}, 400, "parameter 'n' must be int"),
    ("query-int-nul", "GET", "stream/typed?n=%00", {}, 400, "parameter 'n' must be int"),
    ("query-int-huge", "GET", "stream/typed?n=" + "9" * 5000, {}, 400, "parameter 'n' must be int"),
    ("query-float", "GET", "stream/typed?n=1&scale=abc", {}, 400, "parameter 'scale' must be float"),
    ("query-bool", "GET", "stream/typed?n=1&loud=maybe", {}, 400, "parameter 'loud' must be bool"),
    ("query-list-item", "GET", "stream/typed?n=1&tags=a,b", {}, 400, "parameter 'tags' must be int"),
    ("query-unknown", "GET", "stream/typed?n=1&colour=red", {}, 400, "takes n (int, required)"),
    ("query-missing", "GET", "stream/typed", {}, 400, "missing required parameter 'n'; endpoint 'typed' takes"),
    # -- JSON bodies ---------------------------------------------------------------------
    ("body-not-json", "POST", "stream/typed", {"content": b"{"}, 400, "send UTF-8 JSON"),
    ("body-array", "POST", "stream/typed", {"content": b"[1]"}, 400, "JSON object of parameters"),
    ("body-string", "POST", "stream/typed", {"content": b'"n"'}, 400, "JSON object of parameters"),
    ("body-null", "POST", "stream/typed", {"content": b"null"}, 400, "JSON object of parameters"),
    ("body-invalid-utf8", "POST", "stream/typed", {"content": b'{"n": "\xff"}'}, 400, "send UTF-8 JSON"),
    ("body-nested-100k", "POST", "stream/typed", {"content": nested(100_000).encode()}, 400, "send a flatter document"),
    ("body-nested-value", "POST", "stream/typed", {"content": ('{"n": 1, "tags": ' + nested(40) + "}").encode()}, 400,
     "send a flatter document"),
    ("body-nested-objects", "POST", "stream/varkw", {"content": ('{"a": ' + '{"a": ' * 50 + "1" + "}" * 51).encode()}, 400,
     "send a flatter document"),
    ("body-int-string", "POST", "stream/typed", {"json": {"n": "3"}}, 400, "parameter 'n' must be int, got str"),
    ("body-int-bool", "POST", "stream/typed", {"json": {"n": True}}, 400, "parameter 'n' must be int"),
    ("body-list-not-list", "POST", "stream/typed", {"json": {"n": 1, "tags": "x"}}, 400, "parameter 'tags' must be a list"),
    ("body-list-item", "POST", "stream/typed", {"json": {"n": 1, "tags": [1, "a"]}}, 400, "parameter 'tags' must be int"),
    ("body-unknown", "POST", "stream/typed", {"json": {"n": 1, "zzz": 1}}, 400, "unknown parameter 'zzz'"),
    ("body-missing", "POST", "stream/typed", {"json": {"scale": 2}}, 400, "missing required parameter 'n'"),
    ("body-trailing-garbage", "POST", "stream/typed", {"content": b'{"n": 1} x'}, 400, "send UTF-8 JSON"),
    ("body-over-limit", "POST", "stream/typed", {"content": b"x" * (LIMIT + 1)}, 413, "raise JupyterStream.max_request_body"),
    ("body-chunked-over-limit", "POST", "stream/typed", {"content": "chunked:2"}, 413, "raise JupyterStream.max_request_body"),
    ("body-chunked-far-over", "POST", "stream/typed", {"content": "chunked:100"}, 413, "raise JupyterStream.max_request_body"),
    # -- unknown things ------------------------------------------------------------------
    ("unknown-endpoint", "GET", "stream/nope", {}, 404, "(endpoints: "),
    ("unknown-endpoint-post", "POST", "stream/nope", {"json": {}}, 404, "(endpoints: "),
    ("unknown-endpoint-info", "GET", "api/stream/endpoints/nope", {}, 404, "no endpoint named 'nope'"),
    ("unknown-endpoint-delete", "DELETE", "api/stream/endpoints/nope", {}, 404, "no endpoint named 'nope'"),
    ("unknown-function-delete", "DELETE", "api/stream/functions/nope", {}, 404, "no function named 'nope'"),
    # -- auth ------------------------------------------------------------------------------
    ("no-token", "GET", "stream/trivial", {"auth": None}, 403, "authenticate with the server's token"),
    ("wrong-token", "GET", "stream/trivial", {"auth": "token wrong"}, 403, "authenticate with the server's token"),
    ("no-token-body", "POST", "stream/typed", {"auth": None, "content": b"x" * (LIMIT * 4)}, 403, "authenticate"),
    ("no-token-api", "GET", "api/stream/endpoints", {"auth": None}, 403, "authenticate with the server's token"),
    ("no-token-register", "POST", "api/stream/endpoints", {"auth": None, "json": endpoint_registration()}, 403,
     "authenticate with the server's token"),
]

# registrations: (id, kind, JSON body or raw bytes, what the message must say)
REGISTRATION_CASES = [
    ("reg-not-json", "endpoints", b"{", "send UTF-8 JSON"),
    ("reg-array", "endpoints", b"[]", "must be a JSON object with 'name' and 'function'"),
    ("reg-nested", "endpoints", nested(100_000).encode(), "send a flatter document"),
    ("reg-no-name", "endpoints", {"function": FUNCTION}, "has no 'name'"),
    ("reg-name-int", "endpoints", endpoint_registration(name=123), "use letters, digits"),
    ("reg-name-space", "endpoints", endpoint_registration(name="a b"), "use letters, digits"),
    ("reg-name-empty", "endpoints", endpoint_registration(name=""), "use letters, digits"),
    ("reg-name-long", "endpoints", endpoint_registration(name="x" * 65), "at most 64 characters"),
    ("reg-name-crlf", "endpoints", endpoint_registration(name="x\r\nSet-Cookie: a"), "use letters, digits"),
    ("reg-name-trailing-newline", "endpoints", endpoint_registration(name="fine\n"), "use letters, digits"),
    ("reg-name-slash", "endpoints", endpoint_registration(name="../etc"), "use letters, digits"),
    ("reg-no-function", "endpoints", {"name": "fine"}, "base64-encoded"),
    ("reg-function-int", "endpoints", endpoint_registration(function=123), "base64-encoded"),
    ("reg-function-empty", "endpoints", endpoint_registration(function=""), "base64-encoded"),
    ("reg-function-not-base64", "endpoints", endpoint_registration(function="!!not base64!!"), "not valid base64"),
    ("reg-media-int", "endpoints", endpoint_registration(media_type=5), "give one like 'text/event-stream'"),
    ("reg-media-crlf", "endpoints", endpoint_registration(media_type="text/plain\r\nX-Evil: 1"), "no spaces or control characters"),
    ("reg-media-lf", "endpoints", endpoint_registration(media_type="text/plain\n"), "give one like"),
    ("reg-media-nul", "endpoints", endpoint_registration(media_type="text/pl\x00ain"), "give one like"),
    ("reg-media-no-subtype", "endpoints", endpoint_registration(media_type="text"), "type/subtype"),
    ("reg-media-empty", "endpoints", endpoint_registration(media_type=""), "type/subtype"),
    ("reg-media-space", "endpoints", endpoint_registration(media_type="text /plain"), "type/subtype"),
    ("reg-media-long", "endpoints", endpoint_registration(media_type="a" * 300 + "/b"), "type/subtype"),
    ("reg-media-bad-param", "endpoints", endpoint_registration(media_type="text/plain; charset"), "type/subtype"),
    ("reg-media-list", "endpoints", endpoint_registration(media_type=["text/plain"]), "give one like"),
    ("reg-signature-string", "endpoints", endpoint_registration(signature="(n: int)"), "register with jupyter_stream.endpoint()"),
    ("reg-signature-list", "endpoints", endpoint_registration(signature=[]), "must be an object"),
    ("reg-signature-extra", "endpoints", endpoint_registration(signature={"params": [], "x": 1}), "allowed: params, var_keyword"),
    ("reg-params-string", "endpoints", endpoint_registration(signature={"params": "n"}), "must be a list"),
    ("reg-params-int-items", "endpoints", endpoint_registration(signature={"params": [1]}), "must be an object like"),
    ("reg-params-string-items", "endpoints", endpoint_registration(signature={"params": ["n"]}), "must be an object like"),
    ("reg-param-no-name", "endpoints", endpoint_registration(signature={"params": [{"type": "int"}]}), "Python identifier"),
    ("reg-param-bad-name", "endpoints", endpoint_registration(signature={"params": [{"name": "1x"}]}), "Python identifier"),
    ("reg-param-name-int", "endpoints", endpoint_registration(signature={"params": [{"name": 7}]}), "Python identifier"),
    ("reg-param-type", "endpoints", endpoint_registration(signature={"params": [{"name": "n", "type": "complex"}]}), "use one of"),
    ("reg-param-type-int", "endpoints", endpoint_registration(signature={"params": [{"name": "n", "type": 3}]}), "use one of"),
    ("reg-param-item", "endpoints",
     endpoint_registration(signature={"params": [{"name": "n", "type": "list", "item": "dict"}]}), "use one of"),
    ("reg-param-required", "endpoints", endpoint_registration(signature={"params": [{"name": "n", "required": "yes"}]}),
     "must be true or false"),
    ("reg-param-optional", "endpoints", endpoint_registration(signature={"params": [{"name": "n", "optional": 1}]}),
     "must be true or false"),
    ("reg-param-default", "endpoints", endpoint_registration(signature={"params": [{"name": "n", "default": {"a": 1}}]}),
     "a default must be a JSON string"),
    ("reg-param-extra", "endpoints", endpoint_registration(signature={"params": [{"name": "n", "zzz": 1}]}), "allowed: name, type"),
    ("reg-param-twice", "endpoints", endpoint_registration(signature={"params": [{"name": "n"}, {"name": "n"}]}),
     "names a parameter twice"),
    ("reg-params-too-many", "endpoints",
     endpoint_registration(signature={"params": [{"name": f"p{i}"} for i in range(300)]}), "at most 256"),
    ("reg-var-keyword", "endpoints", endpoint_registration(signature={"params": [], "var_keyword": "yes"}), "true or false"),
    ("reg-doc-int", "endpoints", endpoint_registration(doc=5), "'doc' must be a string"),
    ("reg-doc-huge", "endpoints", endpoint_registration(doc="x" * 70_000), "at most 65536 characters"),
    ("reg-endpoint-unknown-field", "endpoints", endpoint_registration(retries=2), "allowed: ['batch', 'doc', 'function'"),
    ("fn-not-json", "functions", b"nope", "send UTF-8 JSON"),
    ("fn-no-name", "functions", {"function": FUNCTION}, "has no 'name'"),
    ("fn-bad-name", "functions", function_registration(name="a/b"), "use letters, digits"),
    ("fn-no-function", "functions", {"name": "fine_fn"}, "base64-encoded"),
    ("fn-not-base64", "functions", function_registration(function="%%%"), "not valid base64"),
    ("fn-retries-negative", "functions", function_registration(retries=-5), "from 0 to 100"),
    ("fn-retries-float", "functions", function_registration(retries=1.5), "from 0 to 100"),
    ("fn-retries-string", "functions", function_registration(retries="2"), "from 0 to 100"),
    ("fn-retries-bool", "functions", function_registration(retries=True), "from 0 to 100"),
    ("fn-retries-huge", "functions", function_registration(retries=1000), "from 0 to 100"),
    ("fn-timeout-negative", "functions", function_registration(timeout=-1), "above 0"),
    ("fn-timeout-zero", "functions", function_registration(timeout=0), "above 0"),
    ("fn-timeout-string", "functions", function_registration(timeout="10"), "number of seconds"),
    ("fn-timeout-huge", "functions", function_registration(timeout=1e9), "7 days"),
    ("fn-timeout-bool", "functions", function_registration(timeout=True), "number of seconds"),
    ("fn-timeout-nan", "functions", b'{"name": "fine_fn", "function": "' + FUNCTION.encode() + b'", "timeout": NaN}', "null for none"),
    ("fn-timeout-inf", "functions", b'{"name": "fine_fn", "function": "' + FUNCTION.encode() + b'", "timeout": Infinity}',
     "null for none"),
    ("fn-generator-string", "functions", function_registration(generator="yes"), "'generator' must be true or false"),
    ("fn-unknown-field", "functions", function_registration(media_type="text/plain"), "allowed: ['batch', 'doc', 'function'"),
    ("fn-doc-list", "functions", function_registration(doc=["x"]), "'doc' must be a string"),
]


def frame(header, payload=b""):
    head = json.dumps(header).encode()
    return struct.pack("!I", len(head)) + head + payload


# WebSocket frames on api/stream/calls: (id, frames sent in order, close code, what the reason must say)
WS_CASES = [
    ("ws-text", ["hello"], 1003, "binary frames only"),
    ("ws-too-short", [b"\x00\x00"], 1007, "4-byte header length"),
    ("ws-length-past-end", [struct.pack("!I", 1000) + b"{}"], 1007, "past the end of the frame"),
    ("ws-header-not-json", [struct.pack("!I", 5) + b"{{{{{"], 1007, "not valid JSON"),
    ("ws-header-array", [frame([1, 2])], 1007, "not a JSON object"),
    ("ws-header-nested", [struct.pack("!I", 200_000) + nested(100_000).encode()], 1007, "not valid JSON"),
    ("ws-no-op", [frame({"id": "a"})], 1007, "expected call, items"),
    ("ws-unknown-op", [frame({"op": "explode", "id": "a"})], 1007, "unknown op 'explode'"),
    ("ws-no-id", [frame({"op": "cancel"})], 1007, "needs an 'id' string"),
    ("ws-id-int", [frame({"op": "cancel", "id": 5})], 1007, "needs an 'id' string"),
    ("ws-id-long", [frame({"op": "cancel", "id": "x" * 65})], 1007, "1 to 64 characters"),
    ("ws-call-no-fn", [frame({"op": "call", "id": "a", "kind": "remote"})], 1007, "needs 'fn'"),
    ("ws-call-bad-kind", [frame({"op": "call", "id": "a", "fn": "double", "kind": "weird"})], 1007, "'remote' or 'map'"),
    ("ws-call-twice", [frame({"op": "call", "id": "m", "fn": "double", "kind": "map"}, wire.dumps(((), {}))),
                       frame({"op": "call", "id": "m", "fn": "double", "kind": "map"}, wire.dumps(((), {})))],
     1007, "already in use"),
    ("ws-items-no-count", [frame({"op": "call", "id": "m", "fn": "double", "kind": "map"}, wire.dumps(((), {}))),
                           frame({"op": "items", "id": "m", "count": "1"}, wire.pack_items([0], [1]) + b"x")],
     1007, "'items' needs 'count'"),
    ("ws-items-short", [frame({"op": "call", "id": "m", "fn": "double", "kind": "map"}, wire.dumps(((), {}))),
                        frame({"op": "items", "id": "m", "count": 2}, wire.pack_items([0], [1]) + b"x")],
     1007, "a frame of 2 items needs at least 32 bytes, it has 17"),
    ("ws-items-negative-index", [frame({"op": "call", "id": "m", "fn": "double", "kind": "map"}, wire.dumps(((), {}))),
                                 frame({"op": "items", "id": "m", "count": 1}, wire.pack_items([-1], [1]) + b"x")],
     1007, "indices and sizes are whole numbers"),
    ("ws-items-sizes-past-payload", [frame({"op": "call", "id": "m", "fn": "double", "kind": "map"}, wire.dumps(((), {}))),
                                     frame({"op": "items", "id": "m", "count": 1}, wire.pack_items([0], [100]) + b"x")],
     1007, "add up to 100 bytes but the frame holds 1"),
    ("ws-items-on-remote", [frame({"op": "call", "id": "r", "fn": "sleepy", "kind": "remote"}, wire.dumps(((1,), {}))),
                            frame({"op": "items", "id": "r", "count": 1}, wire.pack_items([0], [1]) + b"x")],
     1007, "'items' is for map calls"),
    ("ws-ack-on-map", [frame({"op": "call", "id": "m", "fn": "double", "kind": "map"}, wire.dumps(((), {}))),
                       frame({"op": "ack", "id": "m", "bytes": 10})],
     1007, "'ack' is for remote calls"),
    ("ws-ack-negative", [frame({"op": "ack", "id": "r", "bytes": -1})], 1007, "'ack' needs 'bytes'"),
]


def typed(n: int, scale: float = 1.0, loud: bool = False, tags: list[int] = [], name: str = "x"):
    yield {"n": n}


def varkw(**rest):
    yield "ok\n"


def bad_headers(kind: str):
    from jupyter_stream import StreamingResponse

    headers = {"line-break": {"X-Note": "a\nb"}, "none": {"X-Note": None}, "cookie-smuggle": {"X-Note": "1\r\nSet-Cookie: a=b"},
               "space-in-name": {"Bad Name": "1"}, "not-a-dict": [("X-Note", "1")]}[kind]
    return StreamingResponse(iter(["data: x\n\n"]), headers=headers)


def trivial():
    yield "data: ok\n\n"


def double(x):
    return 2 * x


def sleepy(seconds):
    import time

    time.sleep(seconds)
    return seconds


@pytest.fixture(scope="module")
def server(jstream_start_server):
    return jstream_start_server([f"--JupyterStream.max_request_body={LIMIT}", "--JupyterStream.min_workers=2"])


@pytest.fixture(scope="module")
def registered(server):
    """Endpoints and functions the corpus runs against (registered once)."""
    cloudpickle.register_pickle_by_value(__import__(__name__))
    try:
        server.register(typed, media_type="application/x-ndjson")
        server.register(varkw, media_type="text/plain")
        server.register(trivial)
        server.register(bad_headers)
        register_function(double, connection=server.connection)
        register_function(sleepy, connection=server.connection)
    finally:
        cloudpickle.unregister_pickle_by_value(__import__(__name__))
    return server


def still_streams(server):
    r = httpx.get(server.url + "stream/trivial", headers=server.headers, timeout=10)
    assert (r.status_code, r.text) == (200, "data: ok\n\n")


def send(server, method, path, options):
    options = dict(options)
    auth = options.pop("auth", f"token {server.token}")
    headers = {"Authorization": auth} if auth else {}
    content = options.get("content")
    if isinstance(content, str) and content.startswith("chunked:"):  # a body of N MiB, no length sent
        mib = int(content.split(":")[1])
        options["content"] = (b"x" * (1 << 20) for _ in range(mib))
    return httpx.request(method, server.url + path, headers=headers, timeout=60, **options)


@pytest.mark.parametrize("case", HTTP_CASES, ids=[c[0] for c in HTTP_CASES])
def test_bad_request(registered, case):
    _, method, path, options, status, says = case
    r = send(registered, method, path, options)
    assert r.status_code == status, r.text
    assert says in r.json()["message"], r.json()
    still_streams(registered)


@pytest.mark.parametrize("case", REGISTRATION_CASES, ids=[c[0] for c in REGISTRATION_CASES])
def test_bad_registration(registered, case):
    _, kind, body, says = case
    options = {"content": body} if isinstance(body, bytes) else {"json": body}
    r = send(registered, "POST", f"api/stream/{kind}", options)
    assert r.status_code == 400, r.text
    assert says in r.json()["message"], r.json()
    still_streams(registered)


@pytest.mark.parametrize("kind, says", [
    ("line-break", "line break"), ("none", "must be a str or a number"), ("cookie-smuggle", "line break"),
    ("space-in-name", "header name 'Bad Name' is not valid"), ("not-a-dict", "headers must be a dict"),
])
def test_bad_response_headers(registered, kind, says):
    """Headers an endpoint gives its StreamingResponse that HTTP cannot carry: a 500 naming
    the header, from where the response was made, and the worker is free again."""
    r = httpx.get(registered.url + "stream/bad_headers", params={"kind": kind}, headers=registered.headers, timeout=30)
    assert r.status_code == 500 and says in r.json()["error"]["message"], r.text
    assert "a=b" not in r.headers.get("set-cookie", "")  # no header was smuggled in
    still_streams(registered)


def test_no_bad_registration_was_kept(registered):
    endpoints = [e["name"] for e in registered.get("api/stream/endpoints").json()["endpoints"]]
    functions = [f["name"] for f in registered.get("api/stream/functions").json()["functions"]]
    assert sorted(endpoints) == ["bad_headers", "trivial", "typed", "varkw"]
    assert sorted(functions) == ["double", "sleepy"]


async def close_of(server, frames):
    url = "ws" + server.url[4:] + "api/stream/calls"
    ws = await websocket_connect(HTTPRequest(url, headers=server.headers))
    for message in frames:
        await ws.write_message(message, binary=isinstance(message, bytes))
    while await asyncio.wait_for(ws.read_message(), 10) is not None:
        pass  # output of calls started before the bad frame
    return ws.close_code, ws.close_reason


async def remote_call_works(server):
    url = "ws" + server.url[4:] + "api/stream/calls"
    ws = await websocket_connect(HTTPRequest(url, headers=server.headers))
    await ws.write_message(frame({"op": "call", "id": "ok", "fn": "double", "kind": "remote"}, wire.dumps(((21,), {}))), binary=True)
    header, payload = wire.decode_frame(await asyncio.wait_for(ws.read_message(), 30))
    ws.close()
    return header.get("end") and wire.split(payload, header["sizes"])[0].tobytes()


@pytest.mark.parametrize("case", WS_CASES, ids=[c[0] for c in WS_CASES])
def test_bad_websocket_frame(registered, case):
    _, frames, code, says = case
    close_code, reason = asyncio.run(close_of(registered, frames))
    assert close_code == code and says in (reason or ""), (close_code, reason)
    assert asyncio.run(remote_call_works(registered)) == wire.dumps(42)
    still_streams(registered)


def test_the_corpus_is_large_and_the_log_has_one_line_each_and_no_traceback(registered):
    assert len(HTTP_CASES) + len(REGISTRATION_CASES) + len(WS_CASES) >= 120
    log = registered.log()
    assert "Traceback" not in log and "Uncaught exception" not in log, log[-3000:]
    assert "wrote error" not in log
    assert "websocket_ping_timeout" not in log  # the calls socket's pings are tornado's own
    for case_id, method, path, *_ in HTTP_CASES:
        if case_id in ("no-token-body",):
            continue
        plain = path.split("?")[0]
        lines = [line for line in log.splitlines() if re.search(rf"\] 4\d\d {method} /{re.escape(plain)}\b", line)]
        assert lines, f"{case_id}: no log line for {method} /{plain}"
    closing = [line for line in log.splitlines() if "closing a calls socket" in line]
    assert len(closing) == len(WS_CASES)


def test_a_huge_json_body_is_refused_before_it_holds_the_event_loop(jstream_start_server):
    """9.7 MiB of `{}` used to take 0.5 s to parse and 7.6 s to walk on the event loop."""
    server = jstream_start_server(["--JupyterStream.min_workers=1"])

    def sink(items: list):
        return len(items)

    server.register(sink)
    server.register(trivial)
    body = b'{"items": [' + b"{}," * 3_200_000 + b"{}]}"
    latencies, done = [], threading.Event()

    def meanwhile():
        with httpx.Client(headers=server.headers, timeout=30) as client:
            while not done.is_set():
                start = time.monotonic()
                assert client.get(server.url + "stream/trivial").text == "data: ok\n\n"
                latencies.append(time.monotonic() - start)

    thread = threading.Thread(target=meanwhile)
    thread.start()
    try:
        for _ in range(3):
            start = time.monotonic()
            r = httpx.post(server.url + "stream/sink", content=body, headers=server.headers, timeout=60)
            assert r.status_code == 400 and "more than 1,000,000 values" in r.json()["message"], r.text
            assert time.monotonic() - start < 3
    finally:
        done.set()
        thread.join()
    assert max(latencies) < 1.0, sorted(latencies)[-5:]
    ok = json.dumps({"items": [{"n": i} for i in range(100_000)]}).encode()
    assert httpx.post(server.url + "stream/sink", content=ok, headers=server.headers, timeout=60).text == "100000"
