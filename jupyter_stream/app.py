"""The jupyter-server extension: configuration, handlers, and the worker pool's lifetime.

Configure it like any Jupyter server setting, e.g. in ``jupyter_server_config.py``::

    c.JupyterStream.min_workers = 2
    c.JupyterStream.kernel_name = "python3"

or on the command line: ``jupyter server --JupyterStream.max_workers=8``.
"""

from __future__ import annotations

import asyncio
import os
import signal
from typing import Any

from jupyter_client.manager import AsyncKernelManager
from jupyter_server.extension.application import ExtensionApp
from traitlets import Bool, Float, Int, List, Type, Unicode, default

from . import handlers
from .pool import WorkerPool
from .registry import EndpointRegistry, EndpointSpec
from .scheduler import FunctionSpec

#: Environment variables through which kernels started by this server find it.
URL_ENV = "JUPYTER_STREAM_URL"
TOKEN_ENV = "JUPYTER_STREAM_TOKEN"


class JupyterStream(ExtensionApp):
    """Streaming endpoints and remote functions served from worker kernels."""

    name = "jupyter_stream"

    kernel_name = Unicode("python3", config=True, help="Kernelspec that worker kernels are started from.")
    min_workers = Int(1, config=True, help="Worker kernels kept warm from server start (0 starts them on demand).")
    max_workers = Int(4, config=True, help="Most worker kernels running at once; further calls wait for one.")
    calls_per_worker = Int(1, config=True, help="Calls one worker kernel runs at the same time.")
    worker_startup_timeout = Float(60.0, config=True, help="Seconds a worker kernel may take to start.")
    worker_poll_interval = Float(0.5, config=True, help="Seconds between checks that worker kernels are alive.")
    kernel_manager_class = Type(
        AsyncKernelManager,
        klass=AsyncKernelManager,
        config=True,
        help="jupyter_client kernel manager for workers (e.g. a gateway or provisioner-backed one).",
    )
    worker_transport = Unicode("ipc", config=True, help="ZMQ transport to local worker kernels: 'ipc' (unix sockets, faster) or 'tcp'.")
    worker_cwd = Unicode("", config=True, help="Working directory of worker kernels (default: the server's root_dir).")
    sse_heartbeat_interval = Float(15.0, config=True, help="Seconds of silence after which an SSE stream gets a comment heartbeat.")
    max_request_body = Int(10 * 1024 * 1024, config=True, help="Largest request body an endpoint accepts, in bytes (413 above).")
    max_call_message = Int(
        1024 * 1024 * 1024, config=True,
        help="Largest WebSocket message of a remote call, in bytes: one call's pickled arguments, or one batch of map inputs.",
    )
    export_env = Bool(True, config=True, help=f"Set {URL_ENV}/{TOKEN_ENV} so kernels started by this server find it.")
    exit_with_pid = Int(0, config=True, help="Stop the server when the process with this pid exits (embedded servers).")
    notebooks = List(Unicode(), config=True, help="Notebooks to run at startup so their endpoints register (used by `jupyter stream serve`).")

    @default("worker_cwd")
    def _default_cwd(self) -> str:
        return self.serverapp.root_dir if self.serverapp is not None else os.getcwd()

    def initialize_settings(self) -> None:
        self.registry = EndpointRegistry()
        self.functions: dict[str, FunctionSpec] = {}
        self.pool = WorkerPool(
            kernel_name=self.kernel_name,
            min_workers=self.min_workers,
            max_workers=self.max_workers,
            calls_per_worker=self.calls_per_worker,
            startup_timeout=self.worker_startup_timeout,
            poll_interval=self.worker_poll_interval,
            cwd=self.worker_cwd or None,
            kernel_manager_class=self.kernel_manager_class,
            transport=self.worker_transport,
        )
        self.settings["jupyter_stream"] = self

    def initialize_handlers(self) -> None:
        self.handlers.extend(handlers.default_handlers())

    async def _start_jupyter_server_extension(self, serverapp: Any) -> None:
        if self.export_env:
            os.environ[URL_ENV] = self.server_url
            os.environ[TOKEN_ENV] = self.token
        if self.exit_with_pid:
            asyncio.create_task(self._exit_with(self.exit_with_pid))
        await self.pool.start()
        if self.notebooks:
            from .serve import run_notebooks

            asyncio.create_task(run_notebooks(self, list(self.notebooks)))

    async def _exit_with(self, pid: int) -> None:
        """Shut the server down (SIGTERM, so kernels are stopped too) once `pid` is gone."""
        while True:
            await asyncio.sleep(1.0)
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                self.log.info("jupyter_stream: process %s exited; stopping the embedded server", pid)
                os.kill(os.getpid(), signal.SIGTERM)
                return
            except PermissionError:
                pass

    async def stop_extension(self) -> None:
        await self.pool.shutdown()

    @property
    def server_url(self) -> str:
        """This server's URL as seen from this machine, ending in '/'."""
        url = self.serverapp.connection_url
        return url if url.endswith("/") else url + "/"

    @property
    def token(self) -> str:
        return self.serverapp.identity_provider.token or ""

    def endpoint_url(self, name: str) -> str:
        return f"{self.server_url}stream/{name}"

    def function_info(self, spec: FunctionSpec) -> dict[str, Any]:
        return {
            "name": spec.name,
            "generator": spec.is_generator,
            "retries": spec.retries,
            "timeout": spec.timeout,
            "doc": spec.doc,
            "stats": dict(spec.stats),
        }

    def endpoint_info(self, spec: EndpointSpec) -> dict[str, Any]:
        stats = self.registry.stats.get(spec.name)
        return {
            "name": spec.name,
            "url": self.endpoint_url(spec.name),
            "media_type": spec.media_type,
            "parameters": spec.signature.get("params", []),
            "doc": spec.doc,
            "created": spec.created,
            "stats": vars(stats) if stats else {},
        }
