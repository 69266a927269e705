"""Unit tests of the pure parts: SSE framing, chunk encoding, parameter binding."""

import importlib
import json

import pytest

from jupyter_stream import sse
from jupyter_stream.responses import encoder_for
from jupyter_stream.server.registry import EndpointSpec, ParameterError
from jupyter_stream.signatures import check_name, describe_parameters


def test_sse_frames_fields_and_multiline_data():
    assert sse("hi") == "data: hi\n\n"
    assert sse("a\nb", event="up", id=3, retry=100) == "event: up\nid: 3\nretry: 100\ndata: a\ndata: b\n\n"
    assert sse({"x": 1}) == 'data: {"x":1}\n\n'
    assert sse({"café": "é"}) == 'data: {"café":"é"}\n\n'  # UTF-8, as every other object chunk
    with pytest.raises(ValueError, match="single line"):
        sse("x", event="a\nb")


def test_encoder_by_media_type():
    sse_enc = encoder_for("text/event-stream")
    assert sse_enc("data: x\n\n") == b"data: x\n\n"
    assert sse_enc(b"\x00raw") == b"\x00raw"
    assert sse_enc({"a": [1, 2]}) == b'data: {"a":[1,2]}\n\n'
    assert encoder_for("application/x-ndjson")({"a": "é"}) == '{"a":"é"}\n'.encode()
    with pytest.raises(TypeError, match="cannot send a chunk of type object"):
        sse_enc(object())


def spec_for(fn):
    return EndpointSpec("ep", "h", b"", "text/plain", json.loads(json.dumps(describe_parameters(fn))))


def test_bind_converts_query_strings_by_annotation():
    def f(n: int, x: float = 1.0, flag: bool = False, name: str = "a", ids: list[int] = []):
        pass

    spec = spec_for(f)
    got = spec.bind({"n": ["5"], "x": ["2.5"], "flag": ["true"], "ids": ["1,2,3"], "token": ["secret"]}, None)
    assert got == {"n": 5, "x": 2.5, "flag": True, "ids": [1, 2, 3]}
    assert spec.bind({"n": ["1"], "ids": ["4", "5"]}, None)["ids"] == [4, 5]
    assert spec.bind({}, {"n": 3, "x": 1, "name": "b"}) == {"n": 3, "x": 1.0, "name": "b"}


@pytest.mark.parametrize(
    "query, body, message",
    [
        ({"n": ["abc"]}, None, "parameter 'n' must be int, got 'abc'"),
        ({"n": ["1"], "zz": ["1"]}, None, "unknown parameter 'zz'"),
        ({}, None, "missing required parameter 'n'"),
        ({}, {"n": "3"}, "parameter 'n' must be int, got str"),
        ({}, {"n": True}, "parameter 'n' must be int"),
        ({"n": ["1"], "flag": ["maybe"]}, None, "parameter 'flag' must be bool"),
    ],
)
def test_bind_rejects_bad_parameters_by_name(query, body, message):
    def f(n: int, flag: bool = False):
        pass

    with pytest.raises(ParameterError, match=message):
        spec_for(f).bind(query, body)


def test_unannotated_defaults_and_kwargs():
    def f(a, b=2, **rest):
        pass

    spec = spec_for(f)
    assert spec.bind({"a": ["x"], "b": ["3"], "other": ["y"]}, None) == {"a": "x", "b": 3, "other": "y"}


@pytest.mark.parametrize("name", ["", "1abc", "a b", "a/b", "x" * 65])
def test_bad_names(name):
    with pytest.raises(ValueError, match="invalid endpoint name"):
        check_name(name)


def test_a_function_too_large_to_register_says_what_to_do(monkeypatch):
    endpoint_module = importlib.import_module("jupyter_stream.client.registration")
    monkeypatch.setattr(endpoint_module, "MAX_FUNCTION_BYTES", 100_000)
    captured = b"x" * 200_000

    with pytest.raises(ValueError, match="load large data inside the function"):
        endpoint_module.pickle_function(lambda: captured, "endpoint 'big'")
    assert endpoint_module.pickle_function(lambda: len("small"), "endpoint 'small'")


def test_only_a_worker_can_name_itself_to_the_pool():
    from types import SimpleNamespace

    from jupyter_stream.server.pool import WorkerPool

    pool = WorkerPool()
    worker = SimpleNamespace(index=3, alive=True)
    pool.workers.append(worker)
    assert pool.worker_named(f"3:{pool.worker_key(3)}") is worker
    assert pool.worker_named("3:") is None and pool.worker_named("3:not-the-key") is None
    assert pool.worker_named(f"4:{pool.worker_key(3)}") is None and pool.worker_named("") is None


def test_list_parameters_from_the_query_as_json_arrays_too():
    def f(tags: list[str] = [], ids: list[int] = []):
        pass

    spec = spec_for(f)
    assert spec.bind({"tags": ['["a","b"]'], "ids": ["[1, 2]"]}, None) == {"tags": ["a", "b"], "ids": [1, 2]}
    assert spec.bind({"tags": ["a,b"]}, None) == {"tags": ["a", "b"]}
    assert spec.bind({"tags": ["a", "b,c"]}, None) == {"tags": ["a", "b,c"]}


def test_try_it_shows_errors_readably():
    from jupyter_stream.client.cards import readable_error

    error = '{"error": {"type": "ValueError", "message": "bad input 3", "traceback": "Traceback:\\n  File x\\nValueError: bad input 3\\n"}}'
    assert readable_error(error) == ["error: ValueError: bad input 3", "Traceback:", "  File x", "ValueError: bad input 3"]
    assert readable_error('{"message": "authenticate with the server\'s token", "reason": null}') == [
        "error: authenticate with the server's token"]
    assert readable_error("not json") == ["not json"]


def test_a_line_split_across_frames_stays_whole_when_tagging_starts_in_between(capsys):
    from jupyter_stream.client.functions import relay_printed

    midline = set()
    relay_printed({"worker": "worker-1", "print": [["stdout", "line 1\nline 2"]]}, False, midline)
    relay_printed({"worker": "worker-1", "print": [["stdout", " end\nline 3\n"]]}, True, midline)  # now tagged
    assert capsys.readouterr().out == "line 1\nline 2 end\n[worker-1] line 3\n"
