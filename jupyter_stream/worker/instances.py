"""The instances of `%%stream_class` classes living in this worker kernel.

A class method call arrives as a small function (made by `client.classes`) that asks for
its instance here: the first call of a key builds it and runs its ``@enter`` methods once
(concurrent first calls wait for that one), later calls reuse it. The key names the
class, the source of its ``enter`` and ``__init__`` code and the constructor parameters,
so re-running an unchanged class cell finds the loaded instance and only swaps in the
new methods (the model stays loaded). ``@exit`` methods run when the kernel stops
(shut down or scaled down). An ``enter`` that raised fails every call of that key with
its error; it is not tried again until the class is registered anew.
"""

from __future__ import annotations

import atexit
import threading
from typing import Any

_instances: dict[str, Any] = {}
_failed: dict[str, tuple[BaseException, Any]] = {}  # the error and its traceback (sending an error clears it)
_building: dict[str, threading.Lock] = {}
_lock = threading.Lock()


def hooks(cls: type, kind: str) -> list[str]:
    """Names of the class's methods marked ``@enter`` or ``@exit``, in definition order."""
    names = []
    for klass in reversed(cls.__mro__):
        for name, value in vars(klass).items():
            if getattr(value, "__jupyter_stream_hook__", None) == kind and name not in names:
                names.append(name)
    return names


def instance(cls: type, params: dict[str, Any], key: str) -> Any:
    """The instance for `key`, built (and entered) on first use."""
    obj = _instances.get(key)
    if obj is None:
        obj = _build(cls, params, key)
    if type(obj) is not cls:  # the class cell ran again with the same enter: new methods, same state
        obj.__class__ = cls
    return obj


def _build(cls: type, params: dict[str, Any], key: str) -> Any:
    with _lock:
        building = _building.setdefault(key, threading.Lock())
    with building:
        if key in _instances:
            return _instances[key]
        if key in _failed:
            error, tb = _failed[key]
            raise error.with_traceback(tb)
        try:
            if "__init__" in vars(cls) or not params:
                obj = cls(**params)
            else:  # a class without __init__: parameters become attributes, as Modal's parameters do
                obj = cls()
                for name, value in params.items():
                    setattr(obj, name, value)
            for name in hooks(cls, "enter"):
                getattr(obj, name)()
        except BaseException as exc:
            _failed[key] = (exc, exc.__traceback__)
            raise
        atexit.register(_exit, obj)
        _instances[key] = obj
        return obj


def _exit(obj: Any) -> None:
    """At kernel exit: the instance's ``@exit`` methods (each runs even if another raised)."""
    for name in hooks(type(obj), "exit"):
        try:
            getattr(obj, name)()
        except Exception as exc:  # noqa: BLE001 - the kernel is going away; say it and go on
            import sys

            print(f"jupyter-stream: {type(obj).__name__}.{name} (exit) raised {type(exc).__name__}: {exc}", file=sys.stderr)
