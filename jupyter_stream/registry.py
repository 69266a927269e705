"""Registered endpoints, and turning an HTTP request's parameters into keyword arguments.

The server never unpickles user code: a registration carries the cloudpickled function
(forwarded untouched to workers) next to a JSON description of its parameters, made on
the client by `describe_parameters`, which is all the server needs to validate requests.
"""

from __future__ import annotations

import base64
import binascii
import inspect
import json
import math
import re
import time
import typing
from dataclasses import dataclass, field
from typing import Any

NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_\-]{0,63}$")
RESERVED_QUERY = {"token", "_xsrf"}
SCALARS = {int: "int", float: "float", bool: "bool", str: "str"}
TYPES = {"int", "float", "bool", "str", "list", "any"}
ITEM_TYPES = {"int", "float", "bool", "str", "any"}

#: Arrays and objects nested deeper than this in a JSON body are refused (a 400), so that
#: no request can make the server or a worker recurse without bound.
MAX_JSON_DEPTH = 32
#: Largest pickled function a registration may carry.
MAX_FUNCTION_BYTES = 256 * 1024 * 1024
MAX_PARAMS = 256
MAX_DOC = 64 * 1024
MAX_RETRIES = 100
MAX_TIMEOUT = 7 * 24 * 3600.0
#: ``type/subtype`` and ``; key=value`` parameters, as RFC 9110 writes them (no controls).
_TOKEN = r"[A-Za-z0-9!#$%&'*+.^_`|~-]+"
MEDIA_TYPE_RE = re.compile(rf'^{_TOKEN}/{_TOKEN}(?:[ \t]*;[ \t]*{_TOKEN}=(?:{_TOKEN}|"[^"\\\x00-\x1f\x7f]*"))*$')


class ParameterError(ValueError):
    """A request's parameters do not fit the endpoint's signature (an HTTP 400)."""


class RegistrationError(ValueError):
    """A registration is malformed (an HTTP 400); the message says which field and why."""


def check_name(name: str) -> str:
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise ValueError(
            f"invalid endpoint name {name!r}: use letters, digits, '_' and '-', "
            "starting with a letter or '_', at most 64 characters"
        )
    return name


def check_media_type(media_type: Any) -> str:
    if not isinstance(media_type, str) or len(media_type) > 255 or not MEDIA_TYPE_RE.fullmatch(media_type):
        raise RegistrationError(
            f"invalid media type {media_type!r}: give one like 'text/event-stream', 'text/plain; charset=utf-8' "
            "or 'application/x-ndjson' (type/subtype, no spaces or control characters)"
        )
    return media_type


def json_depth(value: Any) -> int:
    """How deeply arrays and objects nest in a parsed JSON value (iteratively)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            item = item.values()
        elif not isinstance(item, list):
            continue
        deepest = max(deepest, depth)
        stack.extend((child, depth + 1) for child in item if isinstance(child, (dict, list)))
    return deepest


def loads_json(raw: bytes | str, what: str) -> Any:
    """Parse a request's JSON, refusing what is not JSON or nests past `MAX_JSON_DEPTH`."""
    too_deep = f"{what} nests arrays or objects more than {MAX_JSON_DEPTH} levels deep; send a flatter document"
    try:
        value = json.loads(raw)
    except RecursionError:
        raise ParameterError(too_deep) from None
    except ValueError as e:  # also UnicodeDecodeError: the bytes are not UTF-8
        raise ParameterError(f"{what} is not valid JSON ({e}); send UTF-8 JSON such as {{\"n\": 3}}") from None
    if json_depth(value) > MAX_JSON_DEPTH:
        raise ParameterError(too_deep)
    return value


def _check_param(p: Any, index: int) -> dict[str, Any]:
    where = f"signature parameter {index}"
    if not isinstance(p, dict):
        raise RegistrationError(f"{where} must be an object like {{\"name\": \"n\", \"type\": \"int\"}}, got {type(p).__name__}")
    unknown = set(p) - {"name", "type", "item", "required", "optional", "default"}
    if unknown:
        raise RegistrationError(f"{where} has unknown fields {sorted(unknown)}; allowed: name, type, item, required, optional, default")
    name = p.get("name")
    if not isinstance(name, str) or not name.isidentifier():
        raise RegistrationError(f"{where} needs a 'name' that is a Python identifier, got {name!r}")
    if p.get("type", "any") not in TYPES:
        raise RegistrationError(f"parameter {name!r} has type {p.get('type')!r}; use one of {sorted(TYPES)}")
    if "item" in p and p["item"] not in ITEM_TYPES:
        raise RegistrationError(f"parameter {name!r} has list item type {p['item']!r}; use one of {sorted(ITEM_TYPES)}")
    for flag in ("required", "optional"):
        if not isinstance(p.get(flag, False), bool):
            raise RegistrationError(f"parameter {name!r}: {flag!r} must be true or false, got {p[flag]!r}")
    default = p.get("default")
    if not (default is None or isinstance(default, (str, int, float, bool))):
        raise RegistrationError(f"parameter {name!r}: a default must be a JSON string, number, boolean or null")
    return p


def check_signature(signature: Any) -> dict[str, Any]:
    """A registration's parameter description, as `describe_parameters` makes it."""
    if signature is None:
        return {"params": [], "var_keyword": True}
    if not isinstance(signature, dict):
        raise RegistrationError(
            f"'signature' must be an object {{\"params\": [...], \"var_keyword\": false}}, got {type(signature).__name__}; "
            "register with jupyter_stream.endpoint() or %%stream_endpoint, which describe the function for you"
        )
    unknown = set(signature) - {"params", "var_keyword"}
    if unknown:
        raise RegistrationError(f"'signature' has unknown fields {sorted(unknown)}; allowed: params, var_keyword")
    params = signature.get("params", [])
    if not isinstance(params, list) or len(params) > MAX_PARAMS:
        raise RegistrationError(f"'signature.params' must be a list of at most {MAX_PARAMS} parameter objects")
    params = [_check_param(p, i) for i, p in enumerate(params)]
    names = [p["name"] for p in params]
    if len(set(names)) != len(names):
        raise RegistrationError(f"'signature.params' names a parameter twice: {names}")
    if not isinstance(signature.get("var_keyword", False), bool):
        raise RegistrationError("'signature.var_keyword' must be true or false")
    return {"params": params, "var_keyword": signature.get("var_keyword", False)}


REGISTRATION_FIELDS = {
    "endpoint": {"name", "function", "media_type", "signature", "doc", "persist"},
    "function": {"name", "function", "generator", "retries", "timeout", "doc", "persist"},
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
    if not isinstance(body.get("persist", False), bool):
        raise RegistrationError("'persist' must be true or false")
    if kind == "endpoint":
        from .responses import SSE

        body["media_type"] = check_media_type(body["media_type"]) if body.get("media_type") is not None else SSE
        body["signature"] = check_signature(body.get("signature"))
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
        raise RegistrationError(f"'timeout' must be a number of seconds above 0 and at most {MAX_TIMEOUT:g} (7 days), or null for none; got {timeout!r}")
    body["timeout"] = float(timeout) if timeout is not None else None
    return body


def _type_name(annotation: Any) -> dict[str, Any]:
    if annotation in SCALARS:
        return {"type": SCALARS[annotation]}
    origin = typing.get_origin(annotation)
    if origin in (list, tuple, set, typing.List, typing.Sequence) or annotation in (list, tuple):
        args = typing.get_args(annotation)
        item = SCALARS.get(args[0], "any") if args else "any"
        return {"type": "list", "item": item}
    if origin is typing.Union or type(annotation).__name__ == "UnionType":
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return {**_type_name(args[0]), "optional": True}
    return {"type": "any"}


def describe_parameters(fn: Any) -> dict[str, Any]:
    """JSON description of `fn`'s parameters: names, types from annotations, defaults."""
    try:
        hints = typing.get_type_hints(fn)
    except Exception:
        hints = {}
    params = []
    var_keyword = False
    for p in inspect.signature(fn).parameters.values():
        if p.kind is p.VAR_KEYWORD:
            var_keyword = True
            continue
        if p.kind in (p.VAR_POSITIONAL, p.POSITIONAL_ONLY):
            continue
        annotation = hints.get(p.name, p.annotation)
        desc: dict[str, Any] = {"name": p.name}
        if annotation is inspect.Parameter.empty and p.default is not inspect.Parameter.empty:
            annotation = type(p.default) if type(p.default) in SCALARS else Any
        desc.update(_type_name(annotation))
        if p.default is inspect.Parameter.empty:
            desc["required"] = True
        else:
            desc["required"] = False
            desc["default"] = p.default if isinstance(p.default, (int, float, str, bool, type(None))) else repr(p.default)
        params.append(desc)
    return {"params": params, "var_keyword": var_keyword}


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _from_text(kind: str, name: str, text: str) -> Any:
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
        raise ParameterError(f"parameter {name!r} must be {kind}, got {text!r}") from None
    return text


def _from_json(kind: str, name: str, value: Any) -> Any:
    ok = {
        "int": isinstance(value, int) and not isinstance(value, bool),
        "float": isinstance(value, (int, float)) and not isinstance(value, bool),
        "bool": isinstance(value, bool),
        "str": isinstance(value, str),
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
    media_type: str
    signature: dict[str, Any]
    doc: str = ""
    persist: bool = False
    created: float = field(default_factory=time.time)

    def describe(self) -> str:
        parts = []
        for p in self.signature.get("params", []):
            kind = p["type"] + (f"[{p['item']}]" if p["type"] == "list" else "")
            parts.append(f"{p['name']} ({kind}{', required' if p.get('required') else ''})")
        return ", ".join(parts) or "no parameters"

    def bind(self, query: dict[str, list[str]], body: dict[str, Any] | None) -> dict[str, Any]:
        """Keyword arguments from query strings and a JSON object body, converted by type."""
        params = {p["name"]: p for p in self.signature.get("params", [])}
        var_keyword = self.signature.get("var_keyword", False)
        kwargs: dict[str, Any] = {}
        for name, values in query.items():
            if name in RESERVED_QUERY:
                continue
            p = params.get(name)
            if p is None:
                if not var_keyword:
                    raise ParameterError(f"unknown parameter {name!r}; endpoint {self.name!r} takes {self.describe()}")
                kwargs[name] = values[-1]
            elif p["type"] == "list":
                items = [v for value in values for v in value.split(",")] if len(values) == 1 else values
                kwargs[name] = [_from_text(p.get("item", "any"), name, v) for v in items]
            else:
                kwargs[name] = _from_text(p["type"], name, values[-1])
        for name, value in (body or {}).items():
            p = params.get(name)
            if p is None:
                if not var_keyword:
                    raise ParameterError(f"unknown parameter {name!r}; endpoint {self.name!r} takes {self.describe()}")
            elif p["type"] == "list":
                if not isinstance(value, list):
                    raise ParameterError(f"parameter {name!r} must be a list, got {type(value).__name__}")
                value = [_from_json(p.get("item", "any"), name, v) for v in value]
            elif value is not None or not p.get("optional"):
                value = _from_json(p["type"], name, value)
            kwargs[name] = value
        missing = [n for n, p in params.items() if p.get("required") and n not in kwargs]
        if missing:
            raise ParameterError(f"missing required parameter {missing[0]!r}; endpoint {self.name!r} takes {self.describe()}")
        return kwargs


@dataclass
class EndpointStats:
    """Live counters for one endpoint, shown by the API and the UI."""

    requests: int = 0
    open_streams: int = 0
    errors: int = 0
    bytes_sent: int = 0


class EndpointRegistry:
    """Name -> spec. A plain dict; specs are replaced, never mutated."""

    def __init__(self) -> None:
        self.endpoints: dict[str, EndpointSpec] = {}
        self.stats: dict[str, EndpointStats] = {}

    def register(self, spec: EndpointSpec) -> None:
        self.endpoints[spec.name] = spec
        self.stats.setdefault(spec.name, EndpointStats())

    def get(self, name: str) -> EndpointSpec | None:
        return self.endpoints.get(name)

    def remove(self, name: str) -> bool:
        self.stats.pop(name, None)
        return self.endpoints.pop(name, None) is not None
