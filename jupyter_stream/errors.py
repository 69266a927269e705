"""Exceptions callers see, the one shape errors travel in, and rebuilding a worker's
exception on the caller's side.

An error crosses processes as a dict ``{"type", "module", "message", "traceback"}`` (and
``pickle``, the pickled exception, for remote calls): `error_payload` makes it from an
exception, `error_info` from what the server knows; `rebuild` turns it back into an
exception for the caller.
"""

from __future__ import annotations

import base64
import builtins
import json
import pickle
import traceback
from typing import Any


class RemoteError(RuntimeError):
    """A remote call raised an exception whose type cannot be recreated here."""


class FunctionTimeoutError(TimeoutError):
    """One attempt of a call ran longer than the function's `timeout`."""


class WorkerDied(RuntimeError):
    """The worker kernel running a call died and the call could not be retried."""


class WorkerError(RuntimeError):
    """No worker kernel could be started or bootstrapped to run a call."""


class RequestError(ValueError):
    """A request's JSON body does not fit the dataclass or pydantic model the endpoint asks
    for (the client gets a 422 naming what is wrong)."""


class ServerRefused(ValueError, RuntimeError):
    """The server refused a request as wrong (a 4xx), saying why in `str(e)`.

    A `ValueError` (what was sent is wrong, not the server), and also a `RuntimeError`,
    which is what earlier versions raised, so code that caught that keeps working.
    `status`, `method` and `path` say which request it was."""

    def __init__(self, message: str, status: int = 400, method: str = "", path: str = ""):
        super().__init__(message)
        self.status, self.method, self.path = status, method, path


class RegistrationError(ServerRefused):
    """The server refused to register an endpoint, function or class (a bad option, a GPU
    spec this machine cannot meet, a kernelspec it lacks); nothing was registered."""


class NotRegisteredError(LookupError):
    """The server has no endpoint, function or share by that name or id (a 404 naming
    what it has)."""


class RemoteTraceback(Exception):
    """Carries the worker's traceback text as the ``__cause__`` of a re-raised exception
    (as `concurrent.futures` does for process pools)."""

    def __init__(self, tb: str):
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        return "\n\n" + self.tb.rstrip()


_OURS = {"FunctionTimeoutError": FunctionTimeoutError, "WorkerDied": WorkerDied, "WorkerError": WorkerError,
         "RequestError": RequestError}


def error_info(type_name: str, message: str, module: str = "jupyter_stream", traceback: str = "") -> dict[str, Any]:
    """An error the server (or the client) describes itself, in the one shape."""
    return {"type": type_name, "module": module, "message": message, "traceback": traceback}


def _user_frames(tb: Any) -> Any:
    """Skip the leading frames that belong to jupyter_stream itself."""
    while tb is not None and tb.tb_frame.f_globals.get("__name__", "").startswith("jupyter_stream."):
        tb = tb.tb_next
    return tb


def error_payload(exc: BaseException, pickled: bool = False) -> dict[str, Any]:
    """Describe an exception for the other side: type, message and the worker's traceback,
    and (for remote calls) the pickled exception so the caller can raise the same type."""
    tb = _user_frames(exc.__traceback__)
    payload = error_info(type(exc).__name__, str(exc), type(exc).__module__,
                         "".join(traceback.format_exception(type(exc), exc, tb)))
    if pickled:
        from .wire import cloudpickle_dumps

        try:
            payload["pickle"] = base64.b64encode(cloudpickle_dumps(exc.with_traceback(None))).decode()
        except Exception:
            pass  # the caller gets a RemoteError naming the type instead
    return payload


class MessageTooLarge(ValueError):
    """A message to a worker is larger than what carries it accepts (a gateway's
    WebSocket): that call fails, its worker and the channel stay as they were."""


def timeout_error() -> dict[str, Any]:
    return error_info("FunctionTimeoutError", "the call ran past its timeout; raise `timeout` if it needs longer")


def worker_died_error(reason: str) -> dict[str, Any]:
    """The error sent to callers whose worker kernel died under them."""
    return error_info("WorkerDied", f"the worker kernel running this call died ({reason}); "
                      "it is being replaced, retry the request")


def gave_up_error(deaths: int) -> dict[str, Any]:
    return error_info("WorkerDied", f"the worker kernel died {deaths} times running this call, so it is not run again: "
                      "it is most likely what kills the kernel (os._exit, a crash in C code, running out of memory)")


def error_body(error: dict[str, Any]) -> str:
    """What an HTTP client sees of a failed endpoint, as the 500's body and as an SSE
    ``event: error``'s data alike: ``{"error": {"type", "message", "traceback"}}`` (the
    shape OpenAI-style clients look for)."""
    shown = {k: error[k] for k in ("type", "message", "traceback") if k in error}
    return json.dumps({"error": shown})


def rebuild(payload: dict[str, Any]) -> BaseException:
    """The exception described by an `error_payload`, with the remote traceback attached:
    the original type when it can be unpickled here, a `RemoteError` naming it otherwise."""
    exc: BaseException | None = None
    if payload.get("pickle"):
        try:
            exc = pickle.loads(base64.b64decode(payload["pickle"]))
        except Exception:
            exc = None
    if exc is None and payload.get("module") == "jupyter_stream" and payload.get("type") in _OURS:
        exc = _OURS[payload["type"]](payload.get("message", ""))
    if exc is None and payload.get("module") == "builtins":
        cls = getattr(builtins, payload.get("type", ""), None)
        if isinstance(cls, type) and issubclass(cls, BaseException):
            try:
                exc = cls(payload.get("message", ""))
            except Exception:
                exc = None
    if exc is None:
        exc = RemoteError(f"{payload.get('module')}.{payload.get('type')}: {payload.get('message')}")
    if payload.get("traceback"):
        exc.__cause__ = RemoteTraceback(payload["traceback"])
    return exc
