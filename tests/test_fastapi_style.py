"""What FastAPI (and Modal's fastapi_endpoint) users expect of an endpoint: a returned value
is one response, a dict-like parameter takes the JSON body, and `request: Request` gives
the request itself."""

import dataclasses
import json

import httpx
import pydantic


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


@dataclasses.dataclass
class Greeting:
    name: str
    times: int = 1


class Order(pydantic.BaseModel):  # at module level, as in a notebook cell
    item: str
    quantity: int


def test_a_single_dict_or_model_parameter_takes_the_whole_body(jstream_server):
    def goodbye(data: dict):
        return {"bye": data["name"]}

    def greet(greeting: Greeting, loud: bool = False):
        text = f"hello {greeting.name}" * greeting.times
        return text.upper() if loud else text

    def order(o: Order):
        yield {"item": o.item, "quantity": o.quantity, "kind": type(o).__name__}

    s = jstream_server
    for fn in (goodbye, greet):
        s.register(fn)
    s.register(order, media_type="application/x-ndjson")
    post = lambda name, **kw: httpx.post(s.url + f"stream/{name}", headers=s.headers, timeout=30, **kw)  # noqa: E731
    assert post("goodbye", json={"name": "Ada"}).json() == {"bye": "Ada"}  # the Modal example that said "unknown parameter"
    assert post("greet?loud=yes", json={"name": "ada", "times": 2}).text == "HELLO ADAHELLO ADA"
    assert json.loads(post("order", json={"item": "tea", "quantity": 2}).text) == {"item": "tea", "quantity": 2, "kind": "Order"}
    # what a wrong body gets: the expected body in the 400, the model's own complaint in a 422
    missing = s.get("stream/greet")
    assert missing.status_code == 400
    assert 'takes a JSON body as \'greeting\': send {"name": str, "times": int}' in missing.json()["message"]
    not_object = post("goodbye", content=b"[1, 2]")
    assert not_object.status_code == 400 and "JSON object" in not_object.json()["message"]
    bad_fields = post("greet", json={"nom": "x"})
    assert bad_fields.status_code == 422 and "does not fit Greeting" in bad_fields.json()["error"]["message"]
    bad_model = post("order", json={"item": "tea", "quantity": "many"})
    assert bad_model.status_code == 422 and "quantity" in bad_model.json()["error"]["message"]


def test_request_access_and_resuming_from_last_event_id(jstream_server):
    from jupyter_stream import Request, sse

    def resumable(request: Request, n: int = 5):
        start = int(request.last_event_id) + 1 if request.last_event_id else 0
        for i in range(start, n):
            yield sse({"tick": i}, id=i)

    def echo(request: Request, x: int = 0):
        return {"method": request.method, "path": request.path, "client": request.client,
                "agent": request.headers.get("user-agent"), "query": request.query,
                "secrets": [h for h in request.headers if h in ("authorization", "cookie")]}

    s = jstream_server
    s.register(resumable)
    s.register(echo)
    full = s.get("stream/resumable").text
    assert full.count("data: ") == 5 and full.startswith("id: 0\n")
    resumed = httpx.get(s.url + "stream/resumable", headers={**s.headers, "Last-Event-ID": "2"}, timeout=30).text
    assert resumed.startswith("id: 3\n") and resumed.count("data: ") == 2
    seen = httpx.get(s.url + f"stream/echo?x=1&token={s.token}", headers={**s.headers, "User-Agent": "probe"}, timeout=30).json()
    assert seen == {"method": "GET", "path": "/stream/echo", "client": "127.0.0.1", "agent": "probe",
                    "query": {"x": ["1"]}, "secrets": []}
    assert s.get("api/stream/endpoints/echo").json()["parameters"][0] == {"name": "request", "type": "request", "required": True}
    assert "no parameters" not in s.get("stream/echo?y=1").json()["message"]  # the signature names x, not the request


class Checked(pydantic.BaseModel):
    name: str

    @pydantic.field_validator("name")
    @classmethod
    def says_so(cls, value: str) -> str:
        print(f"checking {value}")
        return value


def test_async_endpoints_answer_the_same_once_loaded(jstream_server):
    """An async endpoint's first call on a worker loads it (in a pooled thread); later calls
    start on the worker's event loop itself. Both answer alike: a body model and `Request`,
    prints to the log and the card (a model validator's too), an error before the first
    chunk, a coroutine's value."""
    from jupyter_stream import Request

    async def agreet(greeting: Greeting, request: Request, fail: bool = False):
        print(f"greeting {greeting.name} by {request.method}")
        if fail:
            raise ValueError(f"no greeting for {greeting.name}")
        for _ in range(greeting.times):
            yield {"hello": greeting.name}

    async def avalue(x: int = 1):
        import asyncio

        await asyncio.sleep(0)
        return {"x": x}

    async def achecked(checked: Checked):
        yield checked.name

    s = jstream_server
    s.register(agreet, media_type="application/x-ndjson")
    s.register(avalue)
    s.register(achecked, media_type="text/plain")
    post = lambda name, **kw: httpx.post(s.url + f"stream/{name}", headers=s.headers, timeout=30, **kw)  # noqa: E731
    for _ in range(2):  # loaded by the first round
        r = post("agreet", json={"name": "ada", "times": 2})
        assert r.status_code == 200 and [json.loads(line) for line in r.text.splitlines()] == [{"hello": "ada"}] * 2
        failed = post("agreet?fail=yes", json={"name": "bob"})
        assert failed.status_code == 500 and "ValueError: no greeting for bob" in failed.text, failed.text
        assert s.get("stream/avalue?x=3").json() == {"x": 3}
        bad = post("agreet", json={"nom": "x"})
        assert bad.status_code == 422 and "does not fit Greeting" in bad.json()["error"]["message"]
        assert post("achecked", json={"name": "eve"}).text == "eve"
    output = [o["line"] for o in s.get("api/stream/endpoints/agreet").json()["output"]]
    assert output == ["greeting ada by POST", "greeting bob by POST"] * 2, output
    output = [o["line"] for o in s.get("api/stream/endpoints/achecked").json()["output"]]
    assert output == ["checking eve"] * 2, output  # what the model's validator printed, on the loop too
