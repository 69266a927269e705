"""Endpoint cards in a real notebook kernel (issue 17a): one poller thread for all cards,
one GET a second for all of them, a re-run cell's card replaces the older one, a removed
endpoint's card stops, the thread ends with the last card, and a failing poll is logged
once while polling goes on."""

import textwrap
import time

import httpx


def run(kernel, code):
    outputs, reply = kernel.execute(textwrap.dedent(code).lstrip())
    assert reply["status"] == "ok", kernel.text(outputs)
    return "".join(o.get("text", "") for o in outputs if o["type"] == "stream")


def card_threads(kernel):
    return run(kernel, "print(sorted(t.name for t in threading.enumerate() if t.name.startswith('jupyter-stream-card')))").strip()


def test_one_poller_for_all_cards_that_stops_with_the_last(jstream_server, jstream_notebook_kernel):
    kernel = jstream_notebook_kernel
    run(kernel, """
        %load_ext jupyter_stream
        import logging, threading, time
        import httpx, jupyter_stream
        from jupyter_stream.client.cards import POLLER

        conn = jupyter_stream.get_connection()
        GETS, LOGGED, FAULTS = [], [], [0]
        def count(request):
            if request.method == "GET" and "/api/stream/endpoints" in request.url.path:
                GETS.append(request.url.path)
            if FAULTS[0] > 0:  # a fault at the HTTP boundary, for the next polls
                FAULTS[0] -= 1
                raise httpx.ConnectError("injected fault")
        conn.http.event_hooks["request"].append(count)

        class Collect(logging.Handler):
            def emit(self, record):
                LOGGED.append(record.getMessage())
        logging.getLogger("jupyter_stream").addHandler(Collect())
    """)
    for name in ("card_a", "card_b", "card_c"):
        outputs, reply = kernel.execute(f"%%stream_endpoint\ndef {name}():\n    yield 'data: x\\n\\n'\n")
        assert reply["status"] == "ok", kernel.text(outputs)
        assert any("application/vnd.jupyter.widget-view+json" in o.get("data", {}) for o in outputs), outputs
    assert card_threads(kernel) == "['jupyter-stream-cards']"

    # one GET of the list a second for all three cards, never one per card
    polled = run(kernel, "GETS.clear(); time.sleep(3.5); print(len(GETS), sorted(set(GETS)))")
    count, paths = polled.split(" ", 1)
    assert 2 <= int(count) <= 4 and paths.strip() == "['/api/stream/endpoints']", polled

    # the cell runs again: its new card replaces the older one, which stops updating
    run(kernel, "older = card_a._card")
    kernel.execute("%%stream_endpoint\ndef card_a():\n    yield 'data: y\\n\\n'\n")
    state = run(kernel, "print(len(POLLER.cards), older.live, card_a._card.live, 'a newer card' in older.counters.value)")
    assert state.split() == ["3", "False", "True", "True"], state

    # a failing poll is logged once, and polling goes on: the live card still counts requests
    run(kernel, "FAULTS[0] = 3; time.sleep(4)")
    logged = run(kernel, "print('\\n'.join(m for m in LOGGED if 'endpoint cards' in m))").strip().splitlines()
    assert len(logged) == 1 and "injected fault" in logged[0], logged
    assert jstream_server.get("stream/card_a").status_code == 200
    counted = run(kernel, "time.sleep(2); print(card_a._card.counters.value)")
    assert "requests: <b>1</b>" in counted, counted

    # removed with .delete(): at once; removed elsewhere (here over REST): at the next poll
    run(kernel, "card_b.delete()")
    httpx.delete(jstream_server.url + "api/stream/endpoints/card_c", headers=jstream_server.headers, timeout=10).raise_for_status()
    state = run(kernel, """
        time.sleep(2)
        for card in (card_b._card, card_c._card):
            print(card.live, 'removed' in card.counters.value, card.try_button.disabled, card.share_button.disabled,
                  '<del class="jupyter-stream-url">' in card.header.value)
        print(sorted(POLLER.cards))
    """).splitlines()
    assert state[:2] == ["False True True True True"] * 2, state
    assert state[2].endswith(", 'card_a')]"), state

    # the last card goes: the thread ends; a new card starts another
    httpx.delete(jstream_server.url + "api/stream/endpoints/card_a", headers=jstream_server.headers, timeout=10).raise_for_status()
    deadline = time.monotonic() + 10
    while card_threads(kernel) != "[]":
        assert time.monotonic() < deadline, "the poller thread outlived its cards"
        time.sleep(0.5)
    kernel.execute("%%stream_endpoint\ndef card_d():\n    yield 'data: x\\n\\n'\n")
    assert card_threads(kernel) == "['jupyter-stream-cards']"
    run(kernel, "card_d.delete()")
