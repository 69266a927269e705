"""Registering a function with the server: the one path `%%stream_endpoint`,
`%%stream_function` and the decorators share.

The function is cloudpickled here, in the caller's process, so the helpers and globals it
uses from the notebook travel with it; the server checks every field again
(`server.registry.parse_registration`) and never unpickles it.
"""

from __future__ import annotations

import base64
import inspect
import os
import pickle
import sys
import warnings
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
        culprit = unpicklable_name(fn)
        uses = f"it uses {culprit}, which" if culprit else f"something it uses ({e})"
        raise pickle.PicklingError(
            f"cannot send {what} to the worker kernels: {uses} cannot be sent. Everything the function "
            "uses from the notebook is pickled with it: create objects such as locks, open files, sockets, "
            "clients or loaded models inside the function (or in a module the workers can import) instead "
            "of capturing them from the notebook."
        ) from None  # cloudpickle's frames say nothing a person can act on
    if len(blob) > MAX_FUNCTION_BYTES:
        raise ValueError(
            f"{what} pickles to {len(blob) / 1e6:,.0f} MB with what it captures from the notebook, more than "
            f"the {MAX_FUNCTION_BYTES / 1e6:,.0f} MB a registration may carry: load large data inside the "
            "function (from a file or URL the workers can reach) instead of capturing it"
        )
    return blob


def unpicklable_name(fn: Callable) -> str | None:
    """Which of the names `fn` captures (closure variables, then notebook globals it uses)
    cannot be pickled, as "`name` (a type)", or None if no single one is to blame."""
    code = getattr(fn, "__code__", None)
    if code is None:
        return None
    captured = list(zip(code.co_freevars, [cell.cell_contents for cell in (fn.__closure__ or ())]))
    names = set(code.co_names)
    for const in code.co_consts:  # names used by functions defined inside it
        if hasattr(const, "co_names"):
            names.update(const.co_names)
    captured += [(name, fn.__globals__[name]) for name in sorted(names) if name in fn.__globals__]
    for name, value in captured:
        try:
            wire.cloudpickle_dumps(value)
        except Exception:
            return f"`{name}` (a {type(value).__module__}.{type(value).__qualname__})"
    return None


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
            "persist": bool(persist), "owner": registering_owner(), **fields}
    reply = conn.request("POST", f"api/stream/{kind}s", json=body).json()
    if "previous_owner" in reply:
        warnings.warn(
            f"{kind} {name!r} was registered by {reply['previous_owner'] or 'another client'}; "
            f"this cell replaced it (pick another name to keep both)", stacklevel=3,
        )
    return name, reply, conn


def registering_owner() -> str:
    """Who registers: the notebook's path in a kernel started by Jupyter (JPY_SESSION_NAME),
    else the script, else the process."""
    session = os.environ.get("JPY_SESSION_NAME")
    if session:
        return session
    script = sys.argv[0] if sys.argv and sys.argv[0] not in ("", "-c") else ""
    if script and not script.endswith("ipykernel_launcher.py"):
        return os.path.abspath(script)
    return f"process {os.getpid()}"


def list_registrations(connection: ServerConnection | None = None) -> list[dict[str, Any]]:
    """What is registered on the server: endpoints and functions, by whom and since when."""
    conn = connection or get_connection()
    rows = []
    for kind in ("endpoint", "function"):
        for info in conn.request("GET", f"api/stream/{kind}s").json()[f"{kind}s"]:
            rows.append({"kind": kind, "name": info["name"], "owner": info.get("owner", ""), "since": info.get("created"),
                         "url": info.get("url")})
    return rows

