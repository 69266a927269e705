"""The endpoint card: what a `%%stream_endpoint` cell shows in a notebook.

Name, media type, the URL as a link that opens in a new tab, a curl line to copy, live
counters (streams open, requests served, errors), the endpoint's recent prints, a "Try
it" form built from its parameters that shows the response as it arrives (`try_it`), and
a "Share" button that makes a link to copy. The widget's text/plain and text/html
fallbacks carry the URL and curl line.

The bundle also carries `ENDPOINT_MIME`: the card's own data (name, path, media type,
parameters, doc, owner), which the JupyterLab extension (labextension/) draws as the
card, with live counters from the server, ranked above the widget view. That card needs
nothing from this kernel, so it still works after a kernel restart, in a reopened
notebook and in Notebook 7; where the extension is missing the widget shows, and where
widgets cannot (nbconvert, GitHub), the HTML and text fallbacks.

One `CardPoller` thread per process keeps every live card current with one request a
second for all of them. A card stops when its endpoint is removed, or when the cell is run
again (a newer card for the same name takes over); the thread ends with the last card.
"""

from __future__ import annotations

import html
import inspect
import logging
import threading
import time
from typing import Any

import httpx

from .endpoints import LINK_STYLE, local_time
from .try_it import ResponseView, build_request, form_parameters, initial_text, readable_error

log = logging.getLogger("jupyter_stream")

#: Seconds between two polls of the server for the live cards.
REFRESH = 1.0
#: Lines of the endpoint's printed output shown on the card.
PRINTED_LINES = 10
#: The card's data in an output bundle, for the JupyterLab extension's renderer.
ENDPOINT_MIME = "application/vnd.jupyter-stream.endpoint+json"

#: A button that copies `data-copy` to the clipboard (or selects the text where the page
#: may not use the clipboard, as on plain http from another host).
COPY_BUTTON = (
    '<button class="jupyter-stream-copy" data-copy="{text}" title="Copy to the clipboard" '
    "onclick=\"const b = this, t = b.previousElementSibling; navigator.clipboard.writeText(b.dataset.copy).then("
    "() => {{ b.textContent = 'Copied'; setTimeout(() => b.textContent = 'Copy', 1500); }}, "
    "() => {{ const r = document.createRange(); r.selectNodeContents(t); getSelection().removeAllRanges(); "
    "getSelection().addRange(r); b.textContent = 'Press Ctrl+C'; }});\">Copy</button>"
)


def link_field(label: str, url: str, removed: bool = False) -> str:
    """A link shown whole (wrapped where long) with a copy button; struck out once removed."""
    shown = f"<del>{html.escape(url)}</del>" if removed else html.escape(url)
    copy = "" if removed else COPY_BUTTON.format(text=html.escape(url))
    return (f'<div class="jupyter-stream-link jupyter-stream-share-{label}" style="display:flex;gap:.6em;align-items:baseline">'
            f'<span style="min-width:4em">{label}</span>'
            f'<code class="jupyter-stream-link-text" style="word-break:break-all">{shown}</code>{copy}</div>')


class CardPoller:
    """The one thread that keeps this process's live cards current: each `REFRESH`
    seconds, one GET of ``api/stream/endpoints`` per server for all of its cards.
    Supervised: a failure is logged once (until a poll succeeds again) and polling goes on;
    the thread ends when no card is left, and the next card starts another."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.cards: dict[tuple[str, str], EndpointCard] = {}  # (server URL, endpoint name) -> its live card
        self.thread: threading.Thread | None = None
        self.logged: set[str] = set()  # failures already logged since the last clean poll

    def add(self, card: EndpointCard) -> None:
        """Keep `card` current; an older card of the same endpoint stops (the cell ran again)."""
        key = (card.endpoint.connection.url, card.endpoint.name)
        with self.lock:
            older = self.cards.get(key)
            self.cards[key] = card
            if self.thread is None:
                self.thread = threading.Thread(target=self._run, name="jupyter-stream-cards", daemon=True)
                self.thread.start()
        if older is not None and older is not card:
            older.replaced()

    def discard(self, card: EndpointCard) -> None:
        with self.lock:
            key = (card.endpoint.connection.url, card.endpoint.name)
            if self.cards.get(key) is card:
                del self.cards[key]

    def _run(self) -> None:
        while True:
            time.sleep(REFRESH)
            with self.lock:
                if not self.cards:
                    self.thread = None
                    return
                cards = list(self.cards.values())
            try:
                self.poll(cards)
            except Exception as e:  # noqa: BLE001 - logged; the cards must not stop for good
                self._failed("polling the endpoint cards", e)

    def poll(self, cards: list[EndpointCard]) -> None:
        """One round: each server asked once, each card updated or told it was removed."""
        clean = True
        servers: dict[str, list[EndpointCard]] = {}
        for card in cards:
            servers.setdefault(card.endpoint.connection.url, []).append(card)
        for group in servers.values():
            conn = group[0].endpoint.connection
            try:
                infos = {i["name"]: i for i in conn.request("GET", "api/stream/endpoints").json()["endpoints"]}
            except Exception as e:  # noqa: BLE001 - the server may be restarting: try again next round
                clean = self._failed(f"asking {conn.url} for its endpoints", e)
                continue
            for card in group:
                try:
                    info = infos.get(card.endpoint.name)
                    if info is None:
                        card.removed()
                    else:
                        card.update(info)
                except Exception as e:  # noqa: BLE001 - one card's trouble must not stop the others
                    clean = self._failed(f"updating the card of endpoint {card.endpoint.name!r}", e)
        if clean:
            self.logged.clear()

    def _failed(self, what: str, e: Exception) -> bool:
        why = f"{what} failed: {type(e).__name__}: {e}"
        if why not in self.logged:
            self.logged.add(why)
            log.warning("jupyter_stream: %s; the endpoint cards go on and try again every %g s", why, REFRESH)
        return False


POLLER = CardPoller()


class EndpointCard:
    """An ipywidgets card for one `Endpoint`."""

    def __init__(self, endpoint: Any):
        import ipywidgets as widgets

        self.endpoint = endpoint
        self.info = self._info()
        self.header = widgets.HTML(self._header_html())
        self.counters = widgets.HTML(self._counters_html({}))
        self.try_button = widgets.Button(description="Try it", icon="play",
                                         tooltip="Call the endpoint with these values and show the response here")
        self.try_button.add_class("jupyter-stream-try")
        self.try_button.on_click(self._toggle_try)
        self.share_button = widgets.Button(description="Share", icon="link",
                                           tooltip="Make a link (1 hour) that opens this endpoint and its demo page, nothing else")
        self.share_button.add_class("jupyter-stream-share")
        self.share_button.on_click(self._share)
        self.fields = self._form(widgets)
        form = widgets.VBox([field for _, field in self.fields])
        form.add_class("jupyter-stream-form")
        self.shared = widgets.HTML("")
        self.shared.add_class("jupyter-stream-shared")
        self.events = widgets.HTML("")
        self.events.add_class("jupyter-stream-events")
        self.failure = widgets.HTML(self._failure_html(self.info.get("last_failure")))  # the newest failed request
        self.failure.add_class("jupyter-stream-last-failure")
        self.printed = widgets.HTML("")  # what the endpoint's code printed lately (never on the response)
        self.printed.add_class("jupyter-stream-printed")
        self.widget = widgets.VBox([self.header, form, widgets.HBox([self.try_button, self.share_button, self.counters]),
                                    self.shared, self.events, self.failure, self.printed])
        self.widget.add_class("jupyter-stream-card")
        self.share: Any = None  # the latest share made on this card
        self.live = True
        self._trying: threading.Event | None = None
        POLLER.add(self)

    def _info(self) -> dict[str, Any]:
        """The endpoint as the server describes it (its parameters for the form, doc, owner);
        without the server, nothing: the card still shows, without a form."""
        try:
            info = self.endpoint.connection.request("GET", f"api/stream/endpoints/{self.endpoint.name}").json()
        except Exception as e:  # noqa: BLE001 - the card still shows, without a form
            log.warning("jupyter_stream: no form on the card of %r: %s", self.endpoint.name, e)
            return {}
        if self.endpoint.parameters is None:
            self.endpoint.parameters = info.get("parameters", [])
        return info

    def card_data(self) -> dict[str, Any]:
        """What the JupyterLab extension draws the card from (`ENDPOINT_MIME`)."""
        endpoint, info = self.endpoint, self.info
        doc = info.get("doc")
        if doc is None:
            doc = (inspect.getdoc(endpoint.fn) if callable(endpoint.fn) else None) or ""
        return {
            "version": 1,
            "name": endpoint.name,
            "path": f"stream/{endpoint.name}",
            "url": endpoint.url,
            "media_type": endpoint.media_type,
            "media_type_declared": bool(info.get("media_type_declared", False)),
            "parameters": endpoint.parameters,
            "doc": doc,
            "owner": info.get("owner", ""),
        }

    def mimebundle(self) -> dict[str, Any]:
        return {
            ENDPOINT_MIME: self.card_data(),
            "application/vnd.jupyter.widget-view+json": {"version_major": 2, "version_minor": 0, "model_id": self.widget.model_id},
            "text/html": self.endpoint._repr_html_(),
            "text/plain": repr(self.endpoint),
        }

    def close(self) -> None:
        """Stop updating (and stop a stream being tried)."""
        self.live = False
        POLLER.discard(self)
        if self._trying is not None:
            self._trying.set()

    # -- what the poller tells it --------------------------------------------------------

    def update(self, info: dict[str, Any]) -> None:
        """The endpoint's latest state from the server: counters and recent prints."""
        if not self.live:
            return
        value = self._counters_html(info.get("stats", {}))
        if value != self.counters.value:
            self.counters.value = value
        failure = self._failure_html(info.get("last_failure"))
        if failure != self.failure.value:
            self.failure.value = failure
        printed = self._printed_html(info.get("output", []))
        if printed != self.printed.value:
            self.printed.value = printed

    def removed(self) -> None:
        """The endpoint is gone: its links are struck out and its buttons disabled."""
        self.close()
        self.counters.value = '<span class="jupyter-stream-removed"><b>removed</b> from the server</span>'
        self.header.value = self._header_html(removed=True)
        for button in (self.try_button, self.share_button):
            button.disabled = True
            button.tooltip = "The endpoint was removed from the server"
        for _, field in self.fields:
            field.disabled = True
        if self.share is not None:
            self.shared.value = self._share_html(self.share, removed=True)

    def replaced(self) -> None:
        """A newer card shows this endpoint (its cell ran again): this one stops updating."""
        self.close()
        self.counters.value += ' <span class="jupyter-stream-replaced"><i>(a newer card of this endpoint is live)</i></span>'

    # -- what it shows ------------------------------------------------------------------

    def _header_html(self, removed: bool = False) -> str:
        endpoint = self.endpoint
        href = html.escape(endpoint.browser_href)
        if removed:
            url = f'<del class="jupyter-stream-url">{html.escape(endpoint.url)}</del>'
            demo = '<del class="jupyter-stream-demo">demo page</del>'
            curl = f'<pre class="jupyter-stream-curl"><del>{html.escape(endpoint.curl)}</del></pre>'
        else:
            url = (f'<a class="jupyter-stream-url" href="{href}" target="_blank" rel="noopener" '
                   f'style="{LINK_STYLE}">{html.escape(endpoint.url)}</a>')
            demo = (f'<a class="jupyter-stream-demo" href="{href}/demo" target="_blank" rel="noopener" '
                    f'style="{LINK_STYLE}">demo page</a>')
            curl = f'<pre class="jupyter-stream-curl">{html.escape(endpoint.curl)}</pre>'
        return (f'<div class="jupyter-stream-card-title"><b>{html.escape(endpoint.name)}</b> '
                f"<code>{html.escape(endpoint.media_type)}</code> &rarr; {url} &middot; {demo}</div>{curl}")

    @staticmethod
    def _counters_html(stats: dict[str, Any]) -> str:
        parts = [
            f'<span class="jupyter-stream-{key}">{label}: <b>{stats.get(key, 0):,}</b></span>'
            for key, label in (("open_streams", "streams open"), ("requests", "requests"), ("errors", "errors"))
        ]
        return '<span class="jupyter-stream-counters">' + " &middot; ".join(parts) + "</span>"

    def _failure_html(self, failure: dict[str, Any] | None) -> str:
        """The newest failed request in one line, and the code that runs it again here."""
        if not failure:
            return ""
        when = time.strftime("%H:%M:%S", time.localtime(failure["time"]))
        name = self.endpoint.name
        handle = name if name.isidentifier() else f"jupyter_stream.Endpoint.lookup({name!r})"
        code = f"{handle}.requests(failures_first=True)[0].replay()"
        return (f'<div class="jupyter-stream-note">last failure {when} ({failure.get("status")}): '
                f'<b>{html.escape(str(failure.get("type")))}</b>: {html.escape(str(failure.get("message", ""))[:200])} '
                f"&middot; debug it here: <code>{html.escape(code)}</code></div>")

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
            self.share = self.endpoint.share("1h")
        except Exception as e:  # noqa: BLE001 - say it on the card
            self.shared.value = f'<div class="jupyter-stream-note"><i>could not share: {html.escape(str(e))}</i></div>'
            return
        self.shared.value = self._share_html(self.share)

    @staticmethod
    def _share_html(share: Any, removed: bool = False) -> str:
        links = link_field("demo", share.demo_url, removed) + link_field("stream", share.url, removed)
        if removed:
            note = "these links stopped working: the endpoint was removed"
        else:
            until = "with no expiry"
            if share.expires:
                until = (f'until <span class="jupyter-stream-expires" title="{local_time(share.expires, full=True)}">'
                         f"{html.escape(local_time(share.expires))}</span>")

            note = (f"anyone with a link can run this endpoint (and nothing else of the server) {until}; "
                    f'share <code class="jupyter-stream-share-id">{html.escape(share.id)}</code>, revoke it with '
                    f'<code class="jupyter-stream-revoke">{html.escape(share.revoke_hint)}</code>')
        return f'<div class="jupyter-stream-share-links">{links}<i>{note}</i></div>'

    # -- "Try it" ------------------------------------------------------------------------

    def _form(self, widgets: Any) -> list[tuple[dict[str, Any], Any]]:
        """A field per parameter, from the signature the server has (as on the demo page)."""
        parameters = self.endpoint.parameters
        if parameters is None:  # the server could not say (`_info`)
            return []
        fields = []
        style = {"description_width": "8em"}
        for p in form_parameters(parameters):
            hint = f"{p['name']}: {p.get('type', 'any')}" + (" (required)" if p.get("required") else f" = {p.get('default')!r}")
            if p.get("type") == "bool" and not p.get("optional"):
                field = widgets.Checkbox(value=bool(p.get("default")), description=p["name"], indent=True, tooltip=hint, style=style)
            elif p.get("type") == "object":
                field = widgets.Textarea(value="", placeholder="a JSON object: the request body", description=p["name"],
                                         tooltip=hint, style=style, layout={"width": "32em"})
            else:
                placeholder = "required" if p.get("required") else "None" if p.get("default") is None else ""
                if p.get("type") == "list":
                    placeholder = "comma-separated, or a JSON array"
                field = widgets.Text(value=initial_text(p), placeholder=placeholder, description=p["name"], tooltip=hint, style=style,
                                     layout={"width": "32em"})
            field.add_class(f"jupyter-stream-field-{p['name']}")
            fields.append((p, field))
        return fields

    def _toggle_try(self, _button: Any = None) -> None:
        if self._trying is not None:
            self._trying.set()
            return
        try:
            method, query, body = build_request(self.endpoint.parameters or [], {p["name"]: f.value for p, f in self.fields})
        except ValueError as e:
            self._show("", f"check the form: {e}")
            return
        self._trying = threading.Event()
        self.try_button.description = "Stop"
        self.try_button.icon = "stop"
        threading.Thread(target=self._try, args=(self._trying, method, query, body), daemon=True).start()

    def _show(self, body_html: str, note: str, request: str = "") -> None:
        request_html = f'<code class="jupyter-stream-request">{html.escape(request)}</code> ' if request else ""
        self.events.value = f'{body_html}<div class="jupyter-stream-note">{request_html}<i>{html.escape(note)}</i></div>'

    def _try(self, stop: threading.Event, method: str, query: list[tuple[str, str]], body: bytes | None) -> None:
        conn = self.endpoint.connection
        path = f"stream/{self.endpoint.name}"
        request = f"{method} /{path}" + ("?" + str(httpx.QueryParams(query)) if query else "")
        view, note, shown = None, "stream ended", 0.0
        headers = {"Content-Type": "application/json"} if body is not None else {}
        try:
            with conn.http.stream(method, path, params=query, content=body, headers=headers,
                                  timeout=httpx.Timeout(None, connect=10)) as r:
                request += f" → {r.status_code}"
                if r.status_code >= 400:
                    lines = "\n".join(readable_error(r.read().decode(errors="replace")))
                    self._show(f'<pre class="jupyter-stream-output">{html.escape(lines)}</pre>', f"HTTP {r.status_code}", request)
                    return
                view = ResponseView(r.headers.get("content-type", self.endpoint.media_type))
                self._show("", "connected, waiting for the response…", request)
                chunks = r.iter_bytes() if view.kind == "bytes" else r.iter_lines()
                for chunk in chunks:
                    if stop.is_set():
                        note = "stopped"
                        break
                    if isinstance(chunk, bytes):
                        view.bytes += len(chunk)
                    else:
                        view.feed_line(chunk)
                    if time.monotonic() - shown > 0.1:  # at most ten redraws a second
                        shown = time.monotonic()
                        self._show(view.html(), f"streaming… {view.summary()}", request)
                view.finish()
        except Exception as e:  # noqa: BLE001 - show what went wrong instead of failing silently
            note = f"{type(e).__name__}: {e}"
        finally:
            self._trying = None
            self.try_button.description = "Try it"
            self.try_button.icon = "play"
        if view is not None:
            self._show(view.html(), f"{note} · {view.summary()}", request)
        else:
            self._show("", note, request)
