"""The one wire format between the server and its worker kernels.

Both directions are Jupyter comm messages on a comm with target `COMM_TARGET`: the
server opens it on the worker's shell channel and then sends on the control channel
(handled without a hop to the kernel's main thread); the worker answers on IOPub.
Payload bytes travel as binary buffers, never JSON-escaped.

Server -> worker (``data["op"]``):

``call``    start a call. ``id`` names it; ``fn`` is the function's content hash, its
            cloudpickle travels in buffer 0 only when ``send_fn`` is true (workers cache
            functions by hash). ``mode`` is ``"http"`` (chunks are encoded to bytes for
            ``media_type``), ``"values"`` (the result is pickled), ``"map"`` (see below)
            or ``"load"`` (only unpickle the function: the call ends, with the error if
            it does not load). ``kwargs`` holds JSON
            keyword arguments; a pickled ``(args, kwargs)`` may follow in the next buffer
            when ``pickled_args`` is true. ``request`` (for an endpoint with a
            ``Request`` parameter) holds that parameter's name (``param``) and the
            request's method, path, headers, query, client and ``last_event_id``.
``ack``     the server has written ``bytes`` more bytes of call ``id`` to its client (or
            forwarded that much of a map lane's results); the worker may run that much
            further ahead (credit-based backpressure).
``acked``   the server has read the worker's messages up to ``seq`` (see below).
``cancel``  stop call ``id``: close its generator so ``finally`` blocks run. The server
            stops counting the call against the worker at once.
``interrupt`` call ``id`` was cancelled and its code has not stopped within the grace
            period: raise `CallCancelled` in its thread (at its next bytecode). If it
            still runs after as long again, the server replaces the kernel.

Worker -> server:

``ready``   sent once when the comm opens: ``pid``, python version.
``out``     output of call ``id``: buffer 0 holds zero or more bytes (many chunks joined);
            optional ``start`` (``status``, ``headers``, ``media_type``) comes with the
            first message, ``end`` is true on the last one, and ``error`` (a dict from
            `errors.error_payload`) ends the call with a failure. For ``values`` and ``map`` calls
            the buffer holds pickled objects back to back and ``sizes`` gives their
            lengths; a map lane adds ``items``, one ``[index, ok]`` per object (a failed
            item's object is its pickled `errors.error_payload`) and ``busy``, the seconds
            the worker spent running those items (the server sizes the lane's batches by
            it); ``revoked`` answers a ``revoke``. ``fatal`` means the call timed
            out and its thread may be stuck: the server replaces the kernel. Messages from
            the worker's sender thread carry ``seq`` (1, 2, ...); the sender waits while
            `MAX_UNACKED_MESSAGES` are not ``acked``, because IOPub drops what a slow
            reader leaves queued. (A call's first message and a plain return value are
            sent directly, without ``seq``.)

Map calls (``mode: "map"``) open a lane on a worker; the server feeds it with

``batch``   items for lane ``id``: ``indices`` and ``sizes`` of pickled argument tuples
            joined in buffer 0.
``close``   no more items: the lane ends once it has run what it has.
``revoke``  give back items of lane ``id`` that have not started: ``indices``. The worker
            removes those still queued and names them in ``revoked`` of the lane's next
            ``out`` (an empty list when none was left; a lane that has ended answers with
            its end instead); the others run there as sent. The
            server asks one lane for one revoke at a time, so that another lane that ran
            dry can take the items (work stealing).

Between clients (notebook kernels, scripts, workers) and the server, calls of
``%%stream_function`` functions travel over one WebSocket per client as binary frames
made by `encode_frame`: a JSON header and a payload. Client -> server ops: ``call``
(``fn``, ``kind`` "remote" or "map", a pickled ``(args, kwargs)`` payload for remote
calls, pickled common kwargs for maps), ``items`` (map inputs: ``indices``, ``sizes``),
``inputs_done``, ``ack`` (``bytes`` of a generator's output consumed), ``cancel``.
Server -> client ops: ``out`` (as above, with ``items`` and ``lanes``, the number of
workers running it, for maps; ``end`` and ``error`` end the call). A map's client bounds
its own inputs in flight by what it has handed to its caller. A worker's own client
names its worker in the ``X-Jupyter-Stream-Worker`` header, so that its calls can run
beside it when the pool is full.
"""

from __future__ import annotations

import copyreg
import hashlib
import io
import json
import pickle
import struct
import types
from collections import ChainMap
from typing import Any

import cloudpickle

COMM_TARGET = "jupyter_stream.worker"

#: Bootstrap code the pool executes in a fresh worker kernel.
BOOTSTRAP = "import jupyter_stream.worker as _jupyter_stream_worker; _jupyter_stream_worker.register()"

#: Bytes a worker may run ahead of what the server has written to its HTTP client.
DEFAULT_WINDOW = 8 * 1024 * 1024

#: IOPub is a PUB/SUB socket that drops messages when the reader falls 1000 behind, so
#: the worker's sender numbers its messages (``seq``) and stops at this many unacknowledged
#: (what piles up meanwhile goes out in fewer, larger messages) ...
MAX_UNACKED_MESSAGES = 256
#: ... and the server acknowledges (``acked``) every this many.
ACK_MESSAGES_EVERY = 64


# -- server -> worker messages: built only here ------------------------------------------


def call_message(call_id: str, fn_hash: str, send_fn: bool, mode: str, window: int, **fields: Any) -> dict[str, Any]:
    """``call``: run function `fn_hash` (its pickle follows in buffer 0 when `send_fn`);
    `fields` are ``media_type``, ``kwargs``, ``pickled_args``, ``timeout`` and ``request``."""
    return {"op": "call", "id": call_id, "fn": fn_hash, "send_fn": send_fn, "mode": mode, "window": window,
            **{k: v for k, v in fields.items() if v is not None}}


def ack_message(call_id: str, nbytes: int) -> dict[str, Any]:
    return {"op": "ack", "id": call_id, "bytes": nbytes}


def acked_message(seq: int) -> dict[str, Any]:
    return {"op": "acked", "seq": seq}


def cancel_message(call_id: str) -> dict[str, Any]:
    return {"op": "cancel", "id": call_id}


def interrupt_message(call_id: str) -> dict[str, Any]:
    return {"op": "interrupt", "id": call_id}


def batch_message(call_id: str, indices: list[int], sizes: list[int]) -> dict[str, Any]:
    return {"op": "batch", "id": call_id, "indices": indices, "sizes": sizes}


def close_message(call_id: str) -> dict[str, Any]:
    return {"op": "close", "id": call_id}


def revoke_message(call_id: str, indices: list[int]) -> dict[str, Any]:
    return {"op": "revoke", "id": call_id, "indices": indices}


def content_hash(blob: bytes) -> str:
    """Stable id for a pickled function, so workers can cache it."""
    return hashlib.sha256(blob).hexdigest()[:32]


def _code_with_filename(make: Any, args: tuple, filename: str) -> types.CodeType:
    """Rebuild a code object pickled by `Pickler` under its original file name."""
    return make(*args).replace(co_filename=filename)


def _reduce_code(code: types.CodeType) -> tuple:
    make, args = cloudpickle.Pickler.dispatch_table[types.CodeType](code)
    return _code_with_filename, (make, args, code.co_filename)


class Pickler(cloudpickle.Pickler):
    """cloudpickle, keeping each function's file name (cloudpickle >= 3.1.3 replaces it
    with ``<dynamic-code>``), so that a worker's tracebacks name the notebook cell or
    file the code came from and show its lines where the worker can read them."""

    dispatch_table = ChainMap({types.CodeType: _reduce_code}, cloudpickle.Pickler.dispatch_table, copyreg.dispatch_table)


def cloudpickle_dumps(obj: Any) -> bytes:
    buf = io.BytesIO()
    Pickler(buf, protocol=5).dump(obj)
    return buf.getvalue()


def dumps(obj: Any) -> bytes:
    """Pickle a value for the other side: plain pickle when it can, cloudpickle for what
    only cloudpickle can (functions and classes defined in a notebook, lambdas)."""
    try:
        return pickle.dumps(obj, protocol=5)
    except Exception:
        return cloudpickle_dumps(obj)


def encode_frame(header: dict[str, Any], payload: bytes | memoryview = b"") -> bytes:
    """One WebSocket message: 4-byte header length, JSON header, payload."""
    head = json.dumps(header, separators=(",", ":")).encode()
    return b"".join((struct.pack("!I", len(head)), head, payload))


class FrameError(ValueError):
    """A WebSocket message that is not a frame of this protocol (the socket is closed)."""


def decode_frame(message: bytes) -> tuple[dict[str, Any], memoryview]:
    if len(message) < 4:
        raise FrameError("a frame starts with a 4-byte header length")
    (length,) = struct.unpack_from("!I", message)
    if length > len(message) - 4:
        raise FrameError(f"the header length ({length}) is past the end of the frame ({len(message)} bytes)")
    view = memoryview(message)
    try:
        header = json.loads(view[4 : 4 + length].tobytes())
    except (ValueError, RecursionError):
        raise FrameError("the frame's header is not valid JSON") from None
    if not isinstance(header, dict):
        raise FrameError("the frame's header is not a JSON object")
    return header, view[4 + length :]


def split(payload: memoryview, sizes: list[int]) -> list[memoryview]:
    """Cut back-to-back pickles (or any blobs) apart by their sizes."""
    out, offset = [], 0
    for size in sizes:
        out.append(payload[offset : offset + size])
        offset += size
    return out
