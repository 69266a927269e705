"""``@jupyter_stream.batched``: dynamic batching, with Modal's semantics.

The function takes one list per parameter and returns (or, a generator, yields) a list of
the same length; its callers call it with single inputs, through every call form, and the
server gathers the inputs of all callers into batches (`server.batching`)::

    @jupyter_stream.function(gpu="any")
    @jupyter_stream.batched(max_batch_size=32, wait_ms=10)
    def embed(texts: list[str]) -> list[list[float]]:
        return model.encode(texts).tolist()

    embed.remote("one text")                 # one caller's input, one result
    list(embed.map(["a", "b", "c"]))         # batched with whatever else arrives meanwhile

Here the decorator only marks the function (``__jupyter_stream_batch__``); registering it
(`register_function`, `register_endpoint`, a class's methods, or the magics' ``--batch``)
sends the mark to the server, which checks it again (`signatures.check_batch`).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from ..signatures import check_batch

#: the attribute a batched function carries: ``{"max_batch_size": N, "wait_ms": W}``
MARK = "__jupyter_stream_batch__"


def batched(_fn: Callable | None = None, *, max_batch_size: int | None = None,
            wait_ms: float | None = None) -> Callable[[Callable], Callable]:
    """Mark a function, method or endpoint function as batched: it takes lists (one per
    parameter: element i of each is caller i's argument) and returns a list with one
    result per input, in order (a generator yields such lists; element i of each goes to
    caller i). The server waits at most `wait_ms` after a batch's first input for more,
    up to `max_batch_size`. Put it below ``@jupyter_stream.function`` or
    ``@jupyter_stream.endpoint`` (or alone, or below ``@jupyter_stream.method``, on a
    ``%%stream_class`` method)."""
    if _fn is not None or max_batch_size is None or wait_ms is None:
        raise TypeError("use @jupyter_stream.batched(max_batch_size=N, wait_ms=W), with both arguments named")
    batch = checked(max_batch_size, wait_ms)

    def mark(fn: Callable) -> Callable:
        if not inspect.isfunction(fn):
            what = type(fn).__name__
            raise TypeError(f"@jupyter_stream.batched goes on a function, not a {what}: put it below "
                            "@jupyter_stream.function / @jupyter_stream.endpoint, right above the `def`")
        from .classes import in_class_body

        check_parameters(fn, method=in_class_body(fn))
        setattr(fn, MARK, dict(batch))
        if in_class_body(fn) and not hasattr(fn, "__jupyter_stream_method__"):
            fn.__jupyter_stream_method__ = {"kind": "function"}  # served as a method, as Modal's @batched is
        return fn

    return mark


def checked(max_batch_size: Any, wait_ms: Any) -> dict[str, Any]:
    """`max_batch_size` and `wait_ms` checked, as a registration's ``batch``; a ValueError
    says what to pass."""
    batch = check_batch({"max_batch_size": max_batch_size, "wait_ms": wait_ms})
    assert batch is not None
    return batch


def check_parameters(fn: Callable, method: bool = False) -> None:
    """A batched function takes one list per named parameter: at least one, and no
    ``*args`` or ``**kwargs`` (a batch could not be split back by caller)."""
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return
    if method and params:
        params = params[1:]  # self
    name = getattr(fn, "__name__", "the function")
    if any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in params):
        raise ValueError(f"batched function {name!r} cannot take *args or **kwargs: give it one named parameter per "
                         "argument, each receiving a list")
    if not params:
        raise ValueError(f"batched function {name!r} takes no parameters: it needs at least one, which receives the list "
                         "of its callers' arguments")


def batch_of(fn: Callable, batch: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """The batching `fn` is registered with: `batch` (the magics' ``--batch``) or the
    mark ``@batched`` left on it, else None."""
    if batch is None:
        batch = getattr(fn, MARK, None)
    if batch is None:
        return None
    check_parameters(fn)
    return checked(batch.get("max_batch_size"), batch.get("wait_ms"))


def item_signature(signature: dict[str, Any]) -> dict[str, Any]:
    """An endpoint's parameter description for one request of a batched function: each
    ``list[T]`` parameter (what the function receives) is a ``T`` (what one request sends)."""
    params = []
    for p in signature.get("params", []):
        if p.get("type") == "list":
            p = {**{k: v for k, v in p.items() if k != "item"}, "type": p.get("item", "any")}
        params.append(p)
    return {**signature, "params": params}
