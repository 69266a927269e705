"""The endpoint card's "Try it", apart from its widgets: the request its form makes (as the
demo page makes it from the same signature), and the response as a person reads it:
server-sent events parsed into their fields, NDJSON as rows of a table, JSON laid out,
text as lines, other bytes counted."""

from __future__ import annotations

import html
import json
from typing import Any

#: Events, rows or lines of a tried response kept on the card (the latest).
MAX_ITEMS = 40


def form_parameters(parameters: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The parameters a person fills in (a `Request` parameter is the request itself)."""
    return [p for p in parameters if p.get("type") != "request"]


def initial_text(p: dict[str, Any]) -> str:
    """What a text field starts with: the parameter's default, as one would type it."""
    default = p.get("default")
    if default is None:
        return ""
    if p.get("type") == "list" and isinstance(default, str) and default.startswith("["):
        try:
            return ", ".join(str(x) for x in json.loads(default.replace("'", '"')))
        except ValueError:
            return default
    return str(default)


def build_request(parameters: list[dict[str, Any]], values: dict[str, Any]) -> tuple[str, list[tuple[str, str]], bytes | None]:
    """``(method, query, body)`` for the form's `values` (name -> its text, or a bool for a
    checkbox). Fields left as they started are not sent, so the function's defaults apply;
    a parameter that takes a JSON body is POSTed. Raises ValueError naming a field whose
    JSON does not parse."""
    query: list[tuple[str, str]] = []
    body: Any = None
    for p in form_parameters(parameters):
        name, kind, value = p["name"], p.get("type", "any"), values.get(p["name"])
        if kind == "bool":
            if isinstance(value, bool) and (p.get("required") or value != p.get("default")):
                query.append((name, "true" if value else "false"))
            continue
        text = (value or "").strip()
        if not p.get("required") and text == initial_text(p).strip():
            continue  # as it started: the function's default applies
        if kind == "object":
            try:
                body = json.loads(text or "null")
            except ValueError as e:
                raise ValueError(f"{name}: not valid JSON ({e})") from None
        elif kind == "list":
            items = [text] if text.startswith("[") else [item.strip() for item in text.split(",") if item.strip()]
            query.extend((name, item) for item in items or ["[]"])
        else:
            query.append((name, value if kind == "str" else text))
    if body is None:
        return "GET", query, None
    return "POST", query, json.dumps(body).encode()


def kind_of(media_type: str) -> str:
    """How a response of `media_type` is shown: sse, ndjson, json, text or bytes."""
    base = media_type.split(";")[0].strip().lower()
    if base == "text/event-stream":
        return "sse"
    if base in ("application/x-ndjson", "application/ndjson", "application/jsonl", "application/x-jsonlines"):
        return "ndjson"
    if base == "application/json" or base.endswith("+json"):
        return "json"
    if base.startswith("text/") or base in ("application/xml", "application/javascript"):
        return "text"
    return "bytes"


def readable_error(text: str) -> list[str]:
    """An endpoint's error (`{"error": {...}}`, or jupyter-server's `{"message": ...}`) as
    lines a person reads: the type and message, then the worker's traceback."""
    try:
        body = json.loads(text)
    except ValueError:
        return [text[:2000]]
    if not isinstance(body, dict):
        return [text[:2000]]
    error = body.get("error")
    if isinstance(error, dict):
        head = f"error: {error.get('type', 'Error')}: {error.get('message', '')}"
        return [head, *str(error.get("traceback") or "").rstrip().splitlines()]
    return [f"error: {body.get('message') or text[:2000]}"]


class ResponseView:
    """A tried response as it arrives, parsed by its kind (`kind_of`); `html()` shows it."""

    def __init__(self, media_type: str):
        self.kind = kind_of(media_type)
        self.items: list[Any] = []  # events (dicts), rows, or text lines
        self.count = 0  # items seen, including those no longer kept
        self.bytes = 0
        self.event: dict[str, Any] = {}  # the SSE event being read
        self.document: list[str] = []  # a JSON response's text

    def _keep(self, item: Any) -> None:
        self.items.append(item)
        self.count += 1
        del self.items[:-MAX_ITEMS]

    def feed_line(self, line: str) -> None:
        """One line of the body (without its line break)."""
        self.bytes += len(line) + 1
        if self.kind == "sse":
            self._sse_line(line)
        elif self.kind == "ndjson":
            if line.strip():
                try:
                    self._keep(("row", json.loads(line)))
                except ValueError:
                    self._keep(("text", line))
        elif self.kind == "json":
            self.document.append(line)
        else:
            self._keep(line)

    def _sse_line(self, line: str) -> None:
        if not line:  # a blank line ends the event
            if "data" in self.event:
                self._keep(self.event)
            self.event = {}
            return
        if line.startswith(":"):
            return  # a comment, such as the keep-alive
        field, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if field == "data":
            self.event["data"] = value if "data" not in self.event else self.event["data"] + "\n" + value
        elif field in ("event", "id", "retry"):
            self.event[field] = value

    def finish(self) -> None:
        """The body ended: an event without its blank line still counts."""
        if self.kind == "sse" and "data" in self.event:
            self._keep(self.event)
            self.event = {}

    def summary(self) -> str:
        noun = {"sse": "event", "ndjson": "row", "text": "line"}.get(self.kind)
        if noun is None:
            return f"{self.bytes:,} bytes"
        return f"{self.count:,} {noun}{'' if self.count == 1 else 's'}"

    def html(self) -> str:
        earlier = self.count - len(self.items)
        note = f'<div class="jupyter-stream-note"><i>{earlier:,} earlier not shown</i></div>' if earlier > 0 else ""
        if self.kind == "sse":
            return note + self._table(["event", "id", "data"], [self._event_cells(e) for e in self.items], "jupyter-stream-event")
        if self.kind == "ndjson":
            return note + self._rows_html()
        if self.kind == "json":
            text = "\n".join(self.document)
            try:
                text = json.dumps(json.loads(text), indent=2, ensure_ascii=False)
            except ValueError:
                pass
            return f'<pre class="jupyter-stream-output">{html.escape(text[:20000])}</pre>'
        if self.kind == "text":
            return note + f'<pre class="jupyter-stream-output">{html.escape(chr(10).join(self.items))}</pre>'
        return f'<div class="jupyter-stream-output">{self.bytes:,} bytes received</div>'

    @staticmethod
    def _event_cells(event: dict[str, Any]) -> list[str]:
        data = event.get("data", "")
        if event.get("event") == "error":
            data = "\n".join(readable_error(data))
        return [event.get("event", "message"), event.get("id", ""), data]

    def _rows_html(self) -> str:
        rows = [value for kind, value in self.items]
        if rows and all(kind == "row" and isinstance(value, dict) for kind, value in self.items):
            columns = list(dict.fromkeys(key for row in rows for key in row))
            cells = [[_cell(row[c]) if c in row else "" for c in columns] for row in rows]
            return self._table(columns, cells, "jupyter-stream-row")
        return self._table(["row"], [[_cell(value) if kind == "row" else value] for kind, value in self.items], "jupyter-stream-row")

    @staticmethod
    def _table(columns: list[str], rows: list[list[str]], row_class: str) -> str:
        head = "".join(f"<th style='text-align:left;padding:1px .8em 1px 0;line-height:1.4'>{html.escape(c)}</th>" for c in columns)
        body = "".join(
            f'<tr class="{row_class}">' + "".join(
                f"<td style='vertical-align:top;padding:1px .8em 1px 0;line-height:1.4;white-space:pre-wrap;font-family:monospace'>"
                f"{html.escape(str(cell))}</td>" for cell in row) + "</tr>"
            for row in rows
        )
        return f'<table class="jupyter-stream-output"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _cell(value: Any) -> str:
    """A JSON value in a table cell: strings as they are, the rest as compact JSON."""
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
