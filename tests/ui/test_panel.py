"""The JupyterLab extension in a real JupyterLab, in headless Chromium (issue 19): the
Streams panel opens from the status bar and from the command palette, shows how to make a
first endpoint, and its pools; the Running panel has a Streams section. Live from the
server's event stream: an endpoint registered in a notebook shows within a second,
streams open go to 1 and back, a running map shows its progress and stops from the
panel, a share made there works until it is revoked there, the card keeps its link and
counters after a kernel restart, and Remove (confirmed) takes the endpoint off the server.
Screenshots in light and dark themes go to test-artifacts/ui/panel-*.png.

The server is the pytest plugin's (`jstream_start_server`), which serves JupyterLab too."""

import json
import re
import threading
import time

import httpx
import nbformat
import pytest

from . import ARTIFACTS, launch_chromium, needs_chromium

pytestmark = needs_chromium

CELLS = [
    "%load_ext jupyter_stream",
    '%%stream_endpoint\nimport time\n\n\ndef ticks(n: int = 10):\n    """Ticks, one every half second."""\n'
    '    for i in range(n):\n        yield f"data: tick {i}\\n\\n"\n        time.sleep(0.5)',
    "%%stream_function\nimport time\n\n\ndef slow_square(i):\n    time.sleep(0.5)\n    return i * i",
    "try:\n    squares = list(slow_square.map(range(60)))\nexcept Exception as e:\n    print('map ended:', type(e).__name__, e)",
]
THEMES = {"light": "JupyterLab Light", "dark": "JupyterLab Dark"}


@pytest.fixture()
def lab(jstream_start_server, tmp_path):
    """A server with jupyter_stream and JupyterLab, one warm worker (two at most), serving
    a notebook of `CELLS`; its user settings in `tmp_path/settings` (no news prompt) and
    its workspaces of its own (no panel left open by an earlier run)."""
    root = tmp_path / "root"
    root.mkdir()
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(c) for c in CELLS]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3 (ipykernel)", "language": "python"}
    nbformat.write(nb, root / "panel.ipynb")
    settings = tmp_path / "settings"
    set_theme(settings, "light")
    news = settings / "@jupyterlab" / "apputils-extension" / "notification.jupyterlab-settings"
    news.write_text('{"fetchNews": "false"}')
    server = jstream_start_server(
        ["--JupyterStream.min_workers=1", "--JupyterStream.max_workers=2", "--LabApp.news_url=None",
         "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"],
        root_dir=str(root), env={"JUPYTERLAB_SETTINGS_DIR": str(settings), "JUPYTERLAB_WORKSPACES_DIR": str(tmp_path / "workspaces")},
    )
    server.settings_dir = settings
    return server


def set_theme(settings, theme):
    path = settings / "@jupyterlab" / "apputils-extension" / "themes.jupyterlab-settings"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"theme": THEMES[theme]}))


def events_answer(server):
    """The status of GET api/stream/events (read no further than the headers)."""
    with httpx.stream("GET", server.url + "api/stream/events", headers=server.headers, timeout=10) as r:
        return r.status_code


def open_lab(page, server, path="lab"):
    page.goto(f"{server.url}{path}?token={server.token}")
    page.locator(".jupyter-stream-status").wait_for(timeout=60_000)


def panel_of(page):
    return page.locator("#jupyter-stream-panel")


def shot(page, name, locator=None):
    (locator or page).screenshot(path=str(ARTIFACTS / f"panel-{name}.png"))


def text_matches(page, selector, pattern, timeout=10_000):
    """Wait until the first `selector`'s text matches the regular expression `pattern`."""
    page.wait_for_function(
        "([s, p]) => new RegExp(p).test(document.querySelector(s)?.textContent || '')", arg=[selector, pattern], timeout=timeout
    )


def test_the_panel_opens_from_the_status_bar_and_the_palette_and_shows_how_to_begin(lab):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = launch_chromium(p)
        page = browser.new_page(viewport={"width": 1400, "height": 900},)
        try:
            open_lab(page, lab)
            # the status bar: nothing served, the warm worker idle
            text_matches(page, ".jupyter-stream-status", r"^0 endpoints · 0/1 workers$", timeout=30_000)
            panel = panel_of(page)
            assert not panel.is_visible()
            page.locator(".jupyter-stream-status").click()
            panel.wait_for(state="visible", timeout=10_000)
            assert panel.locator(".jupyter-stream-panel-header h2").text_content() == "Streams"

            # the empty state: how to make a first endpoint, ready to copy
            empty = panel.locator(".jupyter-stream-empty")
            empty.wait_for(timeout=30_000)
            assert "Nothing is served yet" in empty.text_content()
            example = empty.locator("pre").text_content()
            assert example.startswith("%load_ext jupyter_stream\n\n%%stream_endpoint\n") and "yield f\"data: tick {i}\\n\\n\"" in example
            # the pool of the warm worker, with its requirements and the worker's state
            pool = panel.locator(".jupyter-stream-pool").first
            pool.wait_for(timeout=30_000)
            assert "no GPU" in pool.text_content() and "1–" in pool.locator(".jupyter-stream-figures").text_content()
            worker = pool.locator(".jupyter-stream-worker").first
            assert "idle" in worker.text_content() and re.search(r"RSS \d+(\.\d)? MiB", worker.text_content()), worker.text_content()
            shot(page, "1-empty-light")

            # hidden again (the file browser takes the sidebar), then shown by the palette's command
            page.locator('.jp-SideBar [data-id="filebrowser"]').click()
            panel.wait_for(state="hidden", timeout=10_000)
            page.keyboard.press("Control+Shift+C")
            page.locator(".lm-CommandPalette-input").fill("Streams: Show panel")
            page.locator(".lm-CommandPalette-item", has_text="Streams: Show panel").first.click()
            panel.wait_for(state="visible", timeout=10_000)

            # the Running panel's Streams section lists the worker kernel
            page.locator('.jp-SideBar [data-id="jp-running-sessions"]').click()
            page.locator(".jp-RunningSessions .jp-AccordionPanel-title", has_text=re.compile("^Streams", re.I)).wait_for(timeout=10_000)
            worker = page.locator(".jupyter-stream-running-worker").first
            worker.locator(".jp-RunningSessions-itemLabel").wait_for(timeout=10_000)
            assert re.fullmatch(r"worker-\d+\s*idle", worker.text_content()), worker.text_content()
            shot(page, "2-running-light")
            # Shut Down there stops that kernel; its pool starts another to keep its one warm worker
            first = worker.locator(".jp-RunningSessions-itemLabel").text_content()
            worker.hover()  # the button shows on hover
            worker.locator(".jp-RunningSessions-itemShutdown").click()
            page.wait_for_function(
                "(name) => { const w = [...document.querySelectorAll('.jupyter-stream-running-worker .jp-RunningSessions-itemLabel')]"
                ".map(e => e.textContent); return w.length === 1 && w[0] !== name; }", arg=first, timeout=60_000)
            assert first not in [w["name"] for w in lab.workers()["workers"]]

            # the dark theme: the same panel, readable
            set_theme(lab.settings_dir, "dark")
            page.reload()
            page.locator(".jupyter-stream-status").wait_for(timeout=60_000)
            page.wait_for_function("() => document.body.dataset.jpThemeLight === 'false'", timeout=30_000)
            page.locator(".jupyter-stream-status").click()
            panel.locator(".jupyter-stream-empty").wait_for(timeout=30_000)
            shot(page, "3-empty-dark")
        except Exception:
            page.screenshot(path=str(ARTIFACTS / "panel-failure.png"))
            raise
        finally:
            browser.close()


def save(page):
    """Save the open notebook (File > Save Notebook) and wait until it is."""
    page.get_by_role("menuitem", name="File", exact=True).click()
    page.get_by_role("menuitem", name=re.compile(r"^Save Notebook")).first.click()
    page.locator(".jp-mod-dirty").wait_for(state="detached", timeout=10_000)


def run_cell(page, index):
    """Run cell `index` of the open notebook (and wait until the kernel is idle again)."""
    page.locator(".jp-Notebook .jp-Cell").nth(index).locator(".jp-InputArea-editor").click()
    page.keyboard.press("Control+Enter")
    page.wait_for_timeout(300)
    page.get_by_text(re.compile(r"Python 3 \(ipykernel\) \| Idle")).wait_for(timeout=120_000)


def prompt_of(page, index):
    """The input prompt of cell `index` (`[n]:` once the kernel has run it)."""
    return page.locator(".jp-Notebook .jp-Cell").nth(index).locator(".jp-InputPrompt").text_content() or ""


def run_cell_until(page, index, done, attempts=3, each=30):
    """Run cell `index` (Ctrl+Enter) until `done()`, pressing again after `each` seconds of nothing."""
    for _ in range(attempts):
        page.locator(".jp-Notebook .jp-Cell").nth(index).locator(".jp-InputArea-editor").click()
        page.keyboard.press("Control+Enter")
        deadline = time.monotonic() + each
        while time.monotonic() < deadline:
            if done():
                return
            page.wait_for_timeout(200)
    outputs = page.locator(".jp-Notebook").text_content()
    raise AssertionError(f"cell {index} did not run after {attempts} tries; the notebook shows: {outputs[-2000:]}")


def test_the_panel_and_the_card_live_from_the_event_stream(lab):
    from playwright.sync_api import sync_playwright

    status = events_answer(lab)
    if status == 404:
        pytest.skip("the server has no event stream yet (GET api/stream/events answers 404)")
    assert status == 200, status
    with sync_playwright() as p:
        browser = launch_chromium(p)
        page = browser.new_page(viewport={"width": 1500, "height": 1000})
        try:
            open_lab(page, lab, "lab/tree/panel.ipynb")
            page.get_by_text(re.compile(r"Python 3 \(ipykernel\) \| Idle")).wait_for(timeout=60_000)
            page.locator(".jupyter-stream-status").click()
            panel = panel_of(page)
            panel.locator(".jupyter-stream-connection-live").wait_for(timeout=30_000)

            # an endpoint registered in the notebook shows in the panel within a second
            run_cell(page, 0)
            page.locator(".jp-Notebook .jp-Cell").nth(1).locator(".jp-InputArea-editor").click()
            page.keyboard.press("Control+Enter")
            deadline = time.monotonic() + 60
            while lab.get("api/stream/endpoints/ticks").status_code != 200:
                assert time.monotonic() < deadline, "ticks was not registered"
                time.sleep(0.05)
            registered = time.monotonic()
            item = panel.locator('.jupyter-stream-panel-endpoint[data-name="ticks"]')
            item.wait_for(timeout=1_000)
            shown_after = time.monotonic() - registered
            assert shown_after < 1.0, shown_after
            assert item.locator(".jupyter-stream-item-link").text_content() == lab.url + "stream/ticks"
            assert item.locator(".jupyter-stream-owner").text_content().startswith("panel.ipynb")
            assert panel.locator(".jupyter-stream-empty").count() == 0
            text_matches(page, ".jupyter-stream-status", r"^1 endpoint · ")
            card = page.locator(".jp-Notebook .jupyter-stream-card").first
            card.wait_for(timeout=30_000)

            # a stream open shows as 1, and as 0 again once it ended (panel and card alike)
            body = []
            reader = threading.Thread(target=lambda: body.append(
                httpx.get(lab.url + "stream/ticks?n=6", headers=lab.headers, timeout=60).text))
            reader.start()
            text_matches(page, '#jupyter-stream-panel [data-name="ticks"] .jupyter-stream-open b', r"^1$")
            text_matches(page, ".jupyter-stream-card .jupyter-stream-open_streams", r"streams open: 1")
            shot(page, "4-streaming-light")
            reader.join(30)
            assert body and body[0].count("data: tick") == 6
            text_matches(page, '#jupyter-stream-panel [data-name="ticks"] .jupyter-stream-open b', r"^0$")
            text_matches(page, '#jupyter-stream-panel [data-name="ticks"] .jupyter-stream-requests b', r"^1$")
            text_matches(page, ".jupyter-stream-card .jupyter-stream-counters", r"streams open: 0 · requests: 1 · errors: 0")

            # a running map: its progress in the panel, and Stop ends it
            run_cell(page, 2)
            page.locator(".jp-Notebook .jp-Cell").nth(3).locator(".jp-InputArea-editor").click()
            page.keyboard.press("Control+Enter")
            call = panel.locator('[data-name="slow_square"] .jupyter-stream-call-map')
            call.wait_for(timeout=60_000)
            text_matches(page, '[data-name="slow_square"] .jupyter-stream-call-count', r"^[1-9]\d*/60 done$", timeout=30_000)
            width = call.locator(".jupyter-stream-progress-fill").evaluate("e => parseFloat(e.style.width)")
            assert 0 < width < 100, width
            shot(page, "5-map-light")
            call.locator(".jupyter-stream-stop").click()
            call.wait_for(state="detached", timeout=15_000)
            page.get_by_text(re.compile(r"Python 3 \(ipykernel\) \| Idle")).wait_for(timeout=60_000)
            assert "map ended:" in page.locator(".jp-Notebook .jp-Cell").nth(3).locator(".jp-OutputArea").text_content()

            # a share made in the panel: its links work until it is revoked there
            item.locator(".jupyter-stream-panel-share").click()
            shared = item.locator(".jupyter-stream-panel-share-item")
            shared.locator(".jupyter-stream-share-stream code").wait_for(timeout=10_000)
            link = shared.locator(".jupyter-stream-share-stream code").text_content()
            assert re.fullmatch(rf"{re.escape(lab.url)}stream/ticks\?share=[\w-]{{43}}", link), link
            assert httpx.get(link.replace("?share=", "?n=1&share="), timeout=30).text == "data: tick 0\n\n"
            shot(page, "6-share-light", panel)
            shared.locator(".jupyter-stream-panel-revoke").click()
            shared.wait_for(state="detached", timeout=10_000)
            assert httpx.get(link, timeout=30).status_code == 403

            # after a kernel restart the card still has its link and counters (nothing of it is in the kernel)
            page.get_by_role("menuitem", name="Kernel", exact=True).click()
            page.get_by_role("menuitem", name=re.compile(r"^Restart Kernel…")).first.click()
            page.locator(".jp-Dialog .jp-mod-accept").click()
            page.get_by_text(re.compile(r"Python 3 \(ipykernel\) \| Idle")).wait_for(timeout=60_000)
            page.wait_for_timeout(1500)
            card = page.locator(".jp-Notebook .jupyter-stream-card").first
            assert card.locator("a.jupyter-stream-url").get_attribute("href") == "/stream/ticks"
            text_matches(page, ".jupyter-stream-card .jupyter-stream-counters", r"requests: [1-9]")
            assert "model not found" not in page.locator(".jp-Notebook").text_content()
            shot(page, "7-after-restart-light", card)

            # Remove, confirmed: gone from the panel and the server, the card struck out
            item.locator(".jupyter-stream-remove").click()
            page.locator(".jp-Dialog .jp-mod-warn", has_text="Remove").click()
            item.wait_for(state="detached", timeout=10_000)
            assert lab.get("stream/ticks").status_code == 404
            card.locator(".jupyter-stream-removed").wait_for(timeout=10_000)
            assert card.locator(".jupyter-stream-try").is_disabled() and card.locator(".jupyter-stream-share").is_disabled()
            assert card.locator("del.jupyter-stream-url").text_content() == lab.url + "stream/ticks"
            shot(page, "8-removed-light")

            # saved and reopened, in the dark theme: the card is drawn from the saved output
            save(page)
            set_theme(lab.settings_dir, "dark")
            page.reload()
            page.wait_for_function("() => document.body.dataset.jpThemeLight === 'false'", timeout=60_000)
            panel.wait_for(state="visible", timeout=30_000)
            card = page.locator(".jp-Notebook .jupyter-stream-card").first
            card.locator(".jupyter-stream-removed").wait_for(timeout=30_000)
            assert page.locator(".jupyter-stream-map-failed .jupyter-stream-summary").text_content().startswith("slow_square.map: ")
            page.wait_for_timeout(500)
            shot(page, "9-reopened-dark")
        except Exception:
            page.screenshot(path=str(ARTIFACTS / "panel-failure.png"))
            raise
        finally:
            browser.close()


def test_the_card_and_the_panel_in_notebook_7(lab):
    from playwright.sync_api import sync_playwright

    pytest.importorskip("notebook", reason="Notebook 7 is not installed (pip install notebook)")
    with sync_playwright() as p:
        browser = launch_chromium(p)
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        try:
            page.goto(f"{lab.url}notebooks/panel.ipynb?token={lab.token}")
            page.locator(".jp-Notebook .jp-Cell").first.wait_for(timeout=60_000)
            page.locator(".jp-NotebookKernelStatus-idle, [data-status='idle']").first.wait_for(timeout=60_000)
            # each cell run until the kernel has run it (a key press made while the page is still
            # connecting its kernel can be lost: pressed again, which these two cells allow)
            run_cell_until(page, 0, lambda: re.search(r"\[\d+\]", prompt_of(page, 0)))
            run_cell_until(page, 1, lambda: lab.get("api/stream/endpoints/ticks").status_code == 200)
            # the card, drawn by the extension: the link from the page's own base URL, live counters
            card = page.locator(".jp-Notebook .jupyter-stream-card").first
            card.wait_for(timeout=60_000)
            assert card.locator("a.jupyter-stream-url").get_attribute("href") == "/stream/ticks"
            text_matches(page, ".jupyter-stream-card .jupyter-stream-counters", r"^streams open: 0 · requests: 0 · errors: 0$", timeout=30_000)
            card.locator(".jupyter-stream-try").click()
            page.wait_for_function("() => document.querySelectorAll('.jupyter-stream-event').length >= 2", timeout=30_000)
            # the panel, from the palette
            page.keyboard.press("Escape")
            page.keyboard.press("Control+Shift+C")
            page.locator(".lm-CommandPalette-input").fill("Streams: Show panel")
            page.locator(".lm-CommandPalette-item", has_text="Streams: Show panel").first.click()
            panel = panel_of(page)
            panel.wait_for(state="visible", timeout=10_000)
            panel.locator('.jupyter-stream-panel-endpoint[data-name="ticks"]').wait_for(timeout=10_000)
            page.wait_for_timeout(500)
            shot(page, "10-notebook7-light")
        except Exception:
            page.screenshot(path=str(ARTIFACTS / "panel-notebook7-failure.png"))
            print("the notebook showed:", page.locator("body").text_content()[-3000:])
            raise
        finally:
            browser.close()
