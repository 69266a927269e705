"""Serving a notebook's endpoints headlessly: run it, then say where each endpoint is.

`jupyter stream serve NOTEBOOK` starts a Jupyter server whose `JupyterStream.notebooks`
lists the notebook; once the server is up, `run_notebooks` executes it with nbclient in
a fresh kernel (which finds the server through the exported environment), so its
``%%stream_endpoint`` cells register, and prints each endpoint's URL and a curl line.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import signal
import sys
import time
from typing import Any

import nbformat
from jupyter_client.manager import AsyncKernelManager
from jupyter_core.paths import jupyter_runtime_dir
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

from ..signatures import parse_expires


async def run_notebook(app: Any, path: str, timeout: int = 600) -> None:
    """Execute one notebook top to bottom in a new kernel (`app.notebook_kernel` while it
    runs), stopped afterwards. The kernel is started here rather than by
    `NotebookClient.async_execute`, which would put signal handlers of its own in place
    (they stop only its kernel) and then remove them, leaving Ctrl-C to nobody."""
    nb = nbformat.read(path, as_version=4)
    cwd = os.path.dirname(os.path.abspath(path))
    # unix sockets, as for worker kernels: local, faster, and no "TCP without encryption" warning
    prefix = os.path.join(jupyter_runtime_dir(), f"jupyter-stream-serve-{os.getpid()}")
    km = AsyncKernelManager(kernel_name=app.kernel_name, transport="ipc", ip=prefix, shutdown_wait_time=2.0)
    app.notebook_kernel = km
    try:
        await km.start_kernel(cwd=cwd)
        kc = km.client()
        kc.start_channels()
        try:
            await kc.wait_for_ready(timeout=60)
            client = NotebookClient(nb, km=km, kernel_name=app.kernel_name, timeout=timeout, resources={"metadata": {"path": cwd}})
            client.kc = kc
            client.reset_execution_trackers()
            for index, cell in enumerate(nb.cells):
                await client.async_execute_cell(cell, index, execution_count=client.code_cells_executed + 1)
        finally:
            kc.stop_channels()
    finally:
        app.notebook_kernel = None
        if km.has_kernel:
            await km.shutdown_kernel()


async def run_notebooks(app: Any, paths: list[str]) -> None:
    """Run each notebook, then print the endpoints now registered."""
    for path in paths:
        before = set(app.endpoints)
        try:
            await run_notebook(app, path)
        except Exception as e:
            if app.stopping:
                return
            if isinstance(e, CellExecutionError):
                print(f"jupyter-stream: a cell of {path} failed; endpoints registered before it are served:\n{e}",
                      file=sys.stderr, flush=True)
            else:  # a missing file, a kernel that would not start
                print(f"jupyter-stream: could not run {path}: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        if app.stopping:
            return
        names = [n for n in app.endpoints if n not in before] or sorted(app.endpoints)
        print(describe_endpoints(app, names, path), flush=True)


def stop_on_signals(app: Any) -> None:
    """Ctrl-C or SIGTERM, at any moment (also while the notebook still runs): interrupt
    the notebook's running cell and stop its kernel, shut the workers down gracefully
    (their ``finally`` blocks and exit hooks run) and let the server remove its runtime
    files, then exit. A second signal stops at once."""
    loop = asyncio.get_running_loop()

    def stop(signum: int) -> None:
        if app.stopping:
            print("jupyter-stream: stopping now", file=sys.stderr, flush=True)
            os._exit(128 + signum)
        app.stopping = True
        print(f"jupyter-stream: {signal.Signals(signum).name}: stopping (again to stop at once)", file=sys.stderr, flush=True)
        serving = app.serving
        if serving is None or serving.done():
            app.serverapp.stop()
            return
        serving.add_done_callback(lambda _: app.serverapp.stop())
        km = app.notebook_kernel
        if km is not None and km.has_kernel:
            # the cell in progress fails with KeyboardInterrupt, so the run ends as a failed
            # cell does; if the code swallows it, the run is cancelled a moment later
            asyncio.ensure_future(km.interrupt_kernel())
            loop.call_later(2.0, serving.cancel)
        else:
            serving.cancel()

    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop, signum)


def describe_endpoints(app: Any, names: list[str], source: str) -> str:
    """What `serve` prints once a notebook has run: each endpoint's URL and curl line (with
    the server's token), or with ``--share`` its share and demo links (and no token)."""
    if not names:
        return f"jupyter-stream: {source} registered no endpoints (put %%stream_endpoint on a cell that defines a generator)"
    sharing = bool(app.serve_share_expires)
    token = app.token
    lines = [f"jupyter-stream: serving {len(names)} endpoint(s) from {source}"]
    for name in names:
        spec = app.endpoints.get(name)
        lines.append(f"  {name}  ({spec.media_type or 'media type by return value'}; {spec.describe()})")
        if sharing:
            expires = app.serve_share_expires
            share, share_token = app.shares.create(name, parse_expires(None if expires.lower() in ("never", "none") else expires))
            urls = app.share_urls(name, share_token)
            until = "never expires" if share.expires is None else \
                f"expires {time.strftime('%Y-%m-%d %H:%M', time.localtime(share.expires))}"
            lines.append(f"    demo:   {urls['demo_url']}")
            lines.append(f"    stream: {urls['url']}  ({until})")
            lines.append(f"    curl --no-buffer {shlex.quote(urls['url'])}")
            if spec.openai:
                lines.append(f"    OpenAI API: base_url={app.public_base}stream/{name}/v1 api_key={share_token}")
            continue
        url = app.endpoint_url(name)
        auth = f"-H {shlex.quote('Authorization: token ' + token)} " if token else ""
        lines.append(f"    {url}")
        lines.append(f"    curl --no-buffer {auth}{shlex.quote(url)}")
        if spec.openai:
            lines.append(f"    OpenAI API: base_url={url}/v1 (api_key: the token)")
    if not sharing:
        query = f"?token={token}" if token else ""
        lines.append(f"Demo pages of every endpoint: {app.public_base}stream/{query}")
    lines.append("Press Ctrl-C to stop.")
    return "\n".join(lines)
