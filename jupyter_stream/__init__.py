"""jupyter-stream: Modal-style streaming endpoints and remote functions, native to Jupyter.

In a notebook::

    %load_ext jupyter_stream

    %%stream_endpoint
    def ticks(n: int = 10):
        for i in range(n):
            yield f"data: tick {i}\\n\\n"

In a script, the same with ``@jupyter_stream.endpoint()``.
"""

from __future__ import annotations

from typing import Any

from .client import ServerConnection, connect, get_connection
from .endpoint import Endpoint, endpoint
from .errors import FunctionTimeoutError, RemoteError, WorkerDied
from .functions import Function, FunctionCall, function
from .responses import StreamingResponse, sse

__version__ = "0.1.0"
__all__ = [
    "Endpoint", "Function", "FunctionCall", "FunctionTimeoutError", "RemoteError", "ServerConnection",
    "StreamingResponse", "WorkerDied", "connect", "endpoint", "function", "get_connection", "serve_forever", "sse",
]


def _jupyter_server_extension_points() -> list[dict[str, Any]]:
    from .app import JupyterStream

    return [{"module": "jupyter_stream", "app": JupyterStream}]


def load_ipython_extension(ipython: Any) -> None:
    """``%load_ext jupyter_stream``: the ``%%stream_endpoint`` and ``%%stream_function`` magics."""
    from .magics import load_ipython_extension as load

    load(ipython)


def serve_forever() -> None:
    """Keep a script alive (and its embedded server with it) until Ctrl-C."""
    import sys
    import time

    conn = get_connection()
    print(f"jupyter-stream: serving at {conn.url}; press Ctrl-C to stop", file=sys.stderr)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
