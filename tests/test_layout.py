"""The package's shape: which process may import what, and the public names."""

import ast
import os
from pathlib import Path

import jupyter_stream

PACKAGE = Path(jupyter_stream.__file__).parent
SHARED = {"wire", "errors", "responses", "signatures", "requirements"}


def imported_modules(path: Path) -> set[str]:
    """Absolute names of the jupyter_stream modules that `path` imports, anywhere in it."""
    module = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            found.add(name)
            found.update(f"{name}.{alias.name}" for alias in node.names)
    return {name for name in found if name.startswith("jupyter_stream")}


def modules_in(sub: str) -> list[Path]:
    return sorted((PACKAGE / sub).glob("*.py")) if sub else sorted(PACKAGE.glob("*.py"))


def test_each_process_imports_only_what_it_may():
    for path in modules_in("worker") + modules_in("client"):
        bad = {m for m in imported_modules(path) if m.startswith("jupyter_stream.server")}
        assert not bad, f"{path.relative_to(PACKAGE)} imports server code: {bad}"
    for path in modules_in("server"):
        bad = {m for m in imported_modules(path) if m.startswith("jupyter_stream.client")}
        assert not bad, f"{path.relative_to(PACKAGE)} imports client code: {bad}"
    for name in SHARED:
        path = PACKAGE / f"{name}.py"
        bad = {m for m in imported_modules(path) if m.split(".")[1] in ("client", "server", "worker")}
        assert not bad, f"shared module {name} imports process code: {bad}"


def test_every_module_lives_where_its_process_is_named():
    top = {p.stem for p in modules_in("")} - {"__init__"}
    assert top == SHARED | {"pytest_plugin"}, top
    assert {p.name for p in PACKAGE.iterdir() if p.is_dir() and not p.name.startswith("__")} == {"client", "server", "worker"}


def test_the_public_names():
    assert jupyter_stream.__all__ == [
        "Endpoint", "Finish", "Function", "FunctionCall", "FunctionTimeoutError", "RemoteError", "Request", "ServerConnection",
        "Share", "StreamingResponse", "WorkerDied", "WorkerError", "connect", "endpoint", "function", "get_connection",
        "list", "serve_forever", "sse", "cls", "enter", "exit", "method", "batched",
    ]
    for name in jupyter_stream.__all__:
        assert getattr(jupyter_stream, name) is not None
    assert callable(jupyter_stream.load_ipython_extension)
    assert jupyter_stream._jupyter_server_extension_points()[0]["app"].name == "jupyter_stream"


def test_importing_the_server_does_not_load_the_client():
    import subprocess
    import sys

    code = ("import sys, jupyter_stream.server.app, jupyter_stream.worker; "
            "print(sorted(m for m in sys.modules if m.startswith('jupyter_stream.client')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=os.environ)
    assert out.stdout.strip() == "[]", out.stdout


def test_workers_report_their_transport(jstream_server):
    """Local kernels take the direct channel by default (the worker's first message on it
    makes the server say so); the channel API and the comm over ZMQ when asked."""
    forced = os.environ.get("JUPYTER_STREAM_TEST_WORKER_MESSAGES")
    expected = {"channels": "channels", "zmq": "zmq"}.get(forced, "direct")
    assert {w["transport"] for w in jstream_server.wait_for_workers(1)} == {expected}


def test_ruff_is_clean():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "ruff", "check", "--output-format", "concise", str(PACKAGE.parent)],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
