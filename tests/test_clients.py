"""One error shape, as each client people use sees it: the 500's body and an SSE
``event: error``'s data are the same ``{"error": {"type", "message", "traceback"}}``."""

import asyncio
import json
import os
import shutil

import httpx
import pytest

from jupyter_stream import Request


def chat(prompt: str = "hi"):
    """An OpenAI-style token stream whose model fails midway."""
    import json

    for token in ["Hel", "lo"]:
        chunk = {"id": "c1", "object": "chat.completion.chunk", "created": 0, "model": "m",
                 "choices": [{"index": 0, "delta": {"content": token}, "finish_reason": None}]}
        yield f"data: {json.dumps(chunk)}\n\n"
    raise RuntimeError("the model crashed")


def broken():
    raise ValueError("bad input")
    yield "never"


@pytest.fixture(scope="module")
def server(jstream_start_server):
    return jstream_start_server(["--JupyterStream.min_workers=1"])


@pytest.fixture()
def endpoints(server):
    server.register(chat)
    server.register(broken)
    return server


def test_the_openai_client_raises_the_stream_error(endpoints):
    import openai

    client = openai.OpenAI(base_url=endpoints.url + "stream", api_key=endpoints.token)
    stream = client.post("/chat", body={"prompt": "hi"}, cast_to=object, stream=True, stream_cls=openai.Stream[object])
    seen = []
    with pytest.raises(openai.APIError, match="the model crashed") as raised:
        for chunk in stream:
            seen.append(chunk["choices"][0]["delta"]["content"])
    assert seen == ["Hel", "lo"]
    assert raised.value.body["type"] == "RuntimeError" and "in chat" in raised.value.body["traceback"]


def test_httpx_sse_sees_an_error_event(endpoints):
    from httpx_sse import connect_sse

    with httpx.Client(headers=endpoints.headers, timeout=30) as client:
        with connect_sse(client, "GET", endpoints.url + "stream/chat") as events:
            received = list(events.iter_sse())
    assert [e.event for e in received] == ["message", "message", "error"]
    assert received[-1].json()["error"]["message"] == "the model crashed"


def test_sseclient_and_requests(endpoints):
    import requests
    import sseclient

    response = requests.get(endpoints.url + "stream/chat", headers=endpoints.headers, stream=True, timeout=30)
    received = list(sseclient.SSEClient(response).events())
    assert received[-1].event == "error" and json.loads(received[-1].data)["error"]["type"] == "RuntimeError"
    failed = requests.get(endpoints.url + "stream/broken", headers=endpoints.headers, timeout=30)
    assert failed.status_code == 500 and failed.json()["error"]["message"] == "bad input"
    assert set(failed.json()["error"]) == {"type", "message", "traceback"}


def test_aiohttp(endpoints):
    import aiohttp

    async def read():
        async with aiohttp.ClientSession(headers=endpoints.headers) as session:
            async with session.get(endpoints.url + "stream/chat") as r:
                text = (await r.read()).decode()
            async with session.get(endpoints.url + "stream/broken") as failed:
                return text, failed.status, await failed.json()

    text, status, body = asyncio.run(read())
    error_event = json.loads(text.split("event: error\ndata: ", 1)[1].split("\n\n")[0])
    assert status == 500 and body["error"]["type"] == "ValueError"
    assert error_event["error"]["type"] == "RuntimeError" and set(error_event["error"]) == set(body["error"])


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
EVENTSOURCE_CONNECTING, EVENTSOURCE_OPEN = 0, 1


def in_browser(server, script, path):
    """Run `script` (a JS function of a URL) in headless Chromium, on a page of the server's
    own origin, with the server's URL for `path` (token in the query: EventSource sends no
    headers); returns what the script resolves to."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            # a page of the server's own origin; the API's CSP (connect-src 'none') would block it
            page = browser.new_page(bypass_csp=True)
            page.goto(server.url + f"api/stream/workers?token={server.token}")
            return page.evaluate(script, server.url + f"{path}?token={server.token}")
        finally:
            browser.close()


@pytest.mark.skipif(CHROMIUM is None and not os.environ.get("CI"), reason="Debian's chromium is not installed")
def test_a_browser_eventsource_gets_the_server_event_then_its_own(endpoints):
    """The `error` listener sees the server's event first (a MessageEvent with .data), then
    the browser's own event when the connection closes (no data); we close it there."""
    seen = in_browser(
        endpoints,
        """(url) => new Promise((resolve) => {
            const seen = [];
            const source = new EventSource(url);
            source.addEventListener('error', (event) => {
                seen.push({kind: event.constructor.name, data: event.data === undefined ? null : event.data,
                           readyState: source.readyState});
                if (event.data === undefined) { source.close(); resolve(seen); }
            });
        })""",
        "stream/chat",
    )
    assert seen[0]["kind"] == "MessageEvent" and json.loads(seen[0]["data"])["error"]["message"] == "the model crashed"
    assert seen[0]["readyState"] == EVENTSOURCE_OPEN
    # then the browser's own: the connection closed, and it is about to reconnect (and rerun
    # the endpoint) unless the listener closes it
    assert seen[1] == {"kind": "Event", "data": None, "readyState": EVENTSOURCE_CONNECTING}


def ticker(request: Request, n: int = 6):
    """At most 3 events per connection, then it hangs up: the browser reconnects."""
    from jupyter_stream import sse

    start = int(request.last_event_id) + 1 if request.last_event_id else 0
    for i in range(start, min(start + 3, n)):
        yield sse({"tick": i}, id=i, retry=100)


@pytest.mark.skipif(CHROMIUM is None and not os.environ.get("CI"), reason="Debian's chromium is not installed")
def test_a_browser_eventsource_resumes_from_its_last_event_id(server):
    """A reconnecting EventSource sends Last-Event-ID by itself: the stream goes on where
    it stopped instead of starting over."""
    server.register(ticker)
    ticks = in_browser(
        server,
        """(url) => new Promise((resolve) => {
            const ticks = [];
            const source = new EventSource(url);
            source.onmessage = (event) => {
                ticks.push([JSON.parse(event.data).tick, event.lastEventId]);
                if (ticks.length === 6) { source.close(); resolve(ticks); }
            };
            setTimeout(() => { source.close(); resolve(ticks); }, 15000);
        })""",
        "stream/ticker",
    )
    assert ticks == [[i, str(i)] for i in range(6)]  # 0-2, then 3-5 after the reconnect
