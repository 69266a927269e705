"""The endpoint demo page (`/stream/<name>/demo`) in headless Chromium with a fresh profile:
a share link opens it without any Jupyter cookie; a field is filled, Run streams events
one by one, Stop ends the stream on the server; data with markup is shown as text; a bad
field, a failing function, NDJSON, text, an image, bytes and a JSON body each show as
they should; a revoked link says so. Screenshots are kept in test-artifacts/ui/demo-*.png."""

import os
import re
import sys
import time

import pytest

from . import ARTIFACTS, launch_chromium, needs_chromium

pytestmark = needs_chromium


# ---- the endpoints (sent to the workers by value) ----

def ticks(n: int = 5, label: str = "tick", tags: list[str] = ["sensor", "lab"], loud: bool = False, pace: float = 0.3):  # noqa: B006
    """Count to `n`, one server-sent event every `pace` seconds.

    Each event is a JSON object with the count, the label and the tags."""
    import time

    for i in range(n):
        yield {"i": i, "label": label.upper() if loud else label, "tags": tags}
        time.sleep(pace)


def markup():
    """Data that looks like HTML: it must show as text."""
    yield "data: <script>alert(1)</script>\n\n"
    yield {"html": "<img src=x onerror=alert(2)>", "note": "</pre><b>bold?</b>"}


def flaky(n: int = 2):
    """Reads a sensor, which fails after `n` readings."""
    for i in range(n):
        yield {"reading": i, "celsius": 21.5 + i}
    raise ValueError("the sensor is unplugged")


def broken():
    raise RuntimeError("the model file is missing")
    yield  # a generator that never yields


def rows(n: int = 4):
    """One JSON line per city."""
    import time

    cities = ["Lisbon", "Oslo", "Nairobi", "Lima", "Osaka", "Perth"]
    for i in range(n):
        yield {"city": cities[i % len(cities)], "rank": i + 1, "ok": True, "note": None}
        time.sleep(0.1)


def story(lines: int = 3):
    """A few lines of plain text."""
    import time

    for i in range(lines):
        yield f"line {i + 1}: the quick brown fox <jumps> over the lazy dog & friends\n"
        time.sleep(0.1)


def swatch(width: int = 240, height: int = 120):
    """A colour gradient as a PNG, sent in pieces."""
    import struct
    import zlib

    raw = b"".join(
        b"\x00" + bytes(v for x in range(width) for v in (x * 255 // width, y * 255 // height, 190)) for y in range(height)
    )

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))
    for i in range(0, len(png), 1000):
        yield png[i:i + 1000]


def blob(kib: int = 64):
    """`kib` KiB of bytes, 8 KiB at a time."""
    import time

    for _ in range(kib // 8):
        yield bytes(range(256)) * 32
        time.sleep(0.05)


def greet(data: dict, times: int = 2):
    """Greets the person named in the JSON body, `times` times."""
    for i in range(times):
        yield {"greeting": f"Hello, {data.get('name', 'stranger')}!", "n": i + 1}


def labelled(start: int | None = None, weights: list[float] = [0.5, 1.5]):  # noqa: B006
    """Named events with ids, multi-line data, an optional int and a list of floats."""
    from jupyter_stream import sse

    yield sse("line one\nline two", event="note", id="7")
    yield sse({"start": start, "weights": weights}, event="progress", id="8")


def summary():
    """A plain value: one JSON response."""
    return {"count": 12345678901234567890, "ratio": 2.0, "cities": ["Lisbon", "Oslo", "Nairobi", "Lima", "Osaka", "Perth"],
            "empty": {}}


ENDPOINTS = [
    (labelled, None), (summary, None), (ticks, None), (markup, None), (flaky, None), (broken, None), (rows, "application/x-ndjson"),
    (story, "text/plain"), (swatch, "image/png"), (blob, "application/octet-stream"), (greet, None),
]


@pytest.fixture(scope="module")
def server(jstream_start_server):
    import cloudpickle

    from jupyter_stream.client.endpoints import register_endpoint

    server = jstream_start_server(["--JupyterStream.min_workers=1", "--JupyterStream.max_workers=2"])
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    try:
        for fn, media_type in ENDPOINTS:
            register_endpoint(fn, fn.__name__, media_type, connection=server.connection)
    finally:
        cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
    return server


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = launch_chromium(p)
        yield browser
        browser.close()


@pytest.fixture()
def page(browser, request):
    """A page in a fresh context (a profile with no cookies); a screenshot if the test fails."""
    context = browser.new_context(viewport={"width": 1366, "height": 860})
    page = context.new_page()
    page.dialogs = []
    page.errors = []
    page.on("dialog", lambda d: (page.dialogs.append(d.message), d.dismiss()))
    page.on("pageerror", lambda e: page.errors.append(str(e)))
    failed = request.session.testsfailed
    yield page
    if request.session.testsfailed > failed:
        page.screenshot(path=str(ARTIFACTS / f"demo-failure-{request.node.name}.png"))
    assert page.errors == [], page.errors
    context.close()


def share(server, name):
    return server.connection.request("POST", "api/stream/shares", json={"endpoint": name, "expires": "1h"}).json()


def shot(page, name):
    time.sleep(0.2)  # the last entry's arrival animation
    page.screenshot(path=str(ARTIFACTS / f"demo-{name}.png"))


def status(page):
    return page.locator("#pill-text").text_content()


def wait_status(page, *texts, timeout=30_000):
    page.wait_for_function(
        "(texts) => texts.includes(document.getElementById('pill-text').textContent)", arg=list(texts), timeout=timeout
    )
    return status(page)


def open_streams(server, name):
    return server.get(f"api/stream/endpoints/{name}").json()["stats"]["open_streams"]


def test_shared_demo_streams_stops_and_says_when_revoked(server, page):
    link = share(server, "ticks")
    page.goto(link["demo_url"])
    page.locator("h1#name").wait_for()
    assert page.locator("h1#name").text_content() == "ticks"
    assert "Count to n, one server-sent event every pace seconds." in page.locator("#doc").text_content()
    assert page.locator("#doc code").all_text_contents() == ["n", "pace"]  # `n` in the docstring
    chips = page.locator("#chips").text_content()
    assert "text/event-stream" in chips and "Shared link" in chips and "expires in" in chips, chips
    # the form: the signature's types and defaults
    assert page.input_value("#f-n") == "5" and page.input_value("#f-label") == "tick"
    assert page.input_value("#f-tags") == "sensor, lab" and page.input_value("#f-pace") == "0.3"
    assert not page.is_checked("#f-loud")
    # a fresh profile: no Jupyter login cookie, only the share's own
    assert not [c for c in page.context.cookies() if c["name"].startswith("username")], page.context.cookies()
    shot(page, "1-opened")

    page.fill("#f-n", "12")
    page.fill("#f-label", "reading")
    page.click("#f-loud + .track")
    page.click("#run")
    counts, deadline = [], time.monotonic() + 20
    while time.monotonic() < deadline:
        counts.append(page.locator("#out .ev").count())
        if counts[-1] >= 6:
            break
        time.sleep(0.1)
    shot(page, "2-streaming")
    grown = sorted(set(c for c in counts if c > 0))
    assert len(grown) >= 4 and grown == sorted(grown), f"events did not arrive one by one: {counts}"
    assert status(page) == "Streaming"
    first = page.locator("#out .ev pre").first.text_content()
    assert '"label": "READING"' in first and '"tags": ["sensor", "lab"]' in first, first
    assert "n=12" in page.locator("#req-path").text_content() and "…" in page.locator("#req-path").text_content()
    assert open_streams(server, "ticks") == 1

    page.click("#stop")
    assert wait_status(page, "Stopped") == "Stopped"
    stopped_at = page.locator("#out .ev").count()
    assert 6 <= stopped_at < 12
    deadline = time.monotonic() + 10
    while open_streams(server, "ticks") != 0 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert open_streams(server, "ticks") == 0
    time.sleep(0.8)
    assert page.locator("#out .ev").count() == stopped_at  # nothing arrives after Stop
    assert "You stopped the stream" in page.locator("#out").text_content()
    assert page.locator("#run").is_enabled() and page.locator("#stop").is_disabled()
    shot(page, "3-stopped")

    # a reload without the query rides the share's cookie
    page.goto(link["demo_url"].split("?")[0])
    page.fill("#f-n", "2")
    page.fill("#f-pace", "0")
    page.click("#run")
    assert wait_status(page, "Done", "Failed") == "Done"
    assert page.locator("#out .ev").count() == 2

    server.connection.request("DELETE", f"api/stream/shares/{link['id']}")
    page.click("#run")
    assert wait_status(page, "Done", "Failed") == "Failed"
    banner = page.locator("#out .banner").text_content()
    assert "This share link no longer works" in banner and "revoked" in banner, banner
    assert "403" in page.locator("#req-code").text_content()
    assert "Shared link · no longer works" in page.locator("#chips").text_content()
    shot(page, "4-revoked")


def test_markup_in_event_data_is_shown_as_text(server, page):
    page.goto(share(server, "markup")["demo_url"])
    assert page.locator(".noparams").text_content() == "This endpoint takes no parameters."
    page.click("#run")
    assert wait_status(page, "Done", "Failed") == "Done"
    texts = page.locator("#out .ev pre").all_text_contents()
    assert texts[0] == "<script>alert(1)</script>", texts
    assert '"html": "<img src=x onerror=alert(2)>"' in texts[1] and "</pre><b>bold?</b>" in texts[1], texts
    assert page.evaluate("() => document.querySelectorAll('#out script, #out img, #out b').length") == 0
    time.sleep(0.3)
    assert page.dialogs == []
    shot(page, "5-markup-as-text")


def test_errors_show_next_to_the_field_or_at_the_end(server, page):
    page.goto(share(server, "ticks")["demo_url"])
    page.fill("#f-n", "many")
    page.click("#run")
    assert wait_status(page, "Done", "Failed") == "Failed"
    field = page.locator(".field.invalid")
    assert field.count() == 1 and field.locator(".pname").text_content() == "n"
    assert field.locator(".ferr").text_content() == "parameter 'n' must be int, got 'many'"
    assert "400" in page.locator("#out .banner .title").text_content()
    shot(page, "6-bad-field")
    page.fill("#f-n", "1")  # typing clears the mark
    assert page.locator(".field.invalid").count() == 0

    page.goto(share(server, "flaky")["demo_url"])
    page.fill("#f-n", "3")
    page.click("#run")
    assert wait_status(page, "Done", "Failed") == "Failed"
    assert page.locator("#out .ev:not(.error)").count() == 3
    error = page.locator("#out .ev.error")
    assert error.count() == 1 and "ValueError: the sensor is unplugged" in error.text_content()
    error.locator("summary").click()
    assert "Traceback" in error.text_content() and "flaky" in error.locator("details pre").text_content()
    shot(page, "7-error-event")

    page.goto(share(server, "broken")["demo_url"])
    page.click("#run")
    assert wait_status(page, "Done", "Failed") == "Failed"
    banner = page.locator("#out .banner")
    assert "500 The endpoint failed" in banner.locator(".title").text_content()
    assert "RuntimeError: the model file is missing" in banner.locator(".msg").text_content()
    banner.locator("summary").click()
    shot(page, "8-failed-500")


def test_ndjson_text_image_and_bytes(server, page):
    page.goto(share(server, "rows")["demo_url"])
    page.fill("#f-n", "6")
    page.click("#run")
    assert wait_status(page, "Done", "Failed") == "Done"
    assert page.locator("#out .row").count() == 6
    assert page.locator("#out .row pre").first.text_content() == '{"city": "Lisbon", "rank": 1, "ok": true, "note": null}'
    assert "6 rows" in page.locator("#stats").text_content()
    shot(page, "9-ndjson")

    page.goto(share(server, "story")["demo_url"])
    page.click("#run")
    assert wait_status(page, "Done", "Failed") == "Done"
    text = page.locator("#out pre.text").text_content()
    assert text.count("the quick brown fox <jumps> over the lazy dog & friends") == 3, text
    shot(page, "10-text")

    page.goto(share(server, "swatch")["demo_url"])
    page.fill("#f-width", "320")
    page.click("#run")
    assert wait_status(page, "Done", "Failed") == "Done"
    img = page.locator("#out img")
    img.wait_for()
    page.wait_for_function("() => document.querySelector('#out img').naturalWidth > 0")
    assert img.evaluate("i => [i.naturalWidth, i.naturalHeight]") == [320, 120]
    assert img.get_attribute("src").startswith("blob:")
    assert page.locator("#out a.download").get_attribute("download") == "swatch.png"
    shot(page, "11-image")

    page.goto(share(server, "blob")["demo_url"])
    page.fill("#f-kib", "96")
    page.click("#run")
    seen = set()
    while status(page) not in ("Done", "Failed"):
        seen.add(page.locator("#out .bytes .count").text_content() if page.locator("#out .bytes .count").count() else "")
        time.sleep(0.05)
    assert status(page) == "Done"
    assert len(seen - {""}) >= 3, f"the byte count did not move: {seen}"  # live, not only at the end
    assert page.locator("#out .bytes .count").text_content() == "96.0 kB"
    link = page.locator("#out a.download")
    assert link.get_attribute("download") == "blob.bin" and "96.0 kB" in link.text_content()
    with page.expect_download() as download:
        link.click()
    assert os.path.getsize(download.value.path()) == 96 * 1024
    shot(page, "12-bytes")


def test_with_the_server_token_a_json_body_is_posted(server, page):
    page.goto(f"{server.url}stream/greet/demo?token={server.token}")
    assert "Jupyter session" in page.locator("#chips").text_content()
    assert page.locator("#f-data").evaluate("t => t.tagName") == "TEXTAREA"
    page.fill("#f-data", '{"name": "Ada <Lovelace>"}')
    page.fill("#f-times", "3")
    page.click("#run")
    assert wait_status(page, "Done", "Failed") == "Done"
    assert page.locator("#req-method").text_content() == "POST"
    events = page.locator("#out .ev pre").all_text_contents()
    assert events == [f'{{"greeting": "Hello, Ada <Lovelace>!", "n": {i}}}' for i in (1, 2, 3)], events
    page.click("summary:has-text('Call it from a terminal')")
    curl = page.locator("#curl").text_content()
    assert "-d '{\"name\": \"Ada <Lovelace>\"}'" in curl and "times=3" in curl, curl
    shot(page, "13-post-json-body")
    page.set_viewport_size({"width": 760, "height": 1100})  # one column on a narrow window
    shot(page, "14-narrow")

    page.fill("#f-data", '{"name": ')
    page.click("#run")
    assert re.match(r"not valid JSON", page.locator(".field.invalid .ferr").text_content())


def test_named_events_multiline_data_optional_and_list_fields(server, page):
    page.goto(share(server, "labelled")["demo_url"])
    assert page.input_value("#f-start") == "" and page.get_attribute("#f-start", "placeholder") == "None"
    assert page.input_value("#f-weights") == "0.5, 1.5"
    page.click("#run")
    assert wait_status(page, "Done", "Failed") == "Done"
    metas = page.locator("#out .ev .meta").all_text_contents()
    assert metas[0].startswith("#1noteid 7") and metas[1].startswith("#2progressid 8"), metas
    texts = page.locator("#out .ev pre").all_text_contents()
    assert texts == ["line one\nline two", '{"start": null, "weights": [0.5, 1.5]}'], texts

    page.fill("#f-start", "4")
    page.fill("#f-weights", "0.25, 2")
    page.click("#run")
    assert wait_status(page, "Done", "Failed") == "Done"
    assert page.locator("#out .ev pre").nth(1).text_content() == '{"start": 4, "weights": [0.25, 2.0]}'
    assert "start=4&weights=0.25&weights=2" in page.locator("#req-path").text_content()
    shot(page, "15-named-events")


def test_a_json_value_is_laid_out_as_sent(server, page):
    page.goto(share(server, "summary")["demo_url"])
    page.click("#run")
    assert wait_status(page, "Done", "Failed") == "Done"
    assert "application/json" in page.locator("#req-code").text_content()
    text = page.locator("#out pre.text").text_content()
    # indented (too long for a line), with the numbers as the server wrote them
    assert text.startswith('{\n  "count": 12345678901234567890,\n  "ratio": 2.0,\n  "cities": [\n    "Lisbon",'), text
    assert text.endswith('  "empty": {}\n}'), text
    shot(page, "16-json-value")
