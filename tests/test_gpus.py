"""GPU placement and per-function pools, against a real server whose inventory is simulated
(two H100s and an A100): workers are real kernels, started with the CUDA_VISIBLE_DEVICES
the placement gives them, which each test reads back from inside the worker."""

import concurrent.futures
import time

import pytest

from jupyter_stream.client.functions import register_function

H100 = "NVIDIA H100 80GB HBM3"
A100 = "NVIDIA A100-SXM4-80GB"
DEVICES = [H100, H100, A100]


def visible(pause: float = 0.0):
    """What the worker sees: its GPUs, the device order, its pid, and when it ran."""
    import os
    import time

    started = time.time()
    time.sleep(pause)
    return {"gpus": os.environ.get("CUDA_VISIBLE_DEVICES"), "order": os.environ.get("CUDA_DEVICE_ORDER"),
            "pid": os.getpid(), "started": started, "ended": time.time()}


def indices(result):
    return [int(i) for i in result["gpus"].split(",")] if result["gpus"] else []


@pytest.fixture
def gpu_server(jstream_start_server):
    return jstream_start_server([
        *(f"--JupyterStream.simulated_gpus={name}" for name in DEVICES),
        "--JupyterStream.min_workers=0", "--JupyterStream.max_workers=6",
        "--JupyterStream.worker_poll_interval=0.2",
    ])


def fn(server, name, **requirements):
    return register_function(visible, name, connection=server.connection, **requirements)


def workers_of(server, gpu):
    return next((p["workers"] for p in server.workers()["pools"] if p["gpu"] == gpu), [])


def test_each_spec_form_lands_on_matching_devices(gpu_server):
    cases = {
        "any": lambda got: len(got) == 1,
        "2": lambda got: len(got) == 2 and len(set(got)) == 2,
        "h100": lambda got: len(got) == 1 and got[0] in (0, 1),  # case-insensitive, matched in the name
        "H100:2": lambda got: got == [0, 1],
        "A100": lambda got: got == [2],
        "A100:2,H100": lambda got: len(got) == 1 and got[0] in (0, 1),  # A100:2 cannot be met here: the fallback
        "a100-sxm4": lambda got: got == [2],
    }
    for i, (spec, ok) in enumerate(cases.items()):
        result = fn(gpu_server, f"f{i}", gpu=spec).remote()
        assert ok(indices(result)), (spec, result)
        assert result["order"] == "PCI_BUS_ID"
    # the decorator's list form is the same fallback list
    assert indices(fn(gpu_server, "listed", gpu=["A100:2", "A100"]).remote()) == [2]
    # a function that asks for no GPU sees none, so it cannot take GPU memory by accident
    assert fn(gpu_server, "cpu").remote()["gpus"] == ""


def test_a_spec_no_device_here_could_meet_fails_at_registration(gpu_server):
    for spec in ("H100:3", "T4", "A10", "4"):
        with pytest.raises(RuntimeError) as caught:
            fn(gpu_server, "never", gpu=spec)
        message = str(caught.value)
        assert f"no GPU here matches {spec.upper()}" in message, message
        assert f"this machine has 3: 0: {H100}, 1: {H100}, 2: {A100}" in message, message
    for spec, error in (("H100:0", "asks for 0 GPUs"), ("H100:x", "must be a whole number"), ("H1 00", "is not a GPU type")):
        with pytest.raises(ValueError, match=error):
            fn(gpu_server, "never", gpu=spec)
    assert "never" not in [f["name"] for f in gpu_server.get("api/stream/functions").json()["functions"]]


def test_one_gpu_calls_run_at_once_on_different_gpus(gpu_server):
    one = fn(gpu_server, "one", gpu="H100", max_workers=2)
    one.remote()  # one warm worker; the second call starts another
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda _: one.remote(1.5), range(2)))
    assert sorted(indices(r)[0] for r in results) == [0, 1], results
    assert results[0]["pid"] != results[1]["pid"]
    overlap = min(r["ended"] for r in results) - max(r["started"] for r in results)
    assert overlap > 0.5, results  # both ran at the same time


def test_a_call_waits_while_its_gpus_are_held_and_runs_when_they_are_freed(gpu_server):
    both = fn(gpu_server, "both", gpu="H100:2")
    one = fn(gpu_server, "one", gpu="H100")
    both.remote()
    holding = both.spawn(3.0)  # both H100s busy for 3 s
    time.sleep(0.5)
    asked = time.time()
    got = one.remote()
    held = holding.get()
    assert indices(held) == [0, 1]
    assert got["started"] >= held["ended"] - 0.05, (got, held)  # it waited for the GPUs...
    assert indices(got)[0] in (0, 1) and got["started"] - asked < 15  # ...and ran once they were free
    # the busy worker was not stopped for it: an idle one was, once its call had ended
    assert "stopping idle worker-" in gpu_server.log()


def test_idle_pools_scale_down_to_their_minimum_and_back_up(gpu_server):
    quick = fn(gpu_server, "quick", gpu="A100", scaledown_window=1.0, max_workers=1)
    kept = fn(gpu_server, "kept", gpu="any", min_workers=1, scaledown_window=1.0)
    first = quick.remote()
    kept_pid = kept.remote()["pid"]
    pools = {p["gpu"]: p for p in gpu_server.workers()["pools"]}
    assert pools["A100"]["scaledown_window"] == 1.0 and pools["A100"]["max_workers"] == 1
    assert pools["any"]["min_workers"] == 1
    deadline = time.monotonic() + 20
    while workers_of(gpu_server, "A100"):
        assert time.monotonic() < deadline, gpu_server.workers()
        time.sleep(0.2)
    assert "idle for" in gpu_server.log()
    time.sleep(1.5)
    assert [w["pid"] for w in workers_of(gpu_server, "any")] == [kept_pid]  # its minimum stays warm
    again = quick.remote()
    assert again["pid"] != first["pid"] and indices(again) == [2]


def test_the_api_lists_pools_workers_and_their_gpus(gpu_server):
    run = fn(gpu_server, "listed", gpu="H100:2", min_workers=1, max_workers=2, scaledown_window=30, env={"MODEL": "tiny"})
    run.remote()
    call = run.spawn(2.0)
    time.sleep(0.5)
    info = gpu_server.workers()
    assert info["simulated_gpus"] is True and [g["name"] for g in info["gpus"]] == DEVICES
    pool = next(p for p in info["pools"] if p["gpu"] == "H100:2")
    assert pool["functions"] == ["listed"] and pool["env"] == ["MODEL"] and "tiny" not in str(info)
    assert pool["name"].endswith("kernel python3, gpu H100:2, env MODEL") and pool["concurrency"] is None
    listed = gpu_server.get("api/stream/functions/listed").json()
    assert listed["requirements"] == {"gpu": "H100:2", "min_workers": 1, "max_workers": 2, "scaledown_window": 30.0,
                                      "env": ["MODEL"]}, listed
    assert (pool["min_workers"], pool["max_workers"], pool["scaledown_window"]) == (1, 2, 30.0)
    assert pool["kernel_name"] == "python3" and pool["waiting_calls"] == 0
    worker = next(w for w in pool["workers"] if w["state"] == "busy")
    assert worker["pid"] > 0 and worker["rss"] > 10 << 20 and worker["idle_since"] is None
    assert [(g["index"], g["name"]) for g in worker["gpus"]] == [(0, H100), (1, H100)]
    assert all(g["uuid"].startswith("GPU-") and g["memory_total"] == 80 << 30 for g in worker["gpus"])
    assert {g["index"]: g["held_by"] for g in info["gpus"]} == {0: worker["name"], 1: worker["name"], 2: None}
    call.get()
    idle = next(w for w in workers_of(gpu_server, "H100:2") if w["pid"] == worker["pid"])
    assert idle["state"] == "idle" and idle["idle_since"] <= time.time()


def test_re_registering_with_new_requirements_moves_the_function_without_breaking_calls(gpu_server):
    moving = fn(gpu_server, "moving", gpu="H100")
    moving.remote()
    in_flight = moving.spawn(2.0)
    time.sleep(0.5)
    moved = fn(gpu_server, "moving", gpu="A100")
    assert indices(in_flight.get())[0] in (0, 1)  # the call in flight finished where it started
    assert indices(moved.remote()) == [2]
    pools = {p["gpu"]: p["functions"] for p in gpu_server.workers()["pools"]}
    assert pools["A100"] == ["moving"] and pools["H100"] == []


def test_a_pool_nothing_uses_is_forgotten_once_its_workers_are_gone(gpu_server):
    """Every GPU spec a function ever had used to stay listed in /api/stream/workers."""
    fn(gpu_server, "fickle", gpu="A100", scaledown_window=1).remote()
    fn(gpu_server, "fickle", gpu="H100", scaledown_window=1).remote()
    deadline = time.monotonic() + 30
    while "A100" in [p["gpu"] for p in gpu_server.workers()["pools"]]:
        assert time.monotonic() < deadline, gpu_server.workers()["pools"]
        time.sleep(0.2)
    assert [p["functions"] for p in gpu_server.workers()["pools"] if p["gpu"] == "H100"] == [["fickle"]]
    assert "forgot pool [kernel python3, gpu A100]" in gpu_server.log()


def test_env_and_kernel_requirements(gpu_server):
    def env_of(name):
        import os

        return os.environ.get(name)

    plain = register_function(env_of, "plain", connection=gpu_server.connection)
    tagged = register_function(env_of, "tagged", connection=gpu_server.connection, env={"STAGE": "test"}, kernel="python3")
    assert tagged.remote("STAGE") == "test" and plain.remote("STAGE") is None
    with pytest.raises(RuntimeError, match="no kernelspec named 'nope'"):
        register_function(env_of, "nokernel", connection=gpu_server.connection, kernel="nope")
    with pytest.raises(ValueError, match="CUDA_VISIBLE_DEVICES is set by jupyter-stream"):
        register_function(env_of, "sneaky", connection=gpu_server.connection, env={"CUDA_VISIBLE_DEVICES": "0"})


def gpu_stream():
    import os

    yield f"data: {os.environ.get('CUDA_VISIBLE_DEVICES')}\n\n"


def test_endpoints_take_the_same_requirements(gpu_server):
    from jupyter_stream.client.endpoints import register_endpoint

    register_endpoint(gpu_stream, "on_a100", connection=gpu_server.connection, gpu="A100")
    register_endpoint(gpu_stream, "on_cpu", connection=gpu_server.connection)
    assert gpu_server.get("stream/on_a100").text == "data: 2\n\n"
    assert gpu_server.get("stream/on_cpu").text == "data: \n\n"
    pools = {p["gpu"]: p["endpoints"] for p in gpu_server.workers()["pools"]}
    assert pools["A100"] == ["on_a100"] and "on_cpu" in pools[None]


def test_the_magics_take_requirements_and_refuse_what_the_machine_lacks(jstream_server, jstream_notebook_kernel):
    kernel = jstream_notebook_kernel
    kernel.execute("%load_ext jupyter_stream")
    outputs, reply = kernel.execute("%%stream_function --gpu H100:3\ndef big():\n    return 1\n")
    text = kernel.text(outputs)
    assert reply["status"] == "error" and "no GPU here matches H100:3; this machine has no GPU" in text, text
    outputs, reply = kernel.execute("%%stream_function --gpu H100:0\ndef big():\n    return 1\n")
    assert reply["status"] == "error" and "asks for 0 GPUs" in kernel.text(outputs)
    cell = ("%%stream_function --min-workers 0 --max-workers 2 --scaledown-window 5 --env STAGE=dev --env MODE=a=b --kernel python3\n"
            "def env_of(name):\n    import os\n    return os.environ.get(name)\n")
    outputs, reply = kernel.execute(cell)
    assert reply["status"] == "ok", kernel.text(outputs)
    outputs, reply = kernel.execute("print(env_of.remote('STAGE'), env_of.remote('MODE'), repr(env_of.remote('CUDA_VISIBLE_DEVICES')))")
    assert kernel.text(outputs).strip() == "dev a=b ''", kernel.text(outputs)
    pool = next(p for p in jstream_server.workers()["pools"] if "env_of" in p["functions"])
    assert pool["env"] == ["MODE", "STAGE"] and (pool["max_workers"], pool["scaledown_window"]) == (2, 5.0)
