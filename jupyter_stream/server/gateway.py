"""Worker kernels from a Jupyter Kernel Gateway or Enterprise Gateway.

When one machine is not enough, organisations already run kernels elsewhere with
Jupyter's own engines. ``c.JupyterStream.worker_gateway_url`` (or the server's own
``--gateway-url``, which workers follow) makes worker pools start their kernels there:

- `WorkerGateway` is jupyter-server's `GatewayClient` (every option it has: auth token and
  scheme, headers, TLS client cert/key/CA, validate_cert, connect and request timeouts, the
  ``KERNEL_`` env whitelist, token renewal, cookies), configured as ``c.WorkerGateway.*``,
  plus how a GPU spec maps onto the gateway (a kernelspec per GPU type, ``KERNEL_GPUS``)
  and the GPUs it offers (NVML only sees this machine).
- `GatewayWorkerManager` starts, watches, interrupts, restarts and shuts a kernel down
  through the gateway's REST API (``/api/kernels``), with errors that name the gateway and
  what to fix.
- `GatewayWorkerClient` speaks to it over the gateway's kernel-channels WebSocket with the
  subset of jupyter_client's client API the worker code needs (``execute``,
  ``get_shell_msg``, ``get_iopub_msg``, ``shell_channel.send`` ...), so `ChannelTransport`
  carries the worker's messages unchanged.

Why not jupyter-server's `GatewayKernelManager` and `GatewayKernelClient` as they are: both
read the one `GatewayClient.instance()` (the server's own gateway, not the workers'), the
client's channel queues poll with ``asyncio.sleep(0)`` (a busy loop on the server's event
loop for every message awaited), it connects with a blocking call, and it reads every
WebSocket message as JSON text, so the binary messages that carry a call's pickled payload
and its chunks would be lost. What they share is reused: the configuration and its request
arguments (`GatewayClient.load_connection_args`), and jupyter-server's own binary message
format (`serialize_binary_message`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import socket
import time
from typing import Any
from urllib.parse import quote

from jupyter_client.jsonutil import json_default
from jupyter_client.session import Session
from jupyter_server.gateway.gateway_client import GatewayClient
from jupyter_server.services.kernels.connection.base import deserialize_binary_message, serialize_binary_message
from jupyter_server.utils import url_path_join
from tornado.httpclient import AsyncHTTPClient, HTTPClientError, HTTPRequest
from tornado.websocket import WebSocketClientConnection, websocket_connect
from traitlets import Dict, Enum, Int, List, Unicode

from ..errors import MessageTooLarge, WorkerError
from .gpus import Gpu

log = logging.getLogger("jupyter_stream")

#: How jupyter-server's notice that it drops a kernel's IOPub messages begins.
RATE_LIMITED = "IOPub message rate exceeded."

#: Linux's TCP_QUICKACK (None elsewhere): see `GatewayWorkerClient._ack_now`.
QUICKACK = getattr(socket, "TCP_QUICKACK", None)

#: Pauses between tries to shut a gateway kernel down.
SHUTDOWN_RETRIES = (0.5, 1.0, 2.0, 0.0)

#: Seconds between two REST checks that a gateway kernel still exists (the WebSocket
#: closing, or a "restarting"/"dead" status on it, tells sooner).
ALIVE_CHECK_INTERVAL = 5.0


class GatewayError(WorkerError):
    """The worker gateway refused, or could not be reached: the message says what to fix;
    `status` is the gateway's HTTP status when it answered (None when it did not)."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


class WorkerGateway(GatewayClient):
    """Where worker kernels come from when they are not started on this machine.

    Every option of jupyter-server's ``GatewayClient`` applies (``c.WorkerGateway.auth_token``,
    ``headers``, ``client_cert``, ``client_key``, ``ca_certs``, ``validate_cert``,
    ``connect_timeout``, ``request_timeout``, ``allowed_envs`` ...); ``url`` is set by
    ``c.JupyterStream.worker_gateway_url``. Made directly, never through ``instance()``:
    the server's own ``GatewayClient.instance()`` stays the server's.

    Only the ``c.WorkerGateway`` section configures it, never ``c.GatewayClient`` (which
    traitlets would load too, as the section of a base class): that is the server's own
    gateway's, and its token, headers and certificates must not go to another host. Workers
    that follow the server's gateway get its options from `JupyterStream.make_worker_gateway`,
    explicitly. (jupyter-server's ``JUPYTER_GATEWAY_*`` environment variables are defaults
    of both.)"""

    @classmethod
    def section_names(cls) -> list[str]:
        return [name for name in super().section_names() if name != GatewayClient.__name__]

    pools = Enum(
        ["all", "gpu"], "all", config=True,
        help="Which worker pools start their kernels on the gateway: 'all', or only those asking for a GPU "
        "('gpu': the others stay on this machine).",
    )
    gpus = List(
        Unicode(), config=True,
        help="The GPUs the gateway can give worker kernels, one device name each (e.g. 8 x 'NVIDIA H100 80GB HBM3'): "
        "placement counts them as it counts this machine's (NVML only sees this machine).",
    )
    gpu_kernelspecs = Dict(
        key_trait=Unicode(), value_trait=Unicode(), config=True,
        help="Gateway kernelspec per GPU type, e.g. {'H100': 'python3-h100', 'A10G': 'python3-a10g'}: a GPU pool "
        "whose kernel is the default one starts from the kernelspec whose key its devices' name contains.",
    )
    gpu_env = Dict(
        key_trait=Unicode(), value_trait=Unicode(), default_value={"KERNEL_GPUS": "{count}", "KERNEL_GPUS_LIMIT": "{count}"},
        config=True,
        help="KERNEL_ variables a GPU worker's start request carries; '{count}' and '{type}' are replaced by its GPU "
        "count and device name (Enterprise Gateway's Kubernetes kernel pods turn KERNEL_GPUS into nvidia.com/gpu).",
    )
    max_message_size = Int(
        10 * 1024 * 1024, config=True,
        help="Largest WebSocket message the gateway accepts, in bytes (tornado's default, 10 MiB, unless the gateway "
        "sets websocket_max_message_size): a call whose arguments are larger fails with an error saying so, "
        "instead of the gateway closing the worker's connection.",
    )
    server_url = Unicode(
        "", config=True,
        help="The URL at which gateway kernels reach this server (their calls of other functions); default: the "
        "server's own URL, right when the gateway runs on this machine.",
    )

    def describe(self) -> str:
        return f"the worker gateway at {self.url}"

    # -- REST -------------------------------------------------------------------------

    async def request(self, path: str, method: str = "GET", body: Any = None, *, what: str) -> Any:
        """One REST request to the gateway; the decoded JSON reply (None for an empty one).
        Raises `GatewayError` naming the gateway, what was asked and what to fix."""
        url = url_path_join(self.url, path)
        kwargs = self.load_connection_args(method=method, headers={"Content-Type": "application/json"})
        if body is not None:
            kwargs["body"] = json.dumps(body)
        elif method == "POST":
            kwargs["body"] = "{}"
        try:
            response = await AsyncHTTPClient().fetch(HTTPRequest(url, **kwargs), raise_error=False)
        except OSError as exc:  # refused, unreachable, name not found, TLS
            raise GatewayError(f"{self.describe()} cannot be reached to {what} ({type(exc).__name__}: {exc}); "
                               "check that it runs and that c.JupyterStream.worker_gateway_url is right") from None
        if response.code == 599:  # tornado: timed out, or the connection failed
            raise GatewayError(f"{self.describe()} did not answer when asked to {what} ({response.error}); "
                               "check that it runs, or raise c.WorkerGateway.request_timeout") from None
        if self.accept_cookies:
            self.update_cookies(response.headers)
        if response.code >= 400:
            raise self.refusal(response.code, response.body, what)
        return json.loads(response.body) if response.body else None

    def refusal(self, code: int, body: bytes | None, what: str) -> GatewayError:
        """The gateway said no: say why in words a user can act on."""
        reason = ""
        try:
            payload = json.loads(body or b"")
            reason = str(payload.get("message") or payload.get("reason") or "")
        except (ValueError, AttributeError):
            reason = (body or b"").decode("utf-8", "replace")[:200]
        said = f" ({reason})" if reason else ""
        if code == 401 or (code == 403 and "limit" not in reason.lower()):
            return GatewayError(f"{self.describe()} refused the token when asked to {what} (HTTP {code}{said}); "
                                "set c.WorkerGateway.auth_token (or JUPYTER_GATEWAY_AUTH_TOKEN) to the gateway's token", code)
        if code == 403 or code == 429:
            return GatewayError(f"{self.describe()} is at its kernel limit when asked to {what} (HTTP {code}{said}); "
                                "raise the gateway's limit (max_kernels, max_kernels_per_user) or lower max_workers", code)
        return GatewayError(f"{self.describe()} could not {what} (HTTP {code}{said})", code)

    async def kernelspec_names(self) -> list[str]:
        specs = await self.request(self.kernelspecs_endpoint, what="list its kernelspecs")
        return sorted((specs or {}).get("kernelspecs", {}))

    # -- what a worker's start asks for ---------------------------------------------------

    def kernel_for(self, kernel_name: str, default_kernel: str, devices: list[Gpu]) -> str:
        """The gateway kernelspec a worker of `kernel_name` on `devices` starts from."""
        if devices and kernel_name == default_kernel:
            name = devices[0].name.lower()
            for gpu_type, spec in sorted(self.gpu_kernelspecs.items(), key=lambda item: -len(item[0])):
                if gpu_type.lower() in name:
                    return spec
        return kernel_name

    def split_env(self, env: dict[str, str], devices: list[Gpu]) -> tuple[dict[str, str], dict[str, str]]:
        """What goes in the start request (``KERNEL_*`` and the allowed names: all that a
        gateway passes on, plus the GPU variables) and what the worker sets itself once its
        comm opens (the rest: jupyter-stream's own variables, the pool's ``--env``)."""
        allowed = {name.strip() for name in self.allowed_envs.split(",") if name.strip()}
        kernel_env = {k: v for k, v in env.items() if k.startswith("KERNEL_") or k in allowed}
        if self.http_user and "KERNEL_USERNAME" not in kernel_env:
            kernel_env["KERNEL_USERNAME"] = self.http_user
        if devices:
            values = {"count": str(len(devices)), "type": devices[0].name}
            kernel_env.update({k: v.format(**values) for k, v in self.gpu_env.items()})
        comm_env = {k: v for k, v in env.items() if k not in kernel_env}
        return kernel_env, comm_env


class GatewayWorkerManager:
    """One worker kernel on the gateway, through its REST API: the part of jupyter_client's
    kernel manager interface that `WorkerKernel` and `WorkerPool` use."""

    #: what `/api/stream/workers` shows as where the worker runs
    source = "gateway"

    def __init__(self, gateway: WorkerGateway, kernel_name: str, devices: list[Gpu] | None = None,
                 default_kernel: str = "python3"):
        self.gateway = gateway
        #: the GPUs placement picked for it (the gateway's, as configured)
        self.devices = list(devices or [])
        self.kernel_name = gateway.kernel_for(kernel_name, default_kernel, self.devices)
        self.kernel_id: str | None = None
        #: what the worker sets in its own environment when its comm opens (see `split_env`)
        self.comm_env: dict[str, str] = {}
        self.shutdown_wait_time = 0.0  # the gateway decides how long a shutdown takes
        self._alive = True
        self._checked = 0.0

    @property
    def has_kernel(self) -> bool:
        return self.kernel_id is not None

    @property
    def kernel_path(self) -> str:
        return url_path_join(self.gateway.kernels_endpoint, quote(str(self.kernel_id), safe=""))

    async def start_kernel(self, env: dict[str, str] | None = None, cwd: str | None = None, **_: Any) -> None:
        """Ask the gateway for a kernel (``cwd`` is this machine's: not sent)."""
        kernel_env, self.comm_env = self.gateway.split_env(dict(env or {}), self.devices)
        what = f"start a {self.kernel_name!r} kernel"
        try:
            model = await self.gateway.request(self.gateway.kernels_endpoint, "POST",
                                               {"name": self.kernel_name, "env": kernel_env}, what=what)
        except GatewayError as exc:
            if exc.status in (404, 500):  # jupyter-server answers an unknown kernelspec with one of these
                raise await self._unknown_kernelspec(exc) from None
            raise
        if not isinstance(model, dict) or not model.get("id"):
            raise GatewayError(f"{self.gateway.describe()} answered a kernel start with no kernel id: {model!r}")
        self.kernel_id = str(model["id"])
        self._alive, self._checked = True, time.monotonic()

    async def _unknown_kernelspec(self, exc: GatewayError) -> GatewayError:
        try:
            names = await self.gateway.kernelspec_names()
        except GatewayError:
            return exc
        if self.kernel_name in names:
            return exc
        return GatewayError(f"{self.gateway.describe()} has no kernelspec named {self.kernel_name!r} (it has: "
                            f"{', '.join(names) or 'none'}); pick one with --kernel, or map GPU types to kernelspecs "
                            "with c.WorkerGateway.gpu_kernelspecs")

    def client(self) -> GatewayWorkerClient:
        return GatewayWorkerClient(self.gateway, str(self.kernel_id))

    async def is_alive(self) -> bool:
        """Whether the gateway still has the kernel: asked at most every few seconds (its
        WebSocket closing, or a restart announced on it, tells sooner). Only the gateway
        saying it does not know the kernel counts as dead; a gateway that cannot be
        reached right now is the WebSocket's to notice."""
        if not self.has_kernel:
            return False
        now = time.monotonic()
        if not self._alive or now - self._checked < ALIVE_CHECK_INTERVAL:
            return self._alive
        self._checked = now
        try:
            await self.gateway.request(self.kernel_path, what="look at its kernel")
        except GatewayError as exc:
            if exc.status == 404:
                self._alive = False
            else:
                log.debug("jupyter_stream: %s", exc)
        return self._alive

    async def interrupt_kernel(self) -> None:
        if self.has_kernel:
            await self.gateway.request(url_path_join(self.kernel_path, "interrupt"), "POST", what="interrupt a kernel")

    async def restart_kernel(self, **_: Any) -> None:
        if self.has_kernel:
            await self.gateway.request(url_path_join(self.kernel_path, "restart"), "POST", what="restart a kernel")

    async def shutdown_kernel(self, now: bool = False, restart: bool = False) -> None:
        """Ask the gateway to stop the kernel (one it no longer has is stopped already).
        A gateway may refuse while it restarts the kernel (jupyter-server answers 500 then):
        asked again a few times, then one log line names the kernel left behind."""
        if not self.has_kernel:
            return
        self._alive = False
        for wait in SHUTDOWN_RETRIES:
            try:
                await self.gateway.request(self.kernel_path, "DELETE", what=f"shut kernel {self.kernel_id} down")
                return
            except GatewayError as exc:
                if exc.status == 404:
                    return
                problem = exc
            await asyncio.sleep(wait)
        log.warning("jupyter_stream: %s; it is left to the gateway's culling", problem)


class _Channel:
    """One of a gateway kernel's channels, as jupyter_client's clients name them: messages
    sent on it go over the kernel's WebSocket, tagged with the channel."""

    def __init__(self, client: GatewayWorkerClient, name: str):
        self.client = client
        self.name = name

    def send(self, msg: dict[str, Any]) -> None:
        self.client.send(self.name, msg)

    def is_alive(self) -> bool:
        return self.client.connected


class GatewayWorkerClient:
    """A gateway kernel's channels over its WebSocket (``/api/kernels/<id>/channels``):
    messages with buffers go in jupyter-server's binary format, others as JSON text; the
    replies are sorted into a queue per channel. When the WebSocket closes, or the gateway
    announces that the kernel restarts or died, every reader gets a `ConnectionError`
    saying so (the worker is then replaced: its comm is gone)."""

    def __init__(self, gateway: WorkerGateway, kernel_id: str):
        self.gateway = gateway
        self.kernel_id = kernel_id
        # the key signs nothing here (the gateway signs what it relays); one keeps Session quiet
        self.session = Session(key=secrets.token_bytes(16), username=gateway.http_user or "jupyter-stream")
        self.shell_channel = _Channel(self, "shell")
        self.control_channel = _Channel(self, "control")
        self.iopub_channel = _Channel(self, "iopub")
        self.stdin_channel = _Channel(self, "stdin")
        self.queues: dict[str, asyncio.Queue] = {name: asyncio.Queue() for name in ("shell", "iopub", "control", "stdin")}
        self.ws: WebSocketClientConnection | None = None
        self._socket: socket.socket | None = None
        self.closed_because: str | None = None
        self._reader: asyncio.Task | None = None
        self._stopped = False

    @property
    def connected(self) -> bool:
        return self.ws is not None and self.closed_because is None

    async def start_channels(self) -> None:
        url = url_path_join(self.gateway.ws_url, self.gateway.kernels_endpoint, quote(self.kernel_id, safe=""), "channels")
        kwargs = self.gateway.load_connection_args()
        kwargs.pop("method", None)
        try:
            self.ws = await websocket_connect(HTTPRequest(url, **kwargs), max_message_size=1 << 31)
        except HTTPClientError as exc:
            body = exc.response.body if exc.response is not None else None
            raise self.gateway.refusal(exc.code, body, "open a kernel's channels") from None
        except OSError as exc:
            raise GatewayError(f"{self.gateway.describe()} cannot be reached to open a kernel's channels "
                               f"({type(exc).__name__}: {exc})") from None
        self._socket = self.ws.protocol.stream.socket
        # tornado turns Nagle's algorithm back on after the handshake, and the gateway's
        # end keeps it: each small message then waited for the other side's delayed ACK
        # (about 40 ms per exchange). Ours go at once; and we ACK at once (`_ack_now`),
        # so the gateway's go at once too.
        self.ws.protocol.stream.set_nodelay(True)
        self._reader = asyncio.create_task(self._read())

    def _ack_now(self) -> None:
        """Linux delays ACKs, and turns quick ACKs off again by itself: set it after each read."""
        if QUICKACK is not None and self._socket is not None:
            try:
                self._socket.setsockopt(socket.IPPROTO_TCP, QUICKACK, 1)
            except OSError:
                pass

    async def _read(self) -> None:
        ws = self.ws
        ack_now = self._ack_now
        ack_now()
        try:
            while True:
                message = await ws.read_message()
                ack_now()
                if message is None:
                    code, reason = ws.close_code, ws.close_reason
                    self._closed(f"the gateway closed its WebSocket (code {code}{', ' + reason if reason else ''})")
                    return
                if isinstance(message, bytes):
                    msg = deserialize_binary_message(message)
                    msg["buffers"] = [memoryview(b) for b in msg["buffers"]]  # as jupyter_client gives them
                else:
                    msg = json.loads(message)
                channel = msg.get("channel") or "iopub"
                if channel == "iopub" and msg.get("msg_type") in ("status", "stream"):
                    problem = self._trouble(msg)
                    if problem:
                        self._closed(problem)
                        return
                queue = self.queues.get(channel)
                if queue is not None:
                    queue.put_nowait(msg)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - every reader hears why
            self._closed(f"its WebSocket failed: {type(exc).__name__}: {exc}")

    def _trouble(self, msg: dict[str, Any]) -> str | None:
        """What an IOPub message from the gateway itself says went wrong: the kernel
        restarts or died (the worker in it is gone), or the gateway has begun dropping its
        messages (jupyter-server's IOPub rate limit: what was dropped is lost)."""
        content = msg.get("content") or {}
        if msg.get("msg_type") == "status":
            state = content.get("execution_state")
            return f"the gateway says its kernel is {state}" if state in ("restarting", "autorestarting", "dead") else None
        if str(content.get("text", "")).startswith(RATE_LIMITED):
            return ("the gateway dropped its messages (IOPub message rate exceeded): start the gateway with "
                    "--ZMQChannelsWebsocketConnection.limit_rate=False")
        return None

    def _closed(self, why: str) -> None:
        if self.closed_because is None:
            self.closed_because = why
        for queue in self.queues.values():
            queue.put_nowait(None)  # wakes whoever waits; `_get` raises

    async def _get(self, channel: str, timeout: float | None) -> dict[str, Any]:
        if self.closed_because is not None:
            raise ConnectionError(self.closed_because)
        queue = self.queues[channel]
        msg = await (asyncio.wait_for(queue.get(), timeout) if timeout is not None else queue.get())
        if msg is None:
            queue.put_nowait(None)
            raise ConnectionError(self.closed_because or "the gateway's WebSocket closed")
        return msg

    async def get_shell_msg(self, timeout: float | None = None) -> dict[str, Any]:
        return await self._get("shell", timeout)

    async def get_iopub_msg(self, timeout: float | None = None) -> dict[str, Any]:
        return await self._get("iopub", timeout)

    def send(self, channel: str, msg: dict[str, Any]) -> None:
        """Put one message on the WebSocket (raises when it is closed: the worker is then
        unreachable, and replaced)."""
        if not self.connected:
            raise ConnectionError(self.closed_because or "the gateway's WebSocket is not open")
        msg = {**msg, "channel": channel}
        buffers = msg.get("buffers")
        if buffers:
            message: bytes | str = serialize_binary_message(msg)
        else:
            msg.pop("buffers", None)
            message = json.dumps(msg, default=json_default)
        limit = self.gateway.max_message_size
        if limit and len(message) > limit:  # the gateway would close the connection (and lose the worker)
            raise MessageTooLarge(
                f"this call's message to its worker is {len(message) / 2**20:.1f} MiB, over the {limit / 2**20:.1f} MiB "
                f"{self.gateway.describe()} accepts in one WebSocket message: pass a smaller argument (or a path or "
                "URL the worker reads), or raise the gateway's websocket_max_message_size and "
                "c.WorkerGateway.max_message_size with it")
        self.ws.write_message(message, binary=isinstance(message, bytes))

    def execute(self, code: str, silent: bool = False, store_history: bool = True) -> str:
        msg = self.session.msg("execute_request", {
            "code": code, "silent": silent, "store_history": store_history,
            "user_expressions": {}, "allow_stdin": False, "stop_on_error": True,
        })
        self.send("shell", msg)
        return msg["header"]["msg_id"]

    async def wait_for_ready(self, timeout: float | None = None) -> None:
        """Ask for kernel_info until the kernel answers (once it does, it runs code)."""
        deadline = time.monotonic() + (timeout or 60.0)
        while True:
            msg = self.session.msg("kernel_info_request", {})
            self.send("shell", msg)
            wait_until = min(deadline, time.monotonic() + 2.0)
            while time.monotonic() < wait_until:
                try:
                    reply = await self._get("shell", max(wait_until - time.monotonic(), 0.01))
                except asyncio.TimeoutError:
                    break
                if reply.get("parent_header", {}).get("msg_id") == msg["header"]["msg_id"]:
                    return
            if time.monotonic() >= deadline:
                raise TimeoutError(f"a kernel on {self.gateway.describe()} did not answer within {timeout or 60:g} s")

    def stop_channels(self) -> None:
        self._stopped = True
        if self._reader is not None:
            self._reader.cancel()
        if self.ws is not None:
            self.ws.close()
        if self.closed_because is None:
            self.closed_because = "its channels were stopped"
