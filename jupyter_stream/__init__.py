"""jupyter-stream: Modal-style streaming endpoints and remote functions, native to Jupyter.

In a notebook::

    %load_ext jupyter_stream

    %%stream_endpoint
    def ticks(n: int = 10):
        for i in range(n):
            yield f"data: tick {i}\\n\\n"

In a script, the same with ``@jupyter_stream.endpoint()``.

The package runs in three processes, and its layout says which: `client` (the notebook
kernel or script), `server` (the jupyter-server extension) and `worker` (the worker
kernels); the modules at the top (`wire`, `errors`, `responses`, `signatures`, `requirements`) are shared.
The public names below are imported on first use, so that the server and the workers do
not load the client's modules.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

#: public name -> the module that defines it
_PUBLIC = {
    "Endpoint": "client.endpoints",
    "Share": "client.endpoints",
    "endpoint": "client.endpoints",
    "Function": "client.functions",
    "FunctionCall": "client.functions",
    "function": "client.functions",
    "ServerConnection": "client.connection",
    "connect": "client.connection",
    "get_connection": "client.connection",
    "FunctionTimeoutError": "errors",
    "RemoteError": "errors",
    "WorkerDied": "errors",
    "WorkerError": "errors",
    "StreamingResponse": "responses",
    "Finish": "responses",
    "Request": "responses",
    "sse": "responses",
    "list": "client.registration:list_registrations",
    "cls": "client.classes",
    "enter": "client.classes",
    "exit": "client.classes",
    "method": "client.classes",
    "batched": "client.batched",
}

__all__ = [
    "Endpoint", "Finish", "Function", "FunctionCall", "FunctionTimeoutError", "RemoteError", "Request", "ServerConnection",
    "Share", "StreamingResponse", "WorkerDied", "WorkerError", "connect", "endpoint", "function", "get_connection",
    "list", "serve_forever", "sse", "cls", "enter", "exit", "method", "batched",
]

if TYPE_CHECKING:
    from .client.batched import batched
    from .client.connection import ServerConnection, connect, get_connection
    from .client.endpoints import Endpoint, Share, endpoint
    from .client.functions import Function, FunctionCall, function
    from .errors import FunctionTimeoutError, RemoteError, WorkerDied, WorkerError
    from .responses import Finish, Request, StreamingResponse, sse


def __getattr__(name: str) -> Any:
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'jupyter_stream' has no attribute {name!r}")
    module, _, attribute = module.partition(":")
    value = getattr(importlib.import_module(f".{module}", __name__), attribute or name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_PUBLIC])


def _jupyter_server_extension_points() -> list[dict[str, Any]]:
    from .server.app import JupyterStream

    return [{"module": "jupyter_stream", "app": JupyterStream}]


def load_ipython_extension(ipython: Any) -> None:
    """``%load_ext jupyter_stream``: the ``%%stream_endpoint`` and ``%%stream_function`` magics."""
    from .client.magics import load_ipython_extension as load

    load(ipython)


def serve_forever() -> None:
    """Keep a script alive (and its embedded server with it) until Ctrl-C."""
    import sys
    import time

    from .client.connection import get_connection

    conn = get_connection()
    print(f"jupyter-stream: serving at {conn.url}; press Ctrl-C to stop", file=sys.stderr)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
