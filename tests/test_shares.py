"""Share links: a token opens one endpoint and its demo page and nothing else of the server,
in every form it can be sent; revocation, expiry, deletion; no token in the log."""

import asyncio
import json
import re
import subprocess
import sys
import time

import httpx
import pytest

from jupyter_stream.client.endpoints import Endpoint, register_endpoint


def ticks(n: int = 3):
    """Ticks, one per line."""
    for i in range(n):
        yield f"data: {i}\n\n"


def secret_thing():
    yield "data: not shared\n\n"


@pytest.fixture
def shared(jstream_start_server):
    server = jstream_start_server(["--JupyterStream.min_workers=1", "--JupyterStream.cors_origins=https://demo.example"])
    register_endpoint(ticks, "ticks", connection=server.connection)
    register_endpoint(secret_thing, "secret_thing", connection=server.connection)
    share = Endpoint.lookup("ticks", server.connection).share("1h")
    return server, share


def forms(token):
    """The four ways a client may present a token: (params, headers, cookies)."""
    return {
        "?token=": ({"token": token}, {}, {}),
        "?share=": ({"share": token}, {}, {}),
        "Authorization": ({}, {"Authorization": f"token {token}"}, {}),
        "cookie": ({}, {}, {"jupyter-stream-share": token}),
    }


def fetch(server, method, path, params=None, headers=None, cookies=None, timeout=30):
    with httpx.Client(base_url=server.url, cookies=cookies or {}, follow_redirects=False, timeout=timeout) as client:
        return client.request(method, path, params=params or {}, headers=headers or {})


def status(server, method, path, params=None, headers=None, cookies=None):
    """The status a route answers, or "no answer" (a route of another extension that
    hangs for anyone, e.g. JupyterLab's /lab/api/licenses/<x> without auth)."""
    try:
        return fetch(server, method, path, params, headers, cookies, timeout=5).status_code
    except httpx.TimeoutException:
        return "no answer"


def test_a_share_opens_its_endpoint_and_page_in_each_form(shared):
    server, share = shared
    assert len(share.token) >= 43  # 256 random bits, urlsafe base64
    assert share.url == f"{server.url}stream/ticks?share={share.token}"
    assert share.demo_url == f"{server.url}stream/ticks/demo?share={share.token}"
    assert httpx.get(share.url, timeout=30).text == "data: 0\n\ndata: 1\n\ndata: 2\n\n"
    for form, (params, headers, cookies) in forms(share.token).items():
        r = fetch(server, "GET", "stream/ticks", {**params, "n": "2"}, headers, cookies)
        assert r.status_code == 200 and r.text == "data: 0\n\ndata: 1\n\n", form
        r = fetch(server, "POST", "stream/ticks", params, {**headers, "Content-Type": "application/json"}, cookies)
        # the cookie opens reading only: a page of another port of this host could post with it
        assert r.status_code == (403 if form == "cookie" else 200), (form, r.text)
        r = fetch(server, "GET", "stream/ticks/demo", params, headers, cookies)
        assert r.status_code == 200 and "text/html" in r.headers["content-type"], form
        assert fetch(server, "GET", "stream/secret_thing", params, headers, cookies).status_code == 403, form
        assert fetch(server, "GET", "stream/secret_thing/demo", params, headers, cookies).status_code == 403, form
    # the page carries the stream URL with the share, and sets a cookie scoped to this endpoint
    page = httpx.get(share.demo_url, timeout=30)
    assert f"/stream/ticks?share={share.token}" in page.text
    cookie = page.headers["set-cookie"]
    assert "Path=/stream/ticks" in cookie and "HttpOnly" in cookie and "SameSite=Strict" in cookie
    assert "nonce-" in page.headers["content-security-policy"] and page.headers["referrer-policy"] == "no-referrer"


def test_a_share_opens_nothing_else_on_any_route(shared):
    """Every route the server has (walked from the tornado application), in every form:
    the share changes nothing, compared with no credentials at all."""
    server, share = shared
    routes = server_routes(server)
    assert len(routes) > 30, routes
    mine = {"/stream/ticks", "/stream/ticks/demo", "/stream/"}  # the index lists the shared demo only (tested below)
    checked = 0
    for path, websocket in routes:
        if path in mine:
            continue
        if websocket:
            anonymous = ws_status(server, path, {})
            for form, (params, headers, cookies) in forms(share.token).items():
                got = ws_status(server, path, {**headers, **({"Cookie": f"jupyter-stream-share={share.token}"} if cookies else {})},
                                params)
                assert got == anonymous and got != 101, (path, form, got)
            checked += 1
            continue
        anonymous = status(server, "GET", path.lstrip("/"))
        for form, (params, headers, cookies) in forms(share.token).items():
            got = status(server, "GET", path.lstrip("/"), params, headers, cookies)
            assert got == anonymous, (path, form, got, anonymous)
            if path.startswith("/api/stream"):
                posted = status(server, "POST", path.lstrip("/"), params, headers, cookies)
                assert posted in (403, 404, 405), (path, form, posted)
        checked += 1
    assert checked > 30
    leaks = [line for line in server.log().splitlines() if share.token in line]
    assert not leaks, leaks


def server_routes(server):
    """(path, is_websocket) for each route of a server configured as `server`: the
    tornado application's rules, walked in a fresh process, each turned into a path."""
    code = f"""
import json, re, sys
from jupyter_server.serverapp import ServerApp
from tornado.websocket import WebSocketHandler
app = ServerApp()
app.initialize(argv={json.dumps(server.options + ["--ServerApp.jpserver_extensions={'jupyter_stream': True}",
                                                    "--ServerApp.open_browser=False", "--ServerApp.port=0"])})
found = []
def walk(router):
    for rule in router.rules:
        if hasattr(rule.target, "rules"):
            walk(rule.target)
        elif isinstance(rule.target, type):
            found.append((rule.matcher.regex.pattern, issubclass(rule.target, WebSocketHandler)))
walk(app.web_app.default_router)
print(json.dumps(found))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**__import__("os").environ, "JUPYTER_RUNTIME_DIR": server.runtime_dir})
    assert out.returncode == 0, out.stderr[-3000:]
    routes = set()
    for pattern, websocket in json.loads(out.stdout.strip().splitlines()[-1]):
        path = path_for(pattern)
        if path is not None:
            routes.add((path, websocket))
    return sorted(routes)


def path_for(pattern):
    """A concrete path that `pattern` matches (groups filled with a plausible value)."""
    body = pattern.rstrip("$").lstrip("^")
    samples = {"name": "other", "kernel_id": "00000000-0000-0000-0000-000000000000", "session_id": "00000000-0000-0000-0000-000000000000",
               "share_id": "abcdef"}

    def fill(match):
        name = match.group(1)
        return samples.get(name, "x")

    path = re.sub(r"\(\?P<(\w+)>(?:[^()]|\([^()]*\))*\)", fill, body)
    path = re.sub(r"\((?:[^()]|\([^()]*\))*\)", "x", path)
    path = path.replace("/?", "/").replace("\\", "").replace("?", "")
    path = re.sub(r"\.\*|\.\+", "x", path)
    if not path.startswith("/"):
        return None
    return path if re.fullmatch(pattern, path) else path.rstrip("/") if re.fullmatch(pattern, path.rstrip("/")) else None


def ws_status(server, path, headers, params=None):
    """The HTTP status a WebSocket upgrade gets (101: it opened)."""
    from tornado.httpclient import HTTPClientError, HTTPRequest
    from tornado.websocket import websocket_connect

    query = "?" + "&".join(f"{k}={v}" for k, v in (params or {}).items()) if params else ""
    url = server.url.replace("http", "ws", 1).rstrip("/") + path + query

    async def attempt():
        try:
            conn = await websocket_connect(HTTPRequest(url, headers=headers, request_timeout=10))
        except HTTPClientError as e:
            return e.code
        except Exception:  # noqa: BLE001 - refused in another way (closed, reset)
            return -1
        conn.close()
        return 101

    return asyncio.run(attempt())


def test_revoked_expired_and_deleted_shares_say_so(shared):
    server, share = shared
    share.revoke()
    for url in (share.url, share.demo_url):
        r = httpx.get(url, timeout=30)
        assert r.status_code == 403 and "revoked" in r.text, r.text

    short = Endpoint.lookup("ticks", server.connection).share(1)
    assert httpx.get(short.url, timeout=30).status_code == 200
    time.sleep(1.2)
    r = httpx.get(short.url, timeout=30)
    assert r.status_code == 403 and "expired" in r.text

    gone = Endpoint.lookup("ticks", server.connection).share(None)
    assert gone.expires is None
    server.connection.request("DELETE", "api/stream/endpoints/ticks")
    r = httpx.get(gone.url, timeout=30)
    assert r.status_code == 403 and "its endpoint 'ticks' was deleted" in r.text
    register_endpoint(ticks, "ticks", connection=server.connection)  # the same name again: the old link stays dead
    assert httpx.get(gone.url, timeout=30).status_code == 403

    r = httpx.get(server.url + "stream/ticks?share=not-a-real-token", timeout=30)
    assert r.status_code == 403 and "not valid here" in r.text
    states = {s["id"]: s["state"] for s in server.connection.request("GET", "api/stream/shares").json()["shares"]}
    assert states == {share.id: "revoked", short.id: "expired", gone.id: "revoked"}
    for token in (share.token, short.token, gone.token):
        assert token not in server.log()


def test_share_tokens_are_compared_by_digest_in_constant_time(monkeypatch):
    import hmac

    from jupyter_stream.server import shares

    store = shares.ShareStore()
    share, token = store.create("ticks", None)
    assert share.digest != token and token not in repr(vars(share))
    compared = []
    real = hmac.compare_digest
    monkeypatch.setattr(shares.hmac, "compare_digest", lambda a, b: compared.append((a, b)) or real(a, b))
    assert store.check(token, "ticks") is share and compared == [(share.digest, share.digest)]
    with pytest.raises(shares.ShareRefused):
        store.check(token[:-1] + ("A" if token[-1] != "A" else "B"), "ticks")
    with pytest.raises(shares.ShareRefused, match="opens another endpoint"):
        store.check(token, "other")


def test_the_index_lists_what_the_visitor_may_open_and_cors(shared):
    server, share = shared
    everything = server.get("stream/").text
    assert "/stream/ticks/demo" in everything and "/stream/secret_thing/demo" in everything
    only = httpx.get(f"{server.url}stream/?share={share.token}", timeout=30).text
    assert f"/stream/ticks/demo?share={share.token}" in only and "secret_thing" not in only
    assert httpx.get(f"{server.url}stream/", timeout=30).status_code == 403

    allowed = httpx.options(share.url, headers={"Origin": "https://demo.example", "Access-Control-Request-Method": "GET"}, timeout=30)
    assert allowed.status_code == 204 and allowed.headers["access-control-allow-origin"] == "https://demo.example"
    r = httpx.get(share.url, headers={"Origin": "https://demo.example"}, timeout=30)
    assert r.headers["access-control-allow-origin"] == "https://demo.example"
    r = httpx.get(share.url, headers={"Origin": "https://evil.example"}, timeout=30)
    assert "access-control-allow-origin" not in r.headers


def test_shares_from_a_notebook_outlive_its_kernel(jstream_server, jstream_notebook_kernel):
    kernel = jstream_notebook_kernel
    kernel.execute("%load_ext jupyter_stream")
    outputs, reply = kernel.execute("%%stream_endpoint\ndef hello(who: str = 'world'):\n    yield f'data: hi {who}\\n\\n'\n")
    assert reply["status"] == "ok"
    outputs, reply = kernel.execute("%stream_share hello --expires 30m")
    text = kernel.text(outputs)
    assert reply["status"] == "ok" and "stream: " in text and "demo:   " in text, text
    url = re.search(r"stream: (\S+)", text).group(1)
    outputs, _ = kernel.execute("s = hello.share('7d'); print(s.url); print(len(hello.shares()))")
    second, count = kernel.text(outputs).split()
    assert count == "2"
    outputs, reply = kernel.execute("%stream_share nosuch")
    assert reply["status"] == "error" and "no endpoint named 'nosuch'" in kernel.text(outputs)
    assert httpx.get(url, timeout=30).status_code == 200, (url, httpx.get(url, timeout=30).text)
    kernel.shutdown()
    for link in (url, second):
        assert httpx.get(link + "&who=you", timeout=30).text == "data: hi you\n\n"


def test_serve_share_prints_links_and_no_token(tmp_path):
    from test_notebook import REPO

    from jupyter_stream.pytest_plugin import free_port

    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "jupyter_stream.server.cli", "serve", str(REPO / "notebooks" / "quickstart.ipynb"),
         "--port", str(port), "--token", "servetoken", "--share", "--expires", "2h"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**__import__("os").environ, "JUPYTER_RUNTIME_DIR": str(tmp_path), "JUPYTER_DATA_DIR": str(tmp_path / "data")},
    )
    try:
        out = []
        for line in proc.stdout:
            out.append(line)
            if "Press Ctrl-C to stop." in line:
                break
        text = "".join(out)
        assert "servetoken" not in text, text
        demo = re.search(r"demo:   (\S+/stream/squares/demo\?share=\S+)", text).group(1)
        stream = re.search(r"stream: (\S+/stream/squares\?share=\S+)", text).group(1)
        assert httpx.get(demo, timeout=30).status_code == 200
        assert len(httpx.get(stream + "&n=2", timeout=30).text.splitlines()) == 2
        assert httpx.get(f"http://127.0.0.1:{port}/api/stream/endpoints?share={stream.split('=')[-1]}", timeout=30).status_code == 403
    finally:
        proc.terminate()
        proc.wait(30)


def test_tokens_in_urls_never_reach_the_log(shared):
    """A refused `POST /api/kernels?share=<token>` used to log the whole token in tornado's
    "'_xsrf' argument missing" warning. Every path that logs a URL, with a share token and
    with a wrong server token in the query: the lines are there, the tokens are not."""
    server, share = shared
    wrong = "wrong" + share.token[5:]
    for token in (share.token, wrong):
        for name in ("share", "token"):
            q = {name: token}
            fetch(server, "POST", "api/kernels", params=q)  # tornado: 403 ... '_xsrf' argument missing
            fetch(server, "POST", "api/sessions", params=q, cookies={"_xsrf": "x"})
            fetch(server, "PUT", "api/contents/x.txt", params=q)
            fetch(server, "DELETE", "api/kernels/nope", params=q)
            fetch(server, "GET", "api/nope", params=q)  # 404
            fetch(server, "GET", "lab", params=q)  # a page: login redirect
            fetch(server, "GET", "files/nope.txt", params=q)
            fetch(server, "GET", "api/stream/calls", params=q, headers={"Connection": "Upgrade", "Upgrade": "websocket",
                                                                      "Sec-WebSocket-Version": "13", "Sec-WebSocket-Key": "x" * 22 + "=="})
            fetch(server, "GET", "api/kernels/0/channels", params=q, headers={"Connection": "Upgrade", "Upgrade": "websocket"})
            fetch(server, "GET", "stream/ticks", params={**q, "n": "not a number"})  # 400 of ours
            fetch(server, "GET", "stream/secret_thing", params=q)  # 403 of ours
    log = server.log()
    leaks = [line for line in log.splitlines() if share.token in line or wrong in line]
    assert not leaks, leaks
    assert "'_xsrf' argument missing" in log and "share=[secret]" in log and "token=[secret]" in log


def test_shares_of_a_persisted_endpoint_survive_a_restart(jstream_start_server, tmp_path):
    import os

    persist_dir = tmp_path / "persisted"
    options = ["--JupyterStream.min_workers=1", f"--JupyterStream.persist_dir={persist_dir}"]
    server = jstream_start_server(options)
    register_endpoint(ticks, "ticks", connection=server.connection, persist=True)
    register_endpoint(secret_thing, "secret_thing", connection=server.connection)  # not persisted
    kept = Endpoint.lookup("ticks", server.connection).share("1h")
    ended = Endpoint.lookup("ticks", server.connection).share(None)
    ended.revoke()
    volatile = Endpoint.lookup("secret_thing", server.connection).share("1h")
    stored = (persist_dir / "shares.json").read_text()
    assert (persist_dir / "shares.json").stat().st_mode & 0o777 == 0o600
    for share in (kept, ended, volatile):  # tokens are never stored; the volatile endpoint's share is not there at all
        assert share.token not in stored
    assert kept.id in stored and ended.id in stored and volatile.id not in stored
    server.stop()

    restarted = jstream_start_server(options)
    deadline = time.monotonic() + 60
    while "restored endpoint ticks" not in restarted.log():
        assert time.monotonic() < deadline, restarted.log()
        time.sleep(0.1)
    r = httpx.get(f"{restarted.url}stream/ticks?n=2&share={kept.token}", timeout=30)
    assert r.status_code == 200 and r.text == "data: 0\n\ndata: 1\n\n", r.text
    r = httpx.get(f"{restarted.url}stream/ticks/demo?share={kept.token}", timeout=30)
    assert r.status_code == 200
    r = httpx.get(f"{restarted.url}stream/ticks?share={ended.token}", timeout=30)
    assert r.status_code == 403 and "revoked" in r.text, r.text
    r = httpx.get(f"{restarted.url}stream/secret_thing?share={volatile.token}", timeout=30)
    assert r.status_code == 403
    states = {s["id"]: s["state"] for s in restarted.connection.request("GET", "api/stream/shares").json()["shares"]}
    assert states == {kept.id: "active", ended.id: "revoked"}

    # a share file someone else could have written is not trusted
    restarted.stop()
    os.chmod(persist_dir / "shares.json", 0o666)
    third = jstream_start_server(options)
    assert third.connection.request("GET", "api/stream/shares").json()["shares"] == []
    assert "share links of persisted endpoints not restored" in third.log() and "writable by others" in third.log()


def test_a_share_stops_when_another_owner_replaces_its_endpoint(shared, monkeypatch):
    server, share = shared
    register_endpoint(ticks, "ticks", connection=server.connection)  # the same owner again: the link works on
    assert httpx.get(share.url, timeout=30).status_code == 200
    monkeypatch.setenv("JPY_SESSION_NAME", "someone-else.ipynb")
    with pytest.warns(UserWarning, match="this cell replaced it"):
        register_endpoint(ticks, "ticks", connection=server.connection)
    r = httpx.get(share.url, timeout=30)
    assert r.status_code == 403 and "its endpoint 'ticks' was replaced by someone-else.ipynb's" in r.text, r.text
    fresh = Endpoint.lookup("ticks", server.connection).share("1h")  # the new owner's own share works
    assert httpx.get(fresh.url, timeout=30).status_code == 200
