"""An OpenAI-compatible chat completions API for an endpoint registered with ``--openai``.

The endpoint's function takes the chat ``messages`` (and may take ``max_tokens`` and
``temperature``) and yields text pieces. ``POST /stream/<name>/v1/chat/completions``
runs it like any call of the endpoint (same worker pool, queue, backpressure and
disconnect handling; `EndpointHandler` does the work) and wraps what it yields:
with ``"stream": true`` as ``chat.completion.chunk`` events and a final ``data: [DONE]``,
otherwise as one ``chat.completion``. ``GET /stream/<name>/v1/models`` lists the one
model. So ``openai.OpenAI(base_url=<endpoint URL>/v1, api_key=<token or share token>)``
works, as does anything built on it.

How the completion ended is what the function says: a `jupyter_stream.Finish` it yields
last (or returns) gives ``finish_reason`` and ``usage``; without one, ``finish_reason``
is ``"stop"`` and ``usage`` is null, unless the endpoint was registered with
``openai_count_chunks``: then each yielded piece counts as one completion token. The
worker reports both with the call's end (``finish``, see `wire`). A streamed completion
ends with a chunk that carries the ``finish_reason`` and, when the request asks with
``stream_options: {"include_usage": true}``, a last chunk with no choices and the
``usage``, as OpenAI sends it.

On an endpoint registered with ``resumable``, a streamed completion is a resumable stream
(see `resumable`): the same POST again with ``Last-Event-ID``, or a GET with ``?stream=``,
gets the rest of the same completion.
"""

from __future__ import annotations

import codecs
import json
import time
import uuid
from typing import Any

from jupyter_server.auth.decorator import allow_unauthenticated
from tornado import web

from .handlers import EndpointHandler, StreamHandlerBase
from .registry import EndpointSpec, ParameterError, loads_json

#: Most text a whole (``"stream": false``) completion may hold: past it the call is stopped
#: and the client is told to stream instead.
MAX_COMPLETION_BYTES = 16 * 1024 * 1024


def openai_error(message: str, kind: str = "invalid_request_error", code: str | None = None) -> str:
    return json.dumps({"error": {"message": message, "type": kind, "param": None, "code": code}})


class CompletionTooLong(Exception):
    """A whole completion outgrew `MAX_COMPLETION_BYTES` (the relay stops its call)."""


class OpenAIMixin:
    #: a missing or wrong key is a 401, as OpenAI answers it (`openai.AuthenticationError`)
    unauthenticated_status = 401

    def openai_spec(self, name: str) -> EndpointSpec:
        spec = self.stream.endpoints.get(name)
        if spec is None or not spec.openai:
            what = "no endpoint named" if spec is None else "not served as an OpenAI API (register it with --openai):"
            raise web.HTTPError(404, f"{what} {name!r}")
        return spec

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        """Errors the way OpenAI's clients read them: ``{"error": {"message", "type"}}``."""
        error = (kwargs.get("exc_info") or (None, None))[1]
        message = error.log_message if isinstance(error, web.HTTPError) and error.log_message else self._reason
        if self.retry_after:
            self.set_header("Retry-After", str(self.retry_after))
        if status_code == 401:  # OpenAI's own answer to a wrong key: the clients raise AuthenticationError
            self.set_header("WWW-Authenticate", 'Bearer realm="jupyter-stream"')
            self.finish(openai_error(f"Incorrect API key provided: {message}", "invalid_request_error", "invalid_api_key"))
            return
        kind = "permission_error" if status_code == 403 else "invalid_request_error" if status_code < 500 else "server_error"
        self.finish(openai_error(message, kind))


class ModelsHandler(OpenAIMixin, StreamHandlerBase):
    """``GET {base_url}stream/<name>/v1/models``: the endpoint, as the one model."""

    accepts_shares = True

    @allow_unauthenticated  # a share may open it: check_access stands in for @web.authenticated
    async def get(self, name: str) -> None:
        await self.check_access("read")
        spec = self.openai_spec(name)
        self.finish(json.dumps({"object": "list", "data": [
            {"id": spec.name, "object": "model", "created": int(spec.created), "owned_by": "jupyter-stream"}]}))


class ChatCompletionsHandler(OpenAIMixin, EndpointHandler):
    """``POST {base_url}stream/<name>/v1/chat/completions``."""

    streaming = False
    include_usage = False
    reads_finish = True
    text: list[str]

    @allow_unauthenticated
    async def get(self, name: str) -> None:
        """Only to resume a streamed completion of a --resumable endpoint (``?stream=``,
        ``Last-Event-ID``); a completion is asked for with POST."""
        await self.check_access("execute")
        spec = self.openai_spec(name)
        if not (spec.resumable and await self.resume(spec)):
            raise web.HTTPError(405, "POST a chat completion request here")

    @allow_unauthenticated
    async def post(self, name: str) -> None:  # type: ignore[override]
        await self.check_access("execute")
        if self._finished:  # answered 413 while the body arrived
            return
        spec = self.openai_spec(name)
        if spec.resumable and await self.resume(spec):  # a client resuming a streamed completion
            return
        try:
            request = loads_json(bytes(self._body) or b"{}", "the chat completion request")
        except ParameterError as e:
            raise web.HTTPError(400, str(e)) from None
        if not isinstance(request, dict) or not isinstance(request.get("messages"), list):
            raise web.HTTPError(400, "a chat completion request is a JSON object with 'messages' (a list of {role, content})")
        accepted = {p["name"] for p in spec.signature.get("params", [])}
        arguments: dict[str, Any] = {"messages": request["messages"]}
        max_tokens = request.get("max_completion_tokens", request.get("max_tokens"))
        if max_tokens is not None and "max_tokens" in accepted:
            arguments["max_tokens"] = max_tokens
        if request.get("temperature") is not None and "temperature" in accepted:
            arguments["temperature"] = request["temperature"]
        try:
            kwargs = self.encode_kwargs(spec.bind({}, arguments))
        except ParameterError as e:
            raise web.HTTPError(400, str(e)) from None
        self.streaming = self.commit_early = bool(request.get("stream"))  # a whole completion keeps its status until it is done
        options = request.get("stream_options")
        if options is not None and (not isinstance(options, dict) or not self.streaming):
            raise web.HTTPError(400, 'stream_options is an object such as {"include_usage": true}, for "stream": true only')
        self.include_usage = bool((options or {}).get("include_usage"))
        self.count_chunks = spec.openai_count_chunks
        self.model = spec.name
        self.completion_id = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        self.created = int(time.time())
        self.decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self.text = []
        self.text_bytes = 0
        try:
            await self.serve_call(spec, kwargs, media_type="text/plain; charset=utf-8")
        except CompletionTooLong:  # the relay has stopped the call
            spec.stats["errors"] += 1
            self.text = []
            self.failed({"type": "CompletionTooLong", "message": f"the completion is longer than {MAX_COMPLETION_BYTES >> 20} "
                         'MiB; ask for it with "stream": true, or a smaller max_tokens'}, False)

    # -- the endpoint's output, wrapped ----------------------------------------------------

    def chunk(self, delta: dict[str, Any] | None, finish: str | None = None, usage: Any = None) -> bytes:
        """One ``chat.completion.chunk`` event; `delta` None: the usage chunk (no choices)."""
        body: dict[str, Any] = {"id": self.completion_id, "object": "chat.completion.chunk", "created": self.created,
                                "model": self.model,
                                "choices": [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish}]}
        if self.include_usage:  # as OpenAI: null on every chunk but the last
            body["usage"] = usage
        return f"data: {json.dumps(body)}\n\n".encode()

    def ending(self) -> tuple[str, dict[str, Any] | None]:
        """The completion's ``finish_reason`` and ``usage``: what the function said with a
        `Finish`, else "stop" and, only if the endpoint counts chunks, their count."""
        finish = self.output.finish or {}
        usage = finish.get("usage")
        if usage is None and self.count_chunks:
            chunks = finish.get("chunks", 0)
            usage = {"prompt_tokens": 0, "completion_tokens": chunks, "total_tokens": chunks}
        return finish.get("reason") or "stop", usage

    def resumable_response(self) -> bool:
        return self.streaming  # a whole completion is one JSON document

    def begin(self, start: dict[str, Any]) -> bool:
        self.set_status(200)
        if not self.streaming:
            self.set_header("Content-Type", "application/json")
            return False
        self.set_header("Content-Type", "text/event-stream")
        self.set_header("Cache-Control", "no-cache, no-transform")
        self.set_header("X-Accel-Buffering", "no")
        if self.rstream is not None:
            self.announce_stream(None)
        self.sse_write(self.chunk({"role": "assistant", "content": ""}))
        return True

    async def emit(self, data: memoryview) -> None:
        text = self.decoder.decode(data.tobytes())
        if not text:
            return
        if not self.streaming:
            self.text_bytes += data.nbytes
            if self.text_bytes > MAX_COMPLETION_BYTES:  # held here whole: stop it before it takes the server's memory
                raise CompletionTooLong()
            self.text.append(text)
            return
        self.sse_write(self.chunk({"content": text}))
        await self.sse_flush()

    def complete(self) -> None:
        rest = self.decoder.decode(b"", final=True)
        reason, usage = self.ending()
        if not self.streaming:
            content = "".join(self.text) + rest
            self.finish(json.dumps({
                "id": self.completion_id, "object": "chat.completion", "created": self.created, "model": self.model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": reason}],
                "usage": usage,
            }))
            return
        if rest:
            self.sse_write(self.chunk({"content": rest}))
        self.sse_write(self.chunk({}, reason))
        if self.include_usage:
            self.sse_write(self.chunk(None, usage=usage))
        self.sse_write(b"data: [DONE]\n\n")

    def failed(self, error: dict[str, Any], sse: bool) -> None:
        self.log.warning("jupyter_stream: endpoint %s failed: %s: %s", self.request.path, error["type"], error["message"])
        message = f"{error['type']}: {error['message']}"
        if not self._headers_written:
            self.clear()
            self.set_status(500)
            self.set_header("Content-Type", "application/json")
            self.finish(openai_error(message, "server_error"))
        elif not self.streaming:  # a completion whose headers went out while it waited
            self.finish(openai_error(message, "server_error"))
        else:  # OpenAI's clients raise on an event whose data has "error"
            self.sse_write(f"data: {openai_error(message, 'server_error')}\n\n".encode())
