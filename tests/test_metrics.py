"""Prometheus metrics on jupyter-server's own `/metrics`: scraped before and after a stream,
a failing request, a 503 and a map, each counter moves by exactly what happened."""

import threading
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from jupyter_stream.client.endpoints import register_endpoint
from jupyter_stream.client.functions import register_function


def scrape(server) -> dict[tuple, float]:
    r = httpx.get(server.url + "metrics", headers=server.headers, timeout=10)
    assert r.status_code == 200, r.text
    samples = {}
    for family in text_string_to_metric_families(r.text):
        for sample in family.samples:
            if sample.name.startswith("jupyter_stream_"):
                samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples, name, **labels):
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


@pytest.fixture(scope="module")
def server(jstream_start_server):
    return jstream_start_server(["--JupyterStream.min_workers=1", "--JupyterStream.max_workers=3",
                                 "--JupyterStream.simulated_gpus=NVIDIA H100 80GB HBM3"])


def counted(n: int = 3):
    for i in range(n):
        yield f"data: {i}\n\n"


def broken():
    raise RuntimeError("on purpose")


def hold(seconds: float = 3.0):
    import time

    time.sleep(seconds)
    return "held"


def test_each_counter_moves_by_exactly_what_happened(server):
    register_endpoint(counted, connection=server.connection)
    register_endpoint(broken, connection=server.connection)
    register_endpoint(hold, connection=server.connection, max_workers=1, queue_timeout=1, env={"POOL": "held"})

    def square(x):
        return x * x

    f = register_function(square, connection=server.connection)
    server.get("stream/counted")  # warm: the series exist
    before = scrape(server)

    body = server.get("stream/counted?n=4").text
    assert server.get("stream/broken").status_code == 500
    holding = threading.Thread(target=lambda: server.get("stream/hold"))
    holding.start()
    time.sleep(0.5)
    assert server.get("stream/hold").status_code == 503  # waited its 1 s queue timeout behind the held one
    holding.join(30)
    assert list(f.map(range(25))) == [x * x for x in range(25)]
    shared = server.connection.request("POST", "api/stream/shares", json={"endpoint": "counted"}).json()
    assert httpx.get(shared["url"], timeout=10).status_code == 200
    after = scrape(server)

    def moved(name, **labels):
        return value(after, name, **labels) - value(before, name, **labels)

    assert moved("jupyter_stream_requests_total", endpoint="counted", status="200") == 2  # ours and the share's
    assert moved("jupyter_stream_requests_total", endpoint="broken", status="500") == 1
    assert moved("jupyter_stream_requests_total", endpoint="hold", status="503") == 1
    assert moved("jupyter_stream_requests_total", endpoint="hold", status="200") == 1
    assert moved("jupyter_stream_queue_timeouts_total", endpoint="hold") == 1
    assert moved("jupyter_stream_sent_bytes_total", endpoint="counted") == len(body) + len("data: 0\n\ndata: 1\n\ndata: 2\n\n")
    assert moved("jupyter_stream_time_to_first_byte_seconds_count", endpoint="counted") == 2
    assert moved("jupyter_stream_request_duration_seconds_count", endpoint="counted") == 2
    assert moved("jupyter_stream_share_requests_total", endpoint="counted") == 1
    assert moved("jupyter_stream_calls_total", function="square", outcome="done") == 1
    assert moved("jupyter_stream_map_items_total", function="square", outcome="done") == 25
    assert moved("jupyter_stream_map_items_total", function="square", outcome="failed") == 0
    assert moved("jupyter_stream_stream_errors_total", endpoint="broken") == 0  # it failed before its response began
    pools = {dict(labels)["pool"] for (name, labels) in after if name == "jupyter_stream_workers"}
    assert any("env POOL" in p for p in pools), pools
    assert value(after, "jupyter_stream_gpu_memory_total_bytes", gpu="0", model="NVIDIA H100 80GB HBM3") == 80 << 30
    assert value(after, "jupyter_stream_open_streams", endpoint="counted") == 0
    text = httpx.get(server.url + "metrics", headers=server.headers, timeout=10).text
    assert shared["token"] not in text and "127.0.0.1" not in text  # no unbounded labels


def test_metrics_need_jupyters_auth(server):
    assert httpx.get(server.url + "metrics", timeout=10).status_code == 403
