"""`%%stream_class` and ``@jupyter_stream.cls``: a class whose model loads once per worker
and serves many calls, as Modal's ``@app.cls`` with ``@modal.enter``::

    %%stream_class --gpu any --concurrency 32
    class LLM:
        @jupyter_stream.enter
        def load(self):                      # once per worker kernel, before its first call
            self.model = load_model()

        @jupyter_stream.method
        def generate(self, prompt: str, max_tokens: int = 64):
            yield from self.model.stream(prompt, max_tokens)

        @jupyter_stream.endpoint(media_type="text/event-stream")
        def chat(self, prompt: str):         # served at /stream/LLM.chat
            ...

        @jupyter_stream.exit
        def unload(self): ...                # when the worker stops (shut down, scaled down)

    LLM().generate.remote("hi"); LLM().chat.url; LLM(size="small").generate.map(prompts)

Each method is registered as a function (``LLM.generate``) and each endpoint method as an
endpoint (``LLM.chat``) whose code asks the worker for its instance (`worker.instances`).
All of an instance's methods share one pool: its environment names the class, the source
of its ``enter`` code and the constructor parameters, so distinct parameters get their own
warm workers and a changed ``enter`` gets fresh ones, while new method code alone reuses
the loaded instance.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import json
import time
from collections.abc import Callable
from typing import Any

from ..signatures import check_name
from .connection import ServerConnection


def enter(fn: Callable) -> Callable:
    """Run once per worker kernel, before the instance's first call there (load a model)."""
    fn.__jupyter_stream_hook__ = "enter"
    return fn


def exit(fn: Callable) -> Callable:  # noqa: A001 - Modal's name for it
    """Run when a worker kernel holding the instance stops (shut down or scaled down)."""
    fn.__jupyter_stream_hook__ = "exit"
    return fn


def method(fn: Callable | None = None, **options: Any) -> Any:
    """Mark a method as callable with the function call forms (``.remote``, ``.map``, ...)."""
    def mark(f: Callable) -> Callable:
        f.__jupyter_stream_method__ = {"kind": "function", **options}
        return f

    return mark(fn) if fn is not None else mark


def in_class_body(fn: Callable) -> bool:
    """Whether `fn` is being defined in a class body (so a decorator marks, not registers)."""
    parts = getattr(fn, "__qualname__", "").split(".")
    return len(parts) >= 2 and parts[-2] != "<locals>"


def source_of(fn: Any) -> str:
    """A function's code as it reads (source, else bytecode), with the values it closes over."""
    try:
        text = inspect.getsource(fn)
    except (OSError, TypeError):
        code = getattr(fn, "__code__", None)
        text = code.co_code.hex() if code is not None else repr(fn)
    closure = getattr(fn, "__closure__", None) or ()
    return text + "".join(repr(cell.cell_contents)[:1000] for cell in closure)


def instance_key(cls: type, params: dict[str, Any]) -> str:
    """What decides whether a warm instance can be reused: the class, its ``enter`` and
    ``__init__`` code, and the constructor parameters."""
    from ..worker.instances import hooks

    code = [source_of(getattr(cls, name)) for name in hooks(cls, "enter")]
    if "__init__" in vars(cls):
        code.append(source_of(cls.__init__))
    digest = hashlib.sha256(("\0".join(code) + json.dumps(params, sort_keys=True, default=repr)).encode()).hexdigest()
    return f"{cls.__qualname__}:{digest[:16]}"


def bound_call(cls: type, name: str, params: dict[str, Any], key: str) -> Callable:
    """A function that runs method `name` of the worker's instance for `key`; it has the
    method's signature without ``self``, so endpoints bind parameters and generators stream."""
    original = getattr(cls, name)

    if inspect.isasyncgenfunction(original):
        async def call(*args: Any, **kwargs: Any) -> Any:
            from jupyter_stream.worker.instances import instance

            async for item in getattr(instance(cls, params, key), name)(*args, **kwargs):
                yield item
    elif inspect.isgeneratorfunction(original):
        def call(*args: Any, **kwargs: Any) -> Any:  # type: ignore[misc]
            from jupyter_stream.worker.instances import instance

            yield from getattr(instance(cls, params, key), name)(*args, **kwargs)
    elif inspect.iscoroutinefunction(original):
        async def call(*args: Any, **kwargs: Any) -> Any:  # type: ignore[misc]
            from jupyter_stream.worker.instances import instance

            return await getattr(instance(cls, params, key), name)(*args, **kwargs)
    else:
        def call(*args: Any, **kwargs: Any) -> Any:  # type: ignore[misc]
            from jupyter_stream.worker.instances import instance

            return getattr(instance(cls, params, key), name)(*args, **kwargs)

    functools.update_wrapper(call, original)
    del call.__wrapped__  # cloudpickle sends `call`, not the method through it
    signature = inspect.signature(original)
    call.__signature__ = signature.replace(parameters=list(signature.parameters.values())[1:])
    call.__qualname__ = call.__name__ = name
    return call


class StreamClass:
    """A registered `%%stream_class`: call it with constructor parameters (or none) for an
    instance whose attributes are the methods' `Function` and `Endpoint` handles."""

    def __init__(self, cls: type, options: dict[str, Any], connection: ServerConnection | None):
        self.cls = cls
        cls.__jupyter_stream_generation__ = time.time_ns()  # newer registrations' methods win on the workers
        self.options = options
        self.connection = connection
        self.methods = {name: value.__jupyter_stream_method__ for name, value in vars(cls).items()
                        if hasattr(value, "__jupyter_stream_method__")}
        if not self.methods:
            raise ValueError(f"class {cls.__name__} has no @jupyter_stream.method or @jupyter_stream.endpoint methods to serve")
        self.instances: dict[str, Instance] = {}
        self.default = self()  # registered now, so the cell fails if something cannot be sent

    def __call__(self, **params: Any) -> Instance:
        key = instance_key(self.cls, params)
        found = self.instances.get(key)
        if found is None:
            found = self.instances[key] = Instance(self, params, key)
        return found

    def __repr__(self) -> str:
        return repr(self.default)

    def _repr_mimebundle_(self, include: Any = None, exclude: Any = None) -> dict[str, Any]:
        return {"text/plain": repr(self.default)}


class Instance:
    """One set of constructor parameters of a `StreamClass`: its methods registered on the
    server, under ``Class.method`` (``Class-<hash>.method`` for non-default parameters)."""

    def __init__(self, owner: StreamClass, params: dict[str, Any], key: str):
        from .endpoints import register_endpoint
        from .functions import register_function

        self.owner, self.params, self.key = owner, params, key
        cls, options = owner.cls, dict(owner.options)
        prefix = cls.__name__ if not params else f"{cls.__name__}-{key.rsplit(':', 1)[1][:8]}"
        check_name(f"{prefix}.x")
        env = {**(options.pop("env", None) or {}), "JUPYTER_STREAM_CLASS": key}
        self.handles: dict[str, Any] = {}
        for name, marked in owner.methods.items():
            call = bound_call(cls, name, params, key)
            if marked["kind"] == "endpoint":
                self.handles[name] = register_endpoint(call, f"{prefix}.{name}", marked.get("media_type"),
                                                       connection=owner.connection, queue_timeout=marked.get("queue_timeout"),
                                                       openai=marked.get("openai", False),
                                                       openai_count_chunks=marked.get("openai_count_chunks", False),
                                                       resumable=marked.get("resumable", False), env=env, **options)
            else:
                self.handles[name] = register_function(call, f"{prefix}.{name}", marked.get("retries", 0), marked.get("timeout"),
                                                       connection=owner.connection, env=env, **options)

    def __getattr__(self, name: str) -> Any:
        handles = self.__dict__.get("handles", {})
        if name in handles:
            return handles[name]
        raise AttributeError(f"{self.owner.cls.__name__} serves no method {name!r} (it serves: {', '.join(handles)})")

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in self.params.items())
        lines = [f"<{self.owner.cls.__name__}({params}): {len(self.handles)} method(s) on the workers>"]
        for name, handle in self.handles.items():
            kind = "endpoint " + handle.url if hasattr(handle, "url") else "function: .remote(), .map(), .spawn(), ..."
            if getattr(handle, "openai", False):
                kind += f" (OpenAI API: base_url={handle.url}/v1)"
            lines.append(f"  .{name}  {kind}")
        return "\n".join(lines)


def register_class(cls: type, connection: ServerConnection | None = None, **options: Any) -> StreamClass:
    """Register `cls`'s methods with the server; `options` are the pool requirements
    (``gpu=``, ``concurrency=``, ``min_workers=``, ...)."""
    if not isinstance(cls, type):
        raise TypeError(f"%%stream_class needs a class, got {type(cls).__name__}")
    return StreamClass(cls, {k: v for k, v in options.items() if v is not None}, connection)


def cls(_cls: type | None = None, **options: Any) -> Any:
    """Decorator form of `%%stream_class` for scripts: ``@jupyter_stream.cls(gpu="any", concurrency=32)``."""
    if _cls is not None:
        return register_class(_cls, **options)
    return lambda c: register_class(c, **options)
