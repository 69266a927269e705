"""The one wire format between the server and its worker kernels.

Both directions are Jupyter comm messages on a comm with target `COMM_TARGET`: the
server sends on the worker's shell channel, the worker answers on IOPub. Payload bytes
travel as binary buffers, never JSON-escaped.

Server -> worker (``data["op"]``):

``call``    start a call. ``id`` names it; ``fn`` is the function's content hash, its
            cloudpickle travels in buffer 0 only when ``send_fn`` is true (workers cache
            functions by hash). ``mode`` is ``"http"`` (chunks are encoded to bytes for
            ``media_type``) or ``"values"`` (the result is pickled). ``kwargs`` holds JSON
            keyword arguments; a pickled ``(args, kwargs)`` may follow in the next buffer
            when ``pickled_args`` is true.
``ack``     the server has written ``bytes`` more bytes of call ``id`` to its client;
            the worker may run that much further ahead (credit-based backpressure).
``cancel``  stop call ``id``: close its generator so ``finally`` blocks run.

Worker -> server:

``ready``   sent once when the comm opens: ``pid``, python version.
``out``     output of call ``id``: buffer 0 holds zero or more bytes (many chunks joined);
            optional ``start`` (``status``, ``headers``, ``media_type``) comes with the
            first message, ``end`` is true on the last one, and ``error`` (a dict from
            `error_payload`) ends the call with a failure.
"""

from __future__ import annotations

import hashlib
import traceback
from typing import Any

COMM_TARGET = "jupyter_stream.worker"

#: Bootstrap code the pool executes in a fresh worker kernel.
BOOTSTRAP = "import jupyter_stream.worker as _jupyter_stream_worker; _jupyter_stream_worker.register()"

#: Bytes a worker may run ahead of what the server has written to its HTTP client.
DEFAULT_WINDOW = 8 * 1024 * 1024


def content_hash(blob: bytes) -> str:
    """Stable id for a pickled function, so workers can cache it."""
    return hashlib.sha256(blob).hexdigest()[:32]


def error_payload(exc: BaseException) -> dict[str, Any]:
    """Describe an exception for the other side: type, message and the formatted traceback."""
    return {
        "type": type(exc).__name__,
        "module": type(exc).__module__,
        "message": str(exc),
        "traceback": "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)),
    }


def worker_died_payload(reason: str) -> dict[str, Any]:
    """The error sent to callers whose worker kernel died under them."""
    return {
        "type": "WorkerDied",
        "module": "jupyter_stream",
        "message": f"the worker kernel running this call died ({reason}); "
        "it is being replaced, retry the request",
        "traceback": "",
    }
