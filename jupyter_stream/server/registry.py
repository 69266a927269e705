"""Registered endpoints, and turning an HTTP request's parameters into keyword arguments.

The server never unpickles user code: a registration carries the cloudpickled function
(forwarded untouched to workers) next to a JSON description of its parameters, made on
the client by `describe_parameters`, which is all the server needs to validate requests.
"""

from __future__ import annotations

import base64
import binascii
import collections
import functools
import json
import math
import re
import time
from dataclasses import dataclass, field
from typing import Any

from ..requirements import check_requirements
from ..signatures import (
    MAX_DOC,
    MAX_FUNCTION_BYTES,
    MAX_RETRIES,
    MAX_TIMEOUT,
    RegistrationError,
    check_batch,
    check_media_type,
    check_name,
    check_signature,
)
from .resumable import DEFAULT_WINDOW, MAX_WINDOW, RESUME_QUERY

RESERVED_QUERY = {"token", "_xsrf", "share"}
#: lines of printed output kept per endpoint
RECENT_OUTPUT = 50
#: requests whose time to first byte is kept per endpoint
RECENT_LATENCIES = 1000
#: seconds a request may wait for a worker before it gets a 503 (an endpoint's --queue-timeout)
DEFAULT_QUEUE_TIMEOUT = 60.0

#: Arrays and objects nested deeper than this in a JSON body are refused (a 400), so that
#: no request can make the server or a worker recurse without bound ...
MAX_JSON_DEPTH = 32
#: ... and a document with more values than this (arrays, objects and the values in them),
#: whose parsing would hold the server's event loop and take memory many times its size.
MAX_JSON_VALUES = 1_000_000

#: JSON strings (whose brackets and commas are text), for `json_values`
_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)


class ParameterError(ValueError):
    """A request's parameters do not fit the endpoint's signature (an HTTP 400)."""


def json_values(raw: bytes) -> int:
    """About how many values a JSON document holds: its arrays and objects, and one per
    comma outside its strings (read from the text, at C speed, without parsing it)."""
    structure = _JSON_STRING.sub(b"", raw)
    return structure.count(b"[") + structure.count(b"{") + structure.count(b",")


def json_depth(value: Any, limit: int = MAX_JSON_DEPTH) -> int:
    """How deeply arrays and objects nest in a parsed JSON value, level by level (no
    recursion), counting no further than ``limit + 1``."""
    level, depth = [value], 0
    while depth <= limit:
        containers = [v for v in level if type(v) is dict or type(v) is list]
        if not containers:
            break
        depth += 1
        level = []
        for container in containers:
            level.extend(container.values() if type(container) is dict else container)
    return depth


def loads_json(raw: bytes | str, what: str) -> Any:
    """Parse a request's JSON, refusing what is not JSON, holds more than
    `MAX_JSON_VALUES` values (told from the text before anything is parsed: the parse
    runs on the server's event loop) or nests past `MAX_JSON_DEPTH`. Its cheap counts of
    commas and brackets skip the exact checks for all but large or deep documents."""
    data = raw.encode("utf-8", "surrogatepass") if isinstance(raw, str) else raw
    brackets = data.count(b"[") + data.count(b"{")
    if brackets + data.count(b",") > MAX_JSON_VALUES and json_values(data) > MAX_JSON_VALUES:
        raise ParameterError(f"{what} holds more than {MAX_JSON_VALUES:,} values; send fewer, or pass large data "
                             "as a file or URL the endpoint reads")
    too_deep = f"{what} nests arrays or objects more than {MAX_JSON_DEPTH} levels deep; send a flatter document"
    try:
        value = json.loads(raw)
    except RecursionError:
        raise ParameterError(too_deep) from None
    except ValueError as e:  # also UnicodeDecodeError: the bytes are not UTF-8
        raise ParameterError(f"{what} is not valid JSON ({e}); send UTF-8 JSON such as {{\"n\": 3}}") from None
    if brackets > MAX_JSON_DEPTH and json_depth(value) > MAX_JSON_DEPTH:
        raise ParameterError(too_deep)
    return value


REGISTRATION_FIELDS = {
    "endpoint": {"name", "function", "media_type", "signature", "doc", "persist", "owner", "requirements", "queue_timeout", "openai",
                 "openai_count_chunks", "history", "resumable", "batch"},
    "function": {"name", "function", "generator", "retries", "timeout", "doc", "persist", "owner", "requirements", "queue_timeout",
                 "batch"},
}


def parse_registration(raw: bytes, kind: str) -> dict[str, Any]:
    """Check every field of a registration's JSON body (`kind` is "endpoint" or
    "function"); returns the fields with ``blob`` (the pickled function's bytes) added.
    Anything wrong is a `RegistrationError` that names the field and what to send."""
    try:
        body = loads_json(raw, "the registration")
    except ParameterError as e:
        raise RegistrationError(str(e)) from None
    if not isinstance(body, dict):
        raise RegistrationError("a registration must be a JSON object with 'name' and 'function' (base64 cloudpickle)")
    unknown = set(body) - REGISTRATION_FIELDS[kind]
    if unknown:
        raise RegistrationError(f"unknown fields {sorted(unknown)} in a{'n' if kind == 'endpoint' else ''} {kind} "
                                f"registration; allowed: {sorted(REGISTRATION_FIELDS[kind])}")
    if "name" not in body:
        raise RegistrationError("the registration has no 'name'")
    try:
        check_name(body["name"])
    except ValueError as e:
        raise RegistrationError(str(e)) from None
    function = body.get("function")
    if not isinstance(function, str) or not function:
        raise RegistrationError("'function' must be the cloudpickled function, base64-encoded (a non-empty string)")
    if len(function) > MAX_FUNCTION_BYTES * 4 // 3 + 4:
        raise RegistrationError(f"'function' is larger than {MAX_FUNCTION_BYTES} bytes; load large data inside the function instead")
    try:
        body["blob"] = base64.b64decode(function, validate=True)
    except (binascii.Error, ValueError) as e:
        raise RegistrationError(f"'function' is not valid base64 ({e}); send the cloudpickled function base64-encoded") from None
    doc = body.get("doc", "")
    if doc is None:
        doc = ""
    if not isinstance(doc, str) or len(doc) > MAX_DOC:
        raise RegistrationError(f"'doc' must be a string of at most {MAX_DOC} characters")
    body["doc"] = doc
    owner = body.get("owner") or ""
    if not isinstance(owner, str) or len(owner) > 4096:
        raise RegistrationError("'owner' must be a string (the registering notebook or script) of at most 4096 characters")
    body["owner"] = owner
    if not isinstance(body.get("persist", False), bool):
        raise RegistrationError("'persist' must be true or false")
    body["requirements"] = check_requirements(body.get("requirements"))
    body["batch"] = check_batch(body.get("batch"))
    if kind == "endpoint":
        # None: not declared; the worker picks it from what the function returns
        body["media_type"] = check_media_type(body["media_type"]) if body.get("media_type") is not None else None
        body["signature"] = check_signature(body.get("signature"))
        queue_timeout = body.get("queue_timeout")
        if queue_timeout is None:
            queue_timeout = DEFAULT_QUEUE_TIMEOUT
        body["queue_timeout"] = check_queue_timeout(queue_timeout)
        if not isinstance(body.get("openai", False), bool):
            raise RegistrationError("'openai' must be true or false")
        body["openai"] = body.get("openai", False)
        if body["openai"] and "messages" not in {p["name"] for p in body["signature"].get("params", [])}:
            raise RegistrationError("an --openai endpoint's function takes the chat `messages` (and may take max_tokens, "
                                    "temperature), e.g. def chat(messages: list, max_tokens: int = 64)")
        count = body.get("openai_count_chunks", False)
        if not isinstance(count, bool) or (count and not body["openai"]):
            raise RegistrationError("'openai_count_chunks' must be true or false, and true only with 'openai'")
        body["openai_count_chunks"] = count
        if body["openai"] and body["batch"] is not None:
            raise RegistrationError("an --openai endpoint cannot be batched (yet): serve the batched model through a "
                                    "batched %%stream_function that the --openai endpoint calls")
        if not isinstance(body.get("history", True), bool):
            raise RegistrationError("'history' must be true or false (false: keep none of its requests)")
        body["history"] = body.get("history", True)
        body["resumable"] = check_resumable(body.get("resumable"), body)
        return body
    if not isinstance(body.get("generator", False), bool):
        raise RegistrationError("'generator' must be true or false")
    retries = body.get("retries", 0)
    retries = 0 if retries is None else retries
    if isinstance(retries, bool) or not isinstance(retries, int) or not 0 <= retries <= MAX_RETRIES:
        raise RegistrationError(f"'retries' must be a whole number from 0 to {MAX_RETRIES}, got {retries!r}")
    body["retries"] = retries
    timeout = body.get("timeout")
    if timeout is not None and (
        isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not math.isfinite(timeout)
        or not 0 < timeout <= MAX_TIMEOUT
    ):
        raise RegistrationError(
            f"'timeout' must be a number of seconds above 0 and at most {MAX_TIMEOUT:g} (7 days), or null for none; got {timeout!r}"
        )
    body["timeout"] = float(timeout) if timeout is not None else None
    # none: a call from a notebook waits as long as it takes (`scheduler.queue_timeout`)
    body["queue_timeout"] = check_queue_timeout(body["queue_timeout"]) if body.get("queue_timeout") is not None else None
    return body


def check_resumable(value: Any, body: dict[str, Any]) -> float | None:
    """An endpoint's resume window in seconds (``resumable``: true is the default window),
    or None when its streams are not resumable (`resumable`)."""
    if value is None or value is False:
        return None
    window = DEFAULT_WINDOW if value is True else value
    if isinstance(window, bool) or not isinstance(window, (int, float)) or not math.isfinite(window) \
            or not 0 < window <= MAX_WINDOW:
        raise RegistrationError(f"'resumable' must be true (a {DEFAULT_WINDOW:g} s window), false, or the seconds a stream's "
                                f"run goes on with no client (above 0, at most {MAX_WINDOW:g}); got {value!r}")
    media_type = body.get("media_type")
    if media_type is not None and not media_type.split(";")[0].strip().lower() == "text/event-stream" and not body.get("openai"):
        raise RegistrationError(f"a resumable endpoint streams Server-Sent Events; its media type is {media_type!r}: "
                                "declare text/event-stream (or none), or leave out --resumable")
    taken = sorted({p["name"] for p in body["signature"].get("params", [])} & set(RESUME_QUERY))
    if taken:
        raise RegistrationError(f"a resumable endpoint keeps the query names {', '.join(RESUME_QUERY)} for resuming streams; "
                                f"rename its parameter {taken[0]!r}")
    return float(window)


def check_queue_timeout(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not 0 < value <= MAX_TIMEOUT:
        raise RegistrationError(f"'queue_timeout' must be a number of seconds above 0 and at most {MAX_TIMEOUT:g}, got {value!r}")
    return float(value)


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _list_items(name: str, values: list[str]) -> list[Any]:
    """A list parameter's items from the query: repeated (``?tags=a&tags=b``), comma
    separated (``?tags=a,b``) or a JSON array (``?tags=["a","b"]``)."""
    if len(values) != 1:
        return values
    text = values[0].strip()
    if text.startswith("["):
        try:
            items = loads_json(text, f"parameter {name!r}")
        except ParameterError as e:
            if "not valid JSON" in str(e):
                raise ParameterError(f"parameter {name!r} looks like a JSON array but is not one: {text[:200]!r}") from None
            raise
        if not isinstance(items, list):
            raise ParameterError(f"parameter {name!r} must be a list")
        return [item if isinstance(item, str) else json.dumps(item) for item in items]
    return text.split(",") if text else []


def _from_text(kind: str, name: str, text: str, spec: Any = None) -> Any:
    try:
        if kind == "int":
            return int(text)
        if kind == "float":
            return float(text)
        if kind == "bool":
            low = text.lower()
            if low in _TRUE:
                return True
            if low in _FALSE:
                return False
            raise ValueError
    except ValueError:
        takes = f"; endpoint {spec.name!r} takes {spec.describe()}" if spec is not None else ""
        raise ParameterError(f"parameter {name!r} must be {kind}, got {text!r}{takes}") from None
    return text


def _from_json(kind: str, name: str, value: Any) -> Any:
    ok = {
        "int": isinstance(value, int) and not isinstance(value, bool),
        "float": isinstance(value, (int, float)) and not isinstance(value, bool),
        "bool": isinstance(value, bool),
        "str": isinstance(value, str),
        "object": isinstance(value, dict),
    }.get(kind, True)
    if not ok:
        raise ParameterError(f"parameter {name!r} must be {kind}, got {type(value).__name__} {value!r}")
    return float(value) if kind == "float" else value


@dataclass
class EndpointSpec:
    """One registered endpoint. Immutable once registered: re-registering replaces the
    whole spec, so streams already running keep the function they started with."""

    name: str
    fn_hash: str
    fn_blob: bytes
    media_type: str | None  # as declared at registration; None lets the return value decide
    signature: dict[str, Any]
    doc: str = ""
    queue_timeout: float = DEFAULT_QUEUE_TIMEOUT
    openai: bool = False  # also served as an OpenAI-compatible chat completions API
    #: the OpenAI route counts yielded pieces as completion tokens (when no `Finish` says)
    openai_count_chunks: bool = False
    persist: bool = False
    owner: str = ""  # the notebook (or script) that registered it
    #: whether its recent requests are kept (`history`); off with --no-history
    keeps_history: bool = True
    #: seconds a stream's run goes on with no client, to be resumed (`resumable`); None: not resumable
    resumable: float | None = None
    #: its recent requests (`history.RequestHistory`), carried over when its owner registers it again
    history: Any = field(default=None, repr=False, compare=False)
    #: what its workers need (`requirements.check_requirements`): GPUs, pool size, kernel, env
    requirements: dict[str, Any] = field(default_factory=dict)
    pool: Any = field(default=None, repr=False, compare=False)  # the pool of those requirements (`JupyterStream.pool_for`)
    #: ``{"max_batch_size", "wait_ms"}`` when its requests run in batches (`batching`), and
    #: the `batching.Batcher` that forms them
    batch: dict[str, Any] | None = None
    batcher: Any = field(default=None, repr=False, compare=False)
    created: float = field(default_factory=time.time)
    stats: dict[str, int] = field(default_factory=dict, repr=False, compare=False)
    #: the last lines its code printed, for the endpoint card's live view
    output: collections.deque = field(default_factory=lambda: collections.deque(maxlen=RECENT_OUTPUT), repr=False, compare=False)
    #: seconds to the first byte of its recent requests (their p50 and p99 show in its info)
    first_bytes: collections.deque = field(default_factory=lambda: collections.deque(maxlen=RECENT_LATENCIES), repr=False,
                                           compare=False)

    def describe(self) -> str:
        parts = []
        for p in self.signature.get("params", []):
            if p["type"] == "request":
                continue
            if p["type"] == "object":
                parts.append(f"{p['name']} (JSON body {expected_body(p)}{', required' if p.get('required') else ''})")
                continue
            kind = p["type"] + (f"[{p['item']}]" if p["type"] == "list" else "")
            parts.append(f"{p['name']} ({kind}{', required' if p.get('required') else ''})")
        return ", ".join(parts) or "no parameters"

    @functools.cached_property  # a spec never changes: worked out once, not per request
    def body_parameter(self) -> dict[str, Any] | None:
        """The parameter that takes the whole JSON body: the only one annotated as a dict,
        dataclass or pydantic model (as FastAPI binds a single body parameter)."""
        objects = [p for p in self.signature.get("params", []) if p.get("type") == "object"]
        return objects[0] if len(objects) == 1 else None

    @functools.cached_property
    def request_parameter(self) -> str | None:
        """The parameter annotated `jupyter_stream.Request`, if any: it gets the request."""
        return next((p["name"] for p in self.signature.get("params", []) if p.get("type") == "request"), None)

    def bind(self, query: dict[str, list[str]], body: dict[str, Any] | None) -> dict[str, Any]:
        """Keyword arguments from query strings and a JSON object body, converted by type."""
        params = {p["name"]: p for p in self.signature.get("params", [])}
        var_keyword = self.signature.get("var_keyword", False)
        body_parameter = self.body_parameter
        kwargs: dict[str, Any] = {}
        for name, values in query.items():
            if name in RESERVED_QUERY:
                continue
            p = params.get(name)
            if p is None:
                if not var_keyword:
                    raise ParameterError(f"unknown parameter {name!r}; endpoint {self.name!r} takes {self.describe()}")
                kwargs[name] = values[-1]
            elif p["type"] in ("object", "request"):
                raise ParameterError(f"parameter {name!r} does not come from the query; endpoint {self.name!r} takes {self.describe()}")
            elif p["type"] == "list":
                kwargs[name] = [_from_text(p.get("item", "any"), name, v, self) for v in _list_items(name, values)]
            else:
                kwargs[name] = _from_text(p["type"], name, values[-1], self)
        if body_parameter is not None:
            if body is not None:
                kwargs[body_parameter["name"]] = body  # the whole body, as FastAPI binds one model
        else:
            for name, value in (body or {}).items():
                p = params.get(name)
                if p is None:
                    if not var_keyword:
                        raise ParameterError(f"unknown parameter {name!r}; endpoint {self.name!r} takes {self.describe()}")
                elif p["type"] == "request":
                    raise ParameterError(f"parameter {name!r} is the request itself; it does not come from the body")
                elif p["type"] == "list":
                    if not isinstance(value, list):
                        raise ParameterError(f"parameter {name!r} must be a list, got {type(value).__name__}")
                    value = [_from_json(p.get("item", "any"), name, v) for v in value]
                elif value is not None or not p.get("optional"):
                    value = _from_json(p["type"], name, value)
                kwargs[name] = value
        missing = [n for n, p in params.items() if p.get("required") and n not in kwargs and p["type"] != "request"]
        if missing:
            if body_parameter is not None and missing[0] == body_parameter["name"]:
                raise ParameterError(
                    f"endpoint {self.name!r} takes a JSON body as {missing[0]!r}: send {expected_body(body_parameter)}"
                )
            raise ParameterError(f"missing required parameter {missing[0]!r}; endpoint {self.name!r} takes {self.describe()}")
        return kwargs


def expected_body(p: dict[str, Any]) -> str:
    """What a body parameter's JSON looks like, for error messages."""
    fields = p.get("fields")
    if not fields:
        return "a JSON object"
    return "{" + ", ".join(f'"{f["name"]}": {f.get("type", "any")}' for f in fields) + "}"


@dataclass
class FunctionSpec:
    """A registered `%%stream_function`; replaced whole when re-registered."""

    name: str
    fn_hash: str
    fn_blob: bytes
    is_generator: bool = False
    retries: int = 0
    timeout: float | None = None
    #: seconds a call may wait for a worker (None: see `scheduler.queue_timeout`)
    queue_timeout: float | None = None
    doc: str = ""
    persist: bool = False
    owner: str = ""
    requirements: dict[str, Any] = field(default_factory=dict)
    pool: Any = field(default=None, repr=False, compare=False)
    #: ``{"max_batch_size", "wait_ms"}`` when its calls run in batches (`batching`), and
    #: the `batching.Batcher` that forms them
    batch: dict[str, Any] | None = None
    batcher: Any = field(default=None, repr=False, compare=False)
    created: float = field(default_factory=time.time)
    stats: dict[str, int] = field(default_factory=dict, repr=False, compare=False)


#: live counters of each kind, shown by the API and the UI
ENDPOINT_STATS = ("requests", "open_streams", "errors", "bytes_sent")
FUNCTION_STATS = ("calls", "items", "failed", "retried", "stolen")


class Registry:
    """Name -> spec, for one kind ("endpoint" or "function"). A spec is replaced whole when
    its name is registered again (calls already running keep the one they started with);
    a name's counters (`spec.stats`) carry over to the new spec and go with removal."""

    def __init__(self, kind: str, counters: tuple[str, ...]):
        self.kind = kind
        self.counters = counters
        self.specs: dict[str, Any] = {}
        self.stats: dict[str, dict[str, int]] = {}

    def register(self, spec: Any) -> bool:
        """Add or replace `spec`; returns whether it replaced one."""
        replaced = spec.name in self.specs
        spec.stats = self.stats.setdefault(spec.name, dict.fromkeys(self.counters, 0))
        self.specs[spec.name] = spec
        return replaced

    def get(self, name: str) -> Any:
        return self.specs.get(name)

    def remove(self, name: str) -> bool:
        self.stats.pop(name, None)
        return self.specs.pop(name, None) is not None

    def values(self) -> list[Any]:
        return list(self.specs.values())

    def __contains__(self, name: object) -> bool:
        return name in self.specs

    def __iter__(self) -> Any:
        return iter(list(self.specs))

    def not_found(self, name: str) -> str:
        known = ", ".join(sorted(self.specs)) or "none registered yet"
        return f"no {self.kind} named {name!r} ({self.kind}s: {known})"
