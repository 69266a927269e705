"""Finding the Jupyter server that runs the extension, and talking to it over HTTP.

In order: an explicit `connect()`, the ``JUPYTER_STREAM_URL``/``JUPYTER_STREAM_TOKEN``
variables the extension exports to every kernel its server starts, the running server
that started this kernel (matched by parent pid in Jupyter's runtime directory), and
finally an embedded server on 127.0.0.1 with a random token (plain python, IPython).
"""

from __future__ import annotations

import atexit
import os
import secrets
import socket
import subprocess
import sys
import tempfile
import time
from typing import Any

import httpx

from ..errors import NotRegisteredError, RegistrationError, ServerRefused

URL_ENV = "JUPYTER_STREAM_URL"
TOKEN_ENV = "JUPYTER_STREAM_TOKEN"
#: how the embedded server gets its token (never on its command line)
EMBEDDED_TOKEN_ENV = "JUPYTER_TOKEN"

_connection: ServerConnection | None = None


class ServerNotFound(RuntimeError):
    """No Jupyter server with the jupyter_stream extension could be reached or started."""


class ServerConnection:
    """An authenticated HTTP client for one Jupyter server running jupyter_stream."""

    def __init__(self, url: str, token: str = "", process: subprocess.Popen | None = None):
        self.url = url if url.endswith("/") else url + "/"
        self.token = token
        self.process = process
        headers = {"Authorization": f"token {token}"} if token else {}
        self.http = httpx.Client(base_url=self.url, headers=headers, timeout=httpx.Timeout(60.0, connect=5.0))

    def __repr__(self) -> str:
        kind = "embedded " if self.process else ""
        return f"<ServerConnection {kind}{self.url}>"

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """Send a request; an error answer raises with the server's message first: a refused
        registration is a `RegistrationError`, other 4xx a `ServerRefused` (both
        `ValueError`), an unknown name a `NotRegisteredError` (a `LookupError`)."""
        try:
            response = self.http.request(method, path, **kwargs)
        except httpx.TransportError as e:
            raise ServerNotFound(f"cannot reach the Jupyter server at {self.url}: {e}") from None
        status = response.status_code
        if status < 400:
            return response
        message = _message(response)
        if status == 401 or (status == 403 and "not authorized" not in response.text):
            raise PermissionError(f"the Jupyter server at {self.url} refused our token ({status})")
        if status == 403:  # the token is fine, but this user may not do that
            raise PermissionError(f"the Jupyter server at {self.url} refused: {message} (403)")
        if status == 404 and path.startswith("api/stream") and message.startswith("no "):
            raise NotRegisteredError(message)  # the extension runs; that name is not registered
        if status == 404 and path.startswith("api/stream"):
            raise ServerNotFound(
                f"the Jupyter server at {self.url} does not run the jupyter_stream extension; "
                "enable it with `jupyter server extension enable jupyter_stream` and restart the server"
            )
        if status < 500:
            registering = method == "POST" and path.rstrip("/") in ("api/stream/endpoints", "api/stream/functions")
            raise (RegistrationError if registering else ServerRefused)(message, status, method, path)
        raise RuntimeError(f"{message} (the server failed on {method} {path} with {status}; its log says more)")

    def endpoint_url(self, name: str) -> str:
        return f"{self.url}stream/{name}"

    def check(self) -> None:
        """Raise unless the server answers and runs the extension."""
        self.request("GET", "api/stream/workers")

    def close(self) -> None:
        self.http.close()
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()


def connect(url: str | None = None, token: str | None = None) -> ServerConnection:
    """Use the server at `url` (with `token`) from now on; with no URL, find one."""
    global _connection
    if url is None:
        _connection = None
        return get_connection()
    conn = ServerConnection(url, token or "")
    conn.check()
    _connection = conn
    return conn


def get_connection() -> ServerConnection:
    """The server this process registers with, found (or started) on first use."""
    global _connection
    if _connection is None:
        _connection = _from_env() or _from_runtime_dir() or start_embedded_server()
    return _connection


def _from_env() -> ServerConnection | None:
    url = os.environ.get(URL_ENV)
    if not url:
        return None
    return ServerConnection(url, os.environ.get(TOKEN_ENV, ""))


def _from_runtime_dir() -> ServerConnection | None:
    """The Jupyter server that started this kernel, from its jpserver-*.json file."""
    try:
        from jupyter_server.serverapp import list_running_servers
    except ImportError:
        return None
    parent = os.getppid()
    for info in list_running_servers():
        if info.get("pid") == parent:
            conn = ServerConnection(info["url"], info.get("token", ""))
            try:
                conn.check()
            except Exception:
                return None
            return conn
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


#: The embedded server's entry point. Its token comes in the environment, which only its
#: user can read (``/proc/<pid>/cmdline`` is readable by every local user), and leaves it
#: at once, so the kernels the server starts do not inherit it.
_EMBEDDED_SERVER = (
    "import os; from traitlets.config import Config; from jupyter_server.serverapp import ServerApp; "
    f"c = Config(); c.IdentityProvider.token = os.environ.pop({EMBEDDED_TOKEN_ENV!r}); ServerApp.launch_instance(config=c)"
)


def start_embedded_server(timeout: float = 60.0, quiet: bool = False) -> ServerConnection:
    """Start a private Jupyter server with the extension on 127.0.0.1, for scripts and
    plain IPython. It exits with this process."""
    port, token = _free_port(), secrets.token_hex(24)
    log = tempfile.NamedTemporaryFile(prefix="jupyter-stream-server-", suffix=".log", delete=False)
    cmd = [
        sys.executable, "-c", _EMBEDDED_SERVER,
        "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={port}", "--ServerApp.port_retries=0",
        "--ServerApp.open_browser=False",
        f"--ServerApp.root_dir={os.getcwd()}", "--ServerApp.jpserver_extensions={'jupyter_stream': True}",
        f"--JupyterStream.exit_with_pid={os.getpid()}",
    ]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        cmd.append("--ServerApp.allow_root=True")  # containers run as root
    process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                               env={**os.environ, EMBEDDED_TOKEN_ENV: token})
    conn = ServerConnection(f"http://127.0.0.1:{port}/", token, process)
    atexit.register(conn.close)
    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            raise ServerNotFound(f"the embedded Jupyter server exited (code {process.returncode}); its log: {log.name}")
        try:
            conn.check()
            break
        except (ServerNotFound, RuntimeError, PermissionError):
            if time.monotonic() > deadline:
                conn.close()
                raise ServerNotFound(f"the embedded Jupyter server did not start in {timeout:.0f} s; its log: {log.name}") from None
            time.sleep(0.1)
    if not quiet:
        print(f"jupyter-stream: started an embedded Jupyter server at {conn.url} (token {token}; log {log.name})", file=sys.stderr)
    return conn


def _message(response: httpx.Response) -> str:
    """The server's explanation in an error response (JSON ``message``, else the text)."""
    try:
        return response.json().get("message") or response.text
    except ValueError:
        return response.text
