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


@pytest.mark.parametrize("name", ["", "1abc", "a b", "a/b", "x" * 65, "a.b.c", "a.", ".a", "a.1b"])
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


def test_a_line_split_across_frames_stays_whole_and_every_line_is_tagged(capsys):
    from jupyter_stream.client.functions import PrintedLines

    lines = PrintedLines()
    lines.relay({"worker": "worker-18", "print": [["stdout", "line 1\nline 2"]]})
    lines.relay({"worker": "worker-18", "print": [["stdout", " end\nline 3\n"]]})
    assert capsys.readouterr().out == "[w1] line 1\n[w1] line 2 end\n[w1] line 3\n"


def test_lines_of_two_workers_never_run_together(capsys):
    from jupyter_stream.client.functions import PrintedLines

    lines = PrintedLines()
    lines.relay({"worker": "worker-7", "print": [["stdout", "line 1\nli"]]})
    lines.relay({"worker": "worker-2", "print": [["stdout", "line 9\n"]]})
    lines.relay({"worker": "worker-7", "print": [["stdout", "ne 2\nunfinished"]]})
    lines.flush()
    assert capsys.readouterr().out == "[w1] line 1\n[w2] line 9\n[w1] line 2\n[w1] unfinished\n"


def test_gpu_specs_parse_as_modal_writes_them():
    from jupyter_stream.requirements import GpuRequest, format_gpu_spec, parse_gpu_spec

    assert parse_gpu_spec(None) == () and parse_gpu_spec("") == ()
    assert parse_gpu_spec("any") == (GpuRequest(None, 1),)
    assert parse_gpu_spec("2") == parse_gpu_spec(2) == (GpuRequest(None, 2),)
    assert parse_gpu_spec("h100") == (GpuRequest("H100", 1),)
    assert parse_gpu_spec("H100:2") == (GpuRequest("H100", 2),)
    assert parse_gpu_spec(" H100 , a100:2 ") == parse_gpu_spec(["H100", "A100:2"]) == (GpuRequest("H100", 1), GpuRequest("A100", 2))
    assert parse_gpu_spec("any:4") == (GpuRequest(None, 4),)
    assert format_gpu_spec(parse_gpu_spec("h100:1,any")) == "H100,any"
    for bad, message in [
        ("H100:0", "asks for 0 GPUs"), ("H100:", "must be a whole number"), ("H100:two", "must be a whole number"),
        ("H100,", "an empty entry"), ("H 100", "is not a GPU type"), ("0", "asks for 0 GPUs"), ("H100:65", "ask for 1 to 64"),
        ("H100;rm", "is not a GPU type"), (3.5, "must be a string"), ([], "a GPU spec list"), ([None], "a GPU spec list"),
    ]:
        with pytest.raises(ValueError, match=message):
            parse_gpu_spec(bad)


def test_gpu_types_match_device_names_as_whole_words():
    from jupyter_stream.requirements import GpuRequest

    assert GpuRequest("H100", 1).matches("NVIDIA H100 80GB HBM3")
    assert GpuRequest("A100", 1).matches("NVIDIA A100-SXM4-80GB") and GpuRequest("A100-80GB", 1).matches("NVIDIA A100 80GB PCIe") is False
    assert not GpuRequest("A10", 1).matches("NVIDIA A100-SXM4-80GB") and GpuRequest("A10G", 1).matches("NVIDIA A10G")
    assert not GpuRequest("L40", 1).matches("NVIDIA L40S") and GpuRequest("L40S", 1).matches("NVIDIA L40S")
    assert GpuRequest(None, 1).matches("anything at all")


def test_requirements_are_checked_field_by_field():
    from jupyter_stream.requirements import check_requirements, env_pairs, requirement_fields
    from jupyter_stream.signatures import RegistrationError

    assert requirement_fields() == {}
    assert requirement_fields(gpu="h100:2", min_workers=1, max_workers=3, scaledown_window=5, env={"B": "2", "A": "1"}) == {
        "gpu": "H100:2", "min_workers": 1, "max_workers": 3, "scaledown_window": 5.0, "env": {"A": "1", "B": "2"}}
    assert env_pairs(["A=1", "B=x=y"]) == {"A": "1", "B": "x=y"}
    with pytest.raises(ValueError, match="takes KEY=VALUE"):
        env_pairs(["A"])
    for bad, message in [
        ({"min_workers": 3, "max_workers": 2}, "more than --max-workers"), ({"max_workers": 0}, "from 1 to"),
        ({"min_workers": -1}, "from 0 to"), ({"min_workers": True}, "whole number"),
        ({"scaledown_window": 0}, "above 0"), ({"scaledown_window": float("inf")}, "above 0"),
        ({"kernel": "../x"}, "kernelspec name"), ({"env": {"1A": "x"}}, "not an environment variable name"),
        ({"env": {"CUDA_VISIBLE_DEVICES": "0"}}, "set by jupyter-stream"), ({"env": {"A": 1}}, "must be a string"),
        ({"gpus": "any"}, "unknown requirements"), ("any", "must be an object"),
    ]:
        with pytest.raises(RegistrationError, match=message):
            check_requirements(bad)


def test_placement_gives_each_worker_its_own_gpus_and_stops_idle_ones_for_room():
    import dataclasses

    from jupyter_stream.server.gpus import GpuInventory
    from jupyter_stream.server.placement import Placement
    from jupyter_stream.server.pool import WorkerPool

    placement = Placement(max_workers=3, inventory=GpuInventory(["NVIDIA H100 80GB HBM3", "NVIDIA H100 80GB HBM3", "NVIDIA A100"]))
    one = WorkerPool(gpu="H100", placement=placement, max_workers=3)
    two = WorkerPool(gpu="H100:2", placement=placement)
    cpu = WorkerPool(placement=placement)
    first, second = placement.reserve(one), placement.reserve(one)
    assert (first.gpus, second.gpus) == ([0], [1])
    assert placement.reserve(one) is None and one in placement.blocked  # no H100 left: it waits
    assert placement.reserve(two) is None
    seat = placement.reserve(cpu)
    assert seat.gpus == [] and placement.reserve(cpu) is None  # the cap of 3 over all pools

    @dataclasses.dataclass(eq=False)
    class IdleWorker:
        name: str
        pid: int
        pool: WorkerPool
        load: int = 0
        accepting: bool = True

    evicted = []
    for s in (first, second):  # both H100 workers are up and idle
        s.worker = IdleWorker(f"w{s.index}", s.index, one)
        one.workers.append(s.worker)
    one.evict = lambda worker: (evicted.append(worker), one.workers.remove(worker))
    placement.free(seat)  # room under the cap again
    taken = placement.reserve(two)
    assert taken.gpus == [0, 1] and sorted(w.name for w in taken.victims) == ["w1", "w2"] and len(evicted) == 2
    placement.free(first), placement.free(second)
    assert placement.inventory.holders == {0: taken, 1: taken}


def test_a_count_of_any_gpus_takes_one_kind_unless_mixed_is_asked_or_nothing_else_fits(caplog):
    """`--gpu 2` on two H100s and an A100 used to give an H100 and an A100."""
    import logging

    from jupyter_stream.requirements import GpuRequest, parse_gpu_spec
    from jupyter_stream.server.gpus import GpuInventory
    from jupyter_stream.server.placement import Placement
    from jupyter_stream.server.pool import WorkerPool

    assert parse_gpu_spec("mixed:2") == (GpuRequest(None, 2, mixed=True),) and str(GpuRequest(None, 2, True)) == "mixed:2"
    devices = ["NVIDIA A100-SXM4-80GB", "NVIDIA H100 80GB HBM3", "NVIDIA H100 80GB HBM3"]
    placement = Placement(max_workers=8, inventory=GpuInventory(devices))
    two, mixed, one = (WorkerPool(gpu=spec, placement=placement) for spec in ("2", "mixed:2", "any"))
    first = placement.reserve(two)
    assert first.gpus == [1, 2]  # the two H100s, not the A100 and an H100
    placement.free(first)
    assert placement.reserve(one).gpus == [0]  # one of any kind
    placement.inventory.holders.clear()
    held = placement.reserve(WorkerPool(gpu="H100", placement=placement))
    assert held.gpus == [1]
    assert placement.reserve(two) is None  # an A100 and an H100 are free, but two H100s exist: it waits, it does not mix
    assert placement.reserve(mixed).gpus == [0, 2]  # asked for: mixed at once
    # a machine with no two of one kind: mixed, with a log line
    small = Placement(max_workers=8, inventory=GpuInventory(["NVIDIA H100 80GB HBM3", "NVIDIA A100-SXM4-80GB"]))
    with caplog.at_level(logging.INFO, logger="jupyter_stream"):
        assert small.reserve(WorkerPool(gpu="2", placement=small)).gpus == [0, 1]
    assert "no 2 GPUs of one kind on this machine" in caplog.text


def test_tokens_are_scrubbed_from_log_text_also_inside_an_encoded_url():
    from jupyter_stream.server.scrub import scrub

    assert scrub("403 POST /api/kernels?share=abc-DEF_1 (127.0.0.1)") == "403 POST /api/kernels?share=[secret] (127.0.0.1)"
    assert scrub("GET /lab?n=1&TOKEN=f00d ok") == "GET /lab?n=1&TOKEN=[secret] ok"
    assert scrub("302 GET /login?next=%2Flab%3Fshare%3Dabc%2D1%26x%3D2") == "302 GET /login?next=%2Flab%3Fshare%3D[secret]%26x%3D2"
    assert scrub("nothing=secret here") == "nothing=secret here"


def test_a_message_that_cannot_be_sent_fails_the_call_once_its_caller_holds_it():
    """The transport refuses to send a call: the worker is replaced on the next loop turn,
    and the call (already in its caller's hands) ends with WorkerDied, not before."""
    import asyncio

    from jupyter_stream.server.kernels import WorkerKernel

    class Refusing:
        closed = broken = False

        def send(self, data, buffers=None):
            raise OSError("injected: the channel is gone")

    class Owner:
        worker_messages, cancel_grace_period = "auto", 5.0
        replaced: list = []

        def release(self, worker):
            pass

        def replace(self, worker, reason):
            self.replaced.append(reason)
            worker.died(reason)

    async def main():
        worker = WorkerKernel(Owner(), 1, km=None)
        worker.transport, worker.alive = Refusing(), True
        ends = []
        run = worker.start_run("f", b"blob", lambda data, buffers: ends.append(data), mode="values")
        assert ends == [] and not Owner.replaced  # the caller gets its run first
        await asyncio.sleep(0)
        assert Owner.replaced and "could not be sent" in Owner.replaced[0]
        assert run.ended and ends[-1]["error"]["type"] == "WorkerDied"

    asyncio.run(main())


def test_map_items_pack_and_unpack_and_refuse_what_does_not_add_up():
    """Map items' indices, sizes and outcomes travel packed (issue 20): what is packed comes
    back; a frame whose head is short, negative or disagrees with its pickles is refused."""
    from jupyter_stream import wire

    blobs = [b"a", b"", b"ccc"]
    frame = memoryview(wire.pack_items([0, 7, 2**40], map(len, blobs), bytes([1, 0, 2])) + b"".join(blobs))
    indices, sizes, outcomes, pickles = wire.unpack_items(frame, 3, outcomes=True)
    assert (indices, sizes, outcomes) == ([0, 7, 2**40], [1, 0, 3], bytes([1, 0, 2]))
    assert [b.tobytes() for b in wire.split(pickles, sizes)] == blobs and wire.cut(pickles, sizes) == blobs
    assert wire.unpack_items(memoryview(b""), 0, outcomes=False)[:3] == ([], [], b"")
    with pytest.raises(wire.FrameError, match="needs at least 51 bytes, it has 40"):
        wire.unpack_items(frame[:40], 3, outcomes=True)
    with pytest.raises(wire.FrameError, match="whole numbers"):
        wire.unpack_items(memoryview(wire.pack_items([-1], [1]) + b"x"), 1, outcomes=False)
    with pytest.raises(wire.FrameError, match="add up to 2 bytes but the frame holds 1"):
        wire.unpack_items(memoryview(wire.pack_items([0], [2]) + b"x"), 1, outcomes=False)
    with pytest.raises(wire.FrameError, match="the number of its items"):
        wire.unpack_items(frame, True, outcomes=True)
    with pytest.raises(ValueError, match="not a whole number of 8-byte integers"):
        wire.unpack_ints(b"1234")


def test_output_queue_wakes_its_reader_only_for_what_it_must_handle():
    """A chunk the sink wrote needs no reader: waking the relay anyway cost one more event
    loop turn per token. A chunk the sink refused, the start, and the end still wake it."""
    import asyncio

    from jupyter_stream.server.kernels import OutputQueue

    async def main():
        queue = OutputQueue()
        written = []
        queue.sink = lambda chunk: written.append(bytes(chunk)) or True
        waiting = asyncio.ensure_future(queue.wait())
        await asyncio.sleep(0)
        queue({"op": "out", "id": "c1"}, [memoryview(b"tok")])
        await asyncio.sleep(0.01)
        assert written == [b"tok"] and queue.sunk == 1 and not waiting.done()

        queue.sink = lambda chunk: False  # (a write the sink cannot take)
        queue({"op": "out", "id": "c1"}, [memoryview(b"late")])
        assert await asyncio.wait_for(waiting, 1) is True
        assert bytes(queue.take()) == b"late"

        for message in ({"op": "out", "id": "c1", "start": {"status": 200}}, {"op": "out", "id": "c1", "end": True}):
            waiting = asyncio.ensure_future(queue.wait())
            await asyncio.sleep(0)
            queue(message, [])
            assert await asyncio.wait_for(waiting, 1) is True
            queue.take_start()

    asyncio.run(main())
