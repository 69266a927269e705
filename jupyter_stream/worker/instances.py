"""The instances of `%%stream_class` classes living in this worker kernel.

A class method call arrives as a small function (made by `client.classes`) that asks for
its instance here: the first call of a key builds it and runs its ``@enter`` methods once
(concurrent first calls wait for that one), later calls reuse it. The key names the
class, the source of its ``enter`` and ``__init__`` code and the constructor parameters,
so re-running an unchanged class cell finds the loaded instance and only swaps in the
new methods (the model stays loaded). ``@exit`` methods run when the kernel stops
(shut down or scaled down). An ``enter`` that raised fails every call of that key with
its error; it is not tried again until the class is registered anew (its methods arrive
as new objects then).
"""

from __future__ import annotations

import atexit
import threading
from typing import Any

_instances: dict[str, Any] = {}
#: key -> the error, its traceback (sending an error clears it) and the class object of the
#: registration that failed; a new registration of the class (the cell ran again) tries again
_failed: dict[str, tuple[BaseException, Any, type]] = {}
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
    return _current(obj, cls)


def _current(obj: Any, cls: type) -> Any:
    """The class cell ran again with the same enter: the newest registration's methods on
    the same state (a call of an older one still running never swaps them back)."""
    if type(obj) is not cls and generation(cls) >= generation(type(obj)):
        obj.__class__ = cls
    return obj


def generation(cls: type) -> int:
    return getattr(cls, "__jupyter_stream_generation__", 0)


def _build(cls: type, params: dict[str, Any], key: str) -> Any:
    with _lock:
        building = _building.setdefault(key, threading.Lock())
    with building:
        if key in _instances:
            return _instances[key]
        failed = _failed.get(key)
        if failed is not None and failed[2] is cls:  # the same registration: not tried again
            raise failed[0].with_traceback(failed[1])
        try:
            if "__init__" in vars(cls) or not params:
                obj = cls(**params)
            else:  # a class without __init__: parameters become attributes, as Modal's parameters do
                obj = cls()
                for name, value in params.items():
                    setattr(obj, name, value)
            for name in hooks(cls, "enter"):
                getattr(obj, name)()
        except Exception as exc:  # an interrupt (a cancelled call, a stopping kernel) is not the class's failure
            _failed[key] = (exc, exc.__traceback__, cls)
            raise
        atexit.register(_exit, obj)
        _instances[key] = obj
        return obj


def _exit(obj: Any) -> None:
    """At kernel exit: the instance's ``@exit`` methods (each runs even if another raised),
    once the calls still running are stopped (atexit runs this before the worker's own hook)."""
    from . import runtime

    if runtime._worker is not None:
        runtime._worker.stop_runs()
    for name in hooks(type(obj), "exit"):
        try:
            getattr(obj, name)()
        except Exception as exc:  # noqa: BLE001 - the kernel is going away; say it and go on
            import sys

            print(f"jupyter-stream: {type(obj).__name__}.{name} (exit) raised {type(exc).__name__}: {exc}", file=sys.stderr)
