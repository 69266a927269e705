"""Pytest fixtures that start a real Jupyter server with jupyter_stream, for our tests and
for projects that build on it. Opt in from a ``conftest.py``::

    pytest_plugins = ["jupyter_stream.pytest_plugin"]

Every fixture's name starts with ``jstream_``.

`jstream_server` is a session-wide server in a subprocess, with real worker kernels;
`KernelGateway` runs a real Kernel Gateway whose kernels a server can take as workers;
`jstream_start_server()` starts another one with its own options; `jstream_notebook_kernel`
starts a kernel through the server's REST API, the way JupyterLab does.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from .client.connection import ServerConnection


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def terminate(process: subprocess.Popen | None) -> None:
    """SIGTERM, 20 s to exit, then SIGKILL."""
    if process is not None and process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


class StreamServer:
    """A jupyter-server subprocess with the extension; `.connection` registers endpoints."""

    def __init__(self, options: list[str] | None = None, root_dir: str | None = None, env: dict[str, str] | None = None):
        self.port = free_port()
        given = [o.split("=", 1)[1] for o in options or [] if o.startswith("--IdentityProvider.token=")]
        self.token = given[-1] if given else secrets.token_hex(16)  # "": a server without auth
        self.url = f"http://127.0.0.1:{self.port}/"
        self.root_dir = root_dir or tempfile.mkdtemp(prefix="jupyter-stream-root-")
        self.runtime_dir = tempfile.mkdtemp(prefix="jupyter-stream-runtime-")
        self.log_path = Path(tempfile.mkdtemp(prefix="jupyter-stream-log-")) / "server.log"
        self.options = list(options or [])
        messages = os.environ.get("JUPYTER_STREAM_TEST_WORKER_MESSAGES")
        if messages and not any(o.startswith("--JupyterStream.worker_messages=") for o in self.options):
            # run a suite with every worker reached through one transport ("channels", "zmq")
            self.options.append(f"--JupyterStream.worker_messages={messages}")
        self.gateway: KernelGateway | None = None
        if os.environ.get("JUPYTER_STREAM_TEST_WORKER_GATEWAY") and not any(
                "gateway" in o.lower() for o in self.options):
            # run a suite with every worker started on a Kernel Gateway of this server's own
            # (its restarter looks at its kernels every 0.5 s: a killed one is noticed as fast as a local one)
            self.gateway = KernelGateway(["--ZMQChannelsWebsocketConnection.limit_rate=False",
                                          "--KernelRestarter.time_to_dead=0.5"])
            self.options.extend(self.gateway.options_for_server)
        if not any(o.startswith("--JupyterStream.persist_dir=") for o in self.options):
            # not the user's data directory: nothing persisted there is restored here
            self.persist_dir = tempfile.mkdtemp(prefix="jupyter-stream-persist-")
            self.options.append(f"--JupyterStream.persist_dir={self.persist_dir}")
        self.env = {**os.environ, "JUPYTER_RUNTIME_DIR": self.runtime_dir, **(env or {})}
        for var in ("JUPYTER_STREAM_URL", "JUPYTER_STREAM_TOKEN"):
            self.env.pop(var, None)
        self.process: subprocess.Popen | None = None
        self.connection: ServerConnection | None = None

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"token {self.token}"} if self.token else {}

    def start(self, timeout: float = 90.0) -> StreamServer:
        if self.gateway is not None:
            self.gateway.start()
        cmd = [
            sys.executable, "-m", "jupyter_server",
            "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={self.port}", "--ServerApp.port_retries=0",
            *([] if any(o.startswith("--IdentityProvider.token=") for o in self.options) else [f"--IdentityProvider.token={self.token}"]),
            "--ServerApp.open_browser=False",
            f"--ServerApp.root_dir={self.root_dir}", "--ServerApp.allow_root=True",
            "--ServerApp.jpserver_extensions={'jupyter_stream': True}",
            *self.options,
        ]
        self._log = open(self.log_path, "wb")
        self.process = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=self.env, stdin=subprocess.DEVNULL)
        self.connection = ServerConnection(self.url, self.token)
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"jupyter server exited with {self.process.returncode}:\n{self.log()}")
            try:
                if self.workers()["workers"] or "--JupyterStream.min_workers=0" in self.options:
                    return self
            except Exception:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"jupyter server did not become ready in {timeout} s:\n{self.log()}")
            time.sleep(0.1)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def get(self, path: str, **kwargs: Any) -> httpx.Response:
        return httpx.get(self.url + path, headers=self.headers, timeout=30, **kwargs)

    def workers(self) -> dict[str, Any]:
        return httpx.get(self.url + "api/stream/workers", headers=self.headers, timeout=5).raise_for_status().json()

    def wait_for_workers(self, count: int = 1, timeout: float = 60.0) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            workers = [w for w in self.workers()["workers"] if w["alive"]]
            if len(workers) >= count:
                return workers
            time.sleep(0.1)
        raise TimeoutError(f"fewer than {count} live workers after {timeout} s: {self.workers()}")

    def wait_until_idle(self, timeout: float = 5.0) -> bool:
        """Wait until no worker runs a call; False if one still does after `timeout` s."""
        deadline = time.monotonic() + timeout
        while any(w["busy"] for w in self.workers()["workers"]):
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        return True

    def register(self, fn: Callable, name: str | None = None, media_type: str | None = None) -> Any:
        from .client.endpoints import register_endpoint

        return register_endpoint(fn, name, media_type, connection=self.connection)

    def start_kernel(self) -> NotebookKernel:
        """A kernel started by this server, as JupyterLab would start it."""
        reply = httpx.post(self.url + "api/kernels", headers=self.headers, json={"name": "python3"}, timeout=60)
        reply.raise_for_status()
        return NotebookKernel(self, reply.json()["id"])

    def stop(self) -> None:
        terminate(self.process)
        if self.connection is not None:
            self.connection.http.close()
        if getattr(self, "_log", None):
            self._log.close()
        if self.gateway is not None:
            self.gateway.stop()


class NotebookKernel:
    """A kernel of the server's, driven over ZMQ from its connection file."""

    def __init__(self, server: StreamServer, kernel_id: str):
        from jupyter_client import BlockingKernelClient

        self.server = server
        self.id = kernel_id
        path = Path(server.runtime_dir) / f"kernel-{kernel_id}.json"
        deadline = time.monotonic() + 30
        while not path.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        self.client = BlockingKernelClient(connection_file=str(path))
        self.client.load_connection_file()
        self.client.start_channels()
        self.client.wait_for_ready(timeout=60)

    def execute(self, code: str, timeout: float = 120) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """Run `code`; return its IOPub outputs and the execute_reply content."""
        outputs: list[dict[str, Any]] = []

        def hook(msg: dict[str, Any]) -> None:
            if msg["header"]["msg_type"] in ("stream", "execute_result", "display_data", "error"):
                outputs.append({"type": msg["header"]["msg_type"], **msg["content"]})

        reply = self.client.execute_interactive(code, timeout=timeout, output_hook=hook)
        return outputs, reply["content"]

    @staticmethod
    def text(outputs: list[dict[str, Any]]) -> str:
        parts = []
        for out in outputs:
            if out["type"] == "stream":
                parts.append(out["text"])
            elif out["type"] in ("execute_result", "display_data"):
                parts.append(out["data"].get("text/plain", ""))
                parts.append(out["data"].get("text/html", ""))
            elif out["type"] == "error":
                parts.append(f"{out['ename']}: {out['evalue']}\n" + "\n".join(out["traceback"]))
        return "\n".join(parts)

    def shutdown(self) -> None:
        self.client.stop_channels()
        httpx.delete(self.server.url + f"api/kernels/{self.id}", headers=self.server.headers, timeout=30)


class KernelGateway:
    """A real ``jupyter kernelgateway`` (the jupyter_kernel_gateway package) on 127.0.0.1,
    with its own token: where `StreamServer`s with ``--JupyterStream.worker_gateway_url``
    start their workers. `options` are the gateway's own (``--KernelGatewayApp.max_kernels=2``,
    ``--MappingKernelManager.cull_idle_timeout=2`` ...); `kernelspecs` name extra kernelspecs
    it offers, each an env dict for a Python kernel (``{"python3-h100": {"SPEC": "h100"}}``)."""

    def __init__(self, options: list[str] | None = None, port: int | None = None,
                 kernelspecs: dict[str, dict[str, str]] | None = None, token: str | None = None):
        self.port = port or free_port()
        self.token = token or secrets.token_hex(16)
        self.url = f"http://127.0.0.1:{self.port}"
        self.options = list(options or [])
        self.data_dir = tempfile.mkdtemp(prefix="jupyter-stream-gateway-")
        self.log_path = Path(self.data_dir) / "gateway.log"
        for name, env in (kernelspecs or {}).items():
            spec_dir = Path(self.data_dir) / "kernels" / name
            spec_dir.mkdir(parents=True)
            (spec_dir / "kernel.json").write_text(json.dumps({
                "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                "display_name": name, "language": "python", "env": env}))
        self.process: subprocess.Popen | None = None

    @property
    def options_for_server(self) -> list[str]:
        """What a `StreamServer` needs to take its workers from here."""
        return [f"--JupyterStream.worker_gateway_url={self.url}", f"--WorkerGateway.auth_token={self.token}"]

    def start(self, timeout: float = 60.0) -> KernelGateway:
        env = {**os.environ, "JUPYTER_PATH": self.data_dir, "JUPYTER_RUNTIME_DIR": self.data_dir}
        cmd = [sys.executable, "-m", "kernel_gateway", "--KernelGatewayApp.ip=127.0.0.1",
               f"--KernelGatewayApp.port={self.port}", "--KernelGatewayApp.port_retries=0",
               f"--KernelGatewayApp.auth_token={self.token}", *self.options]
        self._log = open(self.log_path, "ab")
        self.process = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env, stdin=subprocess.DEVNULL,
                                        cwd=self.data_dir)
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"the kernel gateway exited with {self.process.returncode}:\n{self.log()}")
            try:
                if httpx.get(f"{self.url}/api/kernelspecs", headers={"Authorization": f"token {self.token}"},
                             timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the kernel gateway did not answer in {timeout} s:\n{self.log()}")
            time.sleep(0.1)

    def kernels(self) -> list[dict[str, Any]]:
        """The gateway's kernels (it lists them with --JupyterWebsocketPersonality.list_kernels=True)."""
        reply = httpx.get(f"{self.url}/api/kernels", headers={"Authorization": f"token {self.token}"}, timeout=10)
        return reply.raise_for_status().json()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> None:
        """Stop the gateway (its kernels with it)."""
        terminate(self.process)
        if getattr(self, "_log", None):
            self._log.close()


@pytest.fixture(scope="session")
def jstream_start_server() -> Iterator[Callable[..., StreamServer]]:
    """Factory: start a server with extra ``--Class.trait=value`` options; all are stopped at the end."""
    servers: list[StreamServer] = []

    def start(options: list[str] | None = None, **kwargs: Any) -> StreamServer:
        server = StreamServer(options, **kwargs).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


@pytest.fixture(scope="session")
def jstream_server(jstream_start_server: Callable[..., StreamServer]) -> StreamServer:
    """The shared server: two warm workers, a 1 s SSE heartbeat, fast death detection, and
    no unauthenticated access (so jupyter-server warns about any handler lacking auth)."""
    return jstream_start_server(
        [
            "--JupyterStream.min_workers=2",
            "--JupyterStream.max_workers=3",
            "--JupyterStream.sse_heartbeat_interval=1.0",
            "--JupyterStream.worker_poll_interval=0.2",
            "--JupyterStream.max_request_body=65536",
            "--ServerApp.allow_unauthenticated_access=False",
        ]
    )


@pytest.fixture()
def jstream_notebook_kernel(jstream_server: StreamServer) -> Iterator[NotebookKernel]:
    kernel = jstream_server.start_kernel()
    yield kernel
    kernel.shutdown()

