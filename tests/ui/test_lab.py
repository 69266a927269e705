"""In a real JupyterLab, in headless Chromium: the map progress bar advances and ends with
the failure count, the endpoint card links to the endpoint, "Try it" streams events
into the page, and "Share" makes a link that works without the login. Screenshots of each step are kept in test-artifacts/ui/."""

import os
import re
import shutil
import subprocess
import sys
import time

import httpx
import pytest

from jupyter_stream.pytest_plugin import free_port

from . import ARTIFACTS, REPO, launch_chromium, needs_chromium

pytestmark = needs_chromium


def start_lab(tmp_path, notebook):
    """JupyterLab with jupyter_stream (two warm workers) serving a copy of `notebook`; yields
    its URL and token, and stops it after."""
    root = tmp_path / "root"
    root.mkdir()
    shutil.copy(notebook, root / notebook.name)
    # user settings of this lab only: no "Jupyter news?" prompt over the screenshots
    notification = tmp_path / "settings" / "@jupyterlab" / "apputils-extension" / "notification.jupyterlab-settings"
    notification.parent.mkdir(parents=True)
    notification.write_text('{"fetchNews": "false"}')
    port, token = free_port(), "labtoken"
    env = {k: v for k, v in os.environ.items() if not k.startswith("JUPYTER_STREAM_")}
    env["JUPYTER_RUNTIME_DIR"] = str(tmp_path / "runtime")
    env["JUPYTERLAB_SETTINGS_DIR"] = str(tmp_path / "settings")
    log = open(tmp_path / "lab.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "jupyterlab", "--no-browser", "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={port}",
         f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}", "--ServerApp.allow_root=True",
         "--JupyterStream.min_workers=2", "--JupyterStream.max_workers=2",
         "--LabApp.news_url=None", "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"],
        stdout=log, stderr=subprocess.STDOUT, env=env, cwd=tmp_path,
    )
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 90
    while True:
        try:
            if httpx.get(url + "api/stream/workers", headers={"Authorization": f"token {token}"}, timeout=2).status_code == 200:
                break
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError((tmp_path / "lab.log").read_text())
        time.sleep(0.2)
    yield url, token
    proc.terminate()
    proc.wait(30)
    log.close()


@pytest.fixture()
def lab(tmp_path):
    """JupyterLab with jupyter_stream, serving a copy of notebooks/progress.ipynb."""
    yield from start_lab(tmp_path, REPO / "notebooks" / "progress.ipynb")


def bar_percent(page):
    """The progress bar's fill, in percent, read from the page."""
    return page.evaluate(
        """() => {
            const bar = document.querySelector('.jupyter-stream-progress .progress-bar');
            return bar ? parseFloat(bar.style.width || '0') : -1;
        }"""
    )


def test_progress_and_endpoint_card_in_jupyterlab(lab):
    from playwright.sync_api import sync_playwright

    url, token = lab
    with sync_playwright() as p:
        browser = launch_chromium(p)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        try:
            page.goto(f"{url}lab/tree/progress.ipynb?token={token}")
            page.wait_for_selector(".jp-Notebook .jp-Cell", timeout=60_000)
            page.get_by_text(re.compile(r"Python 3 \(ipykernel\) \| Idle")).wait_for(timeout=60_000)
            page.screenshot(path=str(ARTIFACTS / "1-opened.png"))

            page.get_by_role("menuitem", name="Run", exact=True).click()
            page.get_by_role("menuitem", name="Run All Cells", exact=True).click()

            page.wait_for_selector(".jupyter-stream-progress", timeout=60_000)
            samples, texts = [], []
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                samples.append(bar_percent(page))
                texts.append(page.evaluate("() => document.querySelector('.jupyter-stream-summary')?.textContent || ''"))
                if len(samples) == 8:
                    page.screenshot(path=str(ARTIFACTS / "2-map-running.png"))
                if samples[-1] >= 100:
                    break
                time.sleep(0.5)
            running = [s for s in samples if 0 < s < 100]
            assert len(set(running)) >= 3, f"the bar did not advance while the map ran: {samples}"
            assert running == sorted(running)
            # mid-run, the summary says how many items run on the two workers and how many wait
            running_counts = [int(m.group(1)) for t in texts if (m := re.search(r"· (\d+) running", t))]
            assert max(running_counts[1:], default=0) >= 1 and all(n <= 2 for n in running_counts[1:]), texts

            summary = page.locator(".jupyter-stream-summary").first
            summary.wait_for(timeout=30_000)
            page.wait_for_function(
                "() => /succeeded$/.test(document.querySelector('.jupyter-stream-summary')?.textContent || '')", timeout=30_000
            )
            text = summary.text_content()
            assert "render_frame.map: 200/200 done" in text and "2 failed" in text and "7 retried" in text, text
            # return_exceptions=True: two items failed, the map did not: partly done, not red
            assert text.endswith("◐ 198 of 200 succeeded"), text
            assert page.locator(".jupyter-stream-progress .progress-bar-warning").count() == 1
            assert bar_percent(page) == 100
            page.screenshot(path=str(ARTIFACTS / "3-map-done.png"))

            link = page.locator("a.jupyter-stream-url").first
            link.wait_for(timeout=60_000)
            href = link.get_attribute("href")
            assert href == "/stream/ticker" and link.get_attribute("target") == "_blank"  # the page's own origin
            # Lab is open at 127.0.0.1: the link resolves there and rides the login cookie (no token in it)
            absolute = link.evaluate("a => a.href")
            assert absolute == f"{url}stream/ticker", absolute
            opened = page.evaluate(
                """async (href) => {
                    const controller = new AbortController();
                    const r = await fetch(href, {signal: controller.signal});
                    const first = await r.body.getReader().read();
                    controller.abort();
                    return [r.status, new TextDecoder().decode(first.value)];
                }""",
                absolute,
            )
            assert opened[0] == 200 and opened[1].startswith("data: tick"), opened
            assert "curl --no-buffer" in page.locator(".jupyter-stream-curl").first.text_content()

            page.click(".jupyter-stream-try")
            page.wait_for_function(
                "() => /tick 2/.test(document.querySelector('.jupyter-stream-event:nth-child(3)')?.textContent || '')", timeout=30_000
            )
            page.screenshot(path=str(ARTIFACTS / "4-try-it.png"))
            counters = page.locator(".jupyter-stream-counters").first
            page.wait_for_function(
                "() => /streams open: 1/.test(document.querySelector('.jupyter-stream-counters')?.textContent || '')", timeout=10_000
            )
            assert re.search(r"requests: [1-9]", counters.text_content())

            # the browser's own EventSource, authenticated by the page's login cookie,
            # gets each event as it is yielded (0.5 s apart), not all at the end
            events = page.evaluate(
                """(url) => new Promise((resolve, reject) => {
                    const seen = [], source = new EventSource(url);
                    source.onmessage = (e) => {
                        seen.push([e.data, performance.now()]);
                        if (seen.length === 3) { source.close(); resolve(seen); }
                    };
                    source.onerror = () => { source.close(); reject(new Error("EventSource failed after " + JSON.stringify(seen))); };
                    setTimeout(() => { source.close(); reject(new Error("timed out after " + JSON.stringify(seen))); }, 20000);
                })""",
                f"{url}stream/ticker?n=5",
            )
            assert [data for data, _ in events] == ["tick 0", "tick 1", "tick 2"]
            assert (events[2][1] - events[0][1]) / 1000 >= 0.8, events

            # "Share" makes a link to copy; it opens the stream without the login cookie
            assert page.locator("a.jupyter-stream-demo").first.get_attribute("href") == "/stream/ticker/demo"
            page.click(".jupyter-stream-share")
            page.wait_for_selector(".jupyter-stream-share-stream code", timeout=30_000)
            page.screenshot(path=str(ARTIFACTS / "5-share.png"))
            shared = page.locator(".jupyter-stream-share-stream code").first.text_content()
            assert "/stream/ticker?share=" in shared, shared
            assert page.locator(".jupyter-stream-share-demo code").first.text_content().startswith(shared.split("?")[0] + "/demo?share=")
            assert httpx.get(shared.replace("?share=", "?n=1&share="), timeout=30).text == "data: tick 0\n\n"
        except Exception:
            page.screenshot(path=str(ARTIFACTS / "failure.png"))
            raise
        finally:
            browser.close()
