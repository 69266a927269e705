"""Each endpoint's recent requests, kept so that its author can see what failed and run
that exact call again in the notebook (``ep.requests()``, ``.replay()``).

What is kept, per endpoint, in the server's memory only (lost when it restarts, dropped
with the endpoint, cleared when its registration turns history off or another owner
replaces it): the arguments as bound (JSON, as they went to the worker), the method,
path, query and headers without credentials, the status, duration, time to first byte,
the worker, and an error's type, message and traceback. Bounded by count
(`JupyterStream.request_history`) and bytes (`request_history_bytes`): the oldest go
first; arguments larger than `request_history_argument_bytes` are not kept (the entry
says how large they were) and a traceback keeps its last `MAX_TRACEBACK` characters.
Only the server's token or login reads it (``GET /api/stream/endpoints/<name>/requests``),
never a share link.
"""

from __future__ import annotations

import collections
import json
import re
import time
from typing import Any

#: headers never kept: they carry credentials
CREDENTIAL_HEADERS = frozenset({
    "authorization", "proxy-authorization", "cookie", "set-cookie", "x-xsrftoken", "x-xsrf-token", "x-csrftoken",
    "x-csrf-token", "x-api-key", "api-key", "x-auth-token", "x-amz-security-token",
})
#: ... nor any whose name says it holds a credential
CREDENTIAL_NAME = re.compile(r"token|secret|passw|api[-_]?key|xsrf|csrf|auth|session|cookie", re.IGNORECASE)
#: query parameters never kept (`RESERVED_QUERY` and friends): credentials or the server's own
CREDENTIAL_QUERY = frozenset({"token", "share", "_xsrf", "access_token", "api_key"})
#: characters of an error's traceback kept (its end: the innermost frames and the message)
MAX_TRACEBACK = 32 * 1024
#: characters of one header's value kept
MAX_HEADER_VALUE = 1024
#: what each entry costs besides its arguments, traceback and headers (its fixed fields)
ENTRY_OVERHEAD = 400


def clean_headers(pairs: Any) -> dict[str, str]:
    """A request's headers (name, value pairs) without credentials, names lower-cased,
    repeated ones joined, long values cut."""
    headers: dict[str, str] = {}
    for name, value in pairs:
        key = name.lower()
        if key in CREDENTIAL_HEADERS or CREDENTIAL_NAME.search(key):
            continue
        value = value if len(value) <= MAX_HEADER_VALUE else value[:MAX_HEADER_VALUE] + "…"
        headers[key] = f"{headers[key]}, {value}" if key in headers else value
    return headers


def clean_query(query: dict[str, list[str]]) -> dict[str, list[str]]:
    return {k: v for k, v in query.items() if k.lower() not in CREDENTIAL_QUERY and not CREDENTIAL_NAME.search(k)}


class RequestHistory:
    """One endpoint's last requests, newest last, within `limit` entries and `max_bytes`."""

    def __init__(self, limit: int = 100, max_bytes: int = 4 << 20, max_argument_bytes: int = 64 << 10):
        self.limit = max(0, limit)
        self.max_bytes = max_bytes
        self.max_argument_bytes = max_argument_bytes
        self.entries: collections.deque[tuple[int, dict[str, Any]]] = collections.deque()  # (size, entry)
        self.bytes = 0
        self.count = 0  # requests recorded so far (an entry's "id" is its number)
        self.dropped = 0  # entries pushed out by the bounds

    def record(self, *, method: str, path: str, query: dict[str, list[str]], headers: dict[str, str], client: str | None,
               arguments: bytes | None, status: int, outcome: str, started: float, duration: float,
               first_byte: float | None, worker: str | None, error: dict[str, Any] | None,
               request_parameter: str | None = None) -> dict[str, Any] | None:
        """Keep one finished request (`arguments`: the bound keyword arguments as JSON
        bytes, as they went to the worker; None when it never got that far)."""
        if self.limit == 0:
            return None
        self.count += 1
        entry: dict[str, Any] = {
            "id": self.count, "time": started, "method": method, "path": path, "query": query, "headers": headers,
            "client": client, "status": status, "outcome": outcome, "duration": duration, "first_byte": first_byte,
            "worker": worker, "error": None, "arguments_bytes": len(arguments) if arguments is not None else None,
            "request_parameter": request_parameter,
        }
        size = ENTRY_OVERHEAD + len(path) + sum(len(k) + len(v) for k, v in headers.items()) + \
            sum(len(k) + sum(len(x) for x in v) for k, v in query.items())
        if arguments is not None and len(arguments) <= self.max_argument_bytes:
            entry["arguments"] = arguments  # bytes until read (`entries`): recording costs no parse
            size += len(arguments)
        else:
            entry["arguments"] = None
        if error is not None:
            tb = error.get("traceback") or ""
            if len(tb) > MAX_TRACEBACK:
                tb = "… (traceback cut, its end kept)\n" + tb[-MAX_TRACEBACK:]
            entry["error"] = {"type": error.get("type"), "module": error.get("module"),
                              "message": str(error.get("message", ""))[:MAX_TRACEBACK], "traceback": tb}
            size += len(tb) + len(entry["error"]["message"])
        if size > self.max_bytes:  # even alone it does not fit: keep it without its arguments and traceback
            size -= len(entry["arguments"] or b"")
            entry["arguments"] = None
            if entry["error"] is not None:
                size -= len(entry["error"]["traceback"])
                entry["error"]["traceback"] = "… (traceback not kept: larger than the history's byte limit)"
        self.entries.append((size, entry))
        self.bytes += size
        while self.entries and (len(self.entries) > self.limit or self.bytes > self.max_bytes):
            old, _ = self.entries.popleft()
            self.bytes -= old
            self.dropped += 1
        return entry

    def last_failure(self) -> dict[str, Any] | None:
        """The newest entry that failed (for the endpoint card), in brief."""
        for _, entry in reversed(self.entries):
            if entry["error"] is not None:
                return {"id": entry["id"], "time": entry["time"], "status": entry["status"], "type": entry["error"]["type"],
                        "message": entry["error"]["message"][:300]}
        return None

    def listing(self) -> dict[str, Any]:
        """What the API shows: the entries, newest first, their arguments parsed."""
        out = []
        for _, entry in reversed(self.entries):
            shown = dict(entry)
            raw = entry["arguments"]
            shown["arguments"] = json.loads(raw) if raw is not None else None
            shown["arguments_kept"] = raw is not None
            out.append(shown)
        return {"requests": out, "limit": self.limit, "max_bytes": self.max_bytes, "bytes": self.bytes,
                "recorded": self.count, "dropped": self.dropped, "now": time.time()}
