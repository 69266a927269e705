"""What an endpoint function returns, and how its chunks become bytes.

`StreamingResponse` mirrors Starlette's / FastAPI's class of the same name so code from
Modal's docs works unchanged. `encoder_for` is used on the worker, where chunks are
turned into bytes before they cross to the server.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any

SSE = "text/event-stream"
NDJSON = "application/x-ndjson"


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
        self.status_code = int(status_code)
        self.headers = dict(headers or {})
        self.media_type = media_type

    def __repr__(self) -> str:
        return f"StreamingResponse(media_type={self.media_type!r}, status_code={self.status_code})"


def sse(data: Any = "", event: str | None = None, id: str | None = None, retry: int | None = None) -> str:
    """Frame one Server-Sent Event. Non-str `data` is JSON-encoded; multi-line data is split
    over several ``data:`` lines, as the SSE spec requires."""
    if not isinstance(data, str):
        data = json.dumps(data, separators=(",", ":"))
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
            return chunk.encode()
        if isinstance(chunk, (bytes, bytearray, memoryview)):
            return bytes(chunk)
        if isinstance(chunk, str):
            return chunk.encode()
        try:
            text = dumps(chunk)
        except TypeError as e:
            raise TypeError(
                f"cannot send a chunk of type {type(chunk).__name__}: yield str or bytes, "
                f"or a JSON-serializable object ({e})"
            ) from None
        return prefix + text.encode() + suffix

    return encode
