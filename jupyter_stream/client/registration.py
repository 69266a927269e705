"""Registering a function with the server: the one path `%%stream_endpoint`,
`%%stream_function` and the decorators share.

The function is cloudpickled here, in the caller's process, so the helpers and globals it
uses from the notebook travel with it; the server checks every field again
(`server.registry.parse_registration`) and never unpickles it.
"""

from __future__ import annotations

import base64
import inspect
import pickle
from collections.abc import Callable
from typing import Any

from .. import wire
from ..signatures import MAX_FUNCTION_BYTES, check_name
from .connection import ServerConnection, get_connection


def pickle_function(fn: Callable, what: str) -> bytes:
    """cloudpickle `fn`, turning a failure into an error that says what to change."""
    try:
        blob = wire.cloudpickle_dumps(fn)
    except (pickle.PicklingError, TypeError, AttributeError, RecursionError) as e:
        raise pickle.PicklingError(
            f"cannot send {what} to the worker kernels: cloudpickle failed with {type(e).__name__}: {e}. "
            "Everything the function uses from the notebook is pickled with it; create objects such as "
            "locks, open files, sockets, clients or loaded models inside the function (or in a module "
            "the workers can import) instead of capturing them from the notebook."
        ) from e
    if len(blob) > MAX_FUNCTION_BYTES:
        raise ValueError(
            f"{what} pickles to {len(blob) / 1e6:,.0f} MB with what it captures from the notebook, more than "
            f"the {MAX_FUNCTION_BYTES / 1e6:,.0f} MB a registration may carry: load large data inside the "
            "function (from a file or URL the workers can reach) instead of capturing it"
        )
    return blob


def register(
    kind: str, fn: Callable, name: str | None, connection: ServerConnection | None, persist: bool, **fields: Any
) -> tuple[str, dict[str, Any], ServerConnection]:
    """Register `fn` as an endpoint or function (`kind`) named `name` (default: its own
    name), with the kind's own `fields`; returns the name, the server's reply and the
    connection used."""
    if not callable(fn):
        raise TypeError(f"{'an endpoint' if kind == 'endpoint' else 'a stream function'} must be a function, got {type(fn).__name__}")
    name = check_name(name or fn.__name__)
    blob = pickle_function(fn, f"{kind} {name!r}")
    conn = connection or get_connection()
    body = {"name": name, "function": base64.b64encode(blob).decode(), "doc": inspect.getdoc(fn) or "",
            "persist": bool(persist), **fields}
    return name, conn.request("POST", f"api/stream/{kind}s", json=body).json(), conn
