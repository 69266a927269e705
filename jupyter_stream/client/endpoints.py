"""`Endpoint` handles and registering a function as a streaming endpoint.

`endpoint()` is the decorator for scripts; `%%stream_endpoint` is a thin wrapper over
`register_endpoint`, which adds the endpoint's fields (media type, parameters) to the
shared `registration.register`.
"""

from __future__ import annotations

import html
import shlex
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

from ..errors import NotRegisteredError
from ..requirements import requirement_fields
from ..responses import SSE
from ..signatures import check_media_type, describe_parameters, parse_expires
from .batched import batch_of, item_signature
from .connection import ServerConnection, get_connection
from .registration import register

#: a link that looks like one in JupyterLab's theme (outputs reset link styles)
LINK_STYLE = "color: var(--jp-content-link-color, #1976d2); text-decoration: underline"


class Endpoint:
    """A registered streaming endpoint. `.url` is its full URL."""

    openai = False  # also an OpenAI-compatible API at `url` + "/v1"
    resumable: float | None = None  # seconds a stream's run goes on for a client to come back (--resumable)

    def __init__(self, name: str, url: str, media_type: str, fn: Callable, connection: ServerConnection,
                 parameters: list[dict[str, Any]] | None = None):
        self.name = name
        self.url = url
        self.media_type = media_type
        self.fn = fn
        self.connection = connection
        #: its parameters as the server describes them (names, types, defaults), for forms
        self.parameters = parameters

    @property
    def browser_href(self) -> str:
        """The link for a page of this server: its path only, so the browser opens it on the
        page's own origin (``127.0.0.1`` or ``localhost``, a proxy, a remote host) and
        sends the login cookie along. `url` stays the server's own idea, for curl."""
        return urlsplit(self.url).path

    @property
    def curl(self) -> str:
        """A ready-to-paste command that streams this endpoint in a terminal."""
        auth = f" -H {shlex.quote('Authorization: token ' + self.connection.token)}" if self.connection.token else ""
        return f"curl --no-buffer{auth} {shlex.quote(self.url)}"

    def __repr__(self) -> str:
        return f"<Endpoint {self.name!r} at {self.url} ({self.media_type})>\n{self.curl}"

    def _repr_html_(self) -> str:
        url = html.escape(self.url)
        return (
            f'<div class="jupyter-stream-endpoint"><b>{html.escape(self.name)}</b> '
            f'<code>{html.escape(self.media_type)}</code> &rarr; '
            f'<a href="{html.escape(self.browser_href)}" target="_blank" rel="noopener" style="{LINK_STYLE}">{url}</a>'
            f"<pre>{html.escape(self.curl)}</pre></div>"
        )

    def _repr_mimebundle_(self, include: Any = None, exclude: Any = None) -> dict[str, Any] | None:
        """In a notebook, the endpoint card widget (see `cards`); elsewhere text and HTML."""
        if not _in_notebook_kernel():
            return None
        try:
            from .cards import EndpointCard
        except ImportError:
            return None
        card = getattr(self, "_card", None)
        if card is None:
            card = self._card = EndpointCard(self)
        return card.mimebundle()

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Call the underlying function locally (handy for trying it in the notebook)."""
        return self.fn(*args, **kwargs)

    @classmethod
    def lookup(cls, name: str, connection: ServerConnection | None = None) -> Endpoint:
        """The handle of an endpoint already registered on the server (say, after a kernel
        restart): its URL and curl line; `fn` is None, the code is the server's."""
        conn = connection or get_connection()
        info = conn.request("GET", f"api/stream/endpoints/{name}").json()
        return cls(name, conn.endpoint_url(name), info["media_type"], None, conn, info.get("parameters"))

    def delete(self) -> None:
        """Unregister the endpoint (and forget it if it was persisted); its URL answers 404 from now on."""
        self.connection.request("DELETE", f"api/stream/endpoints/{self.name}")
        card = getattr(self, "_card", None)
        if card is not None:  # say so on its card now, not at the next poll
            card.removed()

    @property
    def demo_url(self) -> str:
        """Its demo page (a form, Run and Stop, the response as it arrives), with Jupyter's auth."""
        return f"{self.url}/demo"

    def share(self, expires: str | float | None = "1h") -> Share:
        """A link that opens this endpoint and its demo page, and nothing else of the
        server, to whoever has it: ``expires`` is ``"30m"``, ``"1h"``, ``"7d"``, seconds,
        or None for never. Revoke it with `Share.revoke`."""
        seconds = parse_expires(expires)
        reply = self.connection.request("POST", "api/stream/shares", json={"endpoint": self.name, "expires": seconds}).json()
        return Share(reply, self.connection)

    def requests(self, failures_first: bool = False) -> Any:
        """Its recent requests as the server kept them (newest first; with `failures_first`,
        the failed ones first), shown as a table: arguments, status, timings, worker, an
        error's traceback. ``ep.requests()[i].replay()`` runs one again in this kernel with
        the cell's current code (``%debug`` works); ``.replay(remote=True)`` on a worker."""
        from .history import requests_of

        return requests_of(self, failures_first)

    def shares(self) -> list[Share]:
        """This endpoint's share links (active, expired and revoked; tokens are not shown again)."""
        reply = self.connection.request("GET", "api/stream/shares", params={"endpoint": self.name}).json()
        return [Share(info, self.connection) for info in reply["shares"]]


class Share:
    """A share link of one endpoint: `url` (the stream, for curl, EventSource or any HTTP
    client, with no other credential), `demo_url`, `token`, `expires` (unix time or None)."""

    def __init__(self, info: dict[str, Any], connection: ServerConnection):
        self.id = info["id"]
        self.endpoint = info["endpoint"]
        self.token = info.get("token")  # only when just made: the server keeps no copy
        self.url = info.get("url")
        self.demo_url = info.get("demo_url")
        self.expires = info.get("expires")
        self.state = info.get("state", "active")
        self.connection = connection

    @classmethod
    def lookup(cls, share_id: str, connection: ServerConnection | None = None) -> Share:
        """The share with this id (the card and `repr` name it), to `revoke` it later."""
        conn = connection or get_connection()
        for info in conn.request("GET", "api/stream/shares").json()["shares"]:
            if info["id"] == share_id:
                return cls(info, conn)
        raise NotRegisteredError(f"no share with id {share_id!r}; Endpoint.shares() lists an endpoint's shares")

    def revoke(self) -> None:
        """From now on the link gets 403 saying it was revoked."""
        self.connection.request("DELETE", f"api/stream/shares/{self.id}")
        self.state = "revoked"

    @property
    def revoke_hint(self) -> str:
        """The code that revokes this share, from any kernel of this server."""
        return f"jupyter_stream.Share.lookup({self.id!r}).revoke()"

    def __repr__(self) -> str:
        until = "never expires" if self.expires is None else f"expires {local_time(self.expires)}"
        if self.url is None:
            return f"<Share {self.id} of {self.endpoint!r}: {self.state}, {until}>"
        return (f"<Share {self.id} of {self.endpoint!r}, {until}>\nstream: {self.url}\ndemo:   {self.demo_url}\n"
                f"revoke: {self.revoke_hint}")


def local_time(t: float, full: bool = False) -> str:
    """A moment as the card, `Share` and the demo page all show it: local time with its
    offset from UTC, and the day when it is not today ("14:05 UTC+2", "Jun 3, 14:05 UTC");
    with `full`, the whole date and the seconds (for a tooltip)."""
    when = time.localtime(t)
    hours, minutes = divmod(abs(when.tm_gmtoff) // 60, 60)
    zone = "UTC" if not when.tm_gmtoff else f"UTC{'+' if when.tm_gmtoff > 0 else '-'}{hours}" + (f":{minutes:02d}" if minutes else "")
    if full:
        return time.strftime("%Y-%m-%d %H:%M:%S ", when) + zone
    shown = time.strftime("%H:%M ", when) + zone
    if when[:3] != time.localtime()[:3]:
        shown = f"{time.strftime('%b', when)} {when.tm_mday}, {shown}"
    return shown


def _in_notebook_kernel() -> bool:
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    return type(get_ipython()).__name__ == "ZMQInteractiveShell"


def register_endpoint(
    fn: Callable,
    name: str | None = None,
    media_type: str | None = None,
    connection: ServerConnection | None = None,
    persist: bool = False,
    queue_timeout: float | None = None,
    openai: bool = False,
    openai_count_chunks: bool = False,
    history: bool = True,
    resumable: bool | float = False,
    batch: dict[str, Any] | None = None,
    **requirements: Any,
) -> Endpoint:
    """Register `fn` with the server as endpoint `name` (default: the function's name).
    The endpoint belongs to the server: it stays after this kernel stops, until it is
    deleted or the server stops; with `persist` it is also registered again when the
    server restarts. `requirements` (``gpu=``, ``min_workers=``, ``max_workers=``,
    ``scaledown_window=``, ``kernel=``, ``env=``) choose the workers that serve it.
    `openai_count_chunks` (implies `openai`): the OpenAI route reports each yielded
    piece as a completion token in ``usage`` when the function does not say
    (`jupyter_stream.Finish`). `history` False: the server keeps none of its requests
    (`Endpoint.requests`). `resumable` True (a 30 s window) or seconds: a client that
    loses its connection gets the rest of the stream with ``Last-Event-ID`` (an
    ``EventSource`` does so by itself) instead of running the function again; the run
    goes on that long with no client. `batch` (or ``@jupyter_stream.batched``): requests
    are run in batches, the function taking lists (its parameters describe one request's)."""
    openai = bool(openai or openai_count_chunks)
    count: dict[str, Any] = {"openai_count_chunks": True} if openai_count_chunks else {}
    if not history:
        count["history"] = False
    if resumable is not False and resumable is not None:
        count["resumable"] = resumable
    signature = describe_parameters(fn) if callable(fn) else None
    batch = batch_of(fn, batch) if callable(fn) else batch
    if batch is not None:
        count["batch"] = batch
        signature = item_signature(signature) if signature is not None else None
    if media_type is not None:  # undeclared: streams are SSE, values are sent as FastAPI does
        check_media_type(media_type)
    name, reply, conn = register(
        "endpoint", fn, name, connection, persist, media_type=media_type, signature=signature,
        requirements=requirement_fields(**requirements), queue_timeout=queue_timeout, openai=openai, **count,
    )
    handle = Endpoint(name, conn.endpoint_url(name), reply.get("media_type") or media_type or SSE, fn, conn, reply.get("parameters"))
    handle.openai = openai
    handle.resumable = reply.get("resumable")
    from .history import remember

    remember(handle)  # the code `replay` runs, until the cell runs again
    return handle


def endpoint(
    fn: Callable | None = None, *, name: str | None = None, media_type: str | None = None, persist: bool = False,
    gpu: str | list[str] | None = None, min_workers: int | None = None, max_workers: int | None = None,
    scaledown_window: float | None = None, kernel: str | None = None, env: dict[str, str] | None = None,
    concurrency: int | None = None, queue_timeout: float | None = None, openai: bool = False,
    openai_count_chunks: bool = False, history: bool = True, resumable: bool | float = False,
) -> Any:
    """Decorator: serve a generator (or any function returning an iterable) as a streaming
    endpoint. Returns an `Endpoint` handle::

        @jupyter_stream.endpoint(media_type="text/event-stream", gpu="any")
        def ticks(n: int = 10):
            for i in range(n):
                yield f"data: tick {i}\\n\\n"
    """
    requirements = dict(gpu=gpu, min_workers=min_workers, max_workers=max_workers,
                        scaledown_window=scaledown_window, kernel=kernel, env=env, concurrency=concurrency)

    def decorate(f: Callable) -> Any:
        from .classes import in_class_body

        if in_class_body(f):  # a method of a %%stream_class: marked here, served with its class
            f.__jupyter_stream_method__ = {"kind": "endpoint", "media_type": media_type, "queue_timeout": queue_timeout,
                                           "openai": openai, "openai_count_chunks": openai_count_chunks,
                                           "resumable": resumable}
            return f
        return register_endpoint(f, name, media_type, persist=persist, queue_timeout=queue_timeout, openai=openai,
                                 openai_count_chunks=openai_count_chunks, history=history, resumable=resumable,
                                 **requirements)

    return decorate(fn) if fn is not None else decorate
