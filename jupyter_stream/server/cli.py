"""``jupyter stream``: the command line.

``jupyter stream serve NOTEBOOK [...]`` serves a notebook's endpoints headlessly. Any
further ``--Class.trait=value`` options go to the Jupyter server, e.g.
``--JupyterStream.min_workers=2``.
"""

from __future__ import annotations

import argparse
import os
import secrets
import sys
from typing import Any


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
    # a token of our own (printed in the curl lines), so jupyter-server does not print its
    # "open this file in a browser" block for a token it generated
    argv.append(f"--IdentityProvider.token={args.token if args.token is not None else secrets.token_hex(24)}")
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        argv.append("--ServerApp.allow_root=True")  # containers run as root
    # an option the user gives replaces ours (traitlets refuses one given twice)
    given = {option.split("=", 1)[0] for option in extra if option.startswith("--")}
    return [option for option in argv if option.split("=", 1)[0] not in given or "JupyterStream.notebooks" in option] + extra


def settings_help() -> str:
    """The `--JupyterStream.*` settings serve passes on, with their defaults and help."""
    from .app import JupyterStream

    lines = ["settings (passed on to the server as --JupyterStream.NAME=VALUE):"]
    for name, trait in sorted(JupyterStream.class_traits(config=True).items()):
        if name in ("notebooks", "exit_with_pid", "export_env", "serve_share_expires") or trait.this_class is not JupyterStream:
            continue
        default = trait.default_value_repr() if hasattr(trait, "default_value_repr") else repr(trait.default_value)
        lines.append(f"  --JupyterStream.{name}={default}\n      {trait.help}")
    lines.append("Any other --Class.trait=value option goes to the Jupyter server too (e.g. --ServerApp.base_url=/x/).")
    return "\n".join(lines)


def list_endpoints(out: Any = None) -> int:
    """`jupyter stream list`: the endpoints of each running Jupyter server that has the extension."""
    import httpx
    from jupyter_server.serverapp import list_running_servers

    out = out or sys.stdout
    found = 0
    for info in list_running_servers():
        url = info["url"] if info["url"].endswith("/") else info["url"] + "/"
        headers = {"Authorization": f"token {info.get('token', '')}"} if info.get("token") else {}
        try:
            reply = httpx.get(url + "api/stream/endpoints", headers=headers, timeout=5)
        except httpx.HTTPError:
            continue
        if reply.status_code != 200:
            continue
        found += 1
        endpoints = reply.json()["endpoints"]
        print(f"{url} (pid {info.get('pid')}): {len(endpoints)} endpoint(s)", file=out)
        for e in endpoints:
            params = ", ".join(p["name"] for p in e.get("parameters", []) if p.get("type") != "request") or "no parameters"
            print(f"  {e['name']}  {e['url']}  ({e['media_type']}; {params})", file=out)
    if not found:
        print("jupyter stream list: no running Jupyter server with the jupyter_stream extension", file=out)
    return 0 if found else 1


def main(argv: list[str] | None = None) -> None:
    try:
        run(argv)
    except KeyboardInterrupt:  # Ctrl-C before the server runs (once it runs, `serve.stop_on_signals` has it)
        print("jupyter-stream: interrupted while starting; stopped", file=sys.stderr, flush=True)
        raise SystemExit(130) from None


def run(argv: list[str] | None = None) -> None:
    from .. import __version__

    parser = argparse.ArgumentParser(prog="jupyter stream", description="Streaming endpoints from Jupyter notebooks.")
    parser.add_argument("--version", action="version", version=f"jupyter-stream {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser(
        "serve", help="run notebooks and serve their %%%%stream_endpoint endpoints until Ctrl-C",
        epilog=settings_help(), formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    serve.add_argument("notebooks", nargs="+", metavar="NOTEBOOK")
    serve.add_argument("--ip", default="127.0.0.1", help="interface to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8888, help="port to listen on (default 8888)")
    serve.add_argument("--token", default=None, help="auth token (default: a random one, printed in the curl lines)")
    serve.add_argument("--workers", type=int, default=None, metavar="N",
                       help="worker kernels at most (short for --JupyterStream.max_workers=N)")
    serve.add_argument("--share", action="store_true",
                       help="print a share link and a demo link for each endpoint (and no server token): "
                            "each opens that endpoint and its page, nothing else")
    serve.add_argument("--expires", default="1d", help="how long --share links work: 30m, 1h, 7d, seconds, or never (default 1d)")
    serve.add_argument("--cors-origin", action="append", default=[], metavar="ORIGIN",
                       help="a web page origin allowed to read the streams from its scripts (repeatable)")
    serve.add_argument("--public-url", default=None, metavar="URL",
                       help="this server's URL as others reach it (behind a proxy), for the printed links")
    sub.add_parser("list", help="list the endpoints of the running Jupyter servers")
    args, extra = parser.parse_known_args(argv)
    if args.command == "list":
        if extra:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        raise SystemExit(list_endpoints())
    if args.workers is not None:
        extra = [*extra, f"--JupyterStream.max_workers={args.workers}"]
    if args.share:
        from ..signatures import parse_expires

        try:
            parse_expires(None if args.expires.lower() in ("never", "none") else args.expires)
        except ValueError as e:
            parser.error(f"--expires: {e}")
        extra = [*extra, f"--JupyterStream.serve_share_expires={args.expires}"]
    extra += [f"--JupyterStream.cors_origins={origin}" for origin in args.cors_origin]
    if args.public_url:
        extra.append(f"--JupyterStream.public_url={args.public_url}")
    for option in extra:  # fail here, in one line, rather than in the server's log
        name, _, value = option.partition("=")
        if name in ("--JupyterStream.max_workers", "--JupyterStream.calls_per_worker") and (not value.isdigit() or int(value) < 1):
            parser.error(f"{'--workers' if args.workers is not None else name} must be 1 or more, not {value!r}")
    from jupyter_server.serverapp import ServerApp

    ServerApp.launch_instance(argv=serve_argv(args, extra))


if __name__ == "__main__":
    main(sys.argv[1:])
