"""What FastAPI (and Modal's fastapi_endpoint) users expect of an endpoint: a returned value
is one response, a dict-like parameter takes the JSON body, and `request: Request` gives
the request itself."""

import json

import httpx


def test_returned_values_are_one_response_as_in_fastapi(jstream_server):
    def as_dict():
        return {"a": 1, "é": [1, 2]}

    def as_list():
        return [1, "two"]

    def as_text():
        return "hello"

    def as_bytes():
        return b"\x00\x01"

    def as_none():
        return None

    def as_number():
        return 4.5

    def declared_text():
        return "hello"

    def declared_dict():
        return {"a": 1}

    def declared_list():
        return ["a\n", "b\n"]

    def still_streams():
        yield "data: 1\n\n"

    s = jstream_server
    for fn in (as_dict, as_list, as_text, as_bytes, as_none, as_number, still_streams):
        s.register(fn)
    s.register(declared_text, media_type="text/csv")
    s.register(declared_dict, media_type="text/event-stream")
    s.register(declared_list, media_type="text/plain")

    def get(name):
        r = s.get(f"stream/{name}")
        assert r.status_code == 200, r.text
        return r.headers["content-type"], r.content

    assert get("as_dict") == ("application/json", json.dumps({"a": 1, "é": [1, 2]}, ensure_ascii=False, separators=(",", ":")).encode())
    assert get("as_list") == ("application/json", b'[1,"two"]')
    assert get("as_text") == ("text/plain; charset=utf-8", b"hello")
    assert get("as_bytes") == ("application/octet-stream", b"\x00\x01")
    assert get("as_none") == ("application/json", b"null")
    assert get("as_number") == ("application/json", b"4.5")
    assert get("declared_text") == ("text/csv", b"hello")  # one chunk, not a character at a time
    assert get("declared_dict") == ("text/event-stream", b'data: {"a":1}\n\n')
    assert get("declared_list") == ("text/plain", b"a\nb\n")  # a declared media type streams a list's items
    assert get("still_streams") == ("text/event-stream", b"data: 1\n\n")
    listed = {e["name"]: e for e in s.get("api/stream/endpoints").json()["endpoints"]}
    assert listed["as_dict"]["media_type_declared"] is False and listed["declared_text"]["media_type"] == "text/csv"
    r = httpx.get(s.url + "stream/as_dict", headers=s.headers, timeout=10)
    assert r.json() == {"a": 1, "é": [1, 2]}
