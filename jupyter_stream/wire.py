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
``comm_open`` asks for it (``direct``), the worker listens on a unix socket,
``<dir>/socket`` in a private directory, and names it in ``ready`` (``direct``: ``dir``
and ``secret``; or ``direct_problem`` saying why it could not). The server connects and
presents ``{"op": "hello", "secret": ...}``, then sends every message there framed by
`direct_parts` (a head of part lengths, the message as JSON, its buffers); the worker
removes the socket (nobody else can connect) and answers on the same connection the same
way, beginning with ``direct``. The same messages, the same meaning: only the carrier
changes (see `worker.direct` and `server.transports.DirectTransport`).
``out``     output of call ``id``: buffer 0 holds zero or more bytes (many chunks joined);
            optional ``start`` (``status``, ``headers``, ``media_type``) comes with the
            first message, ``end`` is true on the last one, and ``error`` (a dict from
            `errors.error_payload`) ends the call with a failure. ``finish`` on the end
            of an ``http`` call says how it ended: ``reason``, ``usage`` (a dict of token
            counts, or null) as a `responses.Finish` the function yielded or returned
            gave them, and ``chunks`` (how many it yielded, counted when the call asked
            for ``finish``); it comes when the call asked for it or a Finish was yielded. For ``values`` and ``map`` calls
            the buffer holds pickled objects back to back and ``sizes`` gives their
            lengths. A map lane's results come instead with ``items``, their number, and
            four buffers: the pickles joined, then `pack_ints` of their indices and of
            their sizes, and one outcome byte each (`ITEM_OK`, or `ITEM_FAILED`: the
            object is its pickled `errors.error_payload`); and with ``busy``, the seconds
            the worker spent running those items (the server sizes the lane's batches by
            it); ``revoked`` answers a ``revoke``. A call that times out ends with
            a `FunctionTimeoutError` at once, and its thread is interrupted (see
            ``stuck``). Messages from
            the worker's sender thread carry ``seq`` (1, 2, ...); the sender waits while
            `MAX_UNACKED_MESSAGES` are not ``acked``, because IOPub drops what a slow
            reader leaves queued. (A call's first message and a plain return value are
            sent directly, without ``seq``.)

Map calls (``mode: "map"``) open a lane on a worker; the server feeds it with

``batch``   ``count`` items for lane ``id``: buffer 0 holds their pickled argument tuples
            joined, buffers 1 and 2 their indices and sizes (`pack_ints`).
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
calls, pickled common kwargs for maps), ``items`` (map inputs: ``count`` of them, the
payload `pack_items` of their indices and sizes, then their pickles),
``inputs_done``, ``ack`` (``bytes`` of a generator's output consumed), ``cancel``.
Server -> client ops: ``out`` (as above; a map's results instead with ``items``, their
number, the payload `pack_items` of indices, sizes and outcome bytes, `ITEM_RETRIED`
for an item that runs again, then the pickles; and ``lanes``, the number of workers
running it; ``end`` and ``error`` end the call). A map's client bounds
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
import sys
import types
from array import array
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
PROTOCOL_VERSION = 6

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


def batch_message(call_id: str, count: int) -> dict[str, Any]:
    """``batch`` of `count` items: buffers are the pickles joined, then `pack_ints` of
    their indices and of their sizes."""
    return {"op": "batch", "id": call_id, "count": count}


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
        if "items" in data:
            raise ProtocolError("'items' come without 'sizes' (theirs are packed in a buffer)")
    elif "items" in data:
        _check_items(data["items"], buffers)
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


def _check_items(count: Any, buffers: list) -> None:
    """A map lane's results: `count` items, buffers pickles, indices, sizes, outcomes."""
    if not _whole(count):
        raise ProtocolError("'items' must be the number of results")
    if len(buffers) != 4:
        raise ProtocolError(f"map results come in 4 buffers (pickles, indices, sizes, outcomes), not {len(buffers)}")
    lengths = [_nbytes(b) for b in buffers[1:]]
    if lengths != [8 * count, 8 * count, count]:
        raise ProtocolError(f"{count} results need buffers of {8 * count}, {8 * count} and {count} bytes, not {lengths}")
    if count:
        indices, sizes = unpack_ints(buffers[1]), unpack_ints(buffers[2])
        if min(indices) < 0 or min(sizes) < 0:
            raise ProtocolError("results' indices and sizes are whole numbers")
        if sum(sizes) != _nbytes(buffers[0]):
            raise ProtocolError(f"the results' sizes add up to {sum(sizes)} bytes but their buffer holds {_nbytes(buffers[0])}")
        if bytes(buffers[3]).strip(b"\x00\x01"):
            raise ProtocolError("a result's outcome is 0 (failed) or 1 (ran)")


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


#: compact JSON, made by one encoder (``json.dumps`` with options builds a new one per call,
#: a few microseconds of every message)
_compact_json = json.JSONEncoder(separators=(",", ":")).encode


def encode_frame(header: dict[str, Any], *payload: bytes | memoryview) -> bytes:
    """One WebSocket message: 4-byte header length, JSON header, payload (its parts
    joined here, in the one copy the message needs)."""
    head = _compact_json(header).encode()
    return b"".join((struct.pack("!I", len(head)), head, *payload))


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


# -- map items: indices, sizes and outcomes packed, not JSON lists -----------------------

#: Map items travel in groups of hundreds; their indices and sizes as JSON lists were most
#: of what the server spent per item (encoding and decoding them at every hop), so they
#: go as packed 64-bit integers (little-endian) beside the pickles instead.
_LITTLE = sys.byteorder == "little"

#: A map result's outcome byte: it ran, it failed (its pickle is the error), or (server
#: to client only) it failed and runs again (its pickle is empty).
ITEM_FAILED, ITEM_OK, ITEM_RETRIED = 0, 1, 2


def pack_ints(values: Any) -> bytes:
    packed = array("q", values)
    if not _LITTLE:
        packed.byteswap()
    return packed.tobytes()


def unpack_ints(data: Any) -> array:
    """The integers `pack_ints` packed (an `array`; ``.tolist()`` for a list). Raises
    ValueError when `data` is not a whole number of them."""
    if _nbytes(data) % 8:
        raise ValueError(f"{_nbytes(data)} bytes are not a whole number of 8-byte integers")
    values = array("q")
    values.frombytes(data)
    if not _LITTLE:
        values.byteswap()
    return values


def pack_items(indices: Any, sizes: Any, outcomes: bytes | None = None) -> bytes:
    """A map frame's head (client <-> server): `count` indices, `count` sizes, and (for
    results) `count` outcome bytes; the pickles follow it in the frame's payload."""
    head = pack_ints(indices) + pack_ints(sizes)
    return head + outcomes if outcomes is not None else head


def unpack_items(payload: memoryview, count: Any, outcomes: bool) -> tuple[list[int], list[int], bytes, memoryview]:
    """A map frame's indices, sizes, outcomes (b"" without) and its pickles, checked: as
    many of each as `count`, indices and sizes whole numbers, sizes adding up to the
    pickles' bytes. Raises `FrameError` otherwise."""
    if not _whole(count):
        raise FrameError("a map frame needs 'items', the number of its items")
    head = count * (17 if outcomes else 16)
    if payload.nbytes < head:
        raise FrameError(f"a frame of {count} items needs at least {head} bytes, it has {payload.nbytes}")
    indices, sizes = unpack_ints(payload[: 8 * count]), unpack_ints(payload[8 * count : 16 * count])
    if count and (min(indices) < 0 or min(sizes) < 0):
        raise FrameError("a map frame's indices and sizes are whole numbers")
    blobs = payload[head:]
    if sum(sizes) != blobs.nbytes:
        raise FrameError(f"the items' sizes add up to {sum(sizes)} bytes but the frame holds {blobs.nbytes}")
    return indices.tolist(), sizes.tolist(), payload[16 * count : head].tobytes() if outcomes else b"", blobs


def cut(payload: memoryview, sizes: list[int]) -> list[bytes]:
    """Back-to-back pickles apart, as `bytes` cut from one copy of `payload`: for many
    small ones cheaper than a view and a copy each."""
    data, start, out = payload.tobytes(), 0, []
    append = out.append
    for size in sizes:
        end = start + size
        append(data[start:end])
        start = end
    return out


# -- the direct channel's framing (see `worker.direct`) ----------------------------------

#: Parts a direct-channel message may have (its JSON and its buffers), and its largest size
MAX_DIRECT_PARTS = 1024
MAX_DIRECT_BYTES = 1 << 34
#: Messages of at least this size are received straight into a buffer of their own
DIRECT_LARGE = 1 << 16


#: Bytes a direct channel's socket may hold on their way (asked for; the system caps it at
#: net.core.wmem_max): with the default (about 200 KiB) a 1 MiB chunk took five hand-offs
#: between the two processes, and bulk streams ran at two thirds of the speed
DIRECT_SOCKET_BUFFER = 4 << 20


def widen_socket(sock: Any) -> None:
    """Ask for `DIRECT_SOCKET_BUFFER` bytes of send and receive buffer (best effort)."""
    import socket

    for option in (socket.SO_SNDBUF, socket.SO_RCVBUF):
        try:
            sock.setsockopt(socket.SOL_SOCKET, option, DIRECT_SOCKET_BUFFER)
        except OSError:
            pass


def direct_parts(data: dict[str, Any], buffers: list | None = None) -> list:
    """One message for the direct channel, as the parts to write: a head (a little-endian
    u32 count of parts and a u64 length per part), the message's JSON, then its buffers,
    uncopied. The JSON is made first, so a message that does not encode raises here
    (TypeError, ValueError) before anything is written."""
    parts = [_compact_json(data).encode(), *(buffers or ())]
    return [struct.pack(f"<I{len(parts)}Q", len(parts), *map(_nbytes, parts)), *parts]


def _byte_views(parts: list) -> list[memoryview]:
    views = []
    for part in parts:
        view = memoryview(part)
        if view.format != "B" or view.ndim != 1:
            view = view.cast("B")
        if view.nbytes:
            views.append(view)
    return views


def _advance(views: list[memoryview], sent: int) -> list[memoryview]:
    """What is left of `views` once `sent` bytes of them are written."""
    i = 0
    while sent and i < len(views):
        n = views[i].nbytes
        if sent >= n:
            sent -= n
            i += 1
        else:
            views[i] = views[i][sent:]
            sent = 0
    return views[i:]


def send_parts(sock: Any, parts: list) -> None:
    """Write `parts` to a blocking socket with scatter-gather writes (no joining copy)."""
    views = _byte_views(parts)
    while views:
        views = _advance(views, sock.sendmsg(views[:MAX_DIRECT_PARTS]))


def send_parts_nowait(sock: Any, parts: list) -> list[memoryview]:
    """Write what a non-blocking socket takes of `parts` now; return what is left."""
    views = _byte_views(parts)
    while views:
        try:
            sent = sock.sendmsg(views[:MAX_DIRECT_PARTS])
        except (BlockingIOError, InterruptedError):
            break
        views = _advance(views, sent)
    return views


class DirectReader:
    """Cuts direct-channel messages out of the bytes a socket gives, in whatever pieces
    they come: a small message is copied out of the read buffer once; a large one is
    received straight into a buffer of its own (`target`), and its buffers are views of
    it. Raises ValueError on bytes that are not this framing."""

    def __init__(self, max_bytes: int = MAX_DIRECT_BYTES):
        self.max_bytes = max_bytes
        self.pending = bytearray()
        self.large: tuple[bytearray, int, tuple] | None = None  # (its buffer, bytes in it, part lengths)

    def target(self) -> memoryview | None:
        """Where the next bytes go while a large message comes in (then call `received`)."""
        if self.large is None:
            return None
        body, filled, _ = self.large
        return memoryview(body)[filled:]

    def received(self, count: int) -> list[tuple[Any, list]]:
        body, filled, lengths = self.large  # type: ignore[misc]
        filled += count
        if filled < len(body):
            self.large = (body, filled, lengths)
            return []
        self.large = None
        return [self._message(memoryview(body), lengths)]

    def feed(self, data: bytes, limit: int | None = None) -> list[tuple[Any, list]]:
        """The messages completed by `data` (JSON decoded, buffers as memoryviews); with
        `limit`, at most that many (the rest stays for the next call)."""
        pending = self.pending
        pending += data
        out: list[tuple[Any, list]] = []
        pos = 0
        while len(pending) - pos >= 4 and (limit is None or len(out) < limit):
            (count,) = struct.unpack_from("<I", pending, pos)
            if not 0 < count <= MAX_DIRECT_PARTS:
                raise ValueError(f"a message of {count} parts (1 to {MAX_DIRECT_PARTS})")
            start = pos + 4 + 8 * count
            if len(pending) < start:
                break
            lengths = struct.unpack_from(f"<{count}Q", pending, pos + 4)
            total = sum(lengths)
            if total > self.max_bytes:
                raise ValueError(f"a message of {total} bytes (at most {self.max_bytes})")
            have = len(pending) - start
            if have < total:
                if total >= DIRECT_LARGE:  # the rest goes straight into its own buffer
                    body = bytearray(total)
                    body[:have] = pending[start:]
                    pending.clear()
                    self.large = (body, have, lengths)
                    return out
                break
            out.append(self._message(memoryview(bytes(pending[start : start + total])), lengths))
            pos = start + total
        if pos:
            del pending[:pos]
        return out

    @staticmethod
    def _message(body: memoryview, lengths: tuple) -> tuple[Any, list]:
        parts, offset = [], 0
        for length in lengths:
            parts.append(body[offset : offset + length])
            offset += length
        return json.loads(parts[0].tobytes()), parts[1:]


def split(payload: memoryview, sizes: list[int]) -> list[memoryview]:
    """Cut back-to-back pickles (or any blobs) apart by their sizes."""
    out, offset = [], 0
    for size in sizes:
        out.append(payload[offset : offset + size])
        offset += size
    return out
