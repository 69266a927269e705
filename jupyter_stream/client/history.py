"""An endpoint's recent requests in the notebook, and running one of them again.

``ep.requests()`` asks the server for what it kept of the endpoint's last requests
(`server.history`: arguments as bound, headers without credentials, status, timings,
worker, an error's traceback) and shows them as a table, newest first;
``ep.requests(failures_first=True)`` puts the failed ones on top. ``ep.requests()[i].replay()``
runs that exact call again here, in the notebook kernel, with the function this kernel
holds now for that endpoint (its cell's current code), so that ``%debug`` and breakpoints
work; ``replay(remote=True)`` sends it to the endpoint again, through the server, as
any client's request.
"""

from __future__ import annotations

import asyncio
import html
import inspect
import json
import threading
import time
from collections.abc import Callable
from typing import Any

from ..errors import RemoteError, RemoteTraceback
from ..responses import StreamingResponse

#: (server URL, endpoint name) -> the latest handle registered from this process with its
#: function: the code `replay` runs (a cell run again registers a new handle)
_current: dict[tuple[str, str], Any] = {}


def remember(handle: Any) -> None:
    """`register_endpoint` says which function this process now holds for an endpoint."""
    if callable(handle.fn):
        _current[(handle.connection.url, handle.name)] = handle


def current_function(endpoint: Any) -> Callable | None:
    """The function this kernel holds now for `endpoint` (its cell's latest run), if any."""
    latest = _current.get((endpoint.connection.url, endpoint.name))
    fn = latest.fn if latest is not None else None
    return fn if callable(fn) else endpoint.fn if callable(endpoint.fn) else None


def _ms(seconds: float | None) -> str:
    return "" if seconds is None else f"{seconds * 1000:.0f} ms" if seconds < 10 else f"{seconds:.1f} s"


def _short(value: Any, width: int = 48) -> str:
    text = value if isinstance(value, str) else json.dumps(value, separators=(", ", "="))[1:-1] if isinstance(value, dict) \
        else repr(value)
    return text if len(text) <= width else text[: width - 1] + "…"


class RecordedRequest:
    """One request the server kept for an endpoint: `arguments` (as bound, None when too
    large to keep), `method`, `path`, `query`, `headers` (no credentials), `status`,
    `outcome` ("ok", "error", "refused", "stopped", "disconnected"), `duration` and
    `first_byte` (seconds), `worker`, `time`, and `error` (``{"type", "message",
    "traceback"}`` or None)."""

    def __init__(self, endpoint: Any, info: dict[str, Any]):
        self.endpoint = endpoint
        self.info = info
        for key in ("id", "time", "method", "path", "query", "headers", "client", "status", "outcome", "duration",
                    "first_byte", "worker", "error", "arguments", "arguments_bytes", "request_parameter"):
            setattr(self, key, info.get(key))
        self.arguments_kept = info.get("arguments_kept", self.arguments is not None)

    @property
    def failed(self) -> bool:
        return self.error is not None

    @property
    def traceback(self) -> str:
        """The worker's traceback of its error ("" when it did not fail)."""
        return (self.error or {}).get("traceback") or ""

    def _kwargs(self) -> dict[str, Any]:
        if not self.arguments_kept:
            raise ValueError(f"request #{self.id} of {self.endpoint.name!r} cannot be replayed: its arguments "
                             f"({self.arguments_bytes} bytes) were larger than the server keeps "
                             "(JupyterStream.request_history_argument_bytes)")
        return json.loads(json.dumps(self.arguments))  # a fresh copy: the function may change what it gets

    def replay(self, remote: bool = False) -> Any:
        """Run this call again with its arguments. Here (the default): with the function this
        kernel holds now for the endpoint, so its error is raised in this kernel, through the
        cell's code (``%debug``, breakpoints); returns what the call produced (a generator's
        or iterable's items as a list, or the value it returned). ``remote=True``: as a new
        request to the endpoint, through the server to a worker; returns the response's text
        and raises `RemoteError` (with the worker's traceback as its cause) if it failed."""
        kwargs = self._kwargs()
        if remote:
            return self._replay_remote(kwargs)
        fn = current_function(self.endpoint)
        if fn is None:
            raise RuntimeError(f"this kernel holds no code for endpoint {self.endpoint.name!r} (it was registered from "
                               "another kernel, or before a restart): run its cell here, or use replay(remote=True)")
        from ..worker import arguments

        request = None
        if self.request_parameter:
            headers = dict(self.headers or {})
            request = {"param": self.request_parameter, "method": self.method, "path": self.path, "headers": headers,
                       "query": dict(self.query or {}), "client": self.client, "last_event_id": headers.get("last-event-id")}
        kwargs = arguments.prepare(fn, kwargs, request)
        return drain(fn(**kwargs))

    def _replay_remote(self, kwargs: dict[str, Any]) -> str:
        endpoint = self.endpoint
        parameters = endpoint.parameters
        if parameters is None:
            parameters = endpoint.connection.request("GET", f"api/stream/endpoints/{endpoint.name}").json().get("parameters", [])
        objects = [p["name"] for p in parameters if p.get("type") == "object"]
        query: dict[str, str] = {}
        body: Any = kwargs
        if len(objects) == 1:  # the one body parameter takes the whole body; the rest go in the query
            body = kwargs.pop(objects[0], None)
            query = {k: v if isinstance(v, str) else json.dumps(v) for k, v in kwargs.items()}
        response = endpoint.connection.http.post(f"stream/{endpoint.name}", params=query, json=body, timeout=None)
        text = response.text
        if response.status_code >= 400:
            raise _remote_error(text, response.status_code)
        marker = text.rfind("event: error\ndata: ")
        if marker >= 0:  # an SSE stream that failed after it began
            raise _remote_error(text[marker + len("event: error\ndata: "):].split("\n", 1)[0], response.status_code)
        return text

    def __repr__(self) -> str:
        error = f" {self.error['type']}: {_short(self.error.get('message', ''), 80)}" if self.error else ""
        args = _short(self.arguments) if self.arguments_kept else "(not kept)"
        return (f"<request #{self.id} of {self.endpoint.name!r} at {time.strftime('%H:%M:%S', time.localtime(self.time))}: "
                f"{self.status} {self.outcome}, {_ms(self.duration)}, args {args}{error}>")

    def _repr_html_(self) -> str:
        return RequestList(self.endpoint, [self])._repr_html_()


def _remote_error(body: str, status: int) -> Exception:
    try:
        error = json.loads(body)
    except ValueError:
        return RemoteError(f"the replayed request failed with HTTP {status}: {body[:500]}")
    if isinstance(error, dict) and isinstance(error.get("error"), dict):
        error = error["error"]  # an endpoint's failure: {"error": {"type", "message", "traceback"}}
    if not isinstance(error, dict):
        return RemoteError(f"the replayed request failed with HTTP {status}: {body[:500]}")
    exc = RemoteError(f"{error.get('type', 'Error')}: {error.get('message', '')}")
    if error.get("traceback"):
        exc.__cause__ = RemoteTraceback(error["traceback"])
    return exc


def drain(result: Any) -> Any:
    """Run what an endpoint function returned to its end, here: the items of a generator,
    iterable or async iterable (a `StreamingResponse`'s content) as a list; another value
    as it is. An async one runs on a loop of its own in a thread (the notebook's loop is
    busy running this cell); its error is raised here with its traceback."""
    if isinstance(result, StreamingResponse):
        result = result.body_iterator
    if inspect.isawaitable(result) or hasattr(result, "__aiter__"):
        return _run_async(result)
    if isinstance(result, (str, bytes, bytearray, dict)) or not hasattr(result, "__iter__"):
        return result
    return list(result)


def _run_async(result: Any) -> Any:
    async def collect() -> Any:
        value = await result if inspect.isawaitable(result) else result
        if isinstance(value, StreamingResponse):
            value = value.body_iterator
        if hasattr(value, "__aiter__"):
            return [item async for item in value]
        return drain(value)

    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["value"] = asyncio.run(collect())
        except BaseException as e:  # noqa: BLE001 - raised again in the caller's thread
            outcome["error"] = e

    thread = threading.Thread(target=run, name="jupyter-stream-replay")
    thread.start()
    thread.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


class RequestList(list):
    """`Endpoint.requests()`: `RecordedRequest`s, newest first (failures first when asked),
    shown as a table; ``[i].replay()`` runs one again."""

    def __init__(self, endpoint: Any, items: list[RecordedRequest], note: str = ""):
        super().__init__(items)
        self.endpoint = endpoint
        self.note = note

    def _rows(self) -> list[tuple[str, ...]]:
        rows = []
        for i, r in enumerate(self):
            error = f"{r.error['type']}: {_short(r.error.get('message', ''), 60)}" if r.error else ""
            args = _short(r.arguments) if r.arguments_kept else f"(not kept: {r.arguments_bytes} bytes)"
            rows.append((str(i), time.strftime("%H:%M:%S", time.localtime(r.time)), str(r.status), r.outcome or "",
                         _ms(r.duration), _ms(r.first_byte), r.worker or "", args, error))
        return rows

    HEAD = ("i", "time", "status", "outcome", "duration", "first byte", "worker", "arguments", "error")

    def __repr__(self) -> str:
        if not self:
            return f"no requests kept for {self.endpoint.name!r}{self.note}"
        rows = [self.HEAD, *self._rows()]
        widths = [max(len(row[c]) for row in rows) for c in range(len(self.HEAD))]
        lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
        hint = f"\n{self.endpoint.name}.requests()[i].replay() runs one again here; .replay(remote=True) on a worker"
        return "\n".join(lines) + hint + self.note

    def _repr_html_(self) -> str:
        if not self:
            return f"<i>{html.escape(repr(self))}</i>"
        head = "".join(f"<th style='text-align:left'>{html.escape(h)}</th>" for h in self.HEAD)
        body = []
        for r, row in zip(self, self._rows()):
            style = " style='background: rgba(255, 0, 0, 0.08)'" if r.failed else ""
            cells = "".join(f"<td style='text-align:left'>{html.escape(c)}</td>" for c in row)
            body.append(f"<tr class='jupyter-stream-request'{style}>{cells}</tr>")
            if r.traceback:
                body.append(f"<tr><td></td><td colspan='{len(self.HEAD) - 1}' style='text-align:left'><details><summary>"
                            f"traceback</summary><pre>{html.escape(r.traceback)}</pre></details></td></tr>")
        hint = (f"<div><code>{html.escape(self.endpoint.name)}.requests()[i].replay()</code> runs one again here; "
                f"<code>.replay(remote=True)</code> on a worker{html.escape(self.note)}</div>")
        return (f"<table class='jupyter-stream-requests'><thead><tr>{head}</tr></thead>"
                f"<tbody>{''.join(body)}</tbody></table>{hint}")


def requests_of(endpoint: Any, failures_first: bool = False) -> RequestList:
    """What `Endpoint.requests` returns (see the module)."""
    reply = endpoint.connection.request("GET", f"api/stream/endpoints/{endpoint.name}/requests").json()
    items = [RecordedRequest(endpoint, info) for info in reply.get("requests", [])]
    if failures_first:
        items.sort(key=lambda r: not r.failed)  # stable: newest first within each group
    note = "" if reply.get("history", True) else f" (registered with --no-history: {endpoint.name!r} keeps none)"
    return RequestList(endpoint, items, note)
