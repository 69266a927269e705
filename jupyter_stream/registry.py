"""Registered endpoints, and turning an HTTP request's parameters into keyword arguments.

The server never unpickles user code: a registration carries the cloudpickled function
(forwarded untouched to workers) next to a JSON description of its parameters, made on
the client by `describe_parameters`, which is all the server needs to validate requests.
"""

from __future__ import annotations

import inspect
import re
import time
import typing
from dataclasses import dataclass, field
from typing import Any

NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_\-]{0,63}$")
RESERVED_QUERY = {"token", "_xsrf"}
SCALARS = {int: "int", float: "float", bool: "bool", str: "str"}


class ParameterError(ValueError):
    """A request's parameters do not fit the endpoint's signature (an HTTP 400)."""


def check_name(name: str) -> str:
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise ValueError(
            f"invalid endpoint name {name!r}: use letters, digits, '_' and '-', "
            "starting with a letter or '_', at most 64 characters"
        )
    return name


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
