"""The notebook's cell magics, thin wrappers over `register_endpoint` and `register_function`.

``%%stream_endpoint [--name NAME] [--media-type TYPE] [--persist] [--no-history] [--resumable [WINDOW]]`` runs the cell in the notebook,
takes the last function it defines, registers it, and binds that name to the `Endpoint`
handle, which is also the cell's output. ``%%stream_function [--name NAME] [--retries N]
[--timeout S] [--persist]`` does the same with a `Function` handle.

Both take the worker requirements: ``--gpu SPEC`` (any, N, TYPE, TYPE:N, H100,A100:2),
``--min-workers N``, ``--max-workers N``, ``--scaledown-window S``, ``--kernel NAME`` and
``--env KEY=VALUE`` (repeatable), and ``--batch N [--batch-wait MS]``
(`@jupyter_stream.batched`: the function takes lists, callers single inputs).
"""

from __future__ import annotations

import ast
import time
from typing import Any

from IPython.core.error import UsageError
from IPython.core.magic import Magics, cell_magic, line_magic, magics_class
from IPython.core.magic_arguments import argument, magic_arguments, parse_argstring

from ..requirements import GPU_SPEC_HELP, env_pairs
from .classes import register_class
from .connection import ServerNotFound
from .endpoints import Endpoint, register_endpoint
from .functions import register_function
from .registration import list_registrations

#: What a cell shows as one line, like a `UsageError`, not as a traceback through our
#: frames: a bad option, a refusal by the server (`RegistrationError`, `ServerRefused`,
#: `NotRegisteredError`, a 403), or no server to ask.
ONE_LINE_ERRORS = (ValueError, LookupError, PermissionError, ServerNotFound)


def requirement_arguments(fn: Any) -> Any:
    """The worker requirement options, shared by the magics."""
    options = [
        argument("--env", action="append", metavar="KEY=VALUE", help="Environment variable of its workers (repeatable)."),
        argument("--kernel", default=None, help="Kernelspec its workers start from (default: the server's)."),
        argument("--scaledown-window", type=float, default=None, metavar="S",
                 help="Seconds an idle worker of its pool is kept (default 60)."),
        argument("--max-workers", type=int, default=None, metavar="N", help="Most workers of its pool."),
        argument("--min-workers", type=int, default=None, metavar="N", help="Workers of its pool kept warm."),
        argument("--gpu", default=None, metavar="SPEC", help=f"GPUs each worker gets: {GPU_SPEC_HELP}."),
        argument("--concurrency", type=int, default=None, metavar="N", help="Calls one worker runs at once (default 1)."),
    ]
    for option in options:
        fn = option(fn)
    return fn


#: milliseconds a batch waits to fill when ``--batch`` comes without ``--batch-wait``
DEFAULT_BATCH_WAIT_MS = 10


def batch_arguments(fn: Any) -> Any:
    """``--batch N --batch-wait MS``: `@jupyter_stream.batched` for a cell's function."""
    fn = argument("--batch-wait", type=float, default=None, metavar="MS",
                  help=f"Milliseconds a batch waits to fill after its first input (default {DEFAULT_BATCH_WAIT_MS}).")(fn)
    return argument("--batch", type=int, default=None, metavar="N",
                    help="Run callers' inputs in batches of up to N: the function takes lists and returns a list.")(fn)


def batch_of_args(args: Any, magic: str) -> dict[str, Any] | None:
    if args.batch is None:
        if args.batch_wait is not None:
            raise UsageError(f"%%{magic}: --batch-wait needs --batch N (the largest batch)")
        return None
    wait = DEFAULT_BATCH_WAIT_MS if args.batch_wait is None else args.batch_wait
    return {"max_batch_size": args.batch, "wait_ms": int(wait) if float(wait).is_integer() else wait}


def requirements_of(args: Any) -> dict[str, Any]:
    return dict(gpu=args.gpu, min_workers=args.min_workers, max_workers=args.max_workers,
                scaledown_window=args.scaledown_window, kernel=args.kernel, env=env_pairs(args.env) or None,
                concurrency=args.concurrency)


def defined_class_name(cell: str) -> str:
    """The name of the last top-level class the cell defines."""
    try:
        tree = ast.parse(cell)
    except SyntaxError:
        return ""
    names = [n.name for n in tree.body if isinstance(n, ast.ClassDef)]
    if not names:
        raise UsageError(
            "%%stream_class: the cell defines no class. Put the magic on a cell that defines one, e.g.\n\n"
            "%%stream_class --concurrency 8\nclass Model:\n    @jupyter_stream.enter\n    def load(self):\n"
            "        self.weights = ...\n\n    @jupyter_stream.method\n    def predict(self, x):\n        return x\n"
        )
    return names[-1]


def defined_function_name(cell: str, magic: str) -> str:
    """The name of the last top-level function the cell defines."""
    try:
        tree = ast.parse(cell)
    except SyntaxError:
        return ""  # let IPython report it when the cell runs (it may use IPython syntax)
    names = [n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
    if not names:
        raise UsageError(
            f"%%{magic}: the cell defines no function. Put the magic on a cell that defines one, e.g.\n\n"
            f"%%{magic}\ndef ticks(n: int = 10):\n    for i in range(n):\n        yield f\"data: tick {{i}}\\n\\n\"\n"
        )
    return names[-1]


@magics_class
class StreamMagics(Magics):
    def _run_and_get_function(self, cell: str, magic: str) -> Any:
        name = defined_function_name(cell, magic)
        source = self.shell.transform_cell(cell)  # IPython syntax (%magics, !cmd) to Python
        filename = self.shell.compile.cache(source)  # so tracebacks and inspect show the cell
        code = self.shell.compile(source, filename, "exec")
        exec(code, self.shell.user_global_ns, self.shell.user_ns)
        if not name:
            raise UsageError(f"%%{magic}: the cell defines no function")
        fn = self.shell.user_ns.get(name)
        if not callable(fn):
            raise UsageError(f"%%{magic}: {name!r} is not a function after running the cell")
        return fn

    def _register_cell(self, magic: Any, line: str, cell: str, register: Any) -> Any:
        """Run the cell, register the function it defines with `register(fn, args)`, and bind
        its name to the handle; a bad name or option is a `UsageError` saying what to fix."""
        args = parse_argstring(magic, line)
        fn = self._run_and_get_function(cell, magic.__name__)
        try:
            handle = register(fn, args)
        except ONE_LINE_ERRORS as e:
            raise UsageError(f"%%{magic.__name__}: {e}") from None
        self.shell.user_ns[fn.__name__] = handle
        return handle

    @magic_arguments()
    @requirement_arguments
    @cell_magic
    def stream_class(self, line: str, cell: str) -> Any:
        """Serve the class this cell defines: its @enter methods load once per worker, its
        @method methods take the function call forms, its @endpoint methods are endpoints."""
        args = parse_argstring(self.stream_class, line)
        name = defined_class_name(cell)
        source = self.shell.transform_cell(cell)
        filename = self.shell.compile.cache(source)
        exec(self.shell.compile(source, filename, "exec"), self.shell.user_global_ns, self.shell.user_ns)
        klass = self.shell.user_ns.get(name)
        if not isinstance(klass, type):
            raise UsageError(f"%%stream_class: {name!r} is not a class after running the cell")
        try:
            handle = register_class(klass, **requirements_of(args))
        except ONE_LINE_ERRORS as e:
            raise UsageError(f"%%stream_class: {e}") from None
        self.shell.user_ns[name] = handle
        return handle

    @magic_arguments()
    @argument("name", help="The endpoint to share.")
    @argument("--expires", default="1h", help="How long the link works: 30m, 1h, 7d, seconds, or never (default 1h).")
    @line_magic
    def stream_share(self, line: str) -> Any:
        """A link that opens one endpoint and its demo page, and nothing else of the server."""
        args = parse_argstring(self.stream_share, line)
        expires = None if args.expires.lower() in ("never", "none") else args.expires
        try:
            share = Endpoint.lookup(args.name).share(expires)
        except ONE_LINE_ERRORS as e:
            raise UsageError(f"%stream_share: {e}") from None
        print(repr(share))
        return None

    @line_magic
    def stream_list(self, line: str) -> None:
        """What is registered on the server: endpoints and functions, by whom, since when."""
        try:
            rows = list_registrations()
        except ONE_LINE_ERRORS as e:
            raise UsageError(f"%stream_list: {e}") from None
        print(format_registrations(rows))

    @magic_arguments()
    @argument("--name", default=None, help="URL name of the endpoint (default: the function's name).")
    @argument("--media-type", default=None, help="Response media type (default: text/event-stream).")
    @argument("--persist", action="store_true", help="Register it again when the server restarts.")
    @argument("--queue-timeout", type=float, default=None, metavar="S",
              help="Seconds a request may wait for a busy worker before it gets 503 (default 60).")
    @argument("--openai", action="store_true",
              help="Also serve it as an OpenAI-compatible chat completions API (the function takes `messages`).")
    @argument("--openai-count-chunks", action="store_true",
              help="--openai, reporting each yielded piece as a completion token in `usage` "
              "(unless the function ends with jupyter_stream.Finish(usage=...)).")
    @argument("--no-history", action="store_true",
              help="Keep none of its requests on the server (ep.requests() lists the last 100 otherwise).")
    @argument("--resumable", nargs="?", type=float, const=True, default=False, metavar="WINDOW",
              help="Streams survive a dropped connection: events get ids <stream>:<n>, and a client that comes back "
              "with Last-Event-ID (an EventSource does so by itself) or ?last_event_id= gets what it missed and the "
              "rest, without running the function again; ?stream=<id> (the X-Stream-Id header) lets others follow. "
              "With no client, the run goes on WINDOW seconds (default 30), then is cancelled.")
    @batch_arguments
    @requirement_arguments
    @cell_magic
    def stream_endpoint(self, line: str, cell: str) -> Any:
        """Serve the generator this cell defines as a streaming HTTP endpoint."""
        return self._register_cell(
            self.stream_endpoint, line, cell,
            lambda fn, args: register_endpoint(fn, args.name, args.media_type, persist=args.persist, queue_timeout=args.queue_timeout,
                                               openai=args.openai, openai_count_chunks=args.openai_count_chunks,
                                               history=not args.no_history, resumable=args.resumable,
                                               batch=batch_of_args(args, "stream_endpoint"),
                                               **requirements_of(args)),
        )

    @magic_arguments()
    @argument("--name", default=None, help="Name of the function on the server (default: its own name).")
    @argument("--retries", type=int, default=0, help="Times an input that raised is run again.")
    @argument("--timeout", type=float, default=None, help="Seconds one attempt may run.")
    @argument("--persist", action="store_true", help="Register it again when the server restarts.")
    @argument("--queue-timeout", type=float, default=None, metavar="S",
              help="Seconds a call may wait for a worker before it fails (default: as long as it takes; "
                   "60 for a call made from inside a worker).")
    @batch_arguments
    @requirement_arguments
    @cell_magic
    def stream_function(self, line: str, cell: str) -> Any:
        """Run the function this cell defines on worker kernels: .remote(), .map(), ..."""
        return self._register_cell(  # its repr is the cell's one-line confirmation
            self.stream_function, line, cell,
            lambda fn, args: register_function(fn, args.name, args.retries, args.timeout, persist=args.persist,
                                               queue_timeout=args.queue_timeout, batch=batch_of_args(args, "stream_function"),
                                               **requirements_of(args)),
        )


def format_registrations(rows: list[dict[str, Any]]) -> str:
    """`%stream_list`'s table: kind, name, owner, since when."""
    if not rows:
        return "nothing registered on the server yet"
    lines = []
    for row in rows:
        since = time.strftime("%Y-%m-%d %H:%M", time.localtime(row["since"])) if row.get("since") else "?"
        url = f"  {row['url']}" if row.get("url") else ""
        lines.append(f"{row['kind']:<9} {row['name']:<24} by {row['owner'] or '?'} since {since}{url}")
    return "\n".join(lines)


def load_ipython_extension(ipython: Any) -> None:
    ipython.register_magics(StreamMagics)
