"""The jupyter-server extension: configuration, handlers, and the worker pool's lifetime.

Configure it like any Jupyter server setting, e.g. in ``jupyter_server_config.py``::

    c.JupyterStream.min_workers = 2
    c.JupyterStream.kernel_name = "python3"

or on the command line: ``jupyter server --JupyterStream.max_workers=8``.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import secrets
import signal
import time
from typing import Any

from jupyter_client.manager import AsyncKernelManager
from jupyter_server.extension.application import ExtensionApp
from traitlets import Bool, Enum, Float, Int, List, TraitError, Type, Unicode, default, validate

from .. import wire
from ..responses import SSE
from . import handlers, metrics, scrub, supervision
from .events import TICK, EventHub
from .gpus import GpuInventory
from .history import RequestHistory
from .kernels import OutputQueue
from .persist import RegistrationStore, StoredRegistration
from .placement import Placement, PoolKey
from .pool import WorkerPool
from .registry import ENDPOINT_STATS, FUNCTION_STATS, EndpointSpec, FunctionSpec, RegistrationError, Registry, parse_registration
from .resumable import ResumableStreams
from .shares import ShareStore

#: Environment variables through which kernels started by this server find it.
URL_ENV = "JUPYTER_STREAM_URL"
TOKEN_ENV = "JUPYTER_STREAM_TOKEN"

#: How often revoked and expired share links past their retention are forgotten ...
SHARE_SWEEP_SECONDS = 600.0
#: ... and pools no registration uses, once they have scaled down to nothing.
POOL_SWEEP_SECONDS = 5.0


class JupyterStream(ExtensionApp):
    """Streaming endpoints and remote functions served from worker kernels."""

    name = "jupyter_stream"
    serving: asyncio.Task | None = None  # `jupyter stream serve`'s notebook run
    stopping = False
    started = False  # the pools may start kernels
    notebook_kernel: Any = None  # the kernel running that notebook, meanwhile

    kernel_name = Unicode("python3", config=True, help="Kernelspec that worker kernels are started from.")
    min_workers = Int(1, config=True, help="Worker kernels kept warm from server start (0 starts them on demand).")
    max_workers = Int(4, config=True, help="Most worker kernels running at once; further calls wait for one.")
    calls_per_worker = Int(1, config=True, help="Calls one worker kernel runs at the same time.")
    worker_startup_timeout = Float(60.0, config=True, help="Seconds a worker kernel may take to start.")
    worker_poll_interval = Float(0.5, config=True, help="Seconds between checks that worker kernels are alive (and pings).")
    worker_ping_timeout = Float(
        60.0, config=True,
        help="Seconds a worker kernel may leave pings unanswered before it is replaced (its calls end with WorkerDied); "
        "after a shorter silence (4 polls, at least 2 s) it gets no new calls until it answers. A worker answers "
        "from a thread of its own, which a call holding Python's GIL in C code for this long also silences.",
    )
    kernel_manager_class = Type(
        AsyncKernelManager,
        klass=AsyncKernelManager,
        config=True,
        help="jupyter_client kernel manager for local worker kernels (e.g. a provisioner-backed one). Not for a "
        "gateway (jupyter-server's GatewayKernelManager does not work here): set worker_gateway_url instead.",
    )
    worker_transport = Unicode("ipc", config=True, help="ZMQ transport to local worker kernels: 'ipc' (unix sockets, faster) or 'tcp'.")
    worker_messages = Enum(
        ["auto", "direct", "zmq", "channels"], "auto", config=True,
        help="How the server exchanges messages with worker kernels: 'direct' through the worker's own unix "
        "sockets once its comm is open (local kernels, fastest), 'zmq' as comm messages read from the "
        "kernel's IOPub socket directly, 'channels' through the kernel client's channel API (any kernel "
        "client, e.g. a Kernel Gateway's); 'auto' is direct where the kernel client has ZMQ sockets. "
        "Workers from a gateway (worker_gateway_url) always use 'channels'.",
    )
    freeze_gc = Bool(
        True, config=True,
        help="Once the server (and each worker kernel) has started, move the objects it has made so far out of "
        "the garbage collector's way (gc.freeze). A full collection otherwise walks them all: here it paused the "
        "server for about 90 ms (every stream and call with it) and now takes about 10 ms. What started with the "
        "process stays in memory for good, as it would anyway.",
    )
    worker_cwd = Unicode("", config=True, help="Working directory of worker kernels (default: the server's root_dir).")
    cancel_grace_period = Float(
        5.0, config=True,
        help="Seconds a cancelled call's code (its client left) may take to stop by itself. It stops counting "
        "against its worker at once; after this its thread is interrupted, and after twice this its kernel is "
        "replaced in the background.",
    )
    commit_headers_after = Float(
        1.0, config=True,
        help="Seconds a response may go without its first chunk before its status and headers are sent "
        "anyway (a failure after that cuts the body short, or is an SSE error event).",
    )
    sse_heartbeat_interval = Float(15.0, config=True, help="Seconds of silence after which an SSE stream gets a comment heartbeat.")
    max_request_body = Int(10 * 1024 * 1024, config=True, help="Largest request body an endpoint accepts, in bytes (413 above).")
    max_call_message = Int(
        1024 * 1024 * 1024, config=True,
        help="Largest WebSocket message of a remote call, in bytes: one call's pickled arguments, or one batch of map inputs.",
    )
    export_env = Bool(
        True, config=True,
        help=f"Set {URL_ENV}/{TOKEN_ENV} so kernels started by this server find it (worker kernels get a token of "
        "their own that opens only the calls socket).",
    )
    exit_with_pid = Int(0, config=True, help="Stop the server when the process with this pid exits (embedded servers).")
    notebooks = List(
        Unicode(), config=True, help="Notebooks to run at startup so their endpoints register (used by `jupyter stream serve`)."
    )
    scaledown_window = Float(
        60.0, config=True,
        help="Seconds a worker kernel may stay idle before it is stopped (down to its pool's minimum); "
        "a function's --scaledown-window sets its own pool's.",
    )
    serve_share_expires = Unicode(
        "", config=True, help="`jupyter stream serve --share --expires E`: print a share link of each endpoint, expiring after E.",
    )
    public_url = Unicode(
        "", config=True,
        help="This server's URL as others reach it (behind a reverse proxy or JupyterHub), for share "
        "links; default: the server's own URL with its base_url.",
    )
    cors_origins = List(
        Unicode(), config=True,
        help="Web page origins (e.g. https://example.org) allowed to read streams, such as shared ones, from their scripts.",
    )
    simulated_gpus = List(
        Unicode(), config=True,
        help="GPU names to act as if this machine had them instead of asking NVML, e.g. "
        "[\"NVIDIA H100 80GB HBM3\", \"NVIDIA A100-SXM4-80GB\"] (tests and demos on machines without GPUs); "
        "on the command line, once per device: --JupyterStream.simulated_gpus=\"NVIDIA H100 80GB HBM3\". "
        "Empty (the default): the devices NVML finds.",
    )

    worker_gateway_url = Unicode(
        "", config=True,
        help="A Jupyter Kernel Gateway or Enterprise Gateway (e.g. http://gateway:8888) whose kernels serve as workers; "
        "notebook kernels stay where they are. Its other options are jupyter-server's GatewayClient's, as "
        "c.WorkerGateway.auth_token, .headers, .client_cert, .client_key, .ca_certs, .validate_cert, "
        ".connect_timeout, .request_timeout, .allowed_envs; GPU types map to its kernelspecs with "
        "c.WorkerGateway.gpu_kernelspecs and c.WorkerGateway.gpus lists the GPUs it offers.",
    )
    workers_follow_gateway = Bool(
        True, config=True,
        help="When this server runs with --gateway-url (its notebook kernels on a gateway) and worker_gateway_url "
        "is not set, start worker kernels on that gateway too.",
    )

    request_history = Int(
        100, config=True,
        help="Requests kept per endpoint, newest last, in memory only (ep.requests() in the notebook, "
        "GET /api/stream/endpoints/<name>/requests); 0 keeps none. An endpoint registered with --no-history keeps none.",
    )
    request_history_bytes = Int(
        4 * 1024 * 1024, config=True,
        help="Most bytes one endpoint's kept requests may take (arguments, headers, tracebacks); the oldest go first.",
    )
    request_history_argument_bytes = Int(
        64 * 1024, config=True,
        help="Largest arguments (as JSON) a kept request holds; larger ones are not kept (the entry says their size).",
    )

    resumable_buffer_events = Int(
        10_000, config=True,
        help="Events kept per resumable stream (--resumable) for clients that come back; the oldest go first, and a "
        "client that comes back for them gets an error event saying how many it lost.",
    )
    resumable_buffer_bytes = Int(
        1024 * 1024, config=True,
        help="Most bytes of events kept per resumable stream (a single larger event is still kept whole).",
    )
    resumable_max_streams = Int(
        256, config=True,
        help="Resumable streams running or kept at once (each holds at most resumable_buffer_bytes); past it, a new "
        "request of a --resumable endpoint gets 503 until one ends and its window passes.",
    )

    persist_dir = Unicode(
        "", config=True,
        help="Directory of registrations made with --persist, registered again at startup "
        "(default: jupyter_stream/persisted in the Jupyter data directory).",
    )

    @validate("max_workers")
    def _check_max_workers(self, proposal: Any) -> int:
        if proposal["value"] < 1:
            raise TraitError(f"JupyterStream.max_workers must be 1 or more (the most worker kernels at once), not {proposal['value']}")
        return proposal["value"]

    @validate("min_workers", "calls_per_worker")
    def _check_counts(self, proposal: Any) -> int:
        least = 0 if proposal["trait"].name == "min_workers" else 1
        if proposal["value"] < least:
            raise TraitError(f"JupyterStream.{proposal['trait'].name} must be {least} or more, not {proposal['value']}")
        return proposal["value"]

    @default("persist_dir")
    def _default_persist_dir(self) -> str:
        return os.path.join(self.data_dir, "jupyter_stream", "persisted")

    @default("worker_cwd")
    def _default_cwd(self) -> str:
        return self.serverapp.root_dir if self.serverapp is not None else os.getcwd()

    def initialize_settings(self) -> None:
        # the package's own loggers (pool, scheduler) write to the server's log
        logging.getLogger("jupyter_stream").parent = self.log
        if self.notebooks:  # `jupyter stream serve`: Ctrl-C while it starts stops it (no "shut down? y/n")
            signal.signal(signal.SIGINT, signal.default_int_handler)
        #: what worker kernels authenticate with: it opens the calls socket (their calls of
        #: other functions) and nothing else, so code serving anonymous share traffic never
        #: holds the server's own token
        self.worker_token = secrets.token_urlsafe(32)
        self.store = RegistrationStore(self.persist_dir)
        self.endpoints = Registry("endpoint", ENDPOINT_STATS)
        self.functions = Registry("function", FUNCTION_STATS)
        self.registries = {"endpoint": self.endpoints, "function": self.functions}
        #: where worker kernels come from when not from this machine (see `gateway`)
        self.worker_gateway = self.make_worker_gateway()
        if self.worker_gateway is not None:
            inventory = GpuInventory(gateway=list(self.worker_gateway.gpus))
            self.log.info("jupyter_stream: worker kernels (%s) come from %s", "all" if self.worker_gateway.pools == "all"
                          else "those with GPUs", self.worker_gateway.describe())
            if self.worker_messages in ("direct", "zmq"):
                self.log.warning("jupyter_stream: worker kernels from %s are reached through their channels "
                                 "(JupyterStream.worker_messages=%r needs a local kernel's ZMQ sockets)",
                                 self.worker_gateway.describe(), self.worker_messages)
        else:
            inventory = GpuInventory(self.simulated_gpus or None)
        self.placement = Placement(max_workers=self.max_workers, inventory=inventory, default_kernel=self.kernel_name)
        #: the pool of what asks for nothing in particular (no GPU, the default kernel)
        self.pool = self.make_pool(self.placement.key_for({}))
        self.shares = ShareStore(on_change=self.share_changed)
        self.restore_shares()
        #: the streams of --resumable endpoints, with their recent events, kept for clients that come back
        self.resumable = ResumableStreams(self.resumable_max_streams, self.resumable_buffer_events, self.resumable_buffer_bytes)
        #: the endpoint requests being answered now (`EndpointHandler`), ended properly at shutdown
        self.open_requests: set[Any] = set()
        #: what happens here, for `GET /api/stream/events` (the Streams panel), and the calls running now
        self.events = EventHub(self.snapshot, self.registration_infos, self.workers_info)
        self.activity = self.events.activity
        metrics.STATE.attach(self)
        self.settings["jupyter_stream"] = self
        # share tokens in a query string never reach the log: jupyter-server's access lines
        # scrub ?token= (and now ?share=), and every other line goes through SecretsFilter
        keys = list(self.serverapp.extra_log_scrub_param_keys)
        self.settings["extra_log_scrub_param_keys"] = keys if "share" in keys else [*keys, "share"]
        scrub.install(self.serverapp.log)

    def make_worker_gateway(self) -> Any:
        """The `WorkerGateway` worker kernels start on: ``worker_gateway_url``, else (if
        `workers_follow_gateway`) the server's own ``--gateway-url``; None for this machine."""
        from jupyter_server.gateway.gateway_client import GatewayClient

        from .gateway import WorkerGateway

        url = self.worker_gateway_url or self.serverapp.config.get("WorkerGateway", {}).get("url")
        follow = None
        if not url and self.workers_follow_gateway:
            server_gateway = getattr(self.serverapp, "gateway_config", None) or GatewayClient.instance()
            if server_gateway.gateway_enabled:
                url, follow = server_gateway.url, server_gateway
        if not url:
            return None
        # configured by c.WorkerGateway alone, never by c.GatewayClient (see WorkerGateway.section_names)
        gateway = WorkerGateway(parent=self.serverapp, url=url)
        if follow is not None:  # the server's gateway options, where none were given for the workers
            given = self.serverapp.config.get("WorkerGateway", {})
            for name in GatewayClient.class_trait_names(config=True):
                if name not in given and name not in ("url", "event_logger"):
                    setattr(gateway, name, getattr(follow, name))
        return gateway

    def on_gateway(self, key: PoolKey) -> bool:
        """Whether the pool of `key` starts its kernels on the worker gateway."""
        gateway = self.worker_gateway
        return gateway is not None and (gateway.pools == "all" or bool(key.gpu))

    def make_pool(self, key: PoolKey) -> WorkerPool:
        default = key == self.placement.key_for({})
        worker_env = {TOKEN_ENV: self.worker_token} if self.export_env else {}
        gateway = self.worker_gateway if self.on_gateway(key) else None
        if gateway is not None and self.export_env:  # how its kernels reach this server
            worker_env[URL_ENV] = gateway.server_url or self.server_url
        return WorkerPool(
            kernel_name=key.kernel,
            gpu=key.gpu,
            env=dict(key.env),
            min_workers=self.min_workers if default else 0,
            max_workers=self.max_workers,
            scaledown_window=self.scaledown_window,
            calls_per_worker=key.concurrency or self.calls_per_worker,
            concurrency=key.concurrency,
            startup_timeout=self.worker_startup_timeout,
            poll_interval=self.worker_poll_interval,
            cwd=self.worker_cwd or None,
            kernel_manager_class=self.kernel_manager_class,
            transport=self.worker_transport,
            cancel_grace_period=self.cancel_grace_period,
            freeze_gc=self.freeze_gc,
            worker_messages=self.worker_messages,
            placement=self.placement,
            ping_timeout=self.worker_ping_timeout,
            worker_env=worker_env,
            gateway=gateway,
        )

    def initialize_handlers(self) -> None:
        self.handlers.extend(handlers.default_handlers())

    async def _start_jupyter_server_extension(self, serverapp: Any) -> None:
        if self.notebooks:  # `jupyter stream serve`: Ctrl-C stops it at once, also while it starts
            from .serve import stop_on_signals

            stop_on_signals(self)
        if self.export_env:
            os.environ[URL_ENV] = self.server_url
            os.environ[TOKEN_ENV] = self.token
        if self.exit_with_pid:
            supervision.spawn(self._exit_with(self.exit_with_pid), "watching the embedding process")
        await self.pool.start()
        self.started = True
        if self.freeze_gc:
            gc.collect()  # (once: what start-up left to collect goes now, not with every full collection)
            gc.freeze()
        self.configure_pools()
        supervision.spawn(self.restore_persisted(), "restoring persisted registrations")
        supervision.spawn(supervision.every(SHARE_SWEEP_SECONDS, self.shares.sweep, "forgetting ended share links",
                                            lambda: not self.placement.closed), "forgetting ended share links")
        supervision.spawn(supervision.every(POOL_SWEEP_SECONDS, self.forget_unused_pools, "forgetting unused pools",
                                            lambda: not self.placement.closed), "forgetting unused pools")
        supervision.spawn(supervision.every(TICK, self.events.tick, "publishing server events",
                                            lambda: not self.placement.closed),
                          "publishing server events")
        if self.notebooks and not self.stopping:
            from .serve import run_notebooks

            self.serving = supervision.spawn(run_notebooks(self, list(self.notebooks)), "running the notebooks")

    # -- registrations: the one path for the API, and for restoring persisted ones ------

    def register(self, kind: str, raw: bytes, restoring: bool = False) -> tuple[Any, Any]:
        """Check and register an endpoint or function from its registration's JSON body;
        returns the new spec and the one it replaced (or None). Raises `RegistrationError`."""
        body = parse_registration(raw, kind)
        self.check_machine(body["requirements"])
        name, blob = body["name"], body["blob"]
        common = dict(name=name, fn_hash=wire.content_hash(blob), fn_blob=blob, doc=body["doc"], persist=body.get("persist", False),
                      owner=body["owner"], requirements=body["requirements"], batch=body["batch"])
        previous = self.registries[kind].get(name)
        if restoring and previous is not None:
            raise RuntimeError("a newer registration of that name was made while it was being restored; kept the newer one")
        spec: EndpointSpec | FunctionSpec
        if kind == "endpoint":
            spec = EndpointSpec(media_type=body["media_type"], signature=body["signature"], queue_timeout=body["queue_timeout"],
                                openai=body["openai"], openai_count_chunks=body["openai_count_chunks"],
                                keeps_history=body["history"], resumable=body["resumable"], **common)
            spec.history = self.history_for(spec, previous)
        else:
            spec = FunctionSpec(is_generator=body.get("generator", False), retries=body["retries"], timeout=body["timeout"],
                                queue_timeout=body["queue_timeout"], **common)
        replaced = self.registries[kind].register(spec)
        if not restoring:
            if spec.persist:
                self.store.save(kind, name, raw, spec.fn_hash)
            else:  # the latest registration wins, also after a restart
                self.store.remove(kind, name)
            if kind == "endpoint" and previous is not None and previous.owner != spec.owner:
                self.shares.endpoint_removed(name, f"its endpoint {name!r} was replaced by {spec.owner or 'another owner'}'s")
            if kind == "endpoint":
                self.save_shares()  # kept on disk or not, as the endpoint now is
        self.log.info("jupyter_stream: %s %s %s%s", "restored" if restoring else "replaced" if replaced else "registered",
                      kind, name, " (persisted)" if spec.persist and not restoring else "")
        if previous is not None and previous.fn_hash != spec.fn_hash:
            self.forget_unused(previous.fn_hash)
        self.configure_pools()
        self.events.publish(kind, {"action": "registered", kind: self.info(spec)})
        return spec, previous

    def history_for(self, spec: EndpointSpec, previous: EndpointSpec | None) -> RequestHistory | None:
        """Where a new registration keeps its requests: its previous registration's, when
        the same owner registers it again (a cell run again: its failures stay to replay);
        none with --no-history."""
        if not spec.keeps_history or self.request_history <= 0:
            return None
        if previous is not None and previous.history is not None and previous.owner == spec.owner:
            return previous.history
        return RequestHistory(self.request_history, self.request_history_bytes, self.request_history_argument_bytes)

    def forget_unused(self, fn_hash: str) -> None:
        """Workers drop a function no registration uses any more (a cell ran again, a
        registration was deleted); calls still running with it keep it."""
        if any(spec.fn_hash == fn_hash for registry in self.registries.values() for spec in registry.values()):
            return
        for pool in self.placement.pools.values():
            for worker in pool.workers + pool.draining:
                worker.forget([fn_hash])

    def remove(self, kind: str, name: str) -> bool:
        """Unregister (and forget, if persisted) an endpoint or function."""
        self.store.remove(kind, name)
        spec = self.registries[kind].get(name)
        removed = self.registries[kind].remove(name)
        if spec is not None:
            self.forget_unused(spec.fn_hash)
        if removed and kind == "endpoint":
            self.shares.endpoint_removed(name)
            self.save_shares()
        self.configure_pools()
        if removed:
            self.events.publish(kind, {"action": "removed", kind: {"name": name}})
        return removed

    # -- what the API and the event stream show ---------------------------------------------

    def registration_infos(self, kind: str) -> list[dict[str, Any]]:
        return [self.info(spec) for spec in self.registries[kind].values()]

    def workers_info(self) -> dict[str, Any]:
        """``GET /api/stream/workers``: the pools, their kernels and the GPUs. ``workers`` and
        ``starting`` are totals over all pools; ``pools`` has each pool's requirements,
        size limits, waiting calls, what uses it, and its kernels."""
        pools = [pool.info() for pool in self.placement.pools.values()]
        for pool, info in zip(self.placement.pools.values(), pools):
            info["functions"] = [s.name for s in self.functions.values() if self.pool_for(s) is pool]
            info["endpoints"] = [s.name for s in self.endpoints.values() if self.pool_for(s) is pool]
        return {
            **self.placement.info(),
            "kernel_name": self.kernel_name,
            "min_workers": self.pool.min_workers,
            "starting": sum(p["starting"] for p in pools),
            "waiting_calls": sum(p["waiting_calls"] for p in pools),
            "replaced": sum(p["replaced"] for p in pools),
            "workers": [w for p in pools for w in p["workers"]],
            "pools": pools,
            "time": time.time(),
        }

    def snapshot(self) -> dict[str, Any]:
        """Everything a new reader of the event stream starts from."""
        from .. import __version__

        return {"server": {"id": self.events.server_id, "version": __version__},
                "endpoints": self.registration_infos("endpoint"), "functions": self.registration_infos("function"),
                "workers": self.workers_info(), "shares": [s.info() for s in self.shares.list()],
                "calls": self.activity.list()}

    def share_changed(self, action: str, share: Any) -> None:
        self.events.publish("share", {"action": action, "share": share.info()})
        if os.path.exists(self.store.path("endpoint", share.endpoint)):
            self.save_shares()

    def save_shares(self) -> None:
        """Store the shares of the persisted endpoints (their digests), for a restart; a
        failure is logged, and the shares go on working until the server stops."""
        records = [s.record() for s in self.shares.list() if os.path.exists(self.store.path("endpoint", s.endpoint))]
        try:
            self.store.save_shares(records)
        except OSError as e:
            self.log.error("jupyter_stream: could not store the share links of persisted endpoints in %s: %s",
                           self.store.directory, e)

    def restore_shares(self) -> None:
        """The share links of persisted endpoints, as the last server stored them."""
        records, problem = self.store.load_shares()
        if problem:
            self.log.error("jupyter_stream: share links of persisted endpoints not restored: %s", problem)
        for problem in self.shares.restore(records):
            self.log.error("jupyter_stream: a stored share link was left out: %s", problem)
        if records:
            self.log.info("jupyter_stream: restored %d share link(s) of persisted endpoints", len(self.shares.list()))

    def shut_down_worker(self, name: str) -> bool:
        """Shut one worker down (JupyterLab's Running panel): an idle one gracefully, a busy
        one at once (its calls end with WorkerDied). False if there is none of that name."""
        for pool in self.placement.pools.values():
            for worker in pool.workers:
                if worker.name == name:
                    self.log.info("jupyter_stream: %s (pid %s) shut down on request", worker.name, worker.pid)
                    if worker.load <= 0:
                        pool.evict(worker)
                    else:
                        pool.replace(worker, "it was shut down from JupyterLab")
                    return True
        return False

    # -- pools: which one runs what, and how large each is ---------------------------------

    def check_machine(self, requirements: dict[str, Any]) -> None:
        """Refuse, at registration, what this machine could never run."""
        from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

        from ..requirements import parse_gpu_spec

        try:
            self.placement.inventory.check_satisfiable(parse_gpu_spec(requirements.get("gpu")))
        except ValueError as e:
            raise RegistrationError(str(e)) from None
        kernel = requirements.get("kernel")
        if kernel and self.on_gateway(self.placement.key_for(requirements)):
            return  # the gateway's kernelspecs: an unknown one is named when a worker starts
        if kernel and kernel != self.kernel_name:
            specs = KernelSpecManager(parent=self.serverapp)
            try:
                specs.get_kernel_spec(kernel)
            except NoSuchKernel:
                have = ", ".join(sorted(specs.find_kernel_specs())) or "none"
                raise RegistrationError(f"no kernelspec named {kernel!r} on this server (it has: {have}); "
                                        "install one with `python -m ipykernel install --user --name NAME`") from None

    def pool_for(self, spec: EndpointSpec | FunctionSpec) -> WorkerPool:
        """The worker pool that runs `spec`'s calls (found once per spec: pools stay)."""
        if spec.pool is None:
            spec.pool = self.placement.pool_for(spec.requirements, self.make_pool)
        return spec.pool

    def configure_pools(self) -> None:
        """Size each pool from what its functions and endpoints ask: the largest minimum,
        maximum and scale-down window among them (the server's settings for the default
        pool, and as the maximum where none is given). A pool whose minimum went up starts
        kernels; one whose functions all left scales down to nothing over the window it had
        (and is then forgotten: `forget_unused_pools`)."""
        asked: dict[WorkerPool, list[dict[str, Any]]] = {pool: [] for pool in self.placement.pools.values()}
        for registry in self.registries.values():
            for spec in registry.values():
                asked.setdefault(self.pool_for(spec), []).append(spec.requirements)
        for pool, wants in asked.items():
            default = pool is self.pool
            if not wants and not default:  # nothing uses it now: it scales down as it was told, then is forgotten
                pool.min_workers = 0
                continue
            mins = [w["min_workers"] for w in wants if "min_workers" in w]
            maxes = [w["max_workers"] for w in wants if "max_workers" in w]
            windows = [w["scaledown_window"] for w in wants if "scaledown_window" in w]
            pool.min_workers = max(mins + [self.min_workers if default else 0])
            pool.max_workers = max(maxes + [self.max_workers] if default or not maxes else maxes)
            pool.max_workers = max(pool.max_workers, pool.min_workers)
            pool.scaledown_window = max(windows) if windows else self.scaledown_window
            if self.started and (not pool.watched or len(pool.workers) + pool.starting < pool.min_workers):
                supervision.spawn(pool.start(), f"starting pool [{pool.key.describe()}]")

    async def forget_unused_pools(self) -> None:
        """Forget the pools no registration uses any more (a function got new requirements,
        or was removed) once they have no kernel and no call waits: `/api/stream/workers`
        then lists only the pools that serve something (the default one always)."""
        used = {self.pool_for(spec) for registry in self.registries.values() for spec in registry.values()}
        for key, pool in list(self.placement.pools.items()):
            if pool is self.pool or pool in used or pool.workers or pool.draining or pool.starting \
                    or pool.waiting or pool.stopping:
                continue
            del self.placement.pools[key]
            self.log.info("jupyter_stream: forgot pool [%s]: nothing uses it any more", key.describe())
            await pool.shutdown()

    async def restore_persisted(self) -> None:
        """Register again what was persisted, once a worker has loaded each pickle; a
        registration that no longer loads is left out, with a log line saying why."""
        for item in self.store.load():
            if isinstance(item, tuple):
                path, problem = item
                self.log.error("jupyter_stream: could not restore %s: %s", path, problem)
                continue
            try:
                await self._restore(item)
            except Exception as e:  # noqa: BLE001 - one bad file must not stop the others
                self.log.error("jupyter_stream: could not restore %s %r from %s: %s. Register it again from its "
                               "notebook (with --persist), or delete the file", item.kind, item.name, item.path, e)

    async def _restore(self, item: StoredRegistration) -> None:
        if item.name in self.registries[item.kind]:
            raise RuntimeError("a newer registration of that name was made before it was restored; kept the newer one")
        try:
            body = parse_registration(item.body, item.kind)
        except RegistrationError as e:
            raise RuntimeError(f"the stored registration is invalid ({e})") from None
        fn_hash = wire.content_hash(body["blob"])
        if fn_hash != item.fn_hash:
            raise RuntimeError("its pickle is corrupted (it does not match the hash it was stored with)")
        try:
            self.check_machine(body["requirements"])
        except RegistrationError as e:
            raise RuntimeError(f"this server cannot run it any more ({e})") from None
        # loaded on a worker of its own pool: its --env, --kernel and GPUs, not the default pool's
        pool = self.placement.pool_for(body["requirements"], self.make_pool)
        if not pool.watched:  # its kernels are watched and scaled down, also if this restore fails
            await pool.start()
        worker = await asyncio.wait_for(pool.acquire(), self.worker_startup_timeout + 30)
        output = OutputQueue()
        run = worker.start_run(fn_hash, body["blob"], output, mode="load")
        try:
            while not output.ended:
                await asyncio.wait_for(output.wait(), 60)
        finally:
            if not output.ended:  # gave up waiting: the worker is not left counted busy
                run.cancel()
        if output.error is not None:
            raise RuntimeError(f"its pickle no longer loads on a worker ({output.error['type']}: {output.error['message']})")
        self.register(item.kind, item.body, restoring=True)

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
        """The server is stopping: end the open streams properly first (an SSE client gets an
        event saying so and every body its last chunk), then stop every worker gracefully."""
        await self.end_streams("the server is stopping; retry in a moment")
        self.resumable.close()
        await self.placement.shutdown()

    async def end_streams(self, why: str, wait: float = 2.0) -> None:
        self.events.close()
        for handler in list(self.open_requests):
            handler.server_stopping(why)
        deadline = asyncio.get_running_loop().time() + wait
        while self.open_requests and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.05)  # their last bytes leave the sockets

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

    @property
    def public_base(self) -> str:
        """Where others reach this server: `public_url`, else the server's URL (both with base_url)."""
        url = self.public_url or self.server_url
        return url if url.endswith("/") else url + "/"

    def share_urls(self, name: str, token: str) -> dict[str, str]:
        stream = f"{self.public_base}stream/{name}"
        return {"url": f"{stream}?share={token}", "demo_url": f"{stream}/demo?share={token}"}

    def info(self, spec: EndpointSpec | FunctionSpec) -> dict[str, Any]:
        """What the API shows of an endpoint or function."""
        common = {"name": spec.name, "doc": spec.doc, "persist": spec.persist, "created": spec.created,
                  "owner": spec.owner, "stats": dict(spec.stats), "requirements": public_requirements(spec.requirements),
                  "batch": spec.batch, **({"batching": spec.batcher.info()} if spec.batcher is not None else {})}
        if isinstance(spec, FunctionSpec):
            return {**common, "generator": spec.is_generator, "retries": spec.retries, "timeout": spec.timeout,
                    "queue_timeout": spec.queue_timeout}
        common["stats"].update(latency_p50=percentile(spec.first_bytes, 0.5), latency_p99=percentile(spec.first_bytes, 0.99))
        return {**common, "url": self.endpoint_url(spec.name), "path": f"stream/{spec.name}", "media_type": spec.media_type or SSE,
                "output": list(spec.output),
                "media_type_declared": spec.media_type is not None,
                "queue_timeout": spec.queue_timeout, "openai": spec.openai,
                "openai_count_chunks": spec.openai_count_chunks,
                "resumable": spec.resumable,
                "history": spec.history is not None,
                "last_failure": spec.history.last_failure() if spec.history is not None else None,
                "parameters": spec.signature.get("params", [])}


def percentile(values: Any, q: float) -> float | None:
    """The `q` quantile of `values` (None when there are none)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else None


def public_requirements(requirements: dict[str, Any]) -> dict[str, Any]:
    """A registration's requirements as the API shows them: GPU spec, pool size, kernel,
    concurrency, and the names of its env variables (their values may be secrets)."""
    shown = {k: v for k, v in requirements.items() if k != "env"}
    if requirements.get("env"):
        shown["env"] = sorted(requirements["env"])
    return shown
