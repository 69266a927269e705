"""Tornado handlers: the streaming endpoints themselves and the REST API behind them.

Follow one request: `EndpointHandler.get` looks the endpoint up in the registry, binds
the query/body to keyword arguments, borrows a worker from the pool, starts the call on
it and then copies the worker's output to the socket, flushing after every batch, until
the call ends. Every route requires Jupyter's auth (token header, ``?token=`` or the
login cookie); unauthenticated API requests get 403 rather than a login redirect.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from jupyter_core.utils import ensure_async
from jupyter_server.auth.decorator import authorized, ws_authenticated
from jupyter_server.base.handlers import APIHandler, JupyterHandler
from jupyter_server.base.websocket import WebSocketMixin
from tornado import httputil, web
from tornado.iostream import StreamClosedError
from tornado.websocket import WebSocketClosedError, WebSocketHandler

from .. import wire
from ..errors import WorkerError, error_body
from ..responses import SSE
from .kernels import OutputQueue
from .registry import RESERVED_QUERY, EndpointSpec, FunctionSpec, ParameterError, RegistrationError, loads_json
from .scheduler import ClientSession

NOT_AUTHENTICATED = ("authenticate with the server's token: an 'Authorization: token ...' header, "
                     "?token=..., or JupyterLab's login cookie")
SSE_HEADERS = {"Cache-Control": "no-cache, no-transform", "X-Accel-Buffering": "no"}


class StreamHandlerBase(APIHandler):
    #: Jupyter's authorizer sees our routes as the kernels they run code in: listing needs
    #: "read", registering or calling a function "execute", removing one "write".
    auth_resource = "kernels"

    async def prepare(self) -> None:
        await super().prepare()
        if not self.current_user:  # before reading a body (the auth decorators run after it)
            raise web.HTTPError(403, NOT_AUTHENTICATED)

    def check_xsrf_cookie(self) -> None:
        # once prepare() knows the user (jupyter-server's own test), say the real problem
        # rather than "'_xsrf' argument missing"
        if hasattr(self, "_jupyter_current_user") and not self.current_user:
            raise web.HTTPError(403, NOT_AUTHENTICATED)
        super().check_xsrf_cookie()

    @property
    def stream(self) -> Any:
        """The extension's state: registry, pool and configuration (the `JupyterStream` extension app)."""
        return self.settings["jupyter_stream"]

    # A bad request costs the log one line: jupyter-server's access line with its status
    # (and a scrubbed URL). The reason goes to the client, and to the log at debug level.

    def log_exception(self, typ: Any, value: Any, tb: Any) -> None:
        if isinstance(value, web.HTTPError) and value.status_code < 500:
            self.log.debug("jupyter_stream: %s %s: %s", value.status_code, self.request.path, value.log_message)
            return
        super().log_exception(typ, value, tb)

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        """Errors are JSON ``{"message", "reason"}``, as in jupyter-server's API."""
        self.set_header("Content-Type", "application/json")
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

    run = None  # the endpoint function running on a worker
    closed = False
    waiting: asyncio.Future | None = None  # for a worker, while the request is queued

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

    @web.authenticated
    @authorized("execute")
    async def get(self, name: str) -> None:
        await self.run_endpoint(name)

    @web.authenticated
    @authorized("execute")
    async def post(self, name: str) -> None:
        if not self._finished:  # not already answered 413 while the body arrived
            await self.run_endpoint(name)

    def parse_body(self) -> dict[str, Any] | None:
        if self._body_size > self.stream.max_request_body:
            raise web.HTTPError(413, self._too_large(self._body_size))
        if not self._body:
            return None
        body = loads_json(bytes(self._body), "the request body")
        if not isinstance(body, dict):
            raise ParameterError("request body must be a JSON object of parameters")
        return body

    async def run_endpoint(self, name: str) -> None:
        spec = self.stream.endpoints.get(name)
        if spec is None:
            raise web.HTTPError(404, self.stream.endpoints.not_found(name))
        try:
            kwargs = spec.bind(self.query_parameters(), self.parse_body())
        except ParameterError as e:
            raise web.HTTPError(400, str(e)) from None
        stats = spec.stats
        stats["requests"] += 1
        stats["open_streams"] += 1
        try:
            await self.relay(spec, kwargs, stats)
        finally:
            stats["open_streams"] -= 1

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

    async def relay(self, spec: EndpointSpec, kwargs: dict[str, Any], stats: Any) -> None:
        """Start the call on a worker and copy its output to the client as it arrives."""
        self.waiting = asyncio.ensure_future(self.stream.pool_for(spec).acquire())
        try:
            worker = await self.waiting
        except asyncio.CancelledError:  # the client left while queued: the call never starts
            return
        except WorkerError as e:
            raise web.HTTPError(503, f"no worker kernel is available: {e}") from None
        finally:
            self.waiting = None
        if self.closed:
            worker.pool.release(worker)
            return
        output = self.output = OutputQueue(on_print=lambda printed: self.printed(spec, worker.name, printed))
        request = self.request_info(spec.request_parameter) if spec.request_parameter else None
        run = self.run = worker.start_run(spec.fn_hash, spec.fn_blob, output, mode="http",
                                          media_type=spec.media_type, kwargs=kwargs, request=request)
        # The worker sends the response's start (status, headers, media type) as soon as
        # the function has returned its iterable. A response with nothing to send yet is
        # committed after `commit_headers_after` seconds anyway (as the registered media
        # type when the function has not even returned), so clients and proxies see its
        # status instead of timing out; an idle SSE stream then gets comment heartbeats.
        heartbeat = self.stream.sse_heartbeat_interval
        commit_after = self.stream.commit_headers_after
        begun = sse = False
        try:
            while True:
                if self._headers_written:
                    timeout = heartbeat if sse else None
                else:
                    timeout = commit_after
                if self.closed:
                    return
                if not await output.wait(timeout):
                    if not begun:
                        sse = self.begin({"media_type": spec.media_type or SSE})
                        begun = True
                    if sse:
                        self.write(b": keep-alive\n\n")
                    await self.flush()
                    continue
                if not begun and output.start is not None:
                    sse = self.begin(output.start)
                    begun = True
                if output.chunks:
                    data = output.take()
                    if self._headers_written:
                        # straight to the connection: no copy into the handler's buffer
                        await self.request.connection.write(data)
                    else:
                        self.write(data.tobytes())
                        await self.flush()
                    stats["bytes_sent"] += data.nbytes
                    run.consumed(data.nbytes)
                    continue
                if output.ended:
                    break
            if output.error is not None:
                stats["errors"] += 1
                self.failed(output.error, sse)
        except StreamClosedError:
            run.cancel()

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
        return sse

    def failed(self, error: dict[str, Any], sse: bool) -> None:
        """Report a failure: a 500 before any output, an SSE error event, or a cut-off body."""
        self.log.warning("jupyter_stream: endpoint %s failed: %s: %s", self.request.path, error["type"], error["message"])
        if not self._headers_written:
            self.clear()  # not the response's own headers: this is an error now
            # a body that does not fit the endpoint's model is the client's mistake, as in FastAPI
            is_request_error = error.get("type") == "RequestError" and str(error.get("module")).startswith("jupyter_stream")
            self.set_status(422 if is_request_error else 500)
            self.set_header("Content-Type", "application/json")
            self.finish(error_body(error))
        elif sse:
            self.write(f"event: error\ndata: {error_body(error)}\n\n")
        else:
            # Close without the final chunk so the client sees a truncated response.
            self.request.connection.stream.close()
            self._finished = True

    def on_connection_close(self) -> None:
        self.closed = True
        if self.waiting is not None:
            self.waiting.cancel()
        if self.run is not None:
            self.run.cancel()
            self.output.wake()  # the relay stops now, even if the run's code does not

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


class CallsHandler(WebSocketMixin, WebSocketHandler, JupyterHandler):
    """``WS {base_url}api/stream/calls``: one client's remote calls and maps, multiplexed
    (frames described in `wire`). Only authenticated callers may send pickled code."""

    @property
    def max_message_size(self) -> int:  # tornado's default (10 MiB) is too small for pickled arguments
        return self.settings["jupyter_stream"].max_call_message

    @ws_authenticated
    async def get(self, *args: Any, **kwargs: Any) -> None:
        # as for a kernel's own websocket: sending code to run needs "execute" on kernels
        if not await ensure_async(self.authorizer.is_authorized(self, self.current_user, "execute", "kernels")):
            raise web.HTTPError(403, "not authorized to execute code in kernels")
        state = self.settings["jupyter_stream"]
        caller_worker = state.placement.worker_named(self.request.headers.get("X-Jupyter-Stream-Worker", ""))
        self.session = ClientSession(state.pool_for, state.functions, self.send_frame, caller_worker)
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
    """``GET {base_url}api/stream/workers``: the pools, their kernels and the GPUs.
    ``workers`` and ``starting`` are totals over all pools; ``pools`` has each pool's
    requirements, size limits, waiting calls and kernels."""

    @web.authenticated
    @authorized
    def get(self) -> None:
        state = self.stream
        pools = [pool.info() for pool in state.placement.pools.values()]
        for pool, info in zip(state.placement.pools.values(), pools):
            info["functions"] = [s.name for s in state.functions.values() if state.pool_for(s) is pool]
            info["endpoints"] = [s.name for s in state.endpoints.values() if state.pool_for(s) is pool]
        self.finish(json.dumps({
            **state.placement.info(),
            "kernel_name": state.kernel_name,
            "min_workers": state.pool.min_workers,
            "starting": sum(p["starting"] for p in pools),
            "waiting_calls": sum(p["waiting_calls"] for p in pools),
            "replaced": sum(p["replaced"] for p in pools),
            "workers": [w for p in pools for w in p["workers"]],
            "pools": pools,
            "time": time.time(),
        }))


def default_handlers() -> list[tuple[str, type]]:
    name = r"(?P<name>[A-Za-z_][A-Za-z0-9_\-]*)"
    return [
        (rf"/stream/{name}/?", EndpointHandler),
        (r"/api/stream/endpoints/?", RegistrationsHandler, {"kind": "endpoint"}),
        (rf"/api/stream/endpoints/{name}/?", RegistrationHandler, {"kind": "endpoint"}),
        (r"/api/stream/workers/?", WorkersHandler),
        (r"/api/stream/functions/?", RegistrationsHandler, {"kind": "function"}),
        (rf"/api/stream/functions/{name}/?", RegistrationHandler, {"kind": "function"}),
        (r"/api/stream/calls", CallsHandler),
    ]
