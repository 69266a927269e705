"""What an endpoint function returns, how its chunks become bytes, and the `Request` it
may ask for.

`StreamingResponse` mirrors Starlette's / FastAPI's class of the same name so code from
Modal's docs works unchanged. `encoder_for` is used on the worker, where chunks are
turned into bytes before they cross to the server.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

SSE = "text/event-stream"
NDJSON = "application/x-ndjson"

#: a header name is an HTTP token (RFC 9110)
_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")


def text_safe(text: str) -> str:
    """`text` as UTF-8 can carry it: a lone surrogate (half an emoji, as half-decoded LLM
    tokens have) becomes U+FFFD, a pair written as two surrogates becomes its character.
    Chunks go out as UTF-8 and messages to the server are UTF-8 JSON: one such character
    must not stop either."""
    if text.isascii():
        return text
    try:
        text.encode()
        return text
    except UnicodeEncodeError:
        return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


def check_status(status: Any) -> int:
    """An HTTP status a streamed response can have: 200-599 and one that carries a body
    (not 204 or 304). Raises ValueError saying what to use."""
    if isinstance(status, bool) or not isinstance(status, int) or not 200 <= status <= 599 or status in (204, 304):
        raise ValueError(f"status_code must be a whole number from 200 to 599 that allows a body (not 204 or 304), "
                         f"got {status!r}")
    return status


def check_headers(headers: Any) -> dict[str, str]:
    """Response headers as tornado can send them: token names, and values (str or numbers)
    on one line. Raises ValueError naming the header and what is wrong."""
    if headers is None:
        return {}
    if not isinstance(headers, Mapping):
        raise ValueError(f"headers must be a dict of names to values, got {type(headers).__name__}")
    checked = {}
    for name, value in headers.items():
        if not isinstance(name, str) or not _HEADER_NAME.fullmatch(name):
            raise ValueError(f"header name {name!r} is not valid: use letters, digits and - (e.g. X-Note)")
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise ValueError(f"header {name!r} must be a str or a number, got {type(value).__name__} {value!r}")
        value = str(value)
        if any(c in value for c in "\r\n\0"):
            raise ValueError(f"header {name!r} has a line break or NUL in its value {value!r}: send it on one line")
        checked[name] = text_safe(value)
    return checked


@dataclass
class Request:
    """The HTTP request an endpoint is answering, for a parameter annotated
    ``request: jupyter_stream.Request``: method, path, headers (lower-case names),
    query (each name's values), the client's address, and the SSE ``Last-Event-ID`` a
    reconnecting EventSource sends, so a stream can resume where it left off. The
    credentials are left out: no ``Authorization`` or ``Cookie`` header, no ``token``."""

    method: str
    path: str
    headers: dict[str, str] = field(default_factory=dict)
    query: dict[str, list[str]] = field(default_factory=dict)
    client: str | None = None
    last_event_id: str | None = None


class StreamingResponse:
    """A streamed HTTP response: `content` is any iterable or async iterable of chunks.

    `str` chunks are sent as UTF-8 and `bytes` verbatim; other objects are JSON-encoded and
    framed for `media_type` (an SSE ``data:`` event, or one line each otherwise).
    """

    def __init__(
        self,
        content: Any,
        status_code: int = 200,
        headers: Mapping[str, str] | None = None,
        media_type: str | None = None,
    ):
        self.body_iterator = content
        self.status_code = check_status(status_code)
        self.headers = check_headers(headers)
        self.media_type = media_type

    def __repr__(self) -> str:
        return f"StreamingResponse(media_type={self.media_type!r}, status_code={self.status_code})"


@dataclass(frozen=True)
class Finish:
    """Why a stream ended, and what it cost: ``yield jupyter_stream.Finish(reason="length",
    usage={"prompt_tokens": 12, "completion_tokens": 64})`` as an endpoint's last chunk
    (or ``return`` it from a generator). The ``--openai`` route reports them as the
    completion's ``finish_reason`` and ``usage``; it is never sent as text. A yielded
    Finish ends the stream (the generator is closed, as if it had returned); on other
    routes it only does that. `usage` holds whole token counts (``total_tokens`` is added
    when both others are there), and may hold OpenAI's ``*_details`` objects of counts."""

    reason: str = "stop"
    usage: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.reason, str) or not self.reason or "\n" in self.reason or len(self.reason) > 64:
            raise ValueError(f'Finish(reason=...) is a short word such as "stop" or "length", got {self.reason!r}')
        if self.usage is None:
            return
        if not isinstance(self.usage, Mapping):
            raise TypeError(f"Finish(usage=...) is a dict of token counts, got {type(self.usage).__name__}")
        usage = {}
        for name, value in self.usage.items():
            details = isinstance(value, Mapping) and all(_count(v) for v in value.values())
            if not isinstance(name, str) or not (_count(value) or details):
                raise ValueError(f"Finish(usage=...) holds whole token counts by name (e.g. completion_tokens=64), "
                                 f"got {name!r}: {value!r}")
            usage[name] = dict(value) if details else value
        if "total_tokens" not in usage and _count(usage.get("prompt_tokens")) and _count(usage.get("completion_tokens")):
            usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        object.__setattr__(self, "usage", usage)

    def info(self) -> dict[str, Any]:
        """What travels to the server at the stream's end."""
        return {"reason": self.reason, "usage": self.usage}


def _count(value: Any) -> bool:
    return type(value) is int and value >= 0


class Finished(Exception):
    """Raised by an encoder (`encoder_for`) for a `Finish` chunk: the stream ends there,
    and its `finish` goes with the end, not into the body."""

    def __init__(self, finish: Finish):
        super().__init__(finish.reason)
        self.finish = finish


def sse(data: Any = "", event: str | None = None, id: str | None = None, retry: int | None = None) -> str:
    """Frame one Server-Sent Event. Non-str `data` is JSON-encoded; multi-line data is split
    over several ``data:`` lines, as the SSE spec requires."""
    if not isinstance(data, str):
        data = json.dumps(data, separators=(",", ":"), ensure_ascii=False)  # UTF-8, as other chunks
    lines = []
    if event is not None:
        lines.append(f"event: {_one_line(event, 'event')}")
    if id is not None:
        lines.append(f"id: {_one_line(str(id), 'id')}")
    if retry is not None:
        lines.append(f"retry: {int(retry)}")
    lines.extend("data: " + line for line in data.replace("\r\n", "\n").replace("\r", "\n").split("\n"))
    return "\n".join(lines) + "\n\n"


def _one_line(value: str, field: str) -> str:
    if "\n" in value or "\r" in value:
        raise ValueError(f"SSE {field} must be a single line, got {value!r}")
    return value


def plain_response(result: Any, media_type: str | None) -> tuple[bytes, str] | None:
    """A function's return value as one whole response, the way FastAPI sends it, or None
    when it is something to stream (a generator, an iterator, any other iterable).

    Without a declared `media_type`: `str` is ``text/plain``, `bytes` is
    ``application/octet-stream``, and a dict, list, number, bool or None is one
    ``application/json`` document. With one, a str or bytes goes out as it is, and a
    dict, number or bool is encoded once for that media type (a list then streams its
    items, as before values were told apart)."""
    if isinstance(result, str):
        return text_safe(result).encode(), media_type or "text/plain; charset=utf-8"
    if isinstance(result, (bytes, bytearray, memoryview)):
        return bytes(result), media_type or "application/octet-stream"
    if media_type is None and (result is None or isinstance(result, (dict, list, tuple, int, float, bool))):
        return _json_document(result), "application/json"
    if result is None:
        return b"", media_type or "application/json"
    if isinstance(result, (dict, int, float, bool)) or not (hasattr(result, "__iter__") or hasattr(result, "__aiter__")):
        return (encoder_for(media_type)(result) if media_type else _json_document(result)), media_type or "application/json"
    return None


def _json_document(value: Any) -> bytes:
    try:
        return text_safe(json.dumps(value, ensure_ascii=False, separators=(",", ":"))).encode()
    except TypeError as e:
        raise TypeError(
            f"cannot send a return value of type {type(value).__name__} as JSON ({e}): return a dict, list, str, "
            "bytes or number, or yield chunks to stream"
        ) from None


def encoder_for(media_type: str | None) -> Callable[[Any], bytes]:
    """Return the function that turns one yielded chunk into bytes for `media_type`."""
    base = (media_type or "").split(";")[0].strip().lower()
    if base == SSE:
        prefix, suffix = b"data: ", b"\n\n"
    else:
        prefix, suffix = b"", b"\n"
    dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode

    def encode(chunk: Any) -> bytes:
        if type(chunk) is str:  # the hot case first
            try:
                return chunk.encode()
            except UnicodeEncodeError:  # a lone surrogate: sent as U+FFFD
                return text_safe(chunk).encode()
        if isinstance(chunk, (bytes, bytearray, memoryview)):
            return bytes(chunk)
        if isinstance(chunk, str):
            return text_safe(chunk).encode()
        if isinstance(chunk, Finish):  # not a chunk: the stream's end (`Worker.emit` catches it)
            raise Finished(chunk)
        try:
            text = dumps(chunk)
        except TypeError as e:
            raise TypeError(
                f"cannot send a chunk of type {type(chunk).__name__}: yield str or bytes, "
                f"or a JSON-serializable object ({e})"
            ) from None
        return prefix + text_safe(text).encode() + suffix

    return encode
