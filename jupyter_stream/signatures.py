"""Describing a function's parameters, and the checks both sides apply to registrations.

The client describes a function with `describe_parameters` (JSON, so that the server
never unpickles user code to validate a request); the server checks that description
with `check_signature`. Names, media types and the registration limits are checked by
both: early in the notebook cell, and again by the server, which trusts no client.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import typing
from typing import Any

#: a name, or ``Class.method`` for the methods of a `%%stream_class`
NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_\-]{0,63}(?:\.[A-Za-z_][A-Za-z0-9_\-]{0,63})?$")
SCALARS = {int: "int", float: "float", bool: "bool", str: "str"}
#: "object": a dict, dataclass or pydantic model, bound to the JSON body as FastAPI does;
#: "request": the `responses.Request` itself
TYPES = {"int", "float", "bool", "str", "list", "any", "object", "request"}
ITEM_TYPES = {"int", "float", "bool", "str", "any"}

#: Largest pickled function a registration may carry.
MAX_FUNCTION_BYTES = 256 * 1024 * 1024
MAX_PARAMS = 256
MAX_DOC = 64 * 1024
MAX_RETRIES = 100
MAX_TIMEOUT = 7 * 24 * 3600.0
#: Dynamic batching (`@jupyter_stream.batched`): the largest batch, and the longest a
#: batch may wait to fill after its first input arrived (Modal's bounds).
MAX_BATCH_SIZE = 1000
MAX_BATCH_WAIT_MS = 10 * 60 * 1000
#: ``type/subtype`` and ``; key=value`` parameters, as RFC 9110 writes them (no controls).
_TOKEN = r"[A-Za-z0-9!#$%&'*+.^_`|~-]+"
MEDIA_TYPE_RE = re.compile(rf'^{_TOKEN}/{_TOKEN}(?:[ \t]*;[ \t]*{_TOKEN}=(?:{_TOKEN}|"[^"\\\x00-\x1f\x7f]*"))*$')


class RegistrationError(ValueError):
    """A registration is malformed (an HTTP 400); the message says which field and why."""


def check_name(name: str) -> str:
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise ValueError(
            f"invalid endpoint name {name!r}: use letters, digits, '_' and '-', "
            "starting with a letter or '_', at most 64 characters (Class.method for a class's methods)"
        )
    return name


def check_media_type(media_type: Any) -> str:
    if not isinstance(media_type, str) or len(media_type) > 255 or not MEDIA_TYPE_RE.fullmatch(media_type):
        raise RegistrationError(
            f"invalid media type {media_type!r}: give one like 'text/event-stream', 'text/plain; charset=utf-8' "
            "or 'application/x-ndjson' (type/subtype, no spaces or control characters)"
        )
    return media_type


def _check_param(p: Any, index: int) -> dict[str, Any]:
    where = f"signature parameter {index}"
    if not isinstance(p, dict):
        raise RegistrationError(f"{where} must be an object like {{\"name\": \"n\", \"type\": \"int\"}}, got {type(p).__name__}")
    unknown = set(p) - {"name", "type", "item", "required", "optional", "default", "fields"}
    if unknown:
        raise RegistrationError(
            f"{where} has unknown fields {sorted(unknown)}; allowed: name, type, item, required, optional, default, fields"
        )
    fields = p.get("fields", [])
    if not isinstance(fields, list) or len(fields) > MAX_PARAMS or not all(
        isinstance(f, dict) and isinstance(f.get("name"), str) and isinstance(f.get("type", "any"), str) for f in fields
    ):
        raise RegistrationError(f"{where}: 'fields' must be a list of {{\"name\", \"type\"}} objects (a body's fields)")
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


def check_batch(batch: Any) -> dict[str, int] | None:
    """A registration's ``batch`` (`@jupyter_stream.batched`): None, or
    ``{"max_batch_size": 1..MAX_BATCH_SIZE, "wait_ms": 0..MAX_BATCH_WAIT_MS}``, checked
    by the decorator in the notebook and again by the server."""
    if batch is None:
        return None
    if not isinstance(batch, dict) or set(batch) != {"max_batch_size", "wait_ms"}:
        raise RegistrationError("'batch' must be null or an object {\"max_batch_size\": N, \"wait_ms\": W}, "
                                "as @jupyter_stream.batched(max_batch_size=N, wait_ms=W) sends it")
    size, wait = batch["max_batch_size"], batch["wait_ms"]
    if isinstance(size, bool) or not isinstance(size, int) or not 1 <= size <= MAX_BATCH_SIZE:
        raise RegistrationError(f"max_batch_size must be a whole number from 1 to {MAX_BATCH_SIZE}, got {size!r}")
    if isinstance(wait, bool) or not isinstance(wait, (int, float)) or not 0 <= wait <= MAX_BATCH_WAIT_MS or wait != wait:
        raise RegistrationError(f"wait_ms must be a number of milliseconds from 0 to {MAX_BATCH_WAIT_MS} (10 minutes), "
                                f"got {wait!r}")
    return {"max_batch_size": size, "wait_ms": wait}


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


def _body_fields(annotation: Any) -> list[dict[str, str]] | None:
    """The fields of a dataclass or pydantic model (what its JSON body holds), else None."""
    if dataclasses.is_dataclass(annotation) and isinstance(annotation, type):
        hints = typing.get_type_hints(annotation)
        return [{"name": f.name, "type": _type_name(hints.get(f.name, Any))["type"]} for f in dataclasses.fields(annotation)]
    model_fields = getattr(annotation, "model_fields", None)  # pydantic v2
    if isinstance(annotation, type) and isinstance(model_fields, dict):
        return [{"name": name, "type": _type_name(field.annotation)["type"]} for name, field in model_fields.items()]
    return None


def _type_name(annotation: Any) -> dict[str, Any]:
    if annotation in SCALARS:
        return {"type": SCALARS[annotation]}
    if annotation is dict or typing.get_origin(annotation) is dict:
        return {"type": "object"}
    if isinstance(annotation, type) and annotation.__module__ == "jupyter_stream.responses" and annotation.__name__ == "Request":
        return {"type": "request"}
    fields = _body_fields(annotation)
    if fields is not None:
        return {"type": "object", "fields": fields}
    origin = typing.get_origin(annotation)
    if origin in (list, tuple, set, list, typing.Sequence) or annotation in (list, tuple):
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


#: the longest a share link may live; `None` (no expiry) is allowed too
MAX_SHARE_SECONDS = 365 * 24 * 3600.0
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*$")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_expires(value: Any) -> float | None:
    """Seconds until a share expires, from ``"30m"``, ``"1h"``, ``"7d"``, a number of
    seconds or None (never). Raises ValueError saying what to write."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise ValueError("expires must be a duration such as '30m', '1h', '7d', a number of seconds, or None")
    if isinstance(value, (int, float)):
        seconds = float(value)
    elif isinstance(value, str) and _DURATION.match(value):
        number, unit = _DURATION.match(value).groups()
        seconds = float(number) * _UNITS[unit]
    else:
        raise ValueError(f"expires must be a duration such as '30m', '1h', '7d', a number of seconds, or None; got {value!r}")
    if not 0 < seconds <= MAX_SHARE_SECONDS:
        raise ValueError(f"expires must be more than 0 and at most 365 days, got {value!r}")
    return seconds
