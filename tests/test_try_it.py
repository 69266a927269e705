"""The endpoint card's "Try it" without a browser: the request its form makes from the
signature the server describes, and how a response is parsed for the card (issue 18.3)."""

from jupyter_stream.client.try_it import ResponseView, build_request, initial_text
from jupyter_stream.signatures import describe_parameters


def params(fn):
    return describe_parameters(fn)["params"]


def hello(name: str, times: int = 1, loud: bool = False, tags: list[str] = ["a", "b"], note: str | None = None):  # noqa: B006
    yield name


def test_the_form_sends_what_was_changed_and_leaves_defaults_to_the_function():
    p = params(hello)
    start = {q["name"]: initial_text(q) for q in p} | {"loud": False, "name": "Ada"}
    assert start["times"] == "1" and start["tags"] == "a, b" and start["note"] == ""
    assert build_request(p, start) == ("GET", [("name", "Ada")], None)
    changed = start | {"times": "3", "loud": True, "tags": "x, y ,z", "note": "hi"}
    assert build_request(p, changed) == (
        "GET", [("name", "Ada"), ("times", "3"), ("loud", "true"), ("tags", "x"), ("tags", "y"), ("tags", "z"), ("note", "hi")], None)
    assert build_request(p, start | {"tags": '["x", "y"]'})[1][1] == ("tags", '["x", "y"]')
    assert build_request(p, start | {"name": ""}) == ("GET", [("name", "")], None)  # required: the server says what is missing


def test_a_json_body_parameter_is_posted():
    def goodbye(data: dict, loud: bool = False):
        yield data

    p = params(goodbye)
    assert build_request(p, {"data": '{"name": "Ada"}', "loud": True}) == ("POST", [("loud", "true")], b'{"name": "Ada"}')
    try:
        build_request(p, {"data": "{nope", "loud": False})
    except ValueError as e:
        assert str(e).startswith("data: not valid JSON")
    else:
        raise AssertionError("a body that is not JSON was sent")


def test_sse_events_are_parsed_into_their_fields():
    view = ResponseView("text/event-stream; charset=utf-8")
    for line in [": keep-alive", "", "event: greet", "id: 7", "data: first line", "data: second line", "",
                 "data: plain", "", 'event: error', 'data: {"error": {"type": "ValueError", "message": "bad n"}}', "",
                 "data: no blank line at the end"]:
        view.feed_line(line)
    view.finish()
    assert view.items == [
        {"event": "greet", "id": "7", "data": "first line\nsecond line"},
        {"data": "plain"},
        {"event": "error", "data": '{"error": {"type": "ValueError", "message": "bad n"}}'},
        {"data": "no blank line at the end"},
    ]
    shown = view.html()
    assert "data:" not in shown and "keep-alive" not in shown
    assert "<td style" in shown and ">greet</td>" in shown and ">7</td>" in shown and "first line\nsecond line" in shown
    assert "error: ValueError: bad n" in shown
    assert view.summary() == "4 events"


def test_ndjson_rows_are_a_table_and_only_the_latest_are_kept():
    view = ResponseView("application/x-ndjson")
    for i in range(50):
        view.feed_line(f'{{"i": {i}, "square": {i * i}}}')
    shown = view.html()
    assert ">i</th>" in shown and ">square</th>" in shown
    assert shown.count('<tr class="jupyter-stream-row">') == 40 and "10 earlier not shown" in shown
    assert ">2401</td>" in shown and view.summary() == "50 rows"
    mixed = ResponseView("application/x-ndjson")
    for line in ("[1, 2]", "not json", '"text"'):
        mixed.feed_line(line)
    assert [cell for cell in ("[1, 2]", "not json", "text") if f">{cell}</td>" in mixed.html()] == ["[1, 2]", "not json", "text"]
