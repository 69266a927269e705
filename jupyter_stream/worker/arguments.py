"""Turning an HTTP request's JSON arguments into what an endpoint function's annotations
ask for. The server binds and checks the JSON (it never sees user classes); here, where
the function lives, a dict becomes the dataclass or pydantic model it is annotated with,
and the `Request` parameter gets the request."""

from __future__ import annotations

import dataclasses
import typing
from typing import Any

from ..errors import RequestError
from ..responses import Request


def _model_of(annotation: Any) -> Any:
    """The dataclass or pydantic model `annotation` names (through Optional), or None."""
    if typing.get_origin(annotation) is typing.Union or type(annotation).__name__ == "UnionType":
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        annotation = args[0] if len(args) == 1 else None
    if isinstance(annotation, type) and (dataclasses.is_dataclass(annotation) or hasattr(annotation, "model_validate")):
        return annotation
    return None


def prepare(fn: Any, kwargs: dict[str, Any], request: dict[str, Any] | None) -> dict[str, Any]:
    if request is None and not any(isinstance(value, dict) for value in kwargs.values()):
        return kwargs  # the common case, on the hot path: nothing to convert
    if request is not None:
        request = dict(request)
        param = request.pop("param")
        kwargs[param] = Request(**request)
    try:
        hints = typing.get_type_hints(fn)
    except Exception:  # an annotation that does not resolve here: leave the values as they are
        return kwargs
    for name, value in kwargs.items():
        model = _model_of(hints.get(name)) if isinstance(value, dict) else None
        if model is None:
            continue
        try:
            kwargs[name] = model.model_validate(value) if hasattr(model, "model_validate") else model(**value)
        except Exception as e:  # TypeError from a dataclass, ValidationError from pydantic
            raise RequestError(f"the JSON body does not fit {model.__name__} ({name!r}): {e}") from None
    return kwargs
