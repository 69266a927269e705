"""What is registered, by whom, and getting handles back: %stream_list, jupyter_stream.list(),
Endpoint.lookup / Function.lookup, a warning when a name another notebook owns is
replaced, and cards that notice their endpoint was removed."""

import time

import pytest

import jupyter_stream
from jupyter_stream import Endpoint, Function
from jupyter_stream.client.endpoints import register_endpoint
from jupyter_stream.client.functions import register_function


def hello():
    yield "data: hello\n\n"


def double(x):
    return 2 * x


def test_owners_listing_and_lookup(jstream_server, monkeypatch):
    conn = jstream_server.connection
    monkeypatch.setenv("JPY_SESSION_NAME", "/home/ada/analysis.ipynb")
    register_endpoint(hello, name="owned", connection=conn)
    register_function(double, name="owned_double", connection=conn)
    monkeypatch.setenv("JPY_SESSION_NAME", "/home/bob/other.ipynb")
    with pytest.warns(UserWarning, match=r"endpoint 'owned' was registered by /home/ada/analysis.ipynb; this cell replaced it"):
        register_endpoint(hello, name="owned", connection=conn)
    rows = {row["name"]: row for row in jupyter_stream.list(conn)}
    assert rows["owned"]["owner"] == "/home/bob/other.ipynb" and rows["owned"]["kind"] == "endpoint"
    assert rows["owned_double"]["owner"] == "/home/ada/analysis.ipynb" and rows["owned_double"]["kind"] == "function"
    assert abs(rows["owned"]["since"] - time.time()) < 60
    # handles again, without the code (after a kernel restart, say)
    endpoint = Endpoint.lookup("owned", connection=conn)
    assert endpoint.url == jstream_server.url + "stream/owned" and endpoint.fn is None
    assert jstream_server.get("stream/owned").text == "data: hello\n\n"
    assert Function.lookup("owned_double", connection=conn).remote(21) == 42
    with pytest.raises(LookupError, match="no endpoint named 'nope'"):
        Endpoint.lookup("nope", connection=conn)


def test_a_card_says_its_endpoint_was_removed_and_stops_polling(jstream_server):
    from jupyter_stream.client import cards

    endpoint = register_endpoint(hello, name="short_lived", connection=jstream_server.connection)
    card = cards.EndpointCard(endpoint)
    endpoint.delete()
    deadline = time.monotonic() + 5
    while "removed" not in card.counters.value:
        assert time.monotonic() < deadline, card.counters.value
        time.sleep(0.1)
    assert card.try_button.disabled
    time.sleep(3 * cards.REFRESH)
    polls = jstream_server.log().count("GET /api/stream/endpoints/short_lived")
    assert polls <= 1, polls  # one 404, then no more


def test_stream_list_magic(jstream_server, jstream_notebook_kernel):
    kernel = jstream_notebook_kernel
    kernel.execute("%load_ext jupyter_stream")
    outputs, reply = kernel.execute('%%stream_endpoint --name listed\ndef listed():\n    yield "data: x\\n\\n"')
    assert reply["status"] == "ok", kernel.text(outputs)
    outputs, reply = kernel.execute("%stream_list")
    text = kernel.text(outputs)
    assert reply["status"] == "ok" and "endpoint" in text and "listed" in text and "since" in text, text
