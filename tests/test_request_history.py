"""Each endpoint's recent requests (issue 22, item 3): kept by the server without
credentials, within their bounds, listed in the notebook with `ep.requests()` and run
again there with `.replay()` (the cell's current code, so `%debug` works) or on a worker."""

import json
import re
import textwrap

import httpx

from jupyter_stream.client.endpoints import Endpoint, register_endpoint

ANSI = re.compile(r"\x1b\[[0-9;]*m")

FAILING_CELL = textwrap.dedent(
    '''
    %%stream_endpoint --name hist_fail --media-type text/plain
    def hist_fail(n: int = 1, tags: list[str] = []):
        if n == 3:
            raise ValueError(f"three is bad: {n} {tags}")  # the line that fails
        yield f"ok {n}\\n"
    '''
).lstrip()


def requests_json(server, name, **kwargs):
    return httpx.get(f"{server.url}api/stream/endpoints/{name}/requests", timeout=30, **kwargs)


def test_a_failed_request_is_listed_and_replayed_in_the_notebook(jstream_server, jstream_notebook_kernel):
    kernel, server = jstream_notebook_kernel, jstream_server
    outputs, reply = kernel.execute("%load_ext jupyter_stream")
    outputs, reply = kernel.execute(FAILING_CELL)
    assert reply["status"] == "ok", kernel.text(outputs)

    assert server.get("stream/hist_fail?n=1").text == "ok 1\n"
    secret_headers = {**server.headers, "Cookie": "_xsrf=cookie-xsrf-value; session=cookie-secret-value",
                      "X-XSRFToken": "header-xsrf-value", "X-Api-Key": "api-key-value", "X-Trace": "visible-value"}
    failed = httpx.get(f"{server.url}stream/hist_fail", params={"n": "3", "tags": "a,b", "token": server.token},
                       headers=secret_headers, timeout=30)
    assert failed.status_code == 500 and "three is bad" in failed.text

    # what the server kept, over its API: no credential of any kind, the rest as sent
    kept = requests_json(server, "hist_fail", headers=server.headers)
    assert kept.status_code == 200
    for secret in (server.token, "cookie-xsrf-value", "cookie-secret-value", "header-xsrf-value", "api-key-value"):
        assert secret not in kept.text, secret
    newest = kept.json()["requests"][0]
    assert newest["arguments"] == {"n": 3, "tags": ["a", "b"]} and newest["status"] == 500 and newest["outcome"] == "error"
    assert newest["headers"]["x-trace"] == "visible-value" and "token" not in newest["query"]
    assert newest["worker"] and newest["duration"] > 0 and "three is bad" in newest["error"]["traceback"]

    # in the notebook: the table, failures first
    outputs, reply = kernel.execute("reqs = hist_fail.requests(failures_first=True)\nreqs")
    text = kernel.text(outputs)
    assert reply["status"] == "ok", text
    assert "ValueError: three is bad" in text and "<table" in text and "500" in text
    outputs, reply = kernel.execute("r = reqs[0]\nprint(r.status, r.outcome, r.arguments, r.error['type'])\n"
                                    "print(reqs[1].status, reqs[1].outcome)\nprint('three is bad' in r.traceback)")
    assert kernel.text(outputs).split("\n")[:3] == ["500 error {'n': 3, 'tags': ['a', 'b']} ValueError", "200 ok", "True"]

    # replay here: the same error, raised through the cell's code
    outputs, reply = kernel.execute("reqs[0].replay()")
    assert reply["status"] == "error" and reply["ename"] == "ValueError", kernel.text(outputs)
    assert reply["evalue"] == "three is bad: 3 ['a', 'b']"
    traceback = ANSI.sub("", "\n".join(reply["traceback"]))
    assert 'raise ValueError(f"three is bad: {n} {tags}")  # the line that fails' in traceback

    # replay on a worker: the same error, from the server
    outputs, reply = kernel.execute("reqs[0].replay(remote=True)")
    assert reply["status"] == "error" and reply["ename"] == "RemoteError" and "three is bad" in reply["evalue"], reply

    # the cell is fixed and run again: replay runs its current code, here and on a worker
    outputs, reply = kernel.execute(FAILING_CELL.replace('raise ValueError(f"three is bad: {n} {tags}")', 'yield "fixed"'))
    assert reply["status"] == "ok", kernel.text(outputs)
    outputs, reply = kernel.execute("print(reqs[0].replay()); print(repr(reqs[0].replay(remote=True)))")
    assert reply["status"] == "ok", kernel.text(outputs)
    text = kernel.text(outputs)  # (what else the kernel printed, if anything, is shown on failure)
    assert [line for line in text.split("\n") if line][:2] == ["['fixed', 'ok 3\\n']", "'fixedok 3\\n'"], text
    # the cell's new registration kept the history (same owner); the remote replay is its newest request
    outputs, reply = kernel.execute("hist_fail.requests()[0].status, len(hist_fail.requests())")
    assert "(200, 4)" in kernel.text(outputs)

    # the card's info says what failed last
    info = server.get("api/stream/endpoints/hist_fail").json()
    assert info["history"] is True and info["last_failure"]["type"] == "ValueError"
    assert info["last_failure"]["message"].startswith("three is bad") and info["last_failure"]["status"] == 500

    # the endpoint's card shows it, with the code that replays it here
    outputs, reply = kernel.execute("print(hist_fail._card.failure.value)")
    card = kernel.text(outputs)
    assert "last failure" in card and "ValueError" in card and "hist_fail.requests(failures_first=True)[0].replay()" in card

    # a share link of the endpoint cannot read its history, in any form
    share = Endpoint.lookup("hist_fail", server.connection).share("1h")
    for params, headers in (({"share": share.token}, {}), ({"token": share.token}, {}), ({}, {"Authorization": f"token {share.token}"}),
                            ({}, {"Authorization": f"Bearer {share.token}"})):
        refused = requests_json(server, "hist_fail", params=params, headers=headers)
        assert refused.status_code == 403, (params, headers, refused.status_code)
        assert "three is bad" not in refused.text
    assert requests_json(server, "hist_fail", cookies={"jupyter-stream-share": share.token}).status_code == 403
    share.revoke()

    # --no-history on the magic keeps nothing, and says so
    outputs, reply = kernel.execute("%%stream_endpoint --name hist_off --no-history\ndef hist_off():\n    yield 'x'\n")
    assert reply["status"] == "ok", kernel.text(outputs)
    assert server.get("stream/hist_off").status_code == 200
    assert requests_json(server, "hist_off", headers=server.headers).json() == {"requests": [], "history": False}
    outputs, reply = kernel.execute("hist_off.requests()")
    assert "no requests kept for 'hist_off' (registered with --no-history" in kernel.text(outputs)


def fail_always(data: str = ""):
    raise RuntimeError("failed on purpose " + "x" * 3000)
    yield ""


def echo(data: str = ""):
    yield str(len(data))


def test_history_is_bounded_by_count_and_bytes(jstream_start_server):
    server = jstream_start_server(["--JupyterStream.min_workers=1", "--JupyterStream.max_workers=1",
                                   "--JupyterStream.request_history=5", "--JupyterStream.request_history_bytes=12000",
                                   "--JupyterStream.request_history_argument_bytes=2000"])
    conn = server.connection
    register_endpoint(echo, "hist_echo", "text/plain", connection=conn)
    for i in range(8):
        assert server.get(f"stream/hist_echo?data={i}").text == "1"
    kept = requests_json(server, "hist_echo", headers=server.headers).json()
    assert [r["arguments"] for r in kept["requests"]] == [{"data": str(i)} for i in range(7, 2, -1)]
    assert kept["recorded"] == 8 and kept["dropped"] == 3 and kept["limit"] == 5

    # arguments over request_history_argument_bytes are not kept; the entry says how large they were
    big = "y" * 5000
    r = httpx.post(f"{server.url}stream/hist_echo", json={"data": big}, headers=server.headers, timeout=30)
    assert r.text == "5000"
    newest = requests_json(server, "hist_echo", headers=server.headers).json()["requests"][0]
    assert newest["arguments"] is None and newest["arguments_kept"] is False and newest["arguments_bytes"] > 5000

    # bytes: each entry near 1.9 KB of arguments; 12 KB hold fewer than the 5 the count allows
    for i in range(5):
        httpx.post(f"{server.url}stream/hist_echo", json={"data": str(i) * 1900}, headers=server.headers, timeout=30)
    kept = requests_json(server, "hist_echo", headers=server.headers).json()
    assert kept["bytes"] <= 12000 and 2 <= len(kept["requests"]) < 5, (kept["bytes"], len(kept["requests"]))
    assert [r["arguments"]["data"][0] for r in kept["requests"]] == ["4", "3", "2", "1", "0"][:len(kept["requests"])]

    # a failure's traceback counts too; the newest failure is always kept
    register_endpoint(fail_always, "hist_fails", "text/plain", connection=conn)
    for _ in range(10):
        assert server.get("stream/hist_fails").status_code == 500
    kept = requests_json(server, "hist_fails", headers=server.headers).json()
    assert kept["bytes"] <= 12000 and kept["requests"][0]["error"]["type"] == "RuntimeError"
    assert "failed on purpose" in kept["requests"][0]["error"]["traceback"]

    # history=False (the decorator's and register_endpoint's) keeps nothing
    register_endpoint(echo, "hist_none", "text/plain", connection=conn, history=False)
    assert server.get("stream/hist_none?data=abc").text == "3"
    assert requests_json(server, "hist_none", headers=server.headers).json() == {"requests": [], "history": False}
    assert server.get("api/stream/endpoints/hist_none").json()["history"] is False
    # a registration turning it back on starts empty; DELETE forgets what was kept
    register_endpoint(echo, "hist_none", "text/plain", connection=conn)
    assert server.get("stream/hist_none?data=ab").text == "2"
    assert len(requests_json(server, "hist_none", headers=server.headers).json()["requests"]) == 1
    assert httpx.delete(f"{server.url}api/stream/endpoints/hist_none/requests", headers=server.headers, timeout=30).status_code == 204
    assert requests_json(server, "hist_none", headers=server.headers).json()["requests"] == []
    assert json.loads(requests_json(server, "nope", headers=server.headers).text)["message"].startswith("no endpoint named 'nope'")
