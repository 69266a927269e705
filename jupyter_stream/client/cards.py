"""The endpoint card: what a `%%stream_endpoint` cell shows in a notebook.

Name, media type, the URL as a link that opens in a new tab, a curl line to copy, live
counters (streams open, requests served, errors) refreshed every `REFRESH` seconds, and
a "Try it" button that opens the stream from the kernel and shows its events as they
arrive. The widget's text/plain and text/html fallbacks carry the URL and curl line.
"""

from __future__ import annotations

import html
import json
import threading
import time
from typing import Any

import httpx

from .endpoints import LINK_STYLE

#: Seconds between two refreshes of a card's counters.
REFRESH = 1.0
#: Lines of a tried stream kept on the card.
MAX_LINES = 40
#: Lines of the endpoint's printed output shown on the card.
PRINTED_LINES = 10


def readable_error(text: str) -> list[str]:
    """An endpoint's error (`{"error": {...}}`, or jupyter-server's `{"message": ...}`) as
    lines a person reads: the type and message, then the worker's traceback."""
    try:
        body = json.loads(text)
    except ValueError:
        return [text[:2000]]
    if not isinstance(body, dict):
        return [text[:2000]]
    error = body.get("error")
    if isinstance(error, dict):
        head = f"error: {error.get('type', 'Error')}: {error.get('message', '')}"
        return [head, *str(error.get("traceback") or "").rstrip().splitlines()]
    return [f"error: {body.get('message') or text[:2000]}"]


class EndpointCard:
    """An ipywidgets card for one `Endpoint`."""

    def __init__(self, endpoint: Any):
        import ipywidgets as widgets

        self.endpoint = endpoint
        url = html.escape(endpoint.url)
        self.header = widgets.HTML(
            f'<div class="jupyter-stream-card-title"><b>{html.escape(endpoint.name)}</b> '
            f"<code>{html.escape(endpoint.media_type)}</code> &rarr; "
            f'<a class="jupyter-stream-url" href="{html.escape(endpoint.browser_href)}" target="_blank" rel="noopener" '
            f'style="{LINK_STYLE}">{url}</a> &middot; '
            f'<a class="jupyter-stream-demo" href="{html.escape(endpoint.browser_href)}/demo" target="_blank" rel="noopener" '
            f'style="{LINK_STYLE}">demo page</a></div>'
            f'<pre class="jupyter-stream-curl">{html.escape(endpoint.curl)}</pre>'
        )
        self.counters = widgets.HTML(self._counters_html({}))
        self.try_button = widgets.Button(description="Try it", icon="play", tooltip="Open the stream and show its events here")
        self.try_button.add_class("jupyter-stream-try")
        self.events = widgets.HTML("")
        self.events.add_class("jupyter-stream-events")
        self.printed = widgets.HTML("")  # what the endpoint's code printed lately (never on the response)
        self.printed.add_class("jupyter-stream-printed")
        self.try_button.on_click(self._toggle_try)
        self.share_button = widgets.Button(description="Share", icon="link",
                                           tooltip="Make a link (1 hour) that opens this endpoint and its demo page, nothing else")
        self.share_button.add_class("jupyter-stream-share")
        self.share_button.on_click(self._share)
        self.shared = widgets.HTML("")
        self.shared.add_class("jupyter-stream-shared")
        self.widget = widgets.VBox([self.header, widgets.HBox([self.try_button, self.share_button, self.counters]), self.shared,
                                    self.events, self.printed])
        self.widget.add_class("jupyter-stream-card")
        self._trying: threading.Event | None = None
        self._closed = threading.Event()
        threading.Thread(target=self._refresh_loop, name=f"jupyter-stream-card-{endpoint.name}", daemon=True).start()

    def mimebundle(self) -> dict[str, Any]:
        return {
            "application/vnd.jupyter.widget-view+json": {"version_major": 2, "version_minor": 0, "model_id": self.widget.model_id},
            "text/html": self.endpoint._repr_html_(),
            "text/plain": repr(self.endpoint),
        }

    def close(self) -> None:
        self._closed.set()
        if self._trying is not None:
            self._trying.set()

    # -- live counters -------------------------------------------------------------------

    @staticmethod
    def _counters_html(stats: dict[str, Any]) -> str:
        parts = [
            f'<span class="jupyter-stream-{key}">{label}: <b>{stats.get(key, 0):,}</b></span>'
            for key, label in (("open_streams", "streams open"), ("requests", "requests"), ("errors", "errors"))
        ]
        return '<span class="jupyter-stream-counters">' + " &middot; ".join(parts) + "</span>"

    def _refresh_loop(self) -> None:
        conn = self.endpoint.connection
        while not self._closed.wait(REFRESH):
            try:
                info = conn.request("GET", f"api/stream/endpoints/{self.endpoint.name}").json()
            except LookupError:  # deleted: say so, and stop asking the server every second
                self.counters.value = '<span class="jupyter-stream-removed"><b>removed</b> from the server</span>'
                self.try_button.disabled = True
                return
            except Exception:
                continue  # the server may be restarting; try again later
            value = self._counters_html(info.get("stats", {}))
            if value != self.counters.value:
                self.counters.value = value
            printed = self._printed_html(info.get("output", []))
            if printed != self.printed.value:
                self.printed.value = printed

    @staticmethod
    def _printed_html(output: list[dict[str, Any]]) -> str:
        if not output:
            return ""
        lines = "\n".join(f"[{o.get('worker')}] {o.get('line', '')}" for o in output[-PRINTED_LINES:])
        return ('<details open><summary>worker output</summary>'
                f'<pre class="jupyter-stream-printed-lines">{html.escape(lines)}</pre></details>')

    # -- "Share" -------------------------------------------------------------------------

    def _share(self, _button: Any = None) -> None:
        """A new share link (1 hour), shown to copy: the stream and its demo page."""
        try:
            share = self.endpoint.share("1h")
        except Exception as e:  # noqa: BLE001 - say it on the card
            self.shared.value = f'<div class="jupyter-stream-note"><i>could not share: {html.escape(str(e))}</i></div>'
            return
        until = time.strftime("%H:%M", time.localtime(share.expires))
        rows = "".join(
            f'<div><span style="display:inline-block;width:4em">{label}</span>'
            f'<input readonly value="{html.escape(url)}" style="width:70%;font-family:monospace" '
            f'class="jupyter-stream-share-{label}"> </div>'
            for label, url in (("demo", share.demo_url), ("stream", share.url))
        )
        self.shared.value = (f'<div class="jupyter-stream-share-links">{rows}<i>anyone with a link can run this endpoint '
                             f"(and nothing else of the server) until {until}; revoke it with <code>{html.escape(self.endpoint.name)}"
                             f".shares()[-1].revoke()</code></i></div>")

    # -- "Try it" ------------------------------------------------------------------------

    def _toggle_try(self, _button: Any = None) -> None:
        if self._trying is not None:
            self._trying.set()
            return
        self._trying = threading.Event()
        self.try_button.description = "Stop"
        self.try_button.icon = "stop"
        threading.Thread(target=self._try, args=(self._trying,), daemon=True).start()

    def _show(self, lines: list[str], note: str = "") -> None:
        body = html.escape("\n".join(lines[-MAX_LINES:]))
        note_html = f'<div class="jupyter-stream-note"><i>{html.escape(note)}</i></div>' if note else ""
        self.events.value = f'<pre class="jupyter-stream-output">{body}</pre>{note_html}'

    def _try(self, stop: threading.Event) -> None:
        conn = self.endpoint.connection
        lines: list[str] = []
        note = "stream ended"
        try:
            with conn.http.stream("GET", f"stream/{self.endpoint.name}", timeout=httpx.Timeout(None, connect=10)) as r:
                if r.status_code >= 400:
                    lines.extend(readable_error(r.read().decode(errors="replace")))
                    note = f"HTTP {r.status_code}"
                else:
                    self._show(lines, "connected, waiting for events…")
                    for line in r.iter_lines():
                        if stop.is_set():
                            note = "stopped"
                            break
                        if line.startswith("data: {") and lines and lines[-1] == "event: error":
                            lines[-1:] = readable_error(line[len("data: "):])  # the stream failed midway
                        elif line:
                            lines.append(line)
                            self._show(lines, "streaming…")
        except Exception as e:  # show what went wrong instead of failing silently
            note = f"{type(e).__name__}: {e}"
        self._show(lines, note)
        self._trying = None
        self.try_button.description = "Try it"
        self.try_button.icon = "play"
