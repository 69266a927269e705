"""Tornado handlers: the streaming endpoints themselves and the REST API behind them.

Follow one request: `EndpointHandler.get` looks the endpoint up in the registry, binds
the query/body to keyword arguments, borrows a worker from the pool, starts the call on
it and then copies the worker's output to the socket, flushing after every batch, until
the call ends. Every route requires Jupyter's auth (token header, ``?token=`` or the
login cookie); unauthenticated API requests get 403 rather than a login redirect.
"""

from __future__ import annotations

import base64
import json
import time
from typing import Any

from jupyter_server.auth.decorator import authorized, ws_authenticated
from jupyter_server.base.handlers import APIHandler, JupyterHandler
from jupyter_server.base.websocket import WebSocketMixin
from jupyter_core.utils import ensure_async
from tornado import web
from tornado.iostream import StreamClosedError
from tornado.websocket import WebSocketClosedError, WebSocketHandler

from . import wire
from .pool import WorkerError
from .registry import EndpointSpec, ParameterError, check_name
from .scheduler import ClientSession, FunctionSpec
from .responses import SSE

SSE_HEADERS = {"Cache-Control": "no-cache, no-transform", "X-Accel-Buffering": "no"}


class StreamHandlerBase(APIHandler):
    #: Jupyter's authorizer sees our routes as the kernels they run code in: listing needs
    #: "read", registering or calling a function "execute", removing one "write".
    auth_resource = "kernels"

    @property
    def stream(self) -> Any:
        """The extension's state: registry, pool and configuration (the `JupyterStream` extension app)."""
        return self.settings["jupyter_stream"]


@web.stream_request_body
class EndpointHandler(StreamHandlerBase):
    """``GET|POST {base_url}stream/<name>``: run the endpoint on a worker, stream its output."""

    call = None
    closed = False

    async def prepare(self) -> None:
        await super().prepare()
        self._body = bytearray()
        self._body_size = 0
        limit = self.stream.max_request_body
        length = self.request.headers.get("Content-Length")
        if length is not None and length.isdigit() and int(length) > limit:
            raise web.HTTPError(413, self._too_large(length))
        # a chunked body's size is known only as it arrives: read (and drop) a moderate
        # excess so the client gets its 413 instead of a reset connection
        self.request.connection.set_max_body_size(limit + max(limit, 64 << 20))

    def _too_large(self, size: int | str) -> str:
        limit = self.stream.max_request_body
        return f"request body of {size} bytes is larger than the {limit}-byte limit (JupyterStream.max_request_body)"

    def data_received(self, chunk: bytes) -> None:
        self._body_size += len(chunk)
        if self._body_size <= self.stream.max_request_body:
            self._body += chunk
        else:
            self._body.clear()

    @web.authenticated
    @authorized("execute")
    async def get(self, name: str) -> None:
        await self.run_endpoint(name)

    @web.authenticated
    @authorized("execute")
    async def post(self, name: str) -> None:
        await self.run_endpoint(name)

    def parse_body(self) -> dict[str, Any] | None:
        if self._body_size > self.stream.max_request_body:
            raise web.HTTPError(413, self._too_large(self._body_size))
        if not self._body:
            return None
        try:
            body = json.loads(self._body)
        except ValueError as e:
            raise ParameterError(f"request body is not valid JSON: {e}") from None
        if not isinstance(body, dict):
            raise ParameterError("request body must be a JSON object of parameters")
        return body

    async def run_endpoint(self, name: str) -> None:
        spec = self.stream.registry.get(name)
        if spec is None:
            known = ", ".join(sorted(self.stream.registry.endpoints)) or "none registered yet"
            raise web.HTTPError(404, f"no endpoint named {name!r} (endpoints: {known})")
        query = {k: [v.decode() for v in vs] for k, vs in self.request.query_arguments.items()}
        try:
            kwargs = spec.bind(query, self.parse_body())
        except ParameterError as e:
            raise web.HTTPError(400, str(e)) from None
        stats = self.stream.registry.stats[name]
        stats.requests += 1
        stats.open_streams += 1
        try:
            await self.relay(spec, kwargs, stats)
        finally:
            stats.open_streams -= 1

    async def relay(self, spec: EndpointSpec, kwargs: dict[str, Any], stats: Any) -> None:
        """Start the call on a worker and copy its output to the client as it arrives."""
        try:
            worker = await self.stream.pool.acquire()
        except WorkerError as e:
            raise web.HTTPError(503, f"no worker kernel is available: {e}") from None
        call = self.call = worker.call(spec.fn_hash, spec.fn_blob, mode="http", media_type=spec.media_type, kwargs=kwargs)
        if self.closed:  # the client left while we waited for a worker
            call.cancel()
            return
        # The worker sends the response's start (status, headers, media type) as soon as
        # the function has returned its iterable; only then is an idle SSE stream kept
        # alive with comments (which commit the headers).
        heartbeat = self.stream.sse_heartbeat_interval
        begun = sse = False
        try:
            while True:
                if not await call.wait(heartbeat if sse else None):
                    self.write(b": keep-alive\n\n")
                    await self.flush()
                    continue
                if not begun and call.start is not None:
                    sse = self.begin(call.start)
                    begun = True
                if call.chunks:
                    data = call.take()
                    if self._headers_written:
                        # straight to the connection: no copy into the handler's buffer
                        await self.request.connection.write(data)
                    else:
                        self.write(data.tobytes())
                        await self.flush()
                    stats.bytes_sent += data.nbytes
                    call.consumed(data.nbytes)
                    continue
                if call.ended:
                    break
            if call.error is not None:
                stats.errors += 1
                self.failed(call.error, sse)
        except StreamClosedError:
            call.cancel()

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
            self.set_status(500)
            self.set_header("Content-Type", "application/json")
            self.finish(json.dumps({"error": error}))
        elif sse:
            self.write(f"event: error\ndata: {json.dumps(error)}\n\n")
        else:
            # Close without the final chunk so the client sees a truncated response.
            self.request.connection.stream.close()
            self._finished = True

    def on_connection_close(self) -> None:
        self.closed = True
        if self.call is not None:
            self.call.cancel()

    def finish(self, *args: Any, **kwargs: Any) -> Any:
        # APIHandler.finish would otherwise force Content-Type: application/json on a stream
        kwargs.setdefault("set_content_type", self._headers.get("Content-Type", "application/json"))
        return super().finish(*args, **kwargs)


def parse_registration(raw: bytes) -> tuple[dict[str, Any], str, bytes]:
    """A registration's JSON body, its checked name and the pickled function's bytes."""
    body = json.loads(raw)
    return body, check_name(body["name"]), base64.b64decode(body["function"], validate=True)


class EndpointsHandler(StreamHandlerBase):
    """``GET|POST {base_url}api/stream/endpoints``: list endpoints, or register one."""

    @web.authenticated
    @authorized
    def get(self) -> None:
        self.finish(json.dumps({"endpoints": [self.stream.endpoint_info(s) for s in self.stream.registry.endpoints.values()]}))

    @web.authenticated
    @authorized("execute")
    def post(self) -> None:
        try:
            body, name, blob = parse_registration(self.request.body)
            spec = EndpointSpec(
                name=name,
                fn_hash=wire.content_hash(blob),
                fn_blob=blob,
                media_type=body.get("media_type") or SSE,
                signature=body.get("signature") or {"params": [], "var_keyword": True},
                doc=body.get("doc") or "",
            )
        except (ValueError, KeyError, TypeError) as e:
            raise web.HTTPError(400, f"bad registration: {e}") from None
        replaced = self.stream.registry.get(name) is not None
        self.stream.registry.register(spec)
        self.log.info("jupyter_stream: %s endpoint %s", "replaced" if replaced else "registered", name)
        self.set_status(200 if replaced else 201)
        self.finish(json.dumps({**self.stream.endpoint_info(spec), "replaced": replaced}))


class EndpointInfoHandler(StreamHandlerBase):
    """``GET|DELETE {base_url}api/stream/endpoints/<name>``."""

    @web.authenticated
    @authorized
    def get(self, name: str) -> None:
        spec = self.stream.registry.get(name)
        if spec is None:
            raise web.HTTPError(404, f"no endpoint named {name!r}")
        self.finish(json.dumps(self.stream.endpoint_info(spec)))

    @web.authenticated
    @authorized
    def delete(self, name: str) -> None:
        if not self.stream.registry.remove(name):
            raise web.HTTPError(404, f"no endpoint named {name!r}")
        self.set_status(204)
        self.finish()


class FunctionsHandler(StreamHandlerBase):
    """``GET|POST {base_url}api/stream/functions``: list functions, or register one."""

    @web.authenticated
    @authorized
    def get(self) -> None:
        self.finish(json.dumps({"functions": [self.stream.function_info(f) for f in self.stream.functions.values()]}))

    @web.authenticated
    @authorized("execute")
    def post(self) -> None:
        try:
            body, name, blob = parse_registration(self.request.body)
            timeout = body.get("timeout")
            spec = FunctionSpec(
                name=name,
                fn_hash=wire.content_hash(blob),
                fn_blob=blob,
                is_generator=bool(body.get("generator")),
                retries=int(body.get("retries") or 0),
                timeout=float(timeout) if timeout else None,
                doc=body.get("doc") or "",
            )
        except (ValueError, KeyError, TypeError) as e:
            raise web.HTTPError(400, f"bad registration: {e}") from None
        replaced = name in self.stream.functions
        self.stream.functions[name] = spec
        self.log.info("jupyter_stream: %s function %s", "replaced" if replaced else "registered", name)
        self.set_status(200 if replaced else 201)
        self.finish(json.dumps({**self.stream.function_info(spec), "replaced": replaced}))


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
        caller_worker = state.pool.worker_named(self.request.headers.get("X-Jupyter-Stream-Worker", ""))
        self.session = ClientSession(state.pool, state.functions, self.send_frame, caller_worker)
        await super().get(*args, **kwargs)

    def open(self, *args: Any, **kwargs: Any) -> None:
        self.set_nodelay(True)  # small frames (a .remote() result) must not wait for Nagle

    def send_frame(self, frame: bytes) -> None:
        try:
            self.write_message(frame, binary=True)
        except WebSocketClosedError:
            self.session.close()

    def on_message(self, message: str | bytes) -> None:
        if isinstance(message, str):
            self.close(1003, "binary frames only")
            return
        header, payload = wire.decode_frame(message)
        self.session.on_frame(header, payload)

    def on_close(self) -> None:
        if getattr(self, "session", None) is not None:
            self.session.close()


class WorkersHandler(StreamHandlerBase):
    """``GET {base_url}api/stream/workers``: the pool and its kernels."""

    @web.authenticated
    @authorized
    def get(self) -> None:
        self.finish(json.dumps({**self.stream.pool.info(), "time": time.time()}))


def default_handlers() -> list[tuple[str, type]]:
    name = r"(?P<name>[A-Za-z_][A-Za-z0-9_\-]*)"
    return [
        (rf"/stream/{name}/?", EndpointHandler),
        (r"/api/stream/endpoints/?", EndpointsHandler),
        (rf"/api/stream/endpoints/{name}/?", EndpointInfoHandler),
        (r"/api/stream/workers/?", WorkersHandler),
        (r"/api/stream/functions/?", FunctionsHandler),
        (r"/api/stream/calls", CallsHandler),
    ]
