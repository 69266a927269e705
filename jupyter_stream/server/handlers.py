"""Tornado handlers: the streaming endpoints themselves and the REST API behind them.

Follow one request: `EndpointHandler.get` looks the endpoint up in the registry, binds
the query/body to keyword arguments, borrows a worker from the pool, starts the call on
it and then copies the worker's output to the socket, flushing after every batch, until
the call ends. A --resumable endpoint's call feeds a `resumable.ResumableStream` instead:
its events are numbered and kept, its run outlives its client for the stream's window,
and a request naming the stream (``Last-Event-ID``, ``?stream=``) follows it rather than
running anything (`EndpointHandler.resume`). Every route requires Jupyter's auth (token
header, ``?token=`` or the login cookie); unauthenticated API requests get 403 rather than
a login redirect.

Who a request is: a request that presents a token (``Authorization`` or ``?token=``,
``?share=``) is judged by that token alone, never by a login cookie beside it; a share
token opens only its endpoint's routes; the workers' own token opens only the calls
socket. A request authenticated by the login cookie alone runs an endpoint only when it
comes from this server's own pages (``Sec-Fetch-Site: same-origin``, or ``none`` for an
address typed or bookmarked) or carries the ``_xsrf`` token, so that another site cannot
run one with its parameters through the browser (an ``<img>``, a link, a form).
"""

from __future__ import annotations

import asyncio
import functools
import hmac
import html
import json
import re
import secrets
import time
from pathlib import Path
from typing import Any

from jupyter_core.utils import ensure_async
from jupyter_server.auth.decorator import allow_unauthenticated, authorized
from jupyter_server.base.handlers import APIHandler, JupyterHandler
from jupyter_server.base.websocket import WebSocketMixin
from tornado import httputil, web
from tornado.iostream import IOStream, StreamClosedError
from tornado.websocket import WebSocketClosedError, WebSocketHandler

from .. import wire
from ..errors import WorkerError, error_body, error_info
from ..responses import SSE, check_headers, check_status
from ..signatures import parse_expires
from . import metrics
from .batching import BatchItem, batcher_for
from .history import clean_headers, clean_query
from .kernels import OutputQueue
from .registry import RESERVED_QUERY, EndpointSpec, FunctionSpec, ParameterError, RegistrationError, loads_json
from .resumable import ResumableStream, ResumeError, StreamsFull, error_event, parse_resume
from .scheduler import ClientSession
from .shares import COOKIE as SHARE_COOKIE
from .shares import Share, ShareRefused

NOT_AUTHENTICATED = ("authenticate with the server's token: an 'Authorization: token ...' header, "
                     "?token=..., or JupyterLab's login cookie")
CROSS_SITE = ("a request authenticated only by the login cookie runs an endpoint when it comes from this server's own "
              "pages (or an address typed into the browser) or carries the _xsrf token; from a script or another site, "
              "send the token (an 'Authorization: token ...' header or ?token=) or use a share link")
WORKER_TOKEN_REFUSED = "the workers' token opens the calls socket only; use the server's token"


#: A token in an ``Authorization`` header, as jupyter-server accepts it (and OpenAI's clients send it)
HEADER_TOKEN = re.compile(r"(?:token|bearer)\s+(\S+)", re.IGNORECASE)


def presented_token(handler: web.RequestHandler) -> str | None:
    """The token a request presents, if any: ``?share=``, ``?token=``, or an
    ``Authorization: token|Bearer`` header (not the login cookie)."""
    for name in ("share", "token"):
        value = handler.get_query_argument(name, None)
        if value:
            return value
    match = HEADER_TOKEN.match(handler.request.headers.get("Authorization", ""))
    return match.group(1) if match else None


def is_worker_token(state: Any, token: str | None) -> bool:
    """Whether `token` is the one the server gives its worker kernels."""
    return bool(token) and hmac.compare_digest(token.encode(), state.worker_token.encode())
SSE_HEADERS = {"Cache-Control": "no-cache, no-transform", "X-Accel-Buffering": "no"}


class PathOnlyLogging:
    """A failed request costs the log one line that names its path, never its URI: the
    query may carry ?token= or ?share= (tornado's own line logs the URI)."""

    def log_exception(self, typ: Any, value: Any, tb: Any) -> None:
        if isinstance(value, web.HTTPError):
            level = self.log.debug if value.status_code < 500 else self.log.warning
            level("jupyter_stream: %s %s %s: %s", value.status_code, self.request.method, self.request.path, value.log_message)
            return
        self.log.error("jupyter_stream: uncaught exception in %s %s", self.request.method, self.request.path,
                       exc_info=(typ, value, tb))


class StreamHandlerBase(PathOnlyLogging, APIHandler):
    #: Jupyter's authorizer sees our routes as the kernels they run code in: listing needs
    #: "read", registering or calling an endpoint or function "execute", removing one "write".
    auth_resource = "kernels"
    #: whether a share link's token opens this route (for the endpoint it shares)
    accepts_shares = False
    share: Share | None = None
    #: the status of a request whose credentials are missing or wrong (OpenAI's API says 401)
    unauthenticated_status = 403

    async def prepare(self) -> None:
        await super().prepare()
        self._cors_ready = True  # from now on, an error response keeps its CORS headers (see `clear`)
        if self.request.method == "OPTIONS" and self.accepts_shares:
            return  # a CORS preflight carries no credentials; it answers headers only
        token = presented_token(self)
        if token is not None and not self.token_authenticated and self.current_user:
            # a token beside a login cookie (a client's cookie jar): judged by the token alone
            self.current_user = self._jupyter_current_user = None
        if token is not None and is_worker_token(self.stream, token):
            raise web.HTTPError(self.unauthenticated_status, WORKER_TOKEN_REFUSED)
        if not self.current_user:  # before reading a body (the auth decorators run after it)
            token = self.presented_share() if self.accepts_shares else None
            if not token:
                raise web.HTTPError(self.unauthenticated_status, NOT_AUTHENTICATED)
            try:
                self.share = self.stream.shares.check(token, self.path_kwargs.get("name"))
            except ShareRefused as e:
                raise web.HTTPError(self.unauthenticated_status, str(e)) from None

    def set_signed_cookie(self, name: str, value: str | bytes, expires_days: float | None = 30,
                          version: int | None = None, **kwargs: Any) -> None:
        """jupyter-server signs a login cookie for every request its token authenticates
        (so that a browser's next request needs no token). A client that sends the token in
        an ``Authorization`` header sends it every time, and a browser cannot set that
        header on a link or an EventSource: such a request gets no login cookie here. That
        is a JSON document, an HMAC and a ``Set-Cookie`` header less per request (about a
        sixth of the server's work before a burst's calls start). A ``?token=`` in a link
        still gets its cookie."""
        if name == self.identity_provider.get_cookie_name(self) and HEADER_TOKEN.match(
                self.request.headers.get("Authorization", "")):
            return
        super().set_signed_cookie(name, value, expires_days, version, **kwargs)

    set_secure_cookie = set_signed_cookie  # the name jupyter-server calls (tornado's alias)

    @property
    def cookie_authenticated(self) -> bool:
        """Whether the request's user comes from the login cookie alone (no token, no share;
        a server without auth lets a request with no cookie through as anonymous: a script's)."""
        if not self.current_user or self.token_authenticated or self.share is not None:
            return False
        return self.get_cookie(self.identity_provider.get_cookie_name(self)) is not None

    def presented_share(self) -> str | None:
        """A share token, from ``?share=``, ``?token=``, the Authorization header or the
        demo page's cookie (scoped to the shared endpoint's path)."""
        token = presented_token(self)
        if token:
            return token
        # the cookie only for reading: a POST needs the token itself (another port of the
        # same host is the same site, so SameSite=Strict alone would let its pages post)
        return self.get_cookie(SHARE_COOKIE) if self.request.method == "GET" else None

    async def check_access(self, action: str) -> None:
        """What ``@web.authenticated`` and ``@authorized(action)`` check, for routes that
        a share may open too: a share opens only its endpoint (checked in `prepare`)."""
        if self.share is not None:
            return
        if not self.current_user:
            raise web.HTTPError(self.unauthenticated_status, NOT_AUTHENTICATED)
        if not await ensure_async(self.authorizer.is_authorized(self, self.current_user, action, self.auth_resource)):
            raise web.HTTPError(403, f"not authorized to {action} {self.auth_resource}")

    def check_xsrf_cookie(self) -> None:
        if self.accepts_shares and hasattr(self, "_jupyter_current_user") and not self.current_user:
            return  # no Jupyter user: only a share may open it (a bearer token, its cookie SameSite=Strict); see prepare
        if hasattr(self, "_jupyter_current_user") and not self.token_authenticated and presented_token(self) is not None:
            return  # a token that is not the server's, beside a cookie: judged by that token alone (see prepare)
        # once prepare() knows the user (jupyter-server's own test), say the real problem
        # rather than "'_xsrf' argument missing"
        if hasattr(self, "_jupyter_current_user") and not self.current_user:
            raise web.HTTPError(403, NOT_AUTHENTICATED)
        super().check_xsrf_cookie()

    def check_origin(self, origin_to_satisfy_tornado: str = "") -> bool:
        """jupyter-server refuses API requests from pages of other origins; the origins in
        ``JupyterStream.cors_origins`` may call the routes a share opens."""
        origin = self.request.headers.get("Origin")
        if self.accepts_shares and origin and origin in self.stream.cors_origins:
            return True
        return super().check_origin(origin_to_satisfy_tornado)

    def clear(self) -> None:
        """tornado clears every header before an error response; the CORS headers come
        back, so that an allowed page can read why it failed (a 400, 403, 500 or 503)."""
        super().clear()
        if getattr(self, "_cors_ready", False):
            self.set_cors_headers()

    def set_cors_headers(self) -> None:
        """Let pages of the configured origins (``JupyterStream.cors_origins``) read what a
        share link streams."""
        super().set_cors_headers()  # ServerApp.allow_origin and friends still apply
        origin = self.request.headers.get("Origin")
        if origin and origin in self.stream.cors_origins:
            self.set_header("Access-Control-Allow-Origin", origin)
            self.set_header("Access-Control-Allow-Headers", "Authorization, Content-Type, Last-Event-ID")
            self.set_header("Access-Control-Allow-Methods", "GET, POST, OPTIONS")
            self.set_header("Access-Control-Expose-Headers", "X-Stream-Id")
            self.set_header("Vary", "Origin")

    @property
    def stream(self) -> Any:
        """The extension's state: registry, pool and configuration (the `JupyterStream` extension app)."""
        return self.settings["jupyter_stream"]

    # A bad request costs the log one line: jupyter-server's access line with its status
    # (and a scrubbed URL). The reason goes to the client, and to the log at debug level
    # (`PathOnlyLogging`).

    retry_after: int | None = None  # seconds, for a 503 of a full queue

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        """Errors are JSON ``{"message", "reason"}``, as in jupyter-server's API."""
        self.set_header("Content-Type", "application/json")
        if self.retry_after:
            self.set_header("Retry-After", str(self.retry_after))
        message = httputil.responses.get(status_code, "Unknown HTTP Error")
        reply: dict[str, Any] = {"message": message, "reason": None}
        error = (kwargs.get("exc_info") or (None, None))[1]
        if isinstance(error, web.HTTPError):
            reply = {"message": error.log_message or message, "reason": error.reason}
        elif error is not None:
            reply["message"] = "Unhandled error"
        self.finish(json.dumps(reply))


@web.stream_request_body
class EndpointHandler(StreamHandlerBase):
    """``GET|POST {base_url}stream/<name>``: run the endpoint on a worker, stream its output."""

    accepts_shares = True
    #: send status and headers after `commit_headers_after` even with no output yet
    commit_early = True
    #: ask the worker how the call ended (``finish``: a `Finish`, chunks counted), for `complete`
    reads_finish = False

    run = None  # the endpoint function running on a worker
    closed = False
    #: why the server ends this response itself (it is stopping, or someone stopped the
    #: call from the Streams panel), once it does, and the error type it says so with
    stopping: str | None = None
    stopping_type = "ServerStopping"
    spec: EndpointSpec | None = None
    call_id: str | None = None  # in the server's `Activity` (the panel lists and stops it)
    started = 0.0  # time.time() the call began
    first_byte: float | None = None  # seconds from the request's arrival to its first body byte
    sent = 0  # bytes of output sent
    #: a chunk's write that the client's socket did not take at once (`relay` waits for it)
    pending_write: asyncio.Future | None = None
    waiting: asyncio.Future | None = None  # for a worker, while the request is queued
    #: what `check_access` said in `start_in_prepare` (None: not asked yet; True, or the
    #: refusal that get() raises): the authorizer is asked once per request
    access: bool | web.HTTPError | None = None
    counted = False  # in the endpoint's stats and the running calls (`count_call`) until `uncount_call`
    #: for the endpoint's request history (`record_request`): the call's arguments (as
    #: `encode_kwargs` made them), its worker, an error the server itself answered with
    call_kwargs: bytes | None = None
    worker_name: str | None = None
    failure: dict[str, Any] | None = None
    refused: web.HTTPError | None = None
    relaying = False  # get() has taken over a call started in prepare()
    #: the resumable stream this request's call feeds (``--resumable``; see `resumable`): its
    #: client may leave and others follow it; None for any other response
    rstream: ResumableStream | None = None
    #: this request's client left a resumable stream whose run goes on (for WINDOW seconds)
    detached = False
    #: the last event of a resumable stream this request sent its client (its producer's or one it follows)
    sent_seq = 0
    following: ResumableStream | None = None  # the stream this request follows (a resume, or ?stream=)

    async def prepare(self) -> None:
        await super().prepare()
        self._body = bytearray()
        self._body_size = 0
        limit = self.stream.max_request_body
        length = self.request.headers.get("Content-Length")
        if length is not None and length.isdigit() and int(length) > limit:
            raise web.HTTPError(413, self._too_large(length))
        # A chunked body's size is known only as it arrives. Up to `drain_limit` the excess is
        # read and dropped, so that a client that sends its whole body before reading the
        # response gets its 413 (not a reset connection); past it the 413 goes out at once
        # and the connection is closed (clients that read while sending, such as curl,
        # still see it). Tornado's own limit stays out of the way: it answers an empty 400.
        self.drain_limit = limit + max(limit, 64 << 20)
        self.request.connection.set_max_body_size(1 << 62)
        if self.request.method == "GET" and type(self).get is EndpointHandler.get and not self.has_body():
            await self.start_in_prepare()

    def has_body(self) -> bool:
        headers = self.request.headers
        return headers.get("Content-Length", "0") != "0" or "Transfer-Encoding" in headers

    async def start_in_prepare(self) -> None:
        """A GET without a body starts its call here, at the end of prepare(), when nothing
        stands in its way and a worker is idle. Tornado calls get() only once it has read
        the (empty) body, two turns of the event loop later, and in a burst every other
        request's prepare() runs in between: a hundred requests at once all started their
        calls at the end, together; now each starts as soon as it is prepared (the median
        client's first token ~7 ms sooner at 100 clients). A request that would be refused
        or answered with an error starts nothing here: get() answers it as before (a
        refusal in prepare() would close the keep-alive connection)."""
        try:
            await self.check_access("execute")
        except web.HTTPError as e:
            self.access = e
            return
        self.access = True
        if self.cookie_authenticated and not self.from_own_pages():
            return
        spec = self.stream.endpoints.get(self.path_kwargs.get("name", ""))
        if spec is None or spec.resumable:  # a resumable one may be a resume: get() decides
            return
        try:
            kwargs = self.encode_kwargs(spec.bind(self.query_parameters(), None))
        except ParameterError:
            return
        if spec.batch is not None:  # a batched endpoint's request joins its next batch
            self.count_call(spec)
            self.join_batch(spec, kwargs, spec.media_type)
            return
        worker = self.stream.pool_for(spec).try_acquire()
        if worker is None:
            return  # all busy: get() waits in the queue, with its heartbeats and timeout
        self.count_call(spec)
        self.start_run_on(worker, spec, kwargs, spec.media_type)

    def from_own_pages(self) -> bool:
        """Whether a cookie-authenticated request comes from this server's own pages: the
        browser says so (``Sec-Fetch-Site``), or it carries the ``_xsrf`` token."""
        if self.request.headers.get("Sec-Fetch-Site") in ("same-origin", "none"):
            return True
        try:
            web.RequestHandler.check_xsrf_cookie(self)  # the _xsrf argument or X-XSRFToken header
        except web.HTTPError:
            return False
        return True

    def _too_large(self, size: int | str) -> str:
        limit = self.stream.max_request_body
        return (f"request body of {size} bytes is larger than the {limit}-byte limit: send less, "
                "or raise JupyterStream.max_request_body")

    def data_received(self, chunk: bytes) -> None:
        self._body_size += len(chunk)
        if self._body_size <= self.stream.max_request_body:
            self._body += chunk
        elif self._body:
            self._body = bytearray()  # over the limit: counted, not kept
        if self._body_size > self.drain_limit and not self._finished:
            # far over: answer now and let tornado close the connection (see prepare)
            self.send_error(413, exc_info=(None, web.HTTPError(413, self._too_large(f"more than {self._body_size}")), None))

    @allow_unauthenticated  # a share may open it: check_access stands in for @web.authenticated
    async def get(self, name: str) -> None:
        if self.access is None:
            await self.check_access("execute")
        elif self.access is not True:
            raise self.access
        # here, not in prepare: a refusal there would close the keep-alive connection
        # (tornado has not read the empty body yet), and the client's next request fails
        if self.cookie_authenticated and not self.from_own_pages():
            raise web.HTTPError(403, CROSS_SITE)
        if self.run is not None:  # started in prepare
            self.relaying = True
            try:
                await self.relay(self.spec, b"", self.spec.stats)
            finally:
                self.uncount_call()
            return
        await self.run_endpoint(name)

    @allow_unauthenticated
    async def post(self, name: str) -> None:
        await self.check_access("execute")
        if not self._finished:  # not already answered 413 while the body arrived
            await self.run_endpoint(name)

    @allow_unauthenticated  # a CORS preflight: headers only, for the configured origins
    async def options(self, name: str) -> None:
        """A CORS preflight (for a shared stream read from another origin's page); its
        headers were set in `prepare`, as for every request."""
        self.set_status(204)
        self.finish()

    def parse_body(self) -> dict[str, Any] | None:
        if self._body_size > self.stream.max_request_body:
            raise web.HTTPError(413, self._too_large(self._body_size))
        if not self._body:
            return None
        raw, self._body = bytes(self._body), bytearray()  # kept once, not twice, while parsed
        body = loads_json(raw, "the request body")
        if not isinstance(body, dict):
            raise ParameterError("request body must be a JSON object of parameters")
        return body

    @staticmethod
    def encode_kwargs(kwargs: dict[str, Any]) -> bytes:
        """Bound arguments as compact JSON, as they travel to the worker: a request waiting
        for a worker holds these bytes, not the parsed objects (many times their size)."""
        return json.dumps(kwargs, separators=(",", ":")).encode()

    async def run_endpoint(self, name: str) -> None:
        spec = self.stream.endpoints.get(name)
        if spec is None:
            raise web.HTTPError(404, self.stream.endpoints.not_found(name))
        if spec.resumable and await self.resume(spec):
            return
        try:
            kwargs = self.encode_kwargs(spec.bind(self.query_parameters(), self.parse_body()))
        except ParameterError as e:
            raise web.HTTPError(400, str(e)) from None
        await self.serve_call(spec, kwargs)

    async def serve_call(self, spec: EndpointSpec, kwargs: bytes, media_type: str | None = None) -> None:
        """Relay one call of `spec`, counted in its stats and listed as running meanwhile."""
        self.count_call(spec)
        self.relaying = True
        self.call_kwargs = kwargs
        try:
            if spec.resumable and self.resumable_response():
                self.open_resumable(spec)
            await self.relay(spec, kwargs, spec.stats, media_type)
        except web.HTTPError as e:  # a 503 from the queue, kept in the history with its reason
            self.refused = e
            raise
        finally:
            self.uncount_call()
            if self.rstream is not None:
                self.end_resumable()

    def count_call(self, spec: EndpointSpec) -> None:
        stats = spec.stats
        stats["requests"] += 1
        stats["open_streams"] += 1
        self.spec, self.started = spec, time.time()
        self.stream.open_requests.add(self)
        self.call_id = self.stream.activity.started(self)
        self.counted = True

    def uncount_call(self) -> None:
        if not self.counted:
            return
        self.counted = False
        self.spec.stats["open_streams"] -= 1
        self.stream.open_requests.discard(self)
        self.stream.activity.ended(self.call_id, self.output.error if self.run is not None else None)
        if self.spec.history is not None:
            try:
                self.record_request(self.spec)
            except Exception:  # noqa: BLE001 - the history never fails a request
                self.log.exception("jupyter_stream: could not keep a request of %s in its history", self.spec.name)

    def record_request(self, spec: EndpointSpec) -> None:
        """Keep this finished call in the endpoint's recent requests (`history`)."""
        error = self.output.error if self.run is not None else None
        error = error or self.failure
        status = self.get_status()
        if self.refused is not None:
            outcome, status = "refused", self.refused.status_code
            error = error or error_info("HTTPError", self.refused.log_message or str(self.refused))
        elif error is not None and not self.closed:
            outcome = "error"
        elif self.stopping:
            outcome = "stopped"
            error = error or error_info(self.stopping_type, self.stopping)
        elif self.closed:
            outcome, error = "disconnected", None  # the client left: its cancellation is no failure of the code
        else:
            outcome = "error" if error is not None else "ok"
        spec.history.record(
            method=self.request.method, path=self.request.path, query=clean_query(self.query_parameters_or_empty()),
            headers=clean_headers(self.request.headers.get_all()), client=self.request.remote_ip,
            arguments=self.call_kwargs, status=status, outcome=outcome, started=self.started,
            duration=time.time() - self.started, first_byte=self.first_byte, worker=self.worker_name, error=error,
            request_parameter=spec.request_parameter,
        )

    def query_parameters_or_empty(self) -> dict[str, list[str]]:
        try:
            return self.query_parameters()
        except ParameterError:
            return {}

    # -- what the Streams panel and the metrics see of this request -----------------------

    def info(self) -> dict[str, Any]:
        return {"kind": "request", "function": self.spec.name if self.spec else None, "started": self.started,
                "done": self.sent, "total": None, "failed": 0, "retried": 0,  # done: bytes sent
                "lanes": 1 if self.run is not None else 0, "client": self.request.remote_ip}

    def stop(self, why: str) -> None:
        """Stopped from the Streams panel: ends as a stopping server ends it, saying why."""
        self.stopping_type = "Stopped"
        self.server_stopping(why)

    def on_finish(self) -> None:
        if self.request.method == "OPTIONS":
            return
        name = self.path_kwargs.get("name")
        label = name if name in self.stream.endpoints else ""
        metrics.REQUESTS.labels(label, str(self.get_status())).inc()
        metrics.REQUEST_SECONDS.labels(label).observe(self.request.request_time())
        if self.share is not None:
            metrics.SHARE_REQUESTS.labels(label).inc()

    def query_parameters(self) -> dict[str, list[str]]:
        """The query string as text; tornado gives names as latin-1 and values as bytes."""
        query = {}
        for key, values in self.request.query_arguments.items():
            try:
                name = key.encode("latin-1").decode()
                query[name] = [v.decode() for v in values]
            except UnicodeError:
                raise ParameterError(
                    f"query parameter {key!r} is not valid UTF-8; percent-encode text as UTF-8 "
                    "(e.g. ?name=%C3%A9 for 'é')"
                ) from None
        return query

    def printed(self, spec: EndpointSpec, worker: str, printed: list) -> None:
        """What the endpoint's code printed: to the server log, naming the endpoint and the
        request, and to the endpoint's recent output (the card's live view)."""
        request = f"{self.request.method} {self.request.path} from {self.request.remote_ip}"
        for stream, text in printed:
            for line in text.splitlines():
                self.log.info("jupyter_stream: [%s %s %s %s] %s", spec.name, request, worker, stream, line)
                spec.output.append({"time": time.time(), "worker": worker, "stream": stream, "line": line})

    def request_info(self, param: str) -> dict[str, Any]:
        """What a `Request` parameter gets: the request without its credentials."""
        headers: dict[str, str] = {}
        for name, value in self.request.headers.get_all():
            if name.lower() not in ("authorization", "cookie"):
                key = name.lower()
                headers[key] = f"{headers[key]}, {value}" if key in headers else value
        query = {k: v for k, v in self.query_parameters().items() if k not in RESERVED_QUERY}
        return {"param": param, "method": self.request.method, "path": self.request.path, "headers": headers,
                "query": query, "client": self.request.remote_ip, "last_event_id": self.request.headers.get("Last-Event-ID")}

    async def relay(self, spec: EndpointSpec, kwargs: bytes, stats: Any, media_type: str | None = None) -> None:
        """Start the call on a worker (`kwargs`: the arguments, as `encode_kwargs` made
        them) and copy its output to the client as it arrives (`media_type`: how the
        worker encodes it, when not the endpoint's own). Whatever ends the relay early (the
        client left, a header tornado refuses, a bug of ours), the call is cancelled on
        its worker: it never runs on for nobody."""
        media_type = media_type or spec.media_type
        if self.run is None and spec.batch is not None:
            self.join_batch(spec, kwargs, media_type)
        elif self.run is None:  # (a GET's call may have started in prepare)
            worker = await self.wait_for_worker(spec, (media_type or "").startswith(SSE))
            if worker is None:
                return
            if self.closed:
                worker.pool.release(worker)
                return
            self.start_run_on(worker, spec, kwargs, media_type)
        run, output = self.run, self.output
        # The worker sends the response's start (status, headers, media type) as soon as
        # the function has returned its iterable. A stream with nothing to send yet is
        # committed after `commit_headers_after` seconds anyway (as its declared media type
        # if the function has not even returned), so clients and proxies see its status
        # instead of timing out; an idle SSE stream then gets comment heartbeats. A
        # function of no declared type may still return a plain value (a dict is one JSON
        # document, an error a 500): until its start says otherwise, it is waited for,
        # however long it takes (a generator's start comes at once).
        heartbeat = self.stream.sse_heartbeat_interval
        commit_after = self.stream.commit_headers_after if self.commit_early else None
        begun = sse = self._headers_written  # an SSE response already begun while queued
        sent_bytes, sent_chunks = metrics.SENT_BYTES.labels(spec.name), metrics.SENT_CHUNKS.labels(spec.name)

        def sent(data: memoryview) -> None:
            stats["bytes_sent"] += data.nbytes
            self.sent += data.nbytes
            sent_bytes.inc(data.nbytes)
            sent_chunks.inc()
            run.consumed(data.nbytes)

        # Once the response is under way, a small chunk that arrives while this loop waits
        # is written by the worker's reader right away (`write_now`): a token then costs
        # no wake-up of this coroutine. The loop still sees the end, errors, a client
        # that left, and a write the socket could not take at once (it waits for that).
        def write_now(data: memoryview) -> bool:
            if (data.nbytes >= LARGE_CHUNK or self.closed or self.stopping or self.rstream is not None
                    or self.pending_write is not None):
                return False
            try:
                written = write_chunk(self.request.connection, data)
            except Exception:  # noqa: BLE001 - not written: the loop sends it, and meets the error itself
                return False
            sent(data)
            if written is not None and (not written.done() or written.exception() is not None):
                self.pending_write = written  # the loop waits for it (or raises what it raised)
                output.wake()
            return True

        sink_ready = type(self).emit is EndpointHandler.emit  # (a handler that rewrites chunks writes each itself)
        idle_left: float | None = None  # of the heartbeat's interval, counted from the sink's last write
        try:
            while True:
                if self._headers_written:
                    timeout = heartbeat if sse else None
                else:
                    timeout = commit_after if begun or media_type else None
                if idle_left is not None:
                    timeout, idle_left = idle_left, None
                if self.closed:
                    return
                if self.stopping:
                    self.end_for_stopping(sse)
                    return
                sunk = output.sunk
                output.sink = write_now if sink_ready and self.first_byte is not None and self._headers_written else None
                try:
                    has_output = await output.wait(timeout)
                finally:
                    output.sink = None
                if self.pending_write is not None:
                    written, self.pending_write = self.pending_write, None
                    await written
                if not has_output:
                    if output.sunk != sunk:  # not idle: the sink wrote meanwhile
                        if sse and heartbeat:
                            idle_left = max(0.001, heartbeat - (time.monotonic() - output.sunk_at))
                        continue
                    if not begun:
                        sse = self.begin({"media_type": media_type})
                        begun = True
                    await self.keep_alive(sse)
                    continue
                start = output.take_start()
                if not begun and start is not None:
                    problem = self.bad_start(start)
                    if problem is not None:
                        run.cancel()
                        stats["errors"] += 1
                        self.failed(error_info("ResponseError", problem), False)
                        return
                    sse = self.begin(start)
                    begun = True
                if output.chunks:
                    data = output.take()
                    if self.first_byte is None:
                        self.first_byte = self.request.request_time()
                        spec.first_bytes.append(self.first_byte)
                        metrics.FIRST_BYTE_SECONDS.labels(spec.name).observe(self.first_byte)
                    await self.emit(data)
                    sent(data)
                    continue
                if output.ended:
                    break
            if output.error is not None:
                if output.error.get("type") == "QueueTimeout" and not self._headers_written:  # (a batched request's)
                    metrics.QUEUE_TIMEOUTS.labels(spec.name).inc()
                    self.retry_after = max(1, min(int(spec.queue_timeout), 30))
                    raise web.HTTPError(503, output.error["message"])
                stats["errors"] += 1
                self.failed(output.error, sse)
            else:
                self.complete()
        except StreamClosedError:
            run.cancel()
        except BaseException:  # noqa: BLE001 - logged as a 500 by tornado; the call stops either way
            run.cancel()
            raise

    def start_run_on(self, worker: Any, spec: EndpointSpec, kwargs: bytes, media_type: str | None) -> None:
        self.call_kwargs, self.worker_name = kwargs, worker.name
        output = self.output = OutputQueue(on_print=lambda printed: self.printed(spec, worker.name, printed))
        request = self.request_info(spec.request_parameter) if spec.request_parameter else None
        run = self.run = worker.start_run(spec.fn_hash, spec.fn_blob, output, mode="http", media_type=media_type,
                                          json_kwargs=kwargs, request=request, finish=self.reads_finish)
        run.on_crash = lambda exc: output({"end": True, "error": error_info(
            "WorkerError", f"the server failed while relaying this call: {type(exc).__name__}: {exc}")}, [])

    def join_batch(self, spec: EndpointSpec, kwargs: bytes, media_type: str | None) -> None:
        """A batched endpoint's request joins the endpoint's next batch (`batching`):
        `self.run` is its `BatchItem`, relayed as a run is. While it waits, `relay` sends an
        SSE stream its heartbeats; past the endpoint's --queue-timeout it is a 503."""
        self.call_kwargs = kwargs
        output = self.output = OutputQueue(on_print=lambda printed: self.printed(spec, self.worker_name or "?", printed))
        request = self.request_info(spec.request_parameter) if spec.request_parameter else None

        def started(run: Any) -> None:
            self.worker_name = run.worker.name
            run.on_crash = lambda exc: output({"end": True, "error": error_info(
                "WorkerError", f"the server failed while relaying this call: {type(exc).__name__}: {exc}")}, [])

        def timed_out(waited: float) -> None:
            output({"end": True, "error": error_info("QueueTimeout", (
                f"all {len(self.stream.pool_for(spec).workers)} worker(s) of endpoint {spec.name!r} are busy: the request "
                f"waited {spec.queue_timeout:g} s for a batch (its --queue-timeout); retry in a moment"))}, [])

        self.run = BatchItem(output, {"json": kwargs, "request": request}, started=started, timed_out=timed_out,
                             refused=lambda error: output({"end": True, "error": error}, []), queue_timeout=spec.queue_timeout)
        batcher_for(spec, "endpoint").submit(self.run, self.stream.pool_for(spec))

    @staticmethod
    def bad_start(start: dict[str, Any]) -> str | None:
        """What is wrong with a response's status or headers, as the function gave them
        (tornado would refuse to send them), or None."""
        try:
            check_status(start.get("status", 200))
            check_headers(start.get("headers"))
        except ValueError as e:
            return f"the endpoint's response cannot be sent: {e}"
        return None

    async def emit(self, data: memoryview) -> None:
        """One chunk of the worker's output to the client, as it came."""
        if self.rstream is not None:
            self.sse_write(data.tobytes())
            await self.sse_flush()
            return
        if self._headers_written:  # straight to the connection: no copy into the handler's buffer
            written = write_chunk(self.request.connection, data)
            if written is not None:
                await written
        else:
            self.write(data.tobytes())
            await self.flush()

    def complete(self) -> None:
        """The function's output ended without an error (nothing more to send here)."""

    async def wait_for_worker(self, spec: EndpointSpec, sse: bool) -> Any:
        """A worker of the endpoint's pool, in arrival order. A client that leaves while
        queued leaves the queue (None); one that waited `spec.queue_timeout` gets a 503 with
        Retry-After. A declared SSE stream begins while it waits, with heartbeats (a
        timeout then ends it with an error event)."""
        pool = self.stream.pool_for(spec)
        worker = pool.try_acquire()  # an idle worker: the common case, with no queue to wait in
        if worker is not None:
            return worker
        self._handed = False
        self.waiting = asyncio.ensure_future(pool.acquire())
        loop = asyncio.get_running_loop()
        deadline = loop.time() + spec.queue_timeout
        try:
            while True:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    self.waiting.cancel()
                    busy = len(pool.workers)
                    message = (f"all {busy} worker(s) of endpoint {spec.name!r} are busy: the request waited "
                               f"{spec.queue_timeout:g} s in the queue (its --queue-timeout); retry in a moment")
                    metrics.QUEUE_TIMEOUTS.labels(spec.name).inc()
                    if self._headers_written:
                        self.failed({"type": "QueueTimeout", "message": message}, True)
                        return None
                    self.retry_after = max(1, min(int(spec.queue_timeout), 30))
                    raise web.HTTPError(503, message)
                step = remaining
                if sse:
                    step = min(remaining, self.stream.sse_heartbeat_interval if self._headers_written else self.stream.commit_headers_after)
                done, _ = await asyncio.wait({self.waiting}, timeout=step)
                if done:
                    worker = self.waiting.result()
                    self._handed = True
                    return worker
                if sse and not self.closed and not self.detached:
                    if not self._headers_written:
                        self.begin({"media_type": spec.media_type})
                    self.write(b": waiting for a worker\n\n")
                    await self.flush()
        except (asyncio.CancelledError, StreamClosedError):  # the client left while queued, or the server stops
            if self.stopping and not self.closed:
                self.end_for_stopping(self._headers_written)
            return None
        except WorkerError as e:
            if self._headers_written:
                self.failed({"type": "WorkerError", "message": f"no worker kernel is available: {e}"}, True)
                return None
            raise web.HTTPError(503, f"no worker kernel is available: {e}") from None
        finally:
            waiting, self.waiting = self.waiting, None
            if waiting is not None and not self._handed:
                if not waiting.done():
                    waiting.cancel()  # leaves the queue (acquire gives back a worker it got meanwhile)
                elif not waiting.cancelled() and waiting.exception() is None:
                    pool.release(waiting.result())

    def server_stopping(self, why: str) -> None:
        """The server is stopping: stop the call and end the response properly (see
        `end_for_stopping`) instead of cutting the connection."""
        self.stopping = why
        if self.rstream is not None:
            self.rstream.release()
        if self.waiting is not None:
            self.waiting.cancel()
        if self.run is not None:
            self.run.cancel()
            self.output.wake()

    def end_for_stopping(self, sse: bool) -> None:
        """The last words of a response the server ends: an SSE stream gets an error event
        saying so, then every body its terminating chunk (tornado finishes the response
        when the handler returns); one not begun yet is a 503."""
        if not self._headers_written:
            self.clear()
            self.retry_after = 5
            self.send_error(503, exc_info=(None, web.HTTPError(503, self.stopping), None))
        elif sse:
            self.sse_write(f"event: error\ndata: {error_body(error_info(self.stopping_type, self.stopping))}\n\n".encode())

    async def keep_alive(self, sse: bool) -> None:
        """A comment to an idle SSE client (and, to any client, the status and headers of a
        response that has no body yet)."""
        if self.detached:
            return
        if sse:
            self.write(b": keep-alive\n\n")
        if self.rstream is None:
            await self.flush()
            return
        try:
            await self.flush()
        except StreamClosedError:
            self.client_left()

    # -- resumable streams (`resumable`): this request's call feeds one, or it follows one --

    def resumable_response(self) -> bool:
        """Whether this response of a --resumable endpoint is a resumable stream (the
        OpenAI route's are when they stream)."""
        return True

    def open_resumable(self, spec: EndpointSpec) -> None:
        """Number and keep this call's events in a stream of its own; this request's client
        is its first follower."""
        try:
            self.rstream = self.stream.resumable.open(spec.name, spec.resumable, self.abandon)
        except StreamsFull as e:
            self.retry_after = 5
            raise web.HTTPError(503, str(e)) from None
        self.stream.resumable.attach(self.rstream, self)

    def announce_stream(self, headers: dict[str, str] | None) -> None:
        """Tell the client its stream's id (``X-Stream-Id``; every event's id names it too)
        and keep how the response starts, for the stream's other followers."""
        self.set_header("X-Stream-Id", self.rstream.id)
        self.rstream.begin(self.get_status(), headers)

    def drop_resumable(self) -> None:
        """The response is not a resumable stream after all (not SSE): sent as usual."""
        stream, self.rstream = self.rstream, None
        self.stream.resumable.forget(stream, "its response was not Server-Sent Events, so it could not be resumed")
        stream.detach(self)

    def sse_write(self, data: bytes) -> None:
        """Bytes of an SSE response, to the client; a resumable stream's are numbered into
        its buffer, and go to this client while it follows."""
        if self.rstream is None:
            self.write(data)
            return
        self.send_events(self.rstream.feed(data))

    def send_events(self, events: list[Any]) -> None:
        if events and not self.detached and not self.closed and not self._finished:
            self.write(b"".join(e.data for e in events))
            self.sent_seq = events[-1].seq

    async def sse_flush(self) -> None:
        """`flush`; a resumable stream's producer then waits while a follower lags behind a
        full buffer (`ResumableStream.room`); a client gone by now only leaves the stream."""
        if self.rstream is None:
            await self.flush()
            return
        if not self.detached and not self.closed:
            try:
                await self.flush()
            except StreamClosedError:
                self.client_left()
        await self.rstream.room()

    def client_left(self) -> None:
        """A write found this resumable stream's client gone (tornado may not have said so yet)."""
        if not self.detached and self.rstream is not None:
            self.detached = True
            self.rstream.detach(self)

    def end_resumable(self) -> None:
        """The call is over: the stream's last events go to this client, its followers
        finish, and it is kept for its window (or forgotten now if nobody was told its id)."""
        stream = self.rstream
        self.send_events(stream.end())
        stream.detach(self)
        if stream.start is None:
            self.stream.resumable.forget(stream, "it ended before it began")
        else:
            self.stream.resumable.ended(stream)

    async def resume(self, spec: EndpointSpec) -> bool:
        """A request of a --resumable endpoint that names one of its streams (a
        ``Last-Event-ID`` of ours, ``?last_event_id=``, ``?stream=``): send it the events
        it missed and the live rest, running nothing. False when it names none."""
        last = self.request.headers.get("Last-Event-ID") or self.get_query_argument("last_event_id", None)
        try:
            wanted = parse_resume(self.get_query_argument("stream", None), last)
        except ResumeError as e:
            raise web.HTTPError(400, str(e)) from None
        if wanted is None:
            return False
        streams = self.stream.resumable
        stream = streams.get(wanted.stream, spec.name)
        if stream is not None and wanted.after > stream.last_seq:
            raise web.HTTPError(400, f"Last-Event-ID names event {wanted.after} of stream {stream.id}, which has sent "
                                     f"{stream.last_seq} so far")
        if wanted.gone or (stream is not None and stream.ended and wanted.after == stream.last_seq and last):
            # nothing more: 204 tells an EventSource to stop reconnecting
            self.set_status(204)
            self.finish()
            return True
        if stream is None or stream.start is None:
            why = streams.why_gone(wanted.stream, spec.name) or (
                "it ended or was cancelled a while ago, the server restarted since, or the id is wrong")
            message = (f"stream {wanted.stream} of endpoint {spec.name!r} is no longer kept: {why}; the events after "
                       f"{wanted.after} are lost. Send the request again without Last-Event-ID (or ?stream=) to run "
                       "the endpoint anew")
            self.set_header("Content-Type", SSE)
            self.set_header("X-Stream-Id", wanted.stream)
            for k, v in SSE_HEADERS.items():
                self.set_header(k, v)
            metrics.STREAM_ERRORS.labels(spec.name).inc()
            self.finish(error_event("StreamGone", message, f"{wanted.stream}:gone", stream=wanted.stream))
            return True
        await self.follow(stream, wanted.after)
        return True

    async def follow(self, stream: ResumableStream, after: int) -> None:
        """Send `stream`'s kept events after event `after`, then its new ones as they come,
        until it ends or this client leaves. Events the buffer no longer holds are named in
        an error event where they would have been."""
        self.following, self.sent_seq = stream, after
        self.stream.resumable.attach(stream, self)
        try:
            self.set_status(stream.start["status"])
            self.set_header("Content-Type", SSE)
            for k, v in SSE_HEADERS.items():
                self.set_header(k, v)
            for k, v in stream.start["headers"].items():
                self.set_header(k, v)
            self.set_header("X-Stream-Id", stream.id)
            heartbeat = self.stream.sse_heartbeat_interval
            while not self.closed:
                lost, events = stream.since(self.sent_seq)
                if lost is not None:
                    first, last = lost
                    self.write(error_event(
                        "EventsLost", f"{last - first + 1} event(s) of stream {stream.id} ({first} to {last}) are no "
                        f"longer kept: its buffer holds the last {stream.max_events} events or {stream.max_bytes} bytes "
                        "(JupyterStream.resumable_buffer_events, resumable_buffer_bytes). It goes on from event "
                        f"{last + 1}; reconnect sooner, or raise those limits",
                        stream=stream.id, lost=last - first + 1, first_lost=first, last_lost=last))
                if events:
                    self.write(b"".join(e.data for e in events))
                if lost is not None or events or not self._headers_written:
                    await self.flush()
                    self.sent_seq = events[-1].seq if events else lost[1] if lost is not None else self.sent_seq
                    stream.advanced()
                    continue
                if stream.ended:
                    return
                if not await stream.changed(heartbeat) and not self.closed:
                    self.write(b": keep-alive\n\n")
                    await self.flush()
        except StreamClosedError:
            pass
        finally:
            stream.detach(self)

    def begin(self, start: dict[str, Any]) -> bool:
        """Send the status line and headers; returns whether this is an SSE stream."""
        media_type = start.get("media_type") or "application/octet-stream"
        self.set_status(start.get("status", 200))
        self.set_header("Content-Type", media_type)
        sse = media_type.startswith(SSE)
        if sse:
            for k, v in SSE_HEADERS.items():
                self.set_header(k, v)
        for k, v in (start.get("headers") or {}).items():
            self.set_header(k, v)
        if self.rstream is not None:
            if sse:
                self.announce_stream(start.get("headers"))
            else:  # not Server-Sent Events: sent as any response is (nobody was told its id)
                self.drop_resumable()
        return sse

    def failed(self, error: dict[str, Any], sse: bool) -> None:
        """Report a failure: a 500 before any output, an SSE error event, or a cut-off body."""
        self.failure = error
        self.log.warning("jupyter_stream: endpoint %s failed: %s: %s", self.request.path, error["type"], error["message"])
        if not self._headers_written:
            self.clear()  # not the response's own headers: this is an error now
            # a body that does not fit the endpoint's model is the client's mistake, as in FastAPI
            is_request_error = error.get("type") == "RequestError" and str(error.get("module")).startswith("jupyter_stream")
            self.set_status(422 if is_request_error else 500)
            self.set_header("Content-Type", "application/json")
            self.finish(error_body(error))
        elif sse or self.rstream is not None:
            metrics.STREAM_ERRORS.labels(self.spec.name if self.spec else "").inc()
            self.sse_write(f"event: error\ndata: {error_body(error)}\n\n".encode())
        else:
            metrics.STREAM_ERRORS.labels(self.spec.name if self.spec else "").inc()
            # Close without the final chunk so the client sees a truncated response.
            self.request.connection.stream.close()
            self._finished = True

    def on_connection_close(self) -> None:
        if self.following is not None:  # it followed a stream: that stream's run goes on
            self.closed = True
            self.following.detach(self)
            self.following.notify()
            return
        if self.rstream is not None and self._headers_written and not self.rstream.ended:
            # its client was told the stream's id: the run goes on for WINDOW seconds (`resumable`)
            self.detached = True
            self.rstream.detach(self)
            return
        self.abandon()

    def abandon(self, why: str = "") -> None:
        """Nobody will read this call any more (its client left; for a resumable stream,
        nobody followed it for its window): cancel it on its worker."""
        self.closed = True
        if self.waiting is not None:
            self.waiting.cancel()
        if self.run is not None:
            self.run.cancel()
            self.output.wake()  # the relay stops now, even if the run's code does not
            if not self.relaying:  # started in prepare, and get() will not come
                self.uncount_call()

    def finish(self, *args: Any, **kwargs: Any) -> Any:
        # APIHandler.finish would otherwise force Content-Type: application/json on a stream
        kwargs.setdefault("set_content_type", self._headers.get("Content-Type", "application/json"))
        return super().finish(*args, **kwargs)


class RegistrationsHandler(StreamHandlerBase):
    """``GET|POST {base_url}api/stream/endpoints`` (or ``functions``): list, or register one."""

    def initialize(self, kind: str) -> None:
        self.kind = kind

    @web.authenticated
    @authorized
    def get(self) -> None:
        self.finish(json.dumps({f"{self.kind}s": [self.stream.info(s) for s in self.stream.registries[self.kind].values()]}))

    @web.authenticated
    @authorized("execute")
    def post(self) -> None:
        try:
            spec, previous = self.stream.register(self.kind, self.request.body)
        except RegistrationError as e:
            raise web.HTTPError(400, f"bad registration: {e}") from None
        reply = {**self.stream.info(spec), "replaced": previous is not None}
        if previous is not None and previous.owner != spec.owner:
            reply["previous_owner"] = previous.owner  # the client warns: it replaced someone else's
        self.set_status(201 if previous is None else 200)
        self.finish(json.dumps(reply))


class RegistrationHandler(StreamHandlerBase):
    """``GET|DELETE {base_url}api/stream/endpoints/<name>`` (or ``functions/<name>``)."""

    def initialize(self, kind: str) -> None:
        self.kind = kind

    def spec(self, name: str) -> EndpointSpec | FunctionSpec:
        registry = self.stream.registries[self.kind]
        spec = registry.get(name)
        if spec is None:
            raise web.HTTPError(404, registry.not_found(name))
        return spec

    @web.authenticated
    @authorized
    def get(self, name: str) -> None:
        self.finish(json.dumps(self.stream.info(self.spec(name))))

    @web.authenticated
    @authorized
    def delete(self, name: str) -> None:
        self.spec(name)
        self.stream.remove(self.kind, name)
        self.set_status(204)
        self.finish()


class RequestsHandler(StreamHandlerBase):
    """``GET {base_url}api/stream/endpoints/<name>/requests``: the endpoint's recent
    requests (`history`), newest first, for the server's token or login only (a share
    link never opens it: it carries other people's arguments). ``DELETE`` forgets them."""

    def history(self, name: str) -> Any:
        spec = self.stream.endpoints.get(name)
        if spec is None:
            raise web.HTTPError(404, self.stream.endpoints.not_found(name))
        return spec.history

    @web.authenticated
    @authorized("read")
    def get(self, name: str) -> None:
        history = self.history(name)
        if history is None:
            self.finish(json.dumps({"requests": [], "history": False}))
            return
        self.finish(json.dumps({**history.listing(), "history": True}))

    @web.authenticated
    @authorized("write")
    def delete(self, name: str) -> None:
        history = self.history(name)
        if history is not None:
            history.entries.clear()
            history.bytes = 0
        self.set_status(204)
        self.finish()


class CallsHandler(PathOnlyLogging, WebSocketMixin, WebSocketHandler, JupyterHandler):
    """``WS {base_url}api/stream/calls``: one client's remote calls and maps, multiplexed
    (frames described in `wire`). Only authenticated callers may send pickled code."""

    @property
    def max_message_size(self) -> int:  # tornado's default (10 MiB) is too small for pickled arguments
        return self.settings["jupyter_stream"].max_call_message

    @allow_unauthenticated  # Jupyter's auth, or the workers' own token: checked here
    async def get(self, *args: Any, **kwargs: Any) -> None:
        state = self.settings["jupyter_stream"]
        if not is_worker_token(state, presented_token(self)):
            if not self.current_user:
                raise web.HTTPError(403, NOT_AUTHENTICATED)
            # as for a kernel's own websocket: sending code to run needs "execute" on kernels
            if not await ensure_async(self.authorizer.is_authorized(self, self.current_user, "execute", "kernels")):
                raise web.HTTPError(403, "not authorized to execute code in kernels")
        caller_worker = state.placement.worker_named(self.request.headers.get("X-Jupyter-Stream-Worker", ""))
        self.session = ClientSession(state.pool_for, state.functions, self.send_frame, caller_worker, state.activity,
                                     self.request.remote_ip)
        await super().get(*args, **kwargs)

    # WebSocketMixin gives these in milliseconds for its own pings, which we do not use;
    # tornado reads them in seconds (and warned that 90000 > 30000): tornado's own pings,
    # as the server is configured (ServerApp.websocket_ping_interval), keep the socket alive.
    @property
    def ping_interval(self) -> float | None:
        return self.settings.get("websocket_ping_interval")

    @property
    def ping_timeout(self) -> float | None:
        return self.settings.get("websocket_ping_timeout")

    def open(self, *args: Any, **kwargs: Any) -> None:
        self.set_nodelay(True)  # small frames (a .remote() result) must not wait for Nagle

    def send_frame(self, frame: bytes) -> None:
        try:
            self.write_message(frame, binary=True)
        except WebSocketClosedError:
            self.session.close()

    def on_message(self, message: str | bytes) -> None:
        if isinstance(message, str):
            self.refuse(1003, "binary frames only (a 4-byte header length, a JSON header, a payload)")
            return
        try:
            header, payload = wire.decode_frame(message)
            self.session.on_frame(header, payload)
        except wire.FrameError as e:
            self.refuse(1007, f"malformed frame: {e}")

    def refuse(self, code: int, reason: str) -> None:
        """Close the socket, saying why in the close frame and in one log line; the
        client's calls stop (see `on_close`)."""
        self.log.warning("jupyter_stream: closing a calls socket from %s: %s", self.request.remote_ip, reason)
        self.close(code, reason.encode()[:120].decode(errors="ignore"))

    def on_close(self) -> None:
        if getattr(self, "session", None) is not None:
            self.session.close()


class WorkersHandler(StreamHandlerBase):
    """``GET {base_url}api/stream/workers``: the pools, their kernels and the GPUs
    (`JupyterStream.workers_info`); ``DELETE .../workers/<name>`` shuts one worker down
    (JupyterLab's Running panel): an idle one gracefully, a busy one at once (its calls
    end with WorkerDied); its pool starts another if it keeps a warm minimum."""

    @web.authenticated
    @authorized
    def get(self, name: str | None = None) -> None:
        self.finish(json.dumps(self.stream.workers_info()))

    @web.authenticated
    @authorized("write")
    def delete(self, name: str | None = None) -> None:
        if not name or not self.stream.shut_down_worker(name):
            raise web.HTTPError(404, f"no worker named {name!r} (GET /api/stream/workers lists them)")
        self.set_status(204)
        self.finish()


class CallHandler(StreamHandlerBase):
    """``DELETE {base_url}api/stream/calls/<id>``: stop a running call, map or endpoint
    request (its client gets an error saying it was stopped); ``GET .../calls/`` lists them."""

    @web.authenticated
    @authorized
    def get(self, call_id: str | None = None) -> None:
        self.finish(json.dumps({"calls": self.stream.activity.list()}))

    @web.authenticated
    @authorized("execute")
    def delete(self, call_id: str | None = None) -> None:
        user = self.current_user  # named when it has a name of its own (JupyterHub), not a token's random id
        who = getattr(user, "display_name", None)
        why = f"stopped from JupyterLab by {who}" if who and who != getattr(user, "username", None) else "stopped from JupyterLab"
        if not call_id or not self.stream.activity.stop(call_id, why):
            raise web.HTTPError(404, f"no running call {call_id!r} (GET /api/stream/calls/ lists them)")
        self.set_status(204)
        self.finish()


class EventsHandler(StreamHandlerBase):
    """``GET {base_url}api/stream/events``: the server's events as Server-Sent Events (see
    `events`), behind Jupyter's auth (a share link does not open it): a snapshot first,
    then what changes, with a comment every `sse_heartbeat_interval` seconds."""

    @web.authenticated
    @authorized
    async def get(self) -> None:
        hub = self.stream.events
        queue, first = hub.subscribe()
        self.queue, self.closed = queue, False
        try:
            self.set_header("Content-Type", "text/event-stream")
            for k, v in SSE_HEADERS.items():
                self.set_header(k, v)
            self.write(first)
            await self.flush()
            while not self.closed and queue in hub.subscribers:
                try:
                    frame = await asyncio.wait_for(queue.get(), self.stream.sse_heartbeat_interval)
                except asyncio.TimeoutError:
                    frame = b": keep-alive\n\n"
                self.write(frame)
                while not queue.empty():  # what piled up goes out in one write
                    self.write(queue.get_nowait())
                await self.flush()
        except StreamClosedError:
            pass
        finally:
            hub.unsubscribe(queue)

    queue: asyncio.Queue | None = None

    def on_connection_close(self) -> None:
        self.closed = True
        if self.queue is not None and not self.queue.full():
            self.queue.put_nowait(b"")  # wakes the loop, which ends now

    def finish(self, *args: Any, **kwargs: Any) -> Any:
        kwargs.setdefault("set_content_type", "text/event-stream")
        return super().finish(*args, **kwargs)


@functools.cache
def demo_page() -> str:
    """`static/demo.html`, read once."""
    return (Path(__file__).with_name("static") / "demo.html").read_text()


def script_json(value: Any) -> str:
    """JSON that is safe inside a <script> element (no "</script>", no HTML comment)."""
    return json.dumps(value).replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


class PageHandler(StreamHandlerBase):
    """A page a share may open: HTML errors, and a script policy that lets only the
    page's own scripts run (a nonce) and connect only to this server."""

    accepts_shares = True

    @functools.cached_property
    def nonce(self) -> str:
        return secrets.token_urlsafe(16)

    @property
    def content_security_policy(self) -> str:
        return (f"default-src 'none'; script-src 'nonce-{self.nonce}'; style-src 'unsafe-inline'; "
                "img-src 'self' blob: data:; media-src 'self' blob:; connect-src 'self'; base-uri 'none'; "
                "form-action 'self'; frame-ancestors 'self'")

    def set_default_headers(self) -> None:
        super().set_default_headers()
        self.set_header("Referrer-Policy", "no-referrer")  # the page's URL may carry a share token

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        error = (kwargs.get("exc_info") or (None, None))[1]
        message = error.log_message if isinstance(error, web.HTTPError) and error.log_message else \
            httputil.responses.get(status_code, "Error")
        self.finish(f"<!doctype html><meta charset=utf-8><title>{status_code}</title>"
                    f"<body style='font:15px system-ui;margin:3em'>"
                    f"<h1>{status_code} {html.escape(httputil.responses.get(status_code, ''))}</h1>"
                    f"<p>{html.escape(message)}</p>", set_content_type="text/html; charset=utf-8")

    def share_query(self) -> str:
        """``?share=TOKEN`` for links from a page opened through a share, else ""."""
        if self.share is None:
            return ""
        return "?share=" + self.presented_share()


class DemoHandler(PageHandler):
    """``GET {base_url}stream/<name>/demo``: a page to try the endpoint: a form built from
    its signature, Run and Stop, and the response shown as it arrives (`static/demo.html`)."""

    @allow_unauthenticated  # a share may open it: check_access stands in for @web.authenticated
    async def get(self, name: str) -> None:
        await self.check_access("execute")
        spec = self.stream.endpoints.get(name)
        if spec is None:
            raise web.HTTPError(404, self.stream.endpoints.not_found(name) if self.share is None else f"no endpoint named {name!r}")
        info = self.stream.info(spec)
        base = self.base_url.rstrip("/") + "/"
        data = {
            "name": spec.name, "doc": spec.doc, "media_type": info["media_type"],
            "media_type_declared": info["media_type_declared"], "parameters": info["parameters"],
            "stream_url": f"{base}stream/{spec.name}{self.share_query()}",
            "shared": self.share is not None,
            "expires": self.share.expires if self.share is not None else None,
            "xsrf": None if self.share is not None else self.xsrf_token.decode(),
        }
        if self.share is not None and self.get_query_argument("share", None):
            # a reload of the page without the query still works, on this endpoint's paths only
            self.set_cookie(SHARE_COOKIE, self.presented_share(), path=f"{base}stream/{spec.name}", httponly=True,
                            samesite="Strict", expires=self.share.expires)
        page = demo_page().replace("/*ENDPOINT*/null", script_json(data)).replace("__NONCE__", self.nonce)
        self.finish(page, set_content_type="text/html; charset=utf-8")


class IndexHandler(PageHandler):
    """``GET {base_url}stream/``: the demos this visitor may open: every endpoint's for
    the server's token or login, the shared one's for a share link."""

    @allow_unauthenticated  # a share may open it: check_access stands in for @web.authenticated
    async def get(self) -> None:
        await self.check_access("read")
        base = self.base_url.rstrip("/") + "/"
        specs = self.stream.endpoints.values()
        if self.share is not None:
            specs = [s for s in specs if s.name == self.share.endpoint]
        query = self.share_query()
        rows = []
        for spec in sorted(specs, key=lambda s: s.name):
            name = html.escape(spec.name)
            doc = html.escape((spec.doc or "").strip().splitlines()[0] if spec.doc and spec.doc.strip() else "")
            active = sum(1 for s in self.stream.shares.list(spec.name) if s.state() == "active")
            shares = "" if self.share is not None else f"<td>{active}</td>"
            rows.append(f"<tr><td><a href='{base}stream/{name}/demo{html.escape(query)}'>{name}</a></td><td>{doc}</td>"
                        f"<td><code>{html.escape(spec.media_type or SSE)}</code></td>{shares}</tr>")
        head = "<th>demo</th><th>what it does</th><th>media type</th>" + ("" if self.share is not None else "<th>active shares</th>")
        empty = "<p>No endpoints are registered yet: put <code>%%stream_endpoint</code> on a notebook cell.</p>"
        table = f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>" if rows else empty
        self.finish(
            "<!doctype html><html lang=en><meta charset=utf-8><meta name=viewport content='width=device-width'>"
            "<title>Streaming demos</title><style>body{font:15px/1.5 system-ui,sans-serif;margin:2.5em auto;max-width:56em;"
            "padding:0 1em;color:#1f2328}h1{font-size:1.4em}table{border-collapse:collapse;width:100%}"
            "td,th{text-align:left;padding:.45em .8em;border-bottom:1px solid #d0d7de}a{color:#0969da}"
            "code{font-size:.9em}</style><h1>Streaming demos</h1>" + table,
            set_content_type="text/html; charset=utf-8",
        )


class SharesHandler(StreamHandlerBase):
    """``GET|POST {base_url}api/stream/shares`` (list; make one of ``{"endpoint", "expires"}``)
    and ``DELETE .../shares/<id>`` (revoke). A new share's token is in the POST's reply only."""

    @web.authenticated
    @authorized("read")
    def get(self, share_id: str | None = None) -> None:
        endpoint = self.get_query_argument("endpoint", None)
        shares = self.stream.shares.list(endpoint)
        self.finish(json.dumps({"shares": [s.info() for s in shares]}))

    @web.authenticated
    @authorized("execute")
    def post(self, share_id: str | None = None) -> None:
        try:
            body = loads_json(self.request.body or b"{}", "the share request")
        except ParameterError as e:
            raise web.HTTPError(400, str(e)) from None
        if not isinstance(body, dict) or not isinstance(body.get("endpoint"), str):
            raise web.HTTPError(400, 'send {"endpoint": NAME, "expires": "1h" | seconds | null}')
        name = body["endpoint"]
        if name not in self.stream.endpoints:
            raise web.HTTPError(404, self.stream.endpoints.not_found(name))
        try:
            seconds = parse_expires(body.get("expires"))
        except ValueError as e:
            raise web.HTTPError(400, str(e)) from None
        share, token = self.stream.shares.create(name, seconds)
        self.set_status(201)
        self.finish(json.dumps({**share.info(), "token": token, **self.stream.share_urls(name, token)}))

    @web.authenticated
    @authorized("write")
    def delete(self, share_id: str | None = None) -> None:
        share = self.stream.shares.get(share_id or "")
        if share is None:
            raise web.HTTPError(404, f"no share with id {share_id!r} (GET /api/stream/shares lists them)")
        self.stream.shares.revoke(share)
        self.set_status(204)
        self.finish()


#: Chunks at least this large go to the socket without being framed into a copy.
LARGE_CHUNK = 64 * 1024


def write_chunk(connection: Any, data: memoryview) -> Any:
    """Write one chunk of a response tornado is sending chunked (``size CRLF chunk CRLF``);
    returns None when it is all sent, else the future of the write (what tornado's own
    `finish` waits for, too). Anything else goes through `HTTP1Connection.write`.

    - A small chunk (a token) goes to the client's socket with one ``send`` when nothing
      else waits to be written there: no two futures, buffer and callback per write. What
      the socket does not take, a TLS stream or a stream already writing go through tornado,
      in order.
    - A large one is not copied: tornado would frame it with two copies of a megabyte per
      megabyte; here the size line, the chunk (a view of the frame the worker's message
      came in) and the CRLF go to the stream as they are."""
    stream = getattr(connection, "stream", None)
    if (stream is None or not getattr(connection, "_chunking_output", False) or not hasattr(connection, "_pending_write")
            or stream.closed()):
        return connection.write(data)
    if data.nbytes >= LARGE_CHUNK:
        stream.write(b"%x\r\n" % data.nbytes)
        stream.write(data)
        connection._pending_write = stream.write(b"\r\n")
        return connection._pending_write
    if type(stream) is not IOStream or stream.writing():
        return connection.write(data)
    frame = b"%x\r\n%b\r\n" % (data.nbytes, data)
    try:
        count = stream.socket.send(frame)
    except (BlockingIOError, InterruptedError):
        count = 0
    except OSError:  # tornado meets the error again and closes the stream, as it does
        return connection.write(data)
    if count == len(frame):
        return None
    connection._pending_write = stream.write(memoryview(frame)[count:])
    return connection._pending_write


def default_handlers() -> list[tuple[str, type]]:
    from . import openai_api  # its handlers build on EndpointHandler

    name = r"(?P<name>[A-Za-z_][A-Za-z0-9_\-]*(?:\.[A-Za-z_][A-Za-z0-9_\-]*)?)"
    return [
        (r"/stream/?", IndexHandler),
        (rf"/stream/{name}/?", EndpointHandler),
        (rf"/stream/{name}/demo/?", DemoHandler),
        (rf"/stream/{name}/v1/chat/completions/?", openai_api.ChatCompletionsHandler),
        (rf"/stream/{name}/v1/models/?", openai_api.ModelsHandler),
        (r"/api/stream/shares/?", SharesHandler),
        (r"/api/stream/shares/(?P<share_id>[0-9a-f]{1,64})/?", SharesHandler),
        (r"/api/stream/endpoints/?", RegistrationsHandler, {"kind": "endpoint"}),
        (rf"/api/stream/endpoints/{name}/?", RegistrationHandler, {"kind": "endpoint"}),
        (rf"/api/stream/endpoints/{name}/requests/?", RequestsHandler),
        (r"/api/stream/workers/?", WorkersHandler),
        (rf"/api/stream/workers/{name}/?", WorkersHandler),
        (r"/api/stream/calls/(?P<call_id>c[0-9]{1,12})/?", CallHandler),
        (r"/api/stream/calls/", CallHandler),
        (r"/api/stream/events/?", EventsHandler),
        (r"/api/stream/functions/?", RegistrationsHandler, {"kind": "function"}),
        (rf"/api/stream/functions/{name}/?", RegistrationHandler, {"kind": "function"}),
        (r"/api/stream/calls", CallsHandler),
    ]
