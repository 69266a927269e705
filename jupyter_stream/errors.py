"""Exceptions callers see, and rebuilding a worker's exception on the caller's side."""

from __future__ import annotations

import base64
import builtins
import pickle
from typing import Any


class RemoteError(RuntimeError):
    """A remote call raised an exception whose type cannot be recreated here."""


class FunctionTimeoutError(TimeoutError):
    """One attempt of a call ran longer than the function's `timeout`."""


class WorkerDied(RuntimeError):
    """The worker kernel running a call died and the call could not be retried."""


class RemoteTraceback(Exception):
    """Carries the worker's traceback text as the ``__cause__`` of a re-raised exception
    (as `concurrent.futures` does for process pools)."""

    def __init__(self, tb: str):
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        return "\n\n" + self.tb.rstrip()


_OURS = {"FunctionTimeoutError": FunctionTimeoutError, "WorkerDied": WorkerDied}


def rebuild(payload: dict[str, Any]) -> BaseException:
    """The exception described by a `wire.error_payload`, with the remote traceback attached:
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
