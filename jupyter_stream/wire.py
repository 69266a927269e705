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
            With ``json_kwargs`` the keyword arguments come as UTF-8 JSON in the last
            buffer instead (an HTTP request's, bound and encoded once: compact while
            the request waits for a worker). With ``finish`` (the OpenAI route) the
            worker counts the chunks the function yields and keeps a generator's
            returned `responses.Finish`, for the end's ``finish``.
            Mode ``"batch"`` runs a batched function once on several callers' inputs
            (see below).
``ack``     the server has written ``bytes`` more bytes of call ``id`` to its client (or
            forwarded that much of a map lane's results); the worker may run that much
            further ahead (credit-based backpressure).
``acked``   the server has read the worker's messages up to ``seq`` (see below).
``cancel``  stop call ``id``: close its generator so ``finally`` blocks run. The server
            stops counting the call against the worker at once.
``interrupt`` call ``id`` was cancelled and its code has not stopped within the grace
            period: raise `CallCancelled` in its thread (at its next bytecode). If it
            still runs after as long again, the server replaces the kernel.
``ping``    answer ``pong`` with the same ``n`` through the sender thread: the server
            pings every worker each poll, so a worker that can no longer send or
            receive is found (and replaced) instead of looking idle.
``forget``  drop functions ``fns`` (content hashes) from the worker's cache: no
            registration uses them any more (a cell was re-run, an endpoint deleted), or
            the worker holds more than `MAX_WORKER_FUNCTIONS`. Runs already using them
            keep them.

The comm's ``comm_open`` carries ``version`` (`PROTOCOL_VERSION`) and
``cancel_grace_period`` (seconds a timed-out call's code gets to stop).

Worker -> server:

``ready``   sent once when the comm opens: ``pid``, python version, ``version`` (the
            worker's `PROTOCOL_VERSION`: a kernel with another jupyter-stream is refused)
            and ``control`` (it takes the server's messages on the control channel).
``pong``    answers ``ping`` ``n``.
``stuck``   a call timed out (or was cancelled) and its code did not stop within the
            grace period after its thread was interrupted: the server replaces the
            kernel in the background, letting its other calls finish.
``broken``  the worker cannot go on (its sender failed: ``reason``); it exits next, and
            the server replaces it.
``direct``  the first message on the direct channel (see below): everything the worker
            sends comes that way from now on.

The direct channel (local kernels, ``worker_messages = auto | direct``): when the comm's
``comm_open`` asks for it (``direct``), the worker binds two unix sockets in a private
directory and names them in ``ready`` (``direct``: ``dir`` and ``secret``; or
``direct_problem`` saying why it could not). The server connects a DEALER to
``<dir>/in`` and presents ``[b"hello", secret]``, then sends every message there as
frames: the message as JSON, then its buffers; the worker answers on ``<dir>/out`` (a PUSH
socket) the same way, beginning with ``direct``. The same messages, the same meaning:
only the carrier changes (see `worker.direct` and `server.transports.DirectTransport`).
``out``     output of call ``id``: buffer 0 holds zero or more bytes (many chunks joined);
            optional ``start`` (``status``, ``headers``, ``media_type``) comes with the
            first message, ``end`` is true on the last one, and ``error`` (a dict from
            `errors.error_payload`) ends the call with a failure. ``finish`` on the end
            of an ``http`` call says how it ended: ``reason``, ``usage`` (a dict of token
            counts, or null) as a `responses.Finish` the function yielded or returned
            gave them, and ``chunks`` (how many it yielded, counted when the call asked
            for ``finish``); it comes when the call asked for it or a Finish was yielded. For ``values`` and ``map`` calls
            the buffer holds pickled objects back to back and ``sizes`` gives their
            lengths; a map lane adds ``items``, one ``[index, ok]`` per object (a failed
            item's object is its pickled `errors.error_payload`) and ``busy``, the seconds
            the worker spent running those items (the server sizes the lane's batches by
            it); ``revoked`` answers a ``revoke``. A call that times out ends with
            a `FunctionTimeoutError` at once, and its thread is interrupted (see
            ``stuck``). Messages from
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

Batches (``mode: "batch"``, `@jupyter_stream.batched`): ``batch`` holds ``mode``
(``"values"`` or ``"http"``: how each input's result travels, as in those modes) and
``items``, one per input: its own call ``id`` and the indices of the buffers that hold its
arguments: ``pickled`` (a pickled ``(args, kwargs)``), or ``args`` (a pickled argument
tuple of a map) with ``kwargs`` (the map's pickled ``((), kwargs)``, shared by its
inputs), or ``json`` (an HTTP request's keyword arguments) with ``request``. The worker
calls the function once with one list per parameter and sends each input's result (or
each yielded list's element) as the output of that input's ``id``, each ending on its
own, then ends the batch's ``id``; an error of the whole batch ends every input with it.
Each input can be cancelled alone (``cancel`` with its ``id``); ``timeout``, ``interrupt``
and the seat on the worker belong to the batch's ``id``.

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

#: Changes whenever a message changes meaning: a worker kernel whose jupyter-stream speaks
#: another version is refused at start (install the same version there).
PROTOCOL_VERSION = 5

#: Functions a worker keeps unpickled at most; the server tells it to forget the least
#: recently used beyond this (and at once those no registration uses any more).
MAX_WORKER_FUNCTIONS = 64

WORKER_OPS = ("ready", "out", "pong", "stuck", "broken", "direct")


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


def ping_message(n: int) -> dict[str, Any]:
    return {"op": "ping", "n": n}


def forget_message(fn_hashes: list[str]) -> dict[str, Any]:
    return {"op": "forget", "fns": fn_hashes}


# -- worker -> server messages: checked only here ----------------------------------------


class ProtocolError(ValueError):
    """A worker sent a message that is not of this protocol (its kernel is replaced)."""


def _whole(value: Any) -> bool:
    return type(value) is int and value >= 0


def _nbytes(buffer: Any) -> int:
    return buffer.nbytes if isinstance(buffer, memoryview) else len(buffer)


def check_worker_message(data: Any, buffers: list) -> None:
    """Raise `ProtocolError` unless `data` (with `buffers`) is a well-formed message from a
    worker (see above): everything the server reads of it has the type it expects, so
    that routing it cannot fail halfway. Cheap: it runs for every message."""
    if not isinstance(data, dict):
        raise ProtocolError(f"a message is a JSON object, not {type(data).__name__}")
    op = data.get("op")
    if op == "out":
        _check_out(data, buffers)
    elif op in ("ready", "pong"):
        key = "pid" if op == "ready" else "n"
        if not _whole(data.get(key)):
            raise ProtocolError(f"{op!r} needs {key!r}, a whole number")
    elif op in ("stuck", "broken"):
        if not isinstance(data.get("reason"), str):
            raise ProtocolError(f"{op!r} needs a 'reason' string")
    elif op == "direct":
        pass
    else:
        raise ProtocolError(f"unknown op {op!r}; expected one of {', '.join(WORKER_OPS)}")


def _check_out(data: dict[str, Any], buffers: list) -> None:
    if not isinstance(data.get("id"), str):
        raise ProtocolError("'out' needs an 'id' string")
    seq = data.get("seq")
    if seq is not None and not _whole(seq):
        raise ProtocolError(f"'seq' must be a whole number, not {seq!r}")
    if not all(isinstance(b, (bytes, bytearray, memoryview)) for b in buffers):
        raise ProtocolError("buffers must be bytes")
    sizes = data.get("sizes")
    if sizes is not None:
        if not isinstance(sizes, list) or not all(_whole(n) for n in sizes):
            raise ProtocolError("'sizes' must be a list of whole numbers")
        total = sum(_nbytes(b) for b in buffers)
        if len(buffers) > 1 or sum(sizes) != total:
            raise ProtocolError(f"'sizes' add up to {sum(sizes)} bytes but the buffers hold {total} in {len(buffers)}")
        items = data.get("items")
        if items is not None and (not isinstance(items, list) or len(items) != len(sizes) or not all(
                isinstance(i, list) and len(i) == 2 and _whole(i[0]) and isinstance(i[1], bool) for i in items)):
            raise ProtocolError("'items' must be one [index, ok] pair per size")
    elif "items" in data:
        raise ProtocolError("'items' come with 'sizes'")
    busy = data.get("busy")
    if busy is not None and (isinstance(busy, bool) or not isinstance(busy, (int, float))):
        raise ProtocolError("'busy' must be a number of seconds")
    revoked = data.get("revoked")
    if revoked is not None and (not isinstance(revoked, list) or not all(_whole(i) for i in revoked)):
        raise ProtocolError("'revoked' must be a list of item indices")
    start = data.get("start")
    if start is not None and not isinstance(start, dict):
        raise ProtocolError("'start' must be an object")
    printed = data.get("print")
    if printed is not None and (not isinstance(printed, list) or not all(
            isinstance(p, list) and len(p) == 2 and isinstance(p[0], str) and isinstance(p[1], str) for p in printed)):
        raise ProtocolError("'print' must be a list of [stream, text] pairs")
    finish = data.get("finish")
    if finish is not None and not (isinstance(finish, dict) and isinstance(finish.get("reason"), str)
                                   and isinstance(finish.get("usage") or {}, dict) and _whole(finish.get("chunks"))):
        raise ProtocolError("'finish' must be an object with a 'reason' string, 'usage' (an object or null) and 'chunks'")
    error = data.get("error")
    if error is not None and not (isinstance(error, dict) and isinstance(error.get("type"), str)
                                  and isinstance(error.get("message"), str)):
        raise ProtocolError("'error' must be an object with 'type' and 'message' strings")


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
