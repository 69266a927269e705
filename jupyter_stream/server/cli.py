"""``jupyter stream``: the command line.

``jupyter stream serve NOTEBOOK [...]`` serves a notebook's endpoints headlessly. Any
further ``--Class.trait=value`` options go to the Jupyter server, e.g.
``--JupyterStream.min_workers=2``.
"""

from __future__ import annotations

import argparse
import os
import sys


def serve_argv(args: argparse.Namespace, extra: list[str]) -> list[str]:
    """The Jupyter server's command line for `jupyter stream serve`."""
    notebooks = [os.path.abspath(p) for p in args.notebooks]
    for path in notebooks:
        if not os.path.isfile(path):
            raise SystemExit(f"jupyter stream serve: no such notebook: {path}")
    argv = [
        "--ServerApp.jpserver_extensions={'jupyter_stream': True}",
        "--ServerApp.open_browser=False",
        f"--ServerApp.ip={args.ip}",
        f"--ServerApp.port={args.port}",
        f"--ServerApp.root_dir={os.path.dirname(notebooks[0])}",
        *(f"--JupyterStream.notebooks={p}" for p in notebooks),
    ]
    if args.token is not None:
        argv.append(f"--IdentityProvider.token={args.token}")
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        argv.append("--ServerApp.allow_root=True")  # containers run as root
    # an option the user gives replaces ours (traitlets refuses one given twice)
    given = {option.split("=", 1)[0] for option in extra if option.startswith("--")}
    return [option for option in argv if option.split("=", 1)[0] not in given or "JupyterStream.notebooks" in option] + extra


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="jupyter stream", description="Streaming endpoints from Jupyter notebooks.")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run notebooks and serve their %%%%stream_endpoint endpoints until Ctrl-C")
    serve.add_argument("notebooks", nargs="+", metavar="NOTEBOOK")
    serve.add_argument("--ip", default="127.0.0.1", help="interface to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8888)
    serve.add_argument("--token", default=None, help="auth token (default: a random one, printed in the curl lines)")
    args, extra = parser.parse_known_args(argv)
    from jupyter_server.serverapp import ServerApp

    ServerApp.launch_instance(argv=serve_argv(args, extra))


if __name__ == "__main__":
    main(sys.argv[1:])
