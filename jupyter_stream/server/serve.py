"""Serving a notebook's endpoints headlessly: run it, then say where each endpoint is.

`jupyter stream serve NOTEBOOK` starts a Jupyter server whose `JupyterStream.notebooks`
lists the notebook; once the server is up, `run_notebooks` executes it with nbclient in
a fresh kernel (which finds the server through the exported environment), so its
``%%stream_endpoint`` cells register, and prints each endpoint's URL and a curl line.
"""

from __future__ import annotations

import os
import shlex
import sys
from typing import Any

import nbformat
from jupyter_client.manager import AsyncKernelManager
from jupyter_core.paths import jupyter_runtime_dir
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError


async def run_notebook(path: str, kernel_name: str = "python3", timeout: int = 600) -> None:
    """Execute one notebook top to bottom in a new kernel (stopped afterwards)."""
    nb = nbformat.read(path, as_version=4)
    # unix sockets, as for worker kernels: local, faster, and no "TCP without encryption" warning
    prefix = os.path.join(jupyter_runtime_dir(), f"jupyter-stream-serve-{os.getpid()}")
    km = AsyncKernelManager(kernel_name=kernel_name, transport="ipc", ip=prefix)
    client = NotebookClient(
        nb,
        km=km,
        kernel_name=kernel_name,
        timeout=timeout,
        resources={"metadata": {"path": os.path.dirname(os.path.abspath(path))}},
    )
    await client.async_execute()


async def run_notebooks(app: Any, paths: list[str]) -> None:
    """Run each notebook, then print the endpoints now registered."""
    for path in paths:
        before = set(app.endpoints)
        try:
            await run_notebook(path, app.kernel_name)
        except CellExecutionError as e:
            print(f"jupyter-stream: a cell of {path} failed; endpoints registered before it are served:\n{e}", file=sys.stderr, flush=True)
        except Exception as e:  # a missing file, a kernel that would not start
            print(f"jupyter-stream: could not run {path}: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        names = [n for n in app.endpoints if n not in before] or sorted(app.endpoints)
        print(describe_endpoints(app, names, path), flush=True)


def describe_endpoints(app: Any, names: list[str], source: str) -> str:
    if not names:
        return f"jupyter-stream: {source} registered no endpoints (put %%stream_endpoint on a cell that defines a generator)"
    token = app.token
    lines = [f"jupyter-stream: serving {len(names)} endpoint(s) from {source}"]
    for name in names:
        spec = app.endpoints.get(name)
        url = app.endpoint_url(name)
        auth = f"-H {shlex.quote('Authorization: token ' + token)} " if token else ""
        lines.append(f"  {name}  ({spec.media_type or 'media type by return value'}; {spec.describe()})")
        lines.append(f"    {url}")
        lines.append(f"    curl --no-buffer {auth}{shlex.quote(url)}")
    lines.append("Press Ctrl-C to stop.")
    return "\n".join(lines)
