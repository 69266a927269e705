"""The endpoint card in a real JupyterLab, in headless Chromium (issue 18.3 and 18.4): "Try
it" takes the parameters from a form built from the signature, counts its request and
shows SSE events parsed and NDJSON rows as rows; "Share" shows its links whole with a copy
button, names the share it made and its expiry as the demo page does; after `delete()`
the buttons are disabled and the links struck out. Screenshots in test-artifacts/ui/."""

import re

import httpx
import nbformat
import pytest

from . import ARTIFACTS, launch_chromium, needs_chromium
from .test_lab import start_lab

pytestmark = needs_chromium

CELLS = [
    "%load_ext jupyter_stream\nfrom jupyter_stream import sse",
    '%%stream_endpoint\nimport time\n\n\ndef hello(name: str, times: int = 1):\n    """Greets `name`, `times` times."""\n'
    "    for i in range(times):\n"
    '        yield sse({"greeting": f"hello {name}", "i": i}, event="greeting", id=str(i))\n'
    "        time.sleep(0.2)",
    "%%stream_endpoint --media-type application/x-ndjson\ndef squares(n: int = 3):\n    for i in range(n):\n"
    '        yield {"i": i, "square": i * i}',
]


@pytest.fixture()
def lab(tmp_path):
    notebook = tmp_path / "cards.ipynb"
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(c) for c in CELLS]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3 (ipykernel)", "language": "python"}
    nbformat.write(nb, notebook)
    yield from start_lab(tmp_path, notebook)


def cell_texts(card, selector):
    return card.locator(selector).all_text_contents()


def test_try_it_form_share_links_and_a_deleted_endpoints_card(lab):
    from playwright.sync_api import sync_playwright

    url, token = lab
    headers = {"Authorization": f"token {token}"}
    with sync_playwright() as p:
        browser = launch_chromium(p)
        context = browser.new_context(viewport={"width": 1400, "height": 1100}, permissions=["clipboard-read", "clipboard-write"])
        page = context.new_page()
        try:
            page.goto(f"{url}lab/tree/cards.ipynb?token={token}")
            page.get_by_text(re.compile(r"Python 3 \(ipykernel\) \| Idle")).wait_for(timeout=60_000)
            page.get_by_role("menuitem", name="Run", exact=True).click()
            page.get_by_role("menuitem", name="Run All Cells", exact=True).click()
            page.wait_for_selector(".jupyter-stream-card >> nth=1", timeout=60_000)
            hello, squares = page.locator(".jupyter-stream-card").nth(0), page.locator(".jupyter-stream-card").nth(1)

            # a form from the signature: name (required, empty) and times (its default)
            name, times = hello.locator(".jupyter-stream-field-name input"), hello.locator(".jupyter-stream-field-times input")
            assert name.input_value() == "" and name.get_attribute("placeholder") == "required"
            assert times.input_value() == "1"
            name.fill("Ada")
            times.fill("3")
            hello.locator(".jupyter-stream-try").click()
            page.wait_for_function("() => document.querySelectorAll('.jupyter-stream-event').length === 3"
                                   " && /stream ended/.test(document.querySelector('.jupyter-stream-note')?.textContent)",
                                   timeout=30_000)
            rows = [cell_texts(row, "td") for row in hello.locator(".jupyter-stream-event").all()]
            assert rows == [["greeting", str(i), f'{{"greeting":"hello Ada","i":{i}}}'] for i in range(3)], rows
            assert "data:" not in hello.locator(".jupyter-stream-events").text_content()  # parsed, not the framing
            note = hello.locator(".jupyter-stream-note").text_content()
            assert "GET /stream/hello?name=Ada&times=3 → 200" in note and "3 events" in note, note
            # it counts its request, as the server does
            page.wait_for_function("() => /requests: 1/.test(document.querySelector('.jupyter-stream-counters').textContent)",
                                   timeout=10_000)
            info = httpx.get(url + "api/stream/endpoints/hello", headers=headers, timeout=10).json()
            assert info["stats"]["requests"] == 1, info["stats"]
            hello.screenshot(path=str(ARTIFACTS / "card-1-try-sse.png"))

            # NDJSON rows are rows of a table
            squares.locator(".jupyter-stream-field-n input").fill("4")
            squares.locator(".jupyter-stream-try").click()
            page.wait_for_function("() => document.querySelectorAll('.jupyter-stream-row').length === 4", timeout=30_000)
            assert cell_texts(squares, "th") == ["i", "square"]
            assert [cell_texts(row, "td") for row in squares.locator(".jupyter-stream-row").all()] == [
                [str(i), str(i * i)] for i in range(4)]
            squares.screenshot(path=str(ARTIFACTS / "card-2-try-ndjson.png"))

            # a share: its links whole, each with a copy button; the hint names this share
            hello.locator(".jupyter-stream-share").click()
            page.wait_for_selector(".jupyter-stream-share-stream code", timeout=30_000)
            stream_link = hello.locator(".jupyter-stream-share-stream code").text_content()
            demo_link = hello.locator(".jupyter-stream-share-demo code").text_content()
            assert re.fullmatch(rf"{re.escape(url)}stream/hello\?share=[\w-]{{43}}", stream_link), stream_link
            hello.locator(".jupyter-stream-share-stream .jupyter-stream-copy").click()
            assert page.evaluate("navigator.clipboard.readText()") == stream_link
            share_id = hello.locator(".jupyter-stream-share-id").text_content()
            assert hello.locator(".jupyter-stream-revoke").text_content() == f"jupyter_stream.Share.lookup('{share_id}').revoke()"
            shares = httpx.get(url + "api/stream/shares", params={"endpoint": "hello"}, headers=headers, timeout=10).json()["shares"]
            assert [s["id"] for s in shares] == [share_id]
            assert httpx.get(stream_link + "&name=Bo", timeout=10).text.startswith("event: greeting\nid: 0\n")
            # the expiry reads as on the demo page: local time with its zone (and its date when
            # that is another day: a link made within the hour before midnight)
            expires = hello.locator(".jupyter-stream-expires").text_content()
            assert re.fullmatch(r"([A-Z][a-z]{2} \d{1,2}, )?\d\d:\d\d UTC([+-]\d+(:\d\d)?)?", expires), expires
            demo = context.new_page()
            demo.goto(demo_link)
            chips = demo.locator("#chips").text_content()
            assert re.search(rf"expires in (60|59) min, {re.escape(expires)}$", chips), (chips, expires)
            demo.screenshot(path=str(ARTIFACTS / "card-3-share-demo-page.png"))
            demo.close()
            hello.screenshot(path=str(ARTIFACTS / "card-3-share.png"))

            # delete() in a new cell: Share and Try it disabled, every old link struck out
            page.locator(".jp-Cell").last.locator(".jp-InputPrompt").click()
            page.keyboard.press("Escape")
            page.keyboard.press("b")
            page.keyboard.press("Enter")  # into the new cell's editor
            page.keyboard.type("hello.delete()")
            page.keyboard.press("Shift+Enter")
            hello.locator(".jupyter-stream-removed").wait_for(timeout=30_000)
            assert hello.locator(".jupyter-stream-try").is_disabled() and hello.locator(".jupyter-stream-share").is_disabled()
            assert hello.locator("a").count() == 0 and hello.locator(".jupyter-stream-copy").count() == 0
            struck = hello.locator("del").all_text_contents()
            assert url + "stream/hello" in struck and "demo page" in struck and stream_link in struck and demo_link in struck, struck
            assert "these links stopped working" in hello.locator(".jupyter-stream-shared").text_content()
            hello.screenshot(path=str(ARTIFACTS / "card-4-deleted.png"))
            assert not squares.locator(".jupyter-stream-try").is_disabled()  # the other card lives on
        except Exception:
            page.screenshot(path=str(ARTIFACTS / "card-failure.png"))
            raise
        finally:
            browser.close()
